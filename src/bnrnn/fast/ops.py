"""One direction of one layer as a PyTorch operator with a typed schema, autograd and a
fake (meta) implementation:

    bnrnn::direction(<DirectionArgs>) -> (output, h_n, c_n, saved, tracked)
    bnrnn::direction_backward(<BackwardArgs>) -> (grad_x, grad_h0, ..., grad_beta_c)

`DirectionArgs` and `BackwardArgs` declare the arguments (their fields, in order, are the
schemas: tensors first, options keyword-only), and the implementations receive them as
one typed object. ``direction`` is functional: it reads the BN modules' population
statistics and returns the rows this call's batch statistics update (``tracked``), which
the caller writes back (`bnrnn.fast.direction`); torch.compile sees that write as
ordinary graph code.

`direction` (the function) calls the implementations directly in eager mode, where the
dispatcher's Python kernels and autograd wrapper would cost a tenth of a millisecond a
call; under torch.compile, torch.export or on tensor subclasses (fake tensors), it calls
the operators. Both run the same implementation, setup and backward below.

The backward computes the gradients with the fast path's own backward
(`bnrnn.fast.run.backward`). When the graph of the gradients is wanted (a gradient
penalty: ``create_graph=True``), it computes them instead by differentiating a
replay of the direction (`bnrnn.fast.replay`), so that second derivatives are right.
"""

from __future__ import annotations

import inspect
from dataclasses import KW_ONLY, dataclass, fields
from functools import cached_property
from typing import Any

import torch
from torch import Tensor

from . import run
from .buffers import Buffers, NormStats
from .compiled import uses_compiled
from .plan import NORM_KEYS, Plan, batch_steps, counted_sizes, make_plan, tracked_rows
from .replay import replay
from .run import Inputs, Population
from .sync import Sync


@dataclass(frozen=True)
class _Differentiable:
    """The differentiable inputs of one direction: the first arguments of both operators
    (see `DirectionArgs`)."""

    x: Tensor
    h0: Tensor
    c0: Tensor | None
    w_ih: Tensor
    w_hh: Tensor
    bias: Tensor | None
    gamma_ih: Tensor | None
    gamma_hh: Tensor | None
    gamma_pre: Tensor | None
    gamma_c: Tensor | None
    beta_c: Tensor | None


INPUTS = tuple(f.name for f in fields(_Differentiable))


