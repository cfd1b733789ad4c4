"""The Attentive Reader (Hermann et al. 2015, §4) and its batch-normalised variants
(Cooijmans §5.4, Appendix C).

    y_d(t) = [fwd LSTM(d)_t ; bwd LSTM(d)_t]                 document states   (T, N, 2H)
    u      = [fwd LSTM(q) at the last token ; bwd at the first]   query         (N, 2H)
    m(t)   = tanh(W_ym y_d(t) + W_um u + b_m)                                  (T, N, A)
    s(t)   = softmax_t(w_ms^T m(t)) over the unpadded positions                (T, N)
    r      = sum_t s(t) y_d(t)                                                 (N, 2H)
    g      = tanh(W_rg r + W_ug u + b_g)                                       (N, G)
    p(a)   = softmax over the example's candidate entities of W_out g         (N, E)

The five models (``READER_MODELS``; what each name means: `bnrnn_experiments.config.MODELS`):

- ``lstm``: `torch.nn.LSTM`, bidirectional, over packed sequences.
- ``bnlstm``: the LSTMs replaced by BN-LSTM (Cooijmans eq. 6-8), frame-wise statistics.
- ``bn-everywhere``: also BN on each of the four terms inside the two tanh (W_ym y_d(t),
  W_um u, W_rg r, W_ug u), padded document positions excluded from the statistics of
  W_ym y_d(t) and from the attention softmax.
- ``bn-e*``: as bn-everywhere, with sequence-wise statistics for the input terms W_ih x of
  the LSTMs (Laurent eq. 20-21), frame-wise for the recurrent terms and the cell.
- ``bn-e**``: as bn-e*, with the backward LSTMs reading only the unpadded part reversed.

How the backward LSTM reads a padded batch is the one difference between bn-e* and bn-e**.
Cooijmans §5.4: "it is common to simply reverse the padded sequences, thus moving the
padding to the front", with the states "not updated based on padded regions", so that a
sequence's state stays at h_0 = 0 while its front padding goes by and the frame-wise
statistics of those first steps see rows with no variance. `bnrnn.BNLSTM` always reverses
the unpadded part only (bn-e**), so the other BN models use `PaddedReverseBNLSTM`, written
here with the library's step function and `StepBatchNorm`, for their backward direction.
Their forward direction is `bnrnn.BNLSTM` with ``lengths``. For the plain LSTM both ways of
reversing give the same outputs (no statistics couple the rows, and a state held at zero
through the front padding starts the sequence exactly as h_0 does), so ``lstm`` uses
`torch.nn.LSTM` over packed sequences.

Consequence, tested in ``tests/experiments/test_qa_model.py``: ``lstm`` and ``bn-e**`` give
the same outputs whatever the padding; the other three depend on how much padding a batch
has (through their backward statistics: this is the flaw bn-e** removes), but never on the
values at padded positions, and their attention and its statistics ignore padded positions.
"""

from __future__ import annotations

import functools
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

import bnrnn
from bnrnn import StepBatchNorm, StepNorms, lstm_step
from bnrnn.init import init_direction
from bnrnn.packing import batch_sizes_of, present_steps

from ..config import MODELS
from ..specs import ModelSpec
from .presets import READER_MODELS

__all__ = [
    "AttentiveReader",
    "BiEncoder",
    "PaddedReverseBNLSTM",
    "reader_lstm",
    "sequence_batch_norm",
]


def sequence_batch_norm(bn: StepBatchNorm, z: Tensor, lengths: Tensor) -> Tensor:
    """`StepBatchNorm.sequence` for rows in any order: one mean and variance over the
    unpadded frames of ``z`` (T, N, F), padded frames (t >= lengths[n]) excluded.

    Padded frames of the result hold normalised garbage; the caller masks them.
    """
    lengths = lengths.to("cpu")
    sorted_lengths, order = torch.sort(lengths, descending=True, stable=True)
    inverse = torch.empty_like(order)
    inverse[order] = torch.arange(len(order))
    out = bn.sequence(
        z.index_select(1, order.to(z.device)), batch_sizes_of(sorted_lengths, z.shape[0])
    )
    return out.index_select(1, inverse.to(z.device))


