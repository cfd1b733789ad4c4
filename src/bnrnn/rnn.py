"""`BNLSTM` and `BNRNN`: multi-layer, bidirectional, batch-normalised recurrent layers with
the `torch.nn.LSTM` / `torch.nn.RNN` contract (arguments, parameter names, inputs, outputs).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils.rnn import PackedSequence

from .checks import check_layer_args, finite, positive_int, warn_user
from .functional import State, lstm_step, rnn_step
from .init import WEIGHT_INITS, init_direction
from .layernorm import StepLayerNorm
from .norm import StepBatchNorm, group_batch_sizes
from .packing import SortedBatch, prepare_input, reverse_padded, unpadded
from .placement import (
    build_norms,
    check_placement,
    default_gamma_init,
    needs_batch_of_two,
    norm_prefix,
)
from .reference import DirectionParams, StepFn, reference_direction

IMPLS = ("auto", "fast", "reference")
# How the reverse direction reads a padded batch (Cooijmans §5.4): each sequence's own part
# reversed, or the padded batch flipped whole (the padding first).
REVERSES = ("unpadded", "padded")
# Deprecated names of an impl, accepted with a FutureWarning: "fused" is "fast".
_DEPRECATED_IMPLS = {"fused": "fast"}


class _BNRNNBase(nn.Module):
    """Shared machinery; subclasses fix the step function, gate count and state arity."""

    _gates: int
    _has_cell: bool

    def __init__(
        self,
        input_size: int,
        hidden_size: int,
        num_layers: int = 1,
        bias: bool = True,
        batch_first: bool = False,
        dropout: float = 0.0,
        bidirectional: bool = False,
        norm: str | None = "cooijmans",
        input_stats: str = "frame",
        max_length: int = 100,
        momentum: float | None = 0.1,
        eps: float = 1e-5,
        gamma_init: float | None = None,
        forget_bias: float = 0.0,
        learn_init: bool = False,
        init_noise: float = 0.0,
        weight_init: str = "uniform",
        impl: str = "auto",
        sync_stats: bool = False,
        process_group: Any = None,
        reverse: str = "unpadded",
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        if reverse not in REVERSES:
            raise ValueError(f"reverse must be one of {REVERSES}, got {reverse!r}")
        check_placement(norm, input_stats, max_length)
        gamma_init = default_gamma_init(norm, gamma_init)
        check_layer_args(input_size, hidden_size, eps, momentum, gamma_init, forget_bias)
        positive_int("num_layers", num_layers)
        if isinstance(dropout, bool) or not 0.0 <= float(dropout) <= 1.0:
            raise ValueError(f"dropout must be a number in [0, 1], got {dropout!r}")
        if dropout > 0 and num_layers == 1:
            warn_user(
                "dropout is applied between layers only (not after the last one); with "
                f"num_layers=1 dropout={dropout} has no effect"
            )
        if weight_init not in WEIGHT_INITS:
            raise ValueError(f"weight_init must be one of {WEIGHT_INITS}, got {weight_init!r}")
        if finite("init_noise", init_noise) < 0:
            raise ValueError(f"init_noise must be non-negative, got {init_noise}")
        if impl in _DEPRECATED_IMPLS:
            warn_user(
                f"impl={impl!r} is deprecated and will be removed; use "
                f"impl={_DEPRECATED_IMPLS[impl]!r}",
                FutureWarning,
            )
            impl = _DEPRECATED_IMPLS[impl]
        if impl not in IMPLS:
            raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")

        factory: dict[str, Any] = {"device": device, "dtype": dtype}
        self.input_size = input_size
        self.hidden_size = hidden_size
        self.num_layers = num_layers
        self.bias = bias
        self.batch_first = batch_first
        self.dropout = float(dropout)
        self.bidirectional = bidirectional
        self.norm = norm
        self.input_stats = input_stats
        self.max_length = max_length
        self.momentum = momentum
        self.eps = eps
        self.gamma_init = gamma_init
        self.forget_bias = forget_bias
        self.learn_init = learn_init
        self.init_noise = init_noise
        self.weight_init = weight_init
        self.impl = impl
        self.reverse = reverse
        D = 2 if bidirectional else 1
        G = self._gates * hidden_size

        # Parameters named and shaped as torch.nn.LSTM's, so its state_dict loads.
        self._direction_names: list[tuple[str, ...]] = []
        for layer in range(num_layers):
            layer_in = input_size if layer == 0 else hidden_size * D
            for suffix in ("", "_reverse")[:D]:
                tag = f"l{layer}{suffix}"
                names = [f"weight_ih_{tag}", f"weight_hh_{tag}"]
                setattr(self, names[0], nn.Parameter(torch.empty(G, layer_in, **factory)))
                setattr(self, names[1], nn.Parameter(torch.empty(G, hidden_size, **factory)))
                for kind in ("ih", "hh"):
                    name = f"bias_{kind}_{tag}"
                    names.append(name)
                    if bias:
                        setattr(self, name, nn.Parameter(torch.empty(G, **factory)))
                    else:
                        self.register_parameter(name, None)
                norms = build_norms(
                    norm,
                    self._gates,
                    hidden_size,
                    self._has_cell,
                    input_stats,
                    max_length,
                    eps,
                    momentum,
                    gamma_init,
                    device,
                    dtype,
                )
                for key, module in norms.items():
                    setattr(self, f"{norm_prefix(norm)}_{key}_{tag}", module)
                self._direction_names.append(tuple(names) + (tag,))

        # Cooijmans eq. 1-4 treat h_0 and c_0 as model parameters.
        n_states = num_layers * D
        if learn_init:
            self.h0 = nn.Parameter(torch.zeros(n_states, hidden_size, **factory))
            self.c0 = (
                nn.Parameter(torch.zeros(n_states, hidden_size, **factory))
                if self._has_cell
                else None
            )
        else:
            self.register_parameter("h0", None)
            self.register_parameter("c0", None)
        self.reset_parameters()
        if sync_stats:
            convert_sync_batchnorm(self, process_group)

    # -- nn.LSTM conventions ------------------------------------------------------------

    def reset_parameters(self) -> None:
        for names in self._direction_names:
            w_ih, w_hh, b_ih, b_hh = (getattr(self, n) for n in names[:4])
            init_direction(w_ih, w_hh, b_ih, b_hh, self.weight_init, self._gates, self.forget_bias)
        for module in self.norm_modules():
            module.reset_parameters()
        for p in (self.h0, self.c0):
            if p is not None:
                nn.init.zeros_(p)

    def reset_running_stats(self) -> None:
        for module in self.norm_modules():
            module.reset_running_stats()

    def flatten_parameters(self) -> None:
        """No-op, for `torch.nn.LSTM` compatibility: the weights are never flattened."""

    def norm_modules(self) -> list[StepBatchNorm | StepLayerNorm]:
        """The normalisation modules: `StepBatchNorm` (``bn_*``) or, for norm="layer",
        `StepLayerNorm` (``ln_*``, without population statistics)."""
        return [m for m in self.children() if isinstance(m, (StepBatchNorm, StepLayerNorm))]

    def extra_repr(self) -> str:
        s = f"{self.input_size}, {self.hidden_size}"
        if self.num_layers != 1:
            s += f", num_layers={self.num_layers}"
        if not self.bias:
            s += ", bias=False"
        if self.batch_first:
            s += ", batch_first=True"
        if self.dropout:
            s += f", dropout={self.dropout}"
        if self.bidirectional:
            s += ", bidirectional=True"
        if self.reverse != "unpadded":
            s += f", reverse={self.reverse!r}"
        s += f", norm={self.norm!r}"
        if self.norm == "layer":
            s += f", gamma_init={self.gamma_init}"
        elif self.norm is not None:
            s += f", input_stats={self.input_stats!r}, max_length={self.max_length}"
            s += f", gamma_init={self.gamma_init}"
        if self.learn_init:
            s += ", learn_init=True"
        if self.init_noise:
            s += f", init_noise={self.init_noise}"
        if self.weight_init != "uniform":
            s += f", weight_init={self.weight_init!r}"
        return s

    # -- forward ------------------------------------------------------------------------

    def _step_fn(self) -> StepFn:
        raise NotImplementedError

    def _padded_reversal(self) -> bool:
        """Does the reverse direction read a padded batch flipped whole (reverse="padded")?
        Only where a frame-wise batch statistic sees the rows in their leading padding:
        without one (norm None or "layer", or "input" with sequence-wise statistics) a
        sequence's state held at its initial value through the padding starts its reversed
        part exactly as in the "unpadded" reading, and the outputs are the same."""
        frame_wise = self.norm in ("cooijmans", "preactivation") or (
            self.norm == "input" and self.input_stats == "frame"
        )
        return self.bidirectional and self.reverse == "padded" and frame_wise

    def _collecting(self) -> bool:
        """Is `update_population_stats` running batches through this layer?"""
        return any(m.collecting for m in self.norm_modules())

    def _direction(self, index: int) -> DirectionParams:
        w_ih, w_hh, b_ih, b_hh, tag = (
            getattr(self, n) if i < 4 else n for i, n in enumerate(self._direction_names[index])
        )
        bias = None if b_ih is None else b_ih + b_hh
        prefix = norm_prefix(self.norm)
        return DirectionParams(
            w_ih,
            w_hh,
            bias,
            bn_ih=getattr(self, f"{prefix}_ih_{tag}", None),
            bn_hh=getattr(self, f"{prefix}_hh_{tag}", None),
            bn_pre=getattr(self, f"{prefix}_pre_{tag}", None),
            bn_c=getattr(self, f"{prefix}_c_{tag}", None),
            input_stats=self.input_stats,
        )

    def _initial_states(
        self, hx: Tensor | tuple[Tensor, ...] | None, batch: SortedBatch, like: Tensor
    ) -> list[Tensor]:
        """Initial states as a list (h, c) / (h,), each (L*D, N, H) in sorted order."""
        D = 2 if self.bidirectional else 1
        N = batch.x.shape[1]
        shape = (self.num_layers * D, N, self.hidden_size)
        n_parts = 2 if self._has_cell else 1
        if hx is None:
            learned = (self.h0, self.c0)[:n_parts]
            states = [
                like.new_zeros(shape) if p is None else p[:, None].expand(shape) for p in learned
            ]
        else:
            parts = (hx,) if isinstance(hx, Tensor) else tuple(hx)
            if len(parts) != n_parts:
                raise RuntimeError(f"hx must be a tuple of {n_parts} tensors, got {len(parts)}")
            states = []
            for k, s in enumerate(parts):
                expect = (shape[0], shape[2]) if batch.unbatched else shape
                if tuple(s.shape) != expect:
                    raise RuntimeError(f"Expected hidden[{k}] size {expect}, got {list(s.shape)}")
                s = s.unsqueeze(1) if batch.unbatched else s
                states.append(batch.sort_state(s))
        if self.init_noise > 0 and (self.training or self._collecting()):
            # Cooijmans §5.1: Gaussian noise on the initial hidden state. Also while
            # `update_population_stats` collects: the population statistics must be those
            # of the states the layer was trained on, and the normalisation amplifies this
            # noise to signal level (§5.1), so noise-free statistics differ by orders of
            # magnitude on the steps where the input is the same for every sequence.
            states[0] = states[0] + self.init_noise * torch.randn_like(states[0])
        return states

    def _forward(
        self,
        input: Tensor | PackedSequence,
        hx: Tensor | tuple[Tensor, ...] | None,
        lengths: Tensor | Sequence[int] | None,
        time_offset: int,
    ) -> tuple[Tensor | PackedSequence, list[Tensor]]:
        if isinstance(time_offset, bool) or not isinstance(time_offset, int) or time_offset < 0:
            raise ValueError(f"time_offset must be a non-negative integer, got {time_offset!r}")
        batch = prepare_input(input, self.input_size, self.batch_first, lengths)
        x = batch.x
        w = self.weight_ih_l0
        if x.dtype != w.dtype:
            raise RuntimeError(f"input must have the type {w.dtype}, got type {x.dtype}")
        uses_batch = self.training or self._collecting()
        T_local, N_batch = x.shape[0], x.shape[1]
        syncing = [m for m in self.norm_modules() if m.syncing]
        group_sizes = None
        if syncing:
            # Every process must run the same steps (each step all-reduces its statistics):
            # pad to the longest batch of the group; the statistics count the whole group.
            T, group_sizes = _group_steps_and_sizes(
                T_local, batch.batch_sizes, syncing[0].process_group, x.device
            )
            N_batch = group_sizes[0]
            if T_local < T:
                x = torch.cat([x, x.new_zeros(T - T_local, *x.shape[1:])])
                batch.x, batch.batch_sizes = x, batch.batch_sizes + [0] * (T - T_local)
        if uses_batch and N_batch < 2 and needs_batch_of_two(self.norm, self.input_stats):
            raise ValueError(
                "Expected more than 1 sequence per batch when training with batch statistics "
                f"(norm={self.norm!r}), got a batch of {x.shape[1]} sequence; use eval() mode "
                "or a larger batch"
            )
        init = self._initial_states(hx, batch, x)
        D = 2 if self.bidirectional else 1
        full = unpadded(batch.batch_sizes, x.shape[1])
        # Cooijmans §5.4, "padded" reversal of a batch with padding: the reverse direction
        # runs over the batch flipped in time, every row at every step (n_t = N in the
        # statistics, population rows indexed by the padded step); at step t the rows
        # [active[t], N) are in their leading padding and hold their initial state.
        padded = self._padded_reversal() and not full
        if padded and syncing:
            raise ValueError(
                "reverse='padded' with synchronised statistics (sync_stats) is not supported: "
                "use reverse='unpadded', or batches without padding"
            )
        active = batch.batch_sizes[::-1]
        step = self._step_fn()
        finals: list[list[Tensor]] = [[] for _ in init]
        layer_input = x
        for layer in range(self.num_layers):
            outs = []
            for d in range(D):
                index = layer * D + d
                state: State = tuple(s[index] for s in init)
                params = self._direction(index)
                params.group_sizes = group_sizes
                run = reference_direction
                if self.impl != "reference":
                    from . import fast  # the fast path; the reference is its test oracle

                    if fast.supports(layer_input, batch.batch_sizes, params, step):
                        run = fast.fast_direction
                    elif self.impl == "fast":
                        raise ValueError(
                            "impl='fast' does not support this configuration (a custom step, "
                            "or statistics synchronised over different process groups); use "
                            "impl='auto' or 'reference'"
                        )
                args = (batch.batch_sizes, state, params, step, time_offset)
                if d == 1 and padded:
                    every = [x.shape[1]] * x.shape[0]
                    flipped = layer_input.flip(0)  # (T, N, I), the padding first
                    out, state = run(flipped, every, *args[1:], active=active)
                    out = out.flip(0)
                elif d == 1 and run is not reference_direction and full:
                    out, state = run(layer_input, *args, reverse=True)  # walks time backwards
                elif d == 1:
                    out, state = run(reverse_padded(layer_input, batch.lengths), *args)
                    out = reverse_padded(out, batch.lengths)
                else:
                    out, state = run(layer_input, *args)
                outs.append(out)
                for k, s in enumerate(state):
                    finals[k].append(s)
            layer_input = outs[0] if D == 1 else torch.cat(outs, -1)  # (T, N, D*H)
            if self.training and self.dropout > 0 and layer < self.num_layers - 1:
                layer_input = F.dropout(layer_input, self.dropout, training=True)
        output = batch.restore_output(layer_input[:T_local])
        return output, [batch.unsort_state(torch.stack(f)) for f in finals]


def _group_steps_and_sizes(
    T: int, sizes: list[int], group: Any, device: torch.device
) -> tuple[int, list[int]]:
    """The longest number of steps over the group, and the number of sequences present
    at each of those steps over the group (T,): two all-reduces (on the data's device:
    NCCL reduces CUDA tensors only)."""
    import torch.distributed as dist

    group = group or dist.group.WORLD
    t = torch.tensor([T], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=group)
    T = int(t)
    return T, group_batch_sizes(sizes + [0] * (T - len(sizes)), group, device)


def convert_sync_batchnorm(module: nn.Module, process_group: Any = None) -> nn.Module:
    """Synchronise the batch statistics of every `StepBatchNorm` in ``module`` over
    ``process_group`` (default: the world), like `torch.nn.SyncBatchNorm.convert_sync_batchnorm`.

    In training (and in `update_population_stats`) each step's sums, sums of squares and
    counts of present sequences are all-reduced, so that normalisation, gradients and
    population statistics equal those of one process on the concatenated batch. Layers
    with synchronised statistics run on the fast path (its PyTorch loops, which issue the
    all-reduces; design.md, Synchronised statistics) unless ``impl="reference"``. Returns
    ``module``, changed in place.
    """
    for m in module.modules():
        if isinstance(m, StepBatchNorm):
            m.sync = True
            m.process_group = process_group
    return module


class BNLSTM(_BNRNNBase):
    r"""Batch-normalised multi-layer LSTM with the `torch.nn.LSTM` contract.

    Cooijmans et al. (2017) eq. 6-8 by default (``norm="cooijmans"``)::

        (i, f, g, o) = BN(W_hh h_{t-1}; g_hh) + BN(W_ih x_t; g_ih) + b
        c_t = sig(f) * c_{t-1} + sig(i) * tanh(g)
        h_t = sig(o) * tanh(BN(c_t; g_c, b_c))

    or Laurent et al. (2016) eq. 18 (``"input"``) / eq. 17 (``"preactivation"``), or the plain
    LSTM (``None``). Statistics are per step over the sequences present at that step
    (frame-wise), or over all unpadded frames for the input term (``input_stats="sequence"``).

    ``norm="layer"`` is the layer-normalised LSTM of Ba et al. (2016, §6.5 and
    supplementary): the same three terms, each row (one sequence at one step) normalised
    over its own features (`StepLayerNorm`, modules ``ln_ih_l{k}``, ``ln_hh_l{k}``,
    ``ln_c_l{k}``)::

        (i, f, g, o) = LN(W_hh h_{t-1}; a_hh) + LN(W_ih x_t; a_ih) + b
        c_t = sig(f) * c_{t-1} + sig(i) * tanh(g)
        h_t = sig(o) * tanh(LN(c_t; a_c, b_c))

    It keeps no statistics: evaluation computes what training does, at any length and for
    a batch of one; ``max_length``, ``momentum`` and ``sync_stats`` have no effect on it
    (there is nothing to track or all-reduce).

    Args (after `torch.nn.LSTM`'s ``input_size, hidden_size, num_layers, bias, batch_first,
    dropout, bidirectional``):
        norm: the placement, ``"cooijmans"``, ``"input"``, ``"preactivation"``, ``"layer"``
            or ``None``.
        input_stats: ``"frame"`` or ``"sequence"`` statistics for the input term.
        max_length: number of steps with their own population statistics; later steps
            reuse the last row in evaluation (Cooijmans §3).
        momentum: running-average factor of the population statistics, ``None`` for a
            cumulative average.
        eps: added to the variance.
        gamma_init: initial scale of the normalisations; by default 0.1 for the batch
            normalisations (Cooijmans §4), 1.0 for ``norm="layer"`` (Ba et al.).
        forget_bias: initial forget-gate bias (in ``bias_ih``), 0 leaves the scheme's value.
        learn_init: learn the initial states ``h0``, ``c0`` of shape (L*D, H).
        init_noise: std of Gaussian noise added to the initial hidden state in training
            (Cooijmans §5.1).
        weight_init: ``"uniform"`` (`nn.LSTM`'s), ``"orthogonal"`` or ``"identity"``.
        impl: ``"auto"`` (the fast path where it applies, else the reference), ``"fast"``
            (the fast path; an error where it does not apply) or ``"reference"`` (the plain
            Python loop over steps); ``"fused"``, a former name of ``"fast"``, is deprecated.
            Which loops the fast path runs (compiled C++ or PyTorch) is
            `bnrnn.fast.set_backend`'s choice, not the layer's.
        sync_stats: all-reduce batch statistics over ``process_group`` (default: the
            world) in distributed data-parallel training; see `convert_sync_batchnorm`.
        reverse: how the reverse direction (``bidirectional=True``) reads a padded batch
            (Cooijmans §5.4). ``"unpadded"``: each sequence's own part reversed, the padding
            left in place, so step 0 of the reverse pass is every sequence's last frame.
            ``"padded"``: the padded batch flipped in time, the padding first (the "common
            practice" of §5.4): a sequence's state stays at its initial value while its
            leading padding goes by and its output there is zero, but its row enters the
            frame-wise batch statistics of every step (N rows at each step, zero input), and
            population rows are indexed by the padded step. Without padding, or without a
            frame-wise batch statistic (``norm=None``, ``"layer"``, ``"input"`` with
            sequence-wise statistics) the two give the same results.

    Shapes: weight_ih_l{k}: (4H, I or D*H); weight_hh_l{k}: (4H, H); bias_ih_l{k},
    bias_hh_l{k}: (4H,), gates in torch order (i, f, g, o). BN modules ``bn_ih_l{k}``,
    ``bn_hh_l{k}`` (4H features), ``bn_c_l{k}`` (H features, with shift) and ``bn_pre_l{k}``
    hold ``weight`` (gamma), ``bias`` (beta) and ``running_mean``/``running_var`` of shape
    (max_length, F).

    Forward: ``input`` as `nn.LSTM` accepts it, optional ``hx = (h_0, c_0)`` each
    (L*D, N, H), optional ``lengths`` (N,) for a padded tensor, and ``time_offset``: the step
    index of the first step (to continue the statistics across truncated-BPTT segments).
    Returns ``output, (h_n, c_n)``; padded output positions are zero and ``h_n, c_n`` are each
    sequence's state at its own last step.
    """

    _gates = 4
    _has_cell = True

    def _step_fn(self) -> StepFn:
        return lstm_step

    def forward(
        self,
        input: Tensor | PackedSequence,
        hx: tuple[Tensor, Tensor] | None = None,
        lengths: Tensor | Sequence[int] | None = None,
        time_offset: int = 0,
    ) -> tuple[Tensor | PackedSequence, tuple[Tensor, Tensor]]:
        output, (h_n, c_n) = self._forward(input, hx, lengths, time_offset)
        return output, (h_n, c_n)


class BNRNN(_BNRNNBase):
    r"""Batch-normalised multi-layer simple RNN with the `torch.nn.RNN` contract:
    ``h_t = tanh(BN(W_hh h_{t-1}) + BN(W_ih x_t) + b)`` (Cooijmans §4, Fig. 1a) with the same
    placements as `BNLSTM` minus the cell (``norm="layer"``: LN of each of the two terms).
    Arguments are `nn.RNN`'s, then `BNLSTM`'s.
    """

    _gates = 1
    _has_cell = False

    def __init__(
        self,
        input_size: int,
        hidden_size: int,
        num_layers: int = 1,
        nonlinearity: str = "tanh",
        bias: bool = True,
        batch_first: bool = False,
        dropout: float = 0.0,
        bidirectional: bool = False,
        **kwargs: Any,
    ) -> None:
        if nonlinearity not in ("tanh", "relu"):
            raise ValueError(
                f"Unknown nonlinearity '{nonlinearity}'. Select from 'tanh' or 'relu'."
            )
        self.nonlinearity = nonlinearity
        super().__init__(
            input_size, hidden_size, num_layers, bias, batch_first, dropout, bidirectional, **kwargs
        )

    def _step_fn(self) -> StepFn:
        if self.nonlinearity == "tanh":
            return rnn_step
        return functools.partial(rnn_step, nonlinearity="relu")

    def extra_repr(self) -> str:
        s = super().extra_repr()
        return s if self.nonlinearity == "tanh" else s + ", nonlinearity='relu'"

    def forward(
        self,
        input: Tensor | PackedSequence,
        hx: Tensor | None = None,
        lengths: Tensor | Sequence[int] | None = None,
        time_offset: int = 0,
    ) -> tuple[Tensor | PackedSequence, Tensor]:
        output, (h_n,) = self._forward(input, hx, lengths, time_offset)
        return output, h_n