@dataclass(frozen=True)
class DirectionArgs(_Differentiable):
    """The arguments of ``bnrnn::direction``: one direction of one layer over a sorted,
    zero-padded batch (`bnrnn.fast.fast_direction` makes them from a layer's modules).

    x (T, N, I); h0, c0 (N, H) (c0 for the LSTM only); w_ih (G, I), w_hh (G, H); bias (G,)
    (bias_ih + bias_hh + the shifts of the ih, hh and pre BNs); for each BN placement key
    (ih, hh, pre, c; absent: None) its scale gamma_<key> (F,), its module's population
    statistics running_mean_<key>, running_var_<key> (max_length, F) and
    num_batches_tracked_<key> (max_length,), eps_<key>, momentum_<key> and
    batch_stats_<key> (the module uses batch statistics: training or collecting); beta_c
    (H,) the shift of BN(c). kind: "lstm", "rnn_tanh" or "rnn_relu"; time_offset: the index
    of the first step; sequence_ih: one statistic of W_ih x over all frames (Laurent eq.
    20-21); save: a backward follows (keep what it reads); reverse: run x in reversed time
    (a batch with no padding, without save); layer: the norms present are layer
    normalisations (norm="layer", Ba et al. §6.5: statistics per row, no population
    statistics, whose arguments are then None); sync_group: synchronised statistics over
    the process group of this name (design.md, Synchronised statistics), group_sizes (T,)
    the sequences present at each step over the group (None: not synchronised); active:
    see `bnrnn.fast.plan.Plan.active` (a padded batch read flipped in time, Cooijmans
    §5.4), None otherwise."""

    running_mean_ih: Tensor | None
    running_var_ih: Tensor | None
    num_batches_tracked_ih: Tensor | None
    running_mean_hh: Tensor | None
    running_var_hh: Tensor | None
    num_batches_tracked_hh: Tensor | None
    running_mean_pre: Tensor | None
    running_var_pre: Tensor | None
    num_batches_tracked_pre: Tensor | None
    running_mean_c: Tensor | None
    running_var_c: Tensor | None
    num_batches_tracked_c: Tensor | None
    _: KW_ONLY
    kind: str
    batch_sizes: list[int]
    time_offset: int
    sequence_ih: bool
    save: bool
    reverse: bool
    eps_ih: float
    eps_hh: float
    eps_pre: float
    eps_c: float
    momentum_ih: float | None
    momentum_hh: float | None
    momentum_pre: float | None
    momentum_c: float | None
    batch_stats_ih: bool
    batch_stats_hh: bool
    batch_stats_pre: bool
    batch_stats_c: bool
    layer: bool = False
    sync_group: str | None = None
    group_sizes: list[int] | None = None
    active: list[int] | None = None

    @cached_property
    def plan(self) -> Plan:
        return _plan(self, self.save, self.reverse)

    @property
    def stat_sizes(self) -> list[int]:
        """(T,) the sequences each step's statistics are over (`Plan.stat_sizes`)."""
        return self.batch_sizes if self.group_sizes is None else self.group_sizes

    def inputs(self) -> Inputs:
        return _inputs(self)

    def populations(self) -> dict[str, Population]:
        out = {}
        for key in NORM_KEYS:
            mean = getattr(self, f"running_mean_{key}")
            if mean is not None:
                out[key] = Population(
                    mean,
                    getattr(self, f"running_var_{key}"),
                    getattr(self, f"num_batches_tracked_{key}"),
                    getattr(self, f"momentum_{key}"),
                )
        return out

    def tensors(self) -> tuple[Tensor | None, ...]:
        """The positional (tensor) arguments, in order."""
        return tuple(getattr(self, name) for name in _TENSORS)

    def options(self) -> dict[str, Any]:
        """The keyword-only arguments (the options)."""
        return {name: getattr(self, name) for name in _OPTIONS}

    def tracked_rows(self) -> dict[str, tuple[int, int]]:
        """For each BN whose population statistics this call updates (in the order of the
        operator's ``tracked`` output): (first row, number of rows); the rows of the steps
        with batch statistics within max_length (none beyond it: 0 rows)."""
        out = {}
        for key in NORM_KEYS:
            mean = getattr(self, f"running_mean_{key}")
            sequence = key == "ih" and self.sequence_ih
            sizes = counted_sizes(self.stat_sizes, self.active, sequence)
            steps = batch_steps(sizes, getattr(self, f"batch_stats_{key}"), sequence)
            if mean is None or steps == 0:
                continue
            out[key] = (0, 1) if sequence else tracked_rows(steps, self.time_offset, mean.shape[0])
        return out


_TENSORS = tuple(f.name for f in fields(DirectionArgs) if not f.kw_only)
_OPTIONS = tuple(f.name for f in fields(DirectionArgs) if f.kw_only)


@dataclass(frozen=True)
class BackwardArgs(_Differentiable):
    """The arguments of ``bnrnn::direction_backward``: the forward's inputs (see
    `DirectionArgs`), its output and saved buffers (``saved``: see `_encode_saved`), the
    gradients of the output, h_n and c_n (None: zero), the options the plan depends on,
    and which of dx, dW_ih and dW_hh to compute."""

    output: Tensor
    saved: list[Tensor]
    grad_output: Tensor | None
    grad_h_n: Tensor | None
    grad_c_n: Tensor | None
    _: KW_ONLY
    kind: str
    batch_sizes: list[int]
    sequence_ih: bool
    eps_ih: float
    eps_hh: float
    eps_pre: float
    eps_c: float
    batch_stats_ih: bool
    batch_stats_hh: bool
    batch_stats_pre: bool
    batch_stats_c: bool
    need_x: bool
    need_w_ih: bool
    need_w_hh: bool
    layer: bool = False
    sync_group: str | None = None
    group_sizes: list[int] | None = None
    active: list[int] | None = None

    @cached_property
    def plan(self) -> Plan:
        return _plan(self, save=True, reverse=False)