class PaddedReverseBNLSTM(nn.Module):
    """The backward direction of a bidirectional BN-LSTM that reverses the *padded* batch
    (Cooijmans §5.4, the common practice bn-e** corrects): the padding of each sequence comes
    first, during which its state is held at h_0 = c_0 = 0 (not updated from padding) while
    its row still enters every frame-wise statistic (as a masked minibatch computation
    does). Statistics of step t are over all N rows at padded position t, and population
    statistics are indexed by t; so the result depends on how much padding the batch has.

    Equations are Cooijmans eq. 6-8 (`bnrnn.lstm_step`). ``input_stats="sequence"``: one
    mean and variance of W_ih x over the unpadded frames (Laurent eq. 20-21; the padding's
    zeros do not bias it, which is what bn-e* fixes); ``"frame"``: per step over all rows,
    zeros of the padding included.

    Parameters as one direction of `torch.nn.LSTM`: weight_ih (4H, I), weight_hh (4H, H),
    bias_ih, bias_hh (4H,), gates (i, f, g, o); BN modules bn_ih, bn_hh (4H features, no
    shift) and bn_c (H features, with shift).

    forward(x (T, N, I) zero-padded at the end, lengths (N,)) -> (output (T, N, H) in the
    input's time order, zero at padded positions; (h_n, c_n) each (N, H), the state after
    reading each sequence back to its first token).
    """

    def __init__(
        self,
        input_size: int,
        hidden_size: int,
        input_stats: str = "frame",
        max_length: int = 100,
        momentum: float | None = 0.1,
        eps: float = 1e-5,
        gamma_init: float = 0.1,
        weight_init: str = "orthogonal",
        forget_bias: float = 0.0,
    ) -> None:
        super().__init__()
        if input_stats not in ("frame", "sequence"):
            raise ValueError(f"input_stats must be 'frame' or 'sequence', got {input_stats!r}")
        G = 4 * hidden_size
        self.input_size = input_size
        self.hidden_size = hidden_size
        self.input_stats = input_stats
        self.weight_init = weight_init
        self.forget_bias = forget_bias
        self.weight_ih = nn.Parameter(torch.empty(G, input_size))
        self.weight_hh = nn.Parameter(torch.empty(G, hidden_size))
        self.bias_ih = nn.Parameter(torch.empty(G))
        self.bias_hh = nn.Parameter(torch.empty(G))
        kw = {"eps": eps, "momentum": momentum, "gamma_init": gamma_init}
        rows = 1 if input_stats == "sequence" else max_length
        self.bn_ih = StepBatchNorm(G, rows, **kw)
        self.bn_hh = StepBatchNorm(G, max_length, **kw)
        self.bn_c = StepBatchNorm(hidden_size, max_length, shift=True, **kw)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        init_direction(
            self.weight_ih,
            self.weight_hh,
            self.bias_ih,
            self.bias_hh,
            self.weight_init,
            4,
            self.forget_bias,
        )
        for bn in (self.bn_ih, self.bn_hh, self.bn_c):
            bn.reset_parameters()

    def extra_repr(self) -> str:
        return f"{self.input_size}, {self.hidden_size}, input_stats={self.input_stats!r}"

    def forward(self, x: Tensor, lengths: Tensor) -> tuple[Tensor, tuple[Tensor, Tensor]]:
        T, N, _ = x.shape
        present = present_steps(lengths, T, x.device)  # (T, N)
        x = torch.where(present[..., None], x, 0)
        wx = F.linear(x, self.weight_ih)  # (T, N, 4H)
        if self.input_stats == "sequence":
            wx = sequence_batch_norm(self.bn_ih, wx, lengths)  # Laurent eq. 20-21
        wx, mask = wx.flip(0), present.flip(0)  # the padding now comes first
        if self.input_stats == "frame":
            wx = self.bn_ih.frames(wx, [N] * T)  # every row, the padding's zeros included
        bias = self.bias_ih + self.bias_hh
        h = x.new_zeros(N, self.hidden_size)
        c = x.new_zeros(N, self.hidden_size)
        # Frame-wise statistics of W_hh h and c over all N rows at every step. They are
        # computed here and folded into the population rows once after the loop (the
        # same update as `StepBatchNorm.step` per step, which is slow in a Python loop).
        batch_stats = self.bn_hh.uses_batch_stats and N >= 2
        seen: dict[str, list[tuple[Tensor, Tensor]]] = {"hh": [], "c": []}
        outputs = []
        for t, (wx_t, m_t) in enumerate(zip(wx.unbind(0), mask.unbind(0))):
            norms = StepNorms(
                hh=functools.partial(self._norm, "hh", t, batch_stats, seen),
                c=functools.partial(self._norm, "c", t, batch_stats, seen),
            )
            h_new, c_new = lstm_step(wx_t, (h, c), self.weight_hh, bias, norms)  # (N, H)
            m = m_t[:, None]
            h = torch.where(m, h_new, h)  # padding does not update the state
            c = torch.where(m, c_new, c)
            outputs.append(torch.where(m, h_new, 0))
        if batch_stats:
            for key, stats in seen.items():
                _track_steps(getattr(self, f"bn_{key}"), stats, N)
        return torch.stack(outputs).flip(0), (h, c)

    def _norm(
        self,
        key: str,
        t: int,
        batch_stats: bool,
        seen: dict[str, list[tuple[Tensor, Tensor]]],
        z: Tensor,
    ) -> Tensor:
        """BN of step ``t`` of ``bn_{key}`` over all rows of ``z`` (n, F)."""
        bn: StepBatchNorm = getattr(self, f"bn_{key}")
        if batch_stats:
            mean, var = z.mean(0), z.var(0, unbiased=False)
            seen[key].append((mean.detach(), var.detach()))
        else:
            row = bn.population_row(t)  # Cooijmans §3: the last tracked row beyond T_max
            mean, var = bn.running_mean[row], bn.running_var[row]
        out = (z - mean) * torch.rsqrt(var + bn.eps) * bn.weight
        return out if bn.bias is None else out + bn.bias


