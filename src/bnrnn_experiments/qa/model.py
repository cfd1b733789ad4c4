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

- ``lstm``: the plain bidirectional LSTM (`bnrnn.BNLSTM` with ``norm=None``: `torch.nn.LSTM`).
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
statistics of those first steps see rows with no variance. That is
``bnrnn.BNLSTM(reverse="padded")``, which bnlstm, bn-everywhere and bn-e* use; bn-e** uses
the default ``reverse="unpadded"`` (each sequence's own part reversed). Every reader's LSTMs
are `bnrnn.BNLSTM` (``lstm``: ``norm=None``, the equations of `torch.nn.LSTM`; for it both
ways of reversing give the same outputs: no statistics couple the rows, and a state held at
zero through the front padding starts the sequence exactly as h_0 does).

Consequence, tested in ``tests/experiments/test_qa_model.py``: ``lstm`` and ``bn-e**`` give
the same outputs whatever the padding; the other three depend on how much padding a batch
has (through their backward statistics: this is the flaw bn-e** removes), but never on the
values at padded positions, and their attention and its statistics ignore padded positions.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

import bnrnn
from bnrnn import StepBatchNorm
from bnrnn.packing import batch_sizes_of, present_steps

from ..config import MODELS
from ..specs import ModelSpec
from .presets import READER_MODELS

__all__ = [
    "AttentiveReader",
    "BiEncoder",
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


def reader_lstm(
    spec: ModelSpec, input_size: int, hidden_size: int, input_stats: str = "frame", **kw: Any
) -> bnrnn.BNLSTM:
    """The bidirectional one-layer LSTM of a reader ``spec`` (the one place a reader's
    recurrent layers are built): `bnrnn.BNLSTM` with ``spec.norm`` (None: the plain LSTM,
    `torch.nn.LSTM`'s equations) whose backward direction reads a padded batch as
    ``spec.reverse`` says (Cooijmans §5.4). ``input_stats``: of W_ih x, unless the model
    fixes it (``spec.input_stats``). ``kw``: max_length, momentum, eps, gamma_init,
    weight_init, forget_bias, as `bnrnn.BNLSTM` takes them.

    forward(x (T, N, I), lengths=(N,)) -> (y (T, N, 2H), zero at padded positions;
    (h_n, c_n) each (2, N, H): forward state at each sequence's last token, backward state
    at its first).
    """
    stats = (spec.input_stats or input_stats) if spec.norm is not None else "frame"
    return bnrnn.BNLSTM(
        input_size,
        hidden_size,
        bidirectional=True,
        norm=spec.norm,
        input_stats=stats,
        reverse=spec.reverse,
        **kw,
    )


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