def _plan(a: DirectionArgs | BackwardArgs, save: bool, reverse: bool) -> Plan:
    norms = {}
    for key in NORM_KEYS:
        if getattr(a, f"gamma_{key}") is not None:
            norms[key] = (getattr(a, f"eps_{key}"), getattr(a, f"batch_stats_{key}"))
    G, H = a.w_hh.shape
    return make_plan(
        kind=a.kind,
        sizes=tuple(a.batch_sizes),
        shape=tuple(a.x.shape),
        H=H,
        G=G,
        norms=norms,
        sequence_ih=a.sequence_ih,
        save=save,
        compiled=uses_compiled(a.x),
        reverse=reverse,
        layer=a.layer,
        sync=Sync.of(a.sync_group, a.group_sizes),
        active=None if a.active is None else tuple(a.active),
    )


def _inputs(a: DirectionArgs | BackwardArgs) -> Inputs:
    gamma = {}
    for key in NORM_KEYS:
        g = getattr(a, f"gamma_{key}")
        if g is not None:
            gamma[key] = g
    return Inputs(a.x, a.h0, a.c0, a.w_ih, a.w_hh, a.bias, gamma, a.beta_c)


# -- what the forward keeps for the backward ----------------------------------------------


def _encode_saved(plan: Plan, b: Buffers) -> list[Tensor]:
    """The forward's buffers that the backward reads, as a list: wx if kept
    (`Plan.keep_wx`), wh, gates (unless recomputed), cell (LSTM), then the mean and
    variance rows of each BN present. ``out`` is the operator's first output."""
    saved = [b.wx] if plan.keep_wx else []
    saved.append(b.wh)
    if not plan.recompute_act:
        saved.append(b.gates)
    if plan.lstm:
        saved.append(b.cell)
    for key, _ in plan.norms():
        saved += [b.stats[key].mean, b.stats[key].var]
    return saved


def _decode_saved(plan: Plan, out: Tensor, saved: list[Tensor]) -> Buffers:
    rest = list(saved)
    wx = rest.pop(0) if plan.keep_wx else None
    wh = rest.pop(0)
    gates = None if plan.recompute_act else rest.pop(0)
    cell = rest.pop(0) if plan.lstm else None
    b = Buffers(wx=wx, wh=wh, gates=gates, out=out, cell=cell)
    for key, _ in plan.norms():
        b.stats[key] = NormStats(rest.pop(0), rest.pop(0))
    return b


def _saved_shapes(plan: Plan) -> list[tuple[int, ...]]:
    """The shapes of `_encode_saved`'s list (for the fake implementation)."""
    T, N, H, G = plan.T, plan.N, plan.H, plan.G
    S = T if plan.save else 1
    shapes: list[tuple[int, ...]] = [(T, N, G)] if plan.keep_wx else []
    shapes.append((S if plan.hh else 1, N, G))
    if not plan.recompute_act:
        shapes.append((S if plan.lstm else 1, N, G))
    if plan.lstm:
        shapes.append((S, N, H))
    for key, nm in plan.norms():
        rows, F = (1 if nm.sequence else T), (H if key == "c" else G)
        if nm.layer:  # per-row statistics
            F = N
        shapes += [(rows, F), (rows, F)]
    return shapes


# -- the forward --------------------------------------------------------------------------


def _direction_impl(a: DirectionArgs) -> tuple[Tensor, Tensor, Tensor, list[Tensor], list[Tensor]]:
    plan = a.plan
    out, h_n, c_n, b, tracked = run.forward(plan, a.inputs(), a.populations(), a.time_offset)
    if c_n is None:  # the RNN has no cell: an empty placeholder output
        c_n = h_n.new_empty(0)
    rows = []
    for key in a.tracked_rows():
        t = tracked[key]
        rows += [t.mean, t.var, t.count]
    return out, h_n, c_n, (_encode_saved(plan, b) if plan.save else []), rows