@torch.no_grad()
def _track_steps(bn: StepBatchNorm, stats: list[tuple[Tensor, Tensor]], n: int) -> None:
    """Fold the batch statistics (mean, biased variance) of steps 0..len(stats)-1, each over
    ``n`` rows, into the population rows of ``bn`` in one call of its own update rule."""
    if not stats:
        return
    mean = torch.stack([m for m, _ in stats])  # (k, F)
    var = torch.stack([v for _, v in stats])
    bn._track(torch.arange(len(stats)), mean, var, [n] * len(stats))


class _PackedLSTM(nn.LSTM):
    """`torch.nn.LSTM` over packed sequences: forward(x (T, N, I), lengths (N,)) -> (y
    (T, N, D*H), zero at padded positions; (h_n, c_n) each (D, N, H) at each sequence's own
    ends)."""

    def forward(self, x: Tensor, lengths: Tensor) -> tuple[Tensor, tuple[Tensor, Tensor]]:  # type: ignore[override]
        packed = pack_padded_sequence(x, lengths.to("cpu"), enforce_sorted=False)
        out, state = super().forward(packed)
        y, _ = pad_packed_sequence(out, total_length=x.shape[0])
        return y, state


class _PaddedReverseBiLSTM(nn.Module):
    """A bidirectional BN-LSTM whose backward direction reverses the padded batch: forward
    `bnrnn.BNLSTM` with the lengths, backward `PaddedReverseBNLSTM`. The contract of
    ``bnrnn.BNLSTM(bidirectional=True)`` with ``lengths``."""

    def __init__(self, input_size: int, hidden_size: int, **kw: Any) -> None:
        super().__init__()
        self.forward_lstm = bnrnn.BNLSTM(input_size, hidden_size, **kw)
        del kw["norm"]
        self.backward_lstm = PaddedReverseBNLSTM(input_size, hidden_size, **kw)

    def forward(self, x: Tensor, lengths: Tensor) -> tuple[Tensor, tuple[Tensor, Tensor]]:
        y_f, (h_f, c_f) = self.forward_lstm(x, lengths=lengths)  # (T, N, H), (1, N, H)
        y_b, (h_b, c_b) = self.backward_lstm(x, lengths)  # (T, N, H), (N, H)
        return torch.cat([y_f, y_b], -1), (torch.cat([h_f, h_b[None]]), torch.cat([c_f, c_b[None]]))


def reader_lstm(
    spec: ModelSpec, input_size: int, hidden_size: int, input_stats: str = "frame", **kw: Any
) -> nn.Module:
    """The bidirectional one-layer LSTM of a reader ``spec`` (the one place a reader's
    recurrent layers are built): `torch.nn.LSTM` over packed sequences without BN, else a
    BN-LSTM (``spec.norm``) whose backward direction reads the batch as ``spec.reverse``
    says. ``input_stats``: of W_ih x, unless the model fixes it (``spec.input_stats``).
    ``kw``: max_length, momentum, eps, gamma_init, weight_init, forget_bias, as
    `bnrnn.BNLSTM` takes them (the plain LSTM uses the last two).

    forward(x (T, N, I), lengths (N,)) -> (y (T, N, 2H), zero at padded positions;
    (h_n, c_n) each (2, N, H): forward state at each sequence's last token, backward state
    at its first).
    """
    if spec.norm is None:
        lstm = _PackedLSTM(input_size, hidden_size, bidirectional=True)
        for sfx in ("_l0", "_l0_reverse"):
            w = [getattr(lstm, n + sfx) for n in ("weight_ih", "weight_hh", "bias_ih", "bias_hh")]
            init_direction(*w, kw["weight_init"], 4, kw["forget_bias"])
        return lstm
    bn = {"norm": spec.norm, "input_stats": spec.input_stats or input_stats, **kw}
    if spec.reverse == "unpadded":
        return bnrnn.BNLSTM(input_size, hidden_size, bidirectional=True, **bn)
    return _PaddedReverseBiLSTM(input_size, hidden_size, **bn)


class BiEncoder(nn.Module):
    """The reader's bidirectional LSTM (`reader_lstm`) over a padded batch.

    forward(x (T, N, I), lengths (N,)) -> (y (T, N, 2H), zero at padded positions;
    final (N, 2H) = [forward state at each sequence's last token ; backward state at its
    first token]).
    """

    def __init__(self, spec: ModelSpec, input_size: int, hidden_size: int, **kw: Any) -> None:
        super().__init__()
        self.hidden_size = hidden_size
        self.lstm = reader_lstm(spec, input_size, hidden_size, **kw)

    def forward(self, x: Tensor, lengths: Tensor) -> tuple[Tensor, Tensor]:
        y, (h_n, _) = self.lstm(x, lengths=lengths)
        return y, torch.cat([h_n[0], h_n[1]], -1)