def _direction_fake(a: DirectionArgs) -> tuple[Tensor, Tensor, Tensor, list[Tensor], list[Tensor]]:
    plan, x = a.plan, a.x
    T, N, H = plan.T, plan.N, plan.H
    out = x.new_empty(T, N, H)
    h_n = x.new_empty(N, H)
    c_n = x.new_empty(N, H) if plan.lstm else x.new_empty(0)
    saved = [x.new_empty(shape) for shape in _saved_shapes(plan)] if plan.save else []
    rows = []
    for key, (_, k) in a.tracked_rows().items():
        mean = getattr(a, f"running_mean_{key}")
        count = getattr(a, f"num_batches_tracked_{key}")
        rows += [mean.new_empty(k, mean.shape[1]), mean.new_empty(k, mean.shape[1])]
        rows.append(count.new_empty(k))
    return out, h_n, c_n, saved, rows


# -- the backward -------------------------------------------------------------------------


def _backward_impl(a: BackwardArgs) -> tuple[Tensor, ...]:
    plan = a.plan
    saved = _decode_saved(plan, a.output, a.saved)
    grads = run.backward(
        plan,
        _inputs(a),
        saved,
        a.grad_output,
        a.grad_h_n,
        a.grad_c_n,
        a.need_x,
        a.need_w_ih,
        a.need_w_hh,
    )
    # (a gradient not computed, or of an absent input: an empty placeholder, each its own:
    # an operator's outputs may not alias each other)
    out = []
    for name in INPUTS:
        g = grads.get(name)
        out.append(a.x.new_empty(0) if (g is None or getattr(a, name) is None) else g)
    return tuple(out)


def _backward_fake(a: BackwardArgs) -> tuple[Tensor, ...]:
    skipped = {"x": not a.need_x, "w_ih": not a.need_w_ih, "w_hh": not a.need_w_hh}
    out = []
    for name in INPUTS:
        t = getattr(a, name)
        out.append(a.x.new_empty(0) if (t is None or skipped.get(name)) else torch.empty_like(t))
    return tuple(out)


def _setup_context(
    ctx: Any, inputs: tuple[Any, ...], keyword_only_inputs: dict[str, Any], output: Any
) -> None:
    """What the backward keeps: the inputs, the output, the saved buffers, the options."""
    out, _, c_n, saved, _ = output
    ctx.options = keyword_only_inputs
    ctx.save_for_backward(*inputs[: len(INPUTS)], out, *saved)
    if keyword_only_inputs["kind"] != "lstm":
        ctx.mark_non_differentiable(c_n)


def _backward(
    ctx: Any, grad_output: Tensor | None, grad_h_n: Tensor | None, grad_c_n: Tensor | None, *_: Any
) -> tuple[Tensor | None, ...]:
    """The gradients of the operator's tensor arguments (None for the population
    statistics)."""
    tensors = ctx.saved_tensors
    inputs, out, saved = tensors[: len(INPUTS)], tensors[len(INPUTS)], tensors[len(INPUTS) + 1 :]
    options = ctx.options
    # (the eager autograd.Function's first input is the arguments object: skipped)
    need = dict(zip(INPUTS, ctx.needs_input_grad[getattr(ctx, "skipped_inputs", 0) :]))
    if options["kind"] != "lstm":
        grad_c_n = None
    args = BackwardArgs(
        *inputs,
        out,
        list(saved),
        grad_output,
        grad_h_n,
        grad_c_n,
        **{name: options[name] for name in _BACKWARD_OPTIONS if name in options},
        need_x=need["x"],
        need_w_ih=need["w_ih"],
        need_w_hh=need["w_hh"],
    )
    if torch.is_grad_enabled():  # create_graph: the gradients' own graph is wanted
        grads = _replay_backward(args, need)
    else:
        grads = _call(_backward_impl, torch.ops.bnrnn.direction_backward, args)
    result = [
        g if (need[name] and t is not None) else None for name, g, t in zip(INPUTS, grads, inputs)
    ]
    return (*result, *(None for _ in _TENSORS[len(INPUTS) :]))


def _replay_backward(a: BackwardArgs, need: dict[str, bool]) -> list[Tensor | None]:
    """The gradients of the inputs with their graph (second derivatives): a differentiable
    replay of the direction (`bnrnn.fast.replay`) differentiated with create_graph."""
    plan = a.plan
    stats = _decode_saved(plan, a.output, a.saved).stats
    out, h_n, c_n = replay(plan, _inputs(a), stats)
    outputs, grad_outputs = [], []
    for o, g in ((out, a.grad_output), (h_n, a.grad_h_n), (c_n, a.grad_c_n)):
        if o is not None and g is not None:
            outputs.append(o)
            grad_outputs.append(g)
    wrt = [name for name in INPUTS if need[name] and getattr(a, name) is not None]
    grads = dict.fromkeys(INPUTS)
    if outputs and wrt:
        found = torch.autograd.grad(
            outputs,
            [getattr(a, name) for name in wrt],
            grad_outputs,
            create_graph=True,
            allow_unused=True,
        )
        grads.update(zip(wrt, found))
    return [grads[name] for name in INPUTS]


_BACKWARD_OPTIONS = tuple(f.name for f in fields(BackwardArgs) if f.kw_only)


class _Direction(torch.autograd.Function):
    """The operator's autograd in eager mode, without the dispatcher: the same
    implementation, setup and backward as the registered ``bnrnn::direction``."""

    @staticmethod
    def forward(ctx: Any, a: DirectionArgs, *tensors: Tensor | None) -> Any:
        output = _direction_impl(a)
        _setup_context(ctx, tensors, a.options(), output)
        ctx.skipped_inputs = 1  # `a`
        return output

    @staticmethod
    def backward(ctx: Any, *grads: Any) -> Any:
        return (None, *_backward(ctx, *grads))


def _traced(x: Tensor) -> bool:
    """Whether the call is traced (torch.compile, torch.export) or on a tensor subclass
    (fake tensors, ...): the registered operators then take it."""
    return torch.compiler.is_compiling() or type(x) is not Tensor


def _call(impl: Any, op: Any, a: Any) -> Any:
    if _traced(a.x):
        return op(*_positional(a), **_keywords(a))
    return impl(a)


def _positional(a: Any) -> list[Any]:
    return [getattr(a, f.name) for f in fields(a) if not f.kw_only]


def _keywords(a: Any) -> dict[str, Any]:
    return {f.name: getattr(a, f.name) for f in fields(a) if f.kw_only}


def direction(a: DirectionArgs) -> tuple[Tensor, Tensor, Tensor, list[Tensor]]:
    """Run ``bnrnn::direction``: the output (T, N, H), h_n and c_n (N, H) (c_n empty for
    the RNN) and the tracked population rows: for each key of `DirectionArgs.tracked_keys`
    the rows' mean, var (k, F) and counts (k,)."""
    if _traced(a.x):
        out, h_n, c_n, _, rows = torch.ops.bnrnn.direction(*a.tensors(), **a.options())
    elif a.save:
        out, h_n, c_n, _, rows = _Direction.apply(a, *a.tensors())
    else:
        with torch.no_grad():
            out, h_n, c_n, _, rows = _direction_impl(a)
    return out, h_n, c_n, rows


# -- registration -------------------------------------------------------------------------


def _register() -> None:
    """Define ``bnrnn::direction`` and ``bnrnn::direction_backward`` (torch >= 2.4)."""
    if not hasattr(torch.library, "custom_op"):
        return
    returns = tuple[Tensor, Tensor, Tensor, list[Tensor], list[Tensor]]

    def forward(*args: Any, **kwargs: Any) -> Any:
        return _direction_impl(DirectionArgs(*args, **kwargs))

    forward.__signature__ = inspect.signature(DirectionArgs).replace(return_annotation=returns)
    op = torch.library.custom_op("bnrnn::direction", forward, mutates_args=())
    op.register_fake(lambda *args, **kwargs: _direction_fake(DirectionArgs(*args, **kwargs)))
    op.register_autograd(_backward, setup_context=_setup_context)

    def backward(*args: Any, **kwargs: Any) -> Any:
        return _backward_impl(BackwardArgs(*args, **kwargs))

    grads = tuple[(Tensor,) * len(INPUTS)]
    backward.__signature__ = inspect.signature(BackwardArgs).replace(return_annotation=grads)
    op = torch.library.custom_op("bnrnn::direction_backward", backward, mutates_args=())
    op.register_fake(lambda *args, **kwargs: _backward_fake(BackwardArgs(*args, **kwargs)))


_register()