class _TanhSum(nn.Module):
    """tanh(BN(W_a a) + BN(W_b b) + bias), or tanh(W_a a + W_b b + bias) without BN.

    ``a`` is (T, N, Da) with ``lengths`` (BN statistics over its unpadded frames,
    sequence-wise) or (N, Da); ``b`` is (N, Db). Each BN has its own statistics and scale,
    no shift: the bias is the shift (Cooijmans §3); gamma starts at ``gamma_init``
    (Cooijmans §4: 0.1).
    """

    def __init__(
        self,
        in_a: int,
        in_b: int,
        out: int,
        bn: bool,
        momentum: float | None,
        eps: float,
        gamma_init: float,
    ) -> None:
        super().__init__()
        self.proj_a = nn.Linear(in_a, out, bias=False)
        self.proj_b = nn.Linear(in_b, out, bias=False)
        self.bias = nn.Parameter(torch.zeros(out))
        kw = {"max_length": 1, "eps": eps, "momentum": momentum, "gamma_init": gamma_init}
        self.bn_a = StepBatchNorm(out, **kw) if bn else None
        self.bn_b = StepBatchNorm(out, **kw) if bn else None

    def forward(self, a: Tensor, b: Tensor, lengths: Tensor | None = None) -> Tensor:
        za, zb = self.proj_a(a), self.proj_b(b)
        if self.bn_a is not None and self.bn_b is not None:
            if lengths is None:
                za = self.bn_a.step(za, 0)
            else:
                za = sequence_batch_norm(self.bn_a, za, lengths)
            zb = self.bn_b.step(zb, 0)
        if za.dim() == 3:
            zb = zb[None]
        return torch.tanh(za + zb + self.bias)


class AttentiveReader(nn.Module):
    """The Attentive Reader of Hermann et al. (2015) with the variants of Cooijmans §5.4.

    Args:
        vocab_size: token vocabulary (id 0 is padding).
        num_entities: E, the output classes ``@entity0 .. @entity{E-1}``.
        model: one of ``READER_MODELS``.
        embed_size, hidden_size: word embedding size and H, the units of each LSTM
            direction (Cooijmans Appendix C: 240).
        attention_size: A, the size of m(t) and of g (default: H).
        input_stats: statistics of the LSTMs' input terms where the model does not fix them
            (bnlstm, bn-everywhere; ``"frame"`` in the paper).
        max_length: steps with their own BN population statistics.
        momentum, eps, gamma_init: of every BN.
        weight_init: of the LSTMs ("orthogonal" by default, Cooijmans §5); the other
            matrices are orthogonal unless "uniform" (then torch's defaults).
        forget_bias: initial forget-gate bias; dropout: on the word embeddings.
        tie_entities: (choice) score entity a as ``emb(@entity_a) . (W_out g)`` with the
            input embedding of its placeholder instead of Hermann et al.'s free output
            vector ``W(a) . g``. Free vectors must each learn to match their placeholder's
            embedding before any answer beats chance, which takes long; tying removes that
            phase. ``entity_offset``: vocabulary id of ``@entity0`` (used when tied).

    forward(document (T_d, N), doc_lengths (N,), query (T_q, N), query_lengths (N,),
    candidates (N, E) bool) -> logits (N, E), ``-inf`` outside each example's candidates.
    """

    def __init__(
        self,
        vocab_size: int,
        num_entities: int,
        model: str = "lstm",
        input_stats: str = "frame",
        embed_size: int = 64,
        hidden_size: int = 64,
        attention_size: int = 0,
        max_length: int = 256,
        momentum: float | None = 0.1,
        eps: float = 1e-5,
        gamma_init: float = 0.1,
        weight_init: str = "orthogonal",
        forget_bias: float = 0.0,
        dropout: float = 0.0,
        tie_entities: bool = False,
        entity_offset: int = 3,
    ) -> None:
        super().__init__()
        if model not in READER_MODELS:
            raise ValueError(f"model must be one of {', '.join(READER_MODELS)}, got {model!r}")
        self.model = model
        self.spec = v = MODELS[model]
        self.num_entities = num_entities
        H, A = hidden_size, attention_size or hidden_size
        enc = {
            "input_stats": input_stats,
            "max_length": max_length,
            "momentum": momentum,
            "eps": eps,
            "gamma_init": gamma_init,
            "weight_init": weight_init,
            "forget_bias": forget_bias,
        }
        bn = {"bn": v.bn_attention, "momentum": momentum, "eps": eps, "gamma_init": gamma_init}
        self.embed = nn.Embedding(vocab_size, embed_size, padding_idx=0)
        self.drop = nn.Dropout(dropout)
        self.doc_encoder = BiEncoder(v, embed_size, H, **enc)
        self.query_encoder = BiEncoder(v, embed_size, H, **enc)
        self.attend_m = _TanhSum(2 * H, 2 * H, A, **bn)  # m(t) = tanh(W_ym y_d(t) + W_um u)
        self.score = nn.Linear(A, 1, bias=False)  # w_ms
        self.attend_g = _TanhSum(2 * H, 2 * H, A, **bn)  # g = tanh(W_rg r + W_ug u)
        self.tie_entities = tie_entities
        self.entity_offset = entity_offset
        if tie_entities:
            if entity_offset + num_entities > vocab_size:
                raise ValueError(
                    f"entity_offset + num_entities ({entity_offset} + {num_entities}) exceeds "
                    f"vocab_size {vocab_size}"
                )
            self.output = nn.Linear(A, embed_size)  # g -> embedding space
        else:
            self.output = nn.Linear(A, num_entities)  # Hermann et al.: W(a) . g
        with torch.no_grad():
            # (choice) embeddings keep torch's N(0, 1): the paper gives no scale, and with
            # N(0, 0.1) the plain LSTM barely sees its input in a short run (the BN models
            # normalise W_ih x and do not care); row 0 (padding) is zero.
            if weight_init != "uniform":  # Cooijmans §5: orthogonal weight matrices
                for lin in (
                    self.attend_m.proj_a,
                    self.attend_m.proj_b,
                    self.attend_g.proj_a,
                    self.attend_g.proj_b,
                    self.score,
                    self.output,
                ):
                    nn.init.orthogonal_(lin.weight)
                nn.init.zeros_(self.output.bias)

    def extra_repr(self) -> str:
        tied = ", tie_entities=True" if self.tie_entities else ""
        return f"model={self.model!r}, num_entities={self.num_entities}{tied}"

    def encode(self, tokens: Tensor, lengths: Tensor, encoder: BiEncoder) -> tuple[Tensor, Tensor]:
        present = present_steps(lengths, tokens.shape[0], tokens.device)  # (T, N)
        x = self.drop(self.embed(tokens)) * present[..., None]  # (T, N, E), zero at padding
        return encoder(x, lengths)

    def attend(self, y_d: Tensor, doc_lengths: Tensor, u: Tensor) -> tuple[Tensor, Tensor]:
        """Attention over the document states: (g (N, A), s (T, N)), padded positions of
        ``y_d`` (T, N, 2H) excluded from the softmax and from the BN statistics."""
        present = present_steps(doc_lengths, y_d.shape[0], y_d.device)  # (T, N)
        m = self.attend_m(y_d, u, doc_lengths)  # (T, N, A)
        e = self.score(m).squeeze(-1).masked_fill(~present, float("-inf"))  # (T, N)
        s = torch.softmax(e, 0)
        r = (s[..., None] * torch.where(present[..., None], y_d, 0)).sum(0)  # (N, 2H)
        return self.attend_g(r, u), s

    def forward(
        self,
        document: Tensor,
        doc_lengths: Tensor,
        query: Tensor,
        query_lengths: Tensor,
        candidates: Tensor,
    ) -> Tensor:
        y_d, _ = self.encode(document, doc_lengths, self.doc_encoder)  # (T_d, N, 2H)
        _, u = self.encode(query, query_lengths, self.query_encoder)  # (N, 2H)
        g, _ = self.attend(y_d, doc_lengths, u)  # (N, A)
        if self.tie_entities:
            k = self.entity_offset
            logits = self.output(g) @ self.embed.weight[k : k + self.num_entities].t()  # (N, E)
        else:
            logits = self.output(g)  # (N, E)
        return logits.masked_fill(~candidates, float("-inf"))
