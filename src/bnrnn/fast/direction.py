"""One direction of one layer on the fast path: `fast_direction`, a drop-in for
`bnrnn.reference.reference_direction` with the same arguments and results, and
`supports`, which says which cases it takes.

It makes the operator's arguments from the layer's modules (`bnrnn.fast.ops.DirectionArgs`),
runs ``bnrnn::direction`` (one autograd node with a hand-written backward), and writes the
population rows the call tracked into the BN modules. Steps beyond ``max_length`` are not
tracked in training: the module warns once.
"""

from __future__ import annotations

import functools
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from ..functional import State, lstm_step, rnn_step
from ..layernorm import StepLayerNorm
from ..norm import StepBatchNorm, group_batch_sizes
from ..packing import unpadded
from ..reference import DirectionParams
from .compiled import uses_compiled
from .ops import DirectionArgs, direction
from .plan import LSTM, RNN_RELU, RNN_TANH, batch_steps, counted_sizes


def _kind(step: Any) -> str | None:
    if step is lstm_step:
        return LSTM
    if step is rnn_step:
        return RNN_TANH
    if isinstance(step, functools.partial) and step.func is rnn_step and not step.args:
        nonlinearity = step.keywords.get("nonlinearity", "tanh")
        if set(step.keywords) <= {"nonlinearity"} and nonlinearity in ("tanh", "relu"):
            return RNN_TANH if nonlinearity == "tanh" else RNN_RELU
    return None


def supports(x: Tensor, batch_sizes: list[int], p: DirectionParams, step: Any) -> bool:
    """Whether `fast_direction` computes this case (else use the reference)."""
    kind = _kind(step)
    bns = [bn for bn in (p.bn_ih, p.bn_hh, p.bn_pre, p.bn_c) if bn is not None]
    syncing = [bn.syncing for bn in bns]
    if any(syncing) and not (all(syncing) and len({_group(bn) for bn in bns}) == 1):
        return False  # some BNs synchronised and others not, or over different groups
    # (synchronised: steps where this process has no sequence left take part all the same)
    if kind is None or not x.is_floating_point() or min(batch_sizes) < (0 if any(syncing) else 1):
        return False
    layer = [isinstance(bn, StepLayerNorm) for bn in bns]
    if any(layer) and not (all(layer) and p.bn_pre is None):  # LN: norm="layer" only
        return False
    if p.bn_pre is not None and (p.bn_ih is not None or p.bn_hh is not None):
        return False
    return p.bn_c is None or kind == LSTM


def fast_direction(
    x: Tensor,
    batch_sizes: list[int],
    state: State,
    p: DirectionParams,
    step: Any,
    time_offset: int = 0,
    reverse: bool = False,
    active: list[int] | None = None,
) -> tuple[Tensor, State]:
    """Run one direction over a sorted, zero-padded batch; same contract as
    `bnrnn.reference.reference_direction`. x: (T, N, I); state: (h_0, c_0) or (h_0,),
    each (N, H). Returns the output (T, N, H), zero beyond each length, and the state of
    each sequence at its own last step. ``reverse`` (a batch with no padding only): run
    over x in reversed time, the output in x's time order, as ``out(x.flip(0)).flip(0)``.
    ``active``: a padded batch read flipped (Cooijmans §5.4), as
    `bnrnn.reference.reference_direction` takes it (``batch_sizes`` then all N)."""
    kind = _kind(step)
    assert kind is not None
    bns = {"ih": p.bn_ih, "hh": p.bn_hh, "pre": p.bn_pre, "c": p.bn_c}
    # A shift (beta) on the ih, hh or pre BN is a constant added to the pre-activation,
    # exactly as the bias is (Cooijmans §3): fold them into one bias vector.
    bias = p.bias
    for bn in (p.bn_ih, p.bn_hh, p.bn_pre):
        if bn is not None and bn.bias is not None:
            bias = bn.bias if bias is None else bias + bn.bias
    h0 = state[0]
    c0 = state[1] if kind == LSTM else None
    differentiable = (x, h0, c0, p.weight_ih, p.weight_hh, bias)
    gammas = [None if bn is None else bn.weight for bn in bns.values()]
    beta_c = None if p.bn_c is None else p.bn_c.bias
    needs_grad = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (*differentiable, *gammas, beta_c)
    )
    sequence_ih = p.bn_ih is not None and p.input_stats == "sequence"
    # synchronised statistics (design.md, Synchronised statistics): the group by its name
    # (an operator option) and the sequences present at each step over it
    sync = [bn for bn in bns.values() if bn is not None and bn.syncing]
    sync_group = _group(sync[0]).group_name if sync else None
    group_sizes = None
    if sync:
        group_sizes = p.group_sizes or group_batch_sizes(batch_sizes, _group(sync[0]), x.device)
    # norm="layer" (Ba et al. §6.5): per-row statistics, no population statistics
    layer = any(isinstance(bn, StepLayerNorm) for bn in bns.values())
    if reverse:
        if not unpadded(batch_sizes, x.shape[1]):
            raise ValueError("reverse=True needs a batch with no padding")
        # The compiled loops walk x and the output backwards themselves without a backward
        # (saves the two flips); otherwise flip. (The Python loops run synchronised
        # statistics.)
        if needs_grad or sequence_ih or sync or not uses_compiled(x):
            out, state = fast_direction(x.flip(0), batch_sizes, state, p, step, time_offset)
            return out.flip(0), state
    stats: dict[str, Any] = {}
    for key, bn in bns.items():
        if isinstance(bn, StepLayerNorm):  # no population statistics
            bn = None
        stats[f"running_mean_{key}"] = None if bn is None else bn.running_mean
        stats[f"running_var_{key}"] = None if bn is None else bn.running_var
        stats[f"num_batches_tracked_{key}"] = None if bn is None else bn.num_batches_tracked
        stats[f"eps_{key}"] = 0.0 if bns[key] is None else bns[key].eps
        stats[f"momentum_{key}"] = None if bn is None else bn.momentum
        stats[f"batch_stats_{key}"] = bn is not None and bn.uses_batch_stats
    args = DirectionArgs(
        *differentiable,
        *gammas,
        beta_c,
        kind=kind,
        batch_sizes=list(batch_sizes),
        time_offset=time_offset,
        sequence_ih=sequence_ih,
        save=needs_grad,
        reverse=reverse,
        **stats,
        layer=layer,
        sync_group=sync_group,
        group_sizes=None if group_sizes is None else list(group_sizes),
        active=None if active is None else list(active),
    )
    out, h_n, c_n, rows = direction(args)
    _write_tracked(args, bns, rows)
    return out, ((h_n, c_n) if kind == LSTM else (h_n,))


def _group(bn: StepBatchNorm) -> Any:
    """The process group a synchronised BN reduces over (default: the world)."""
    return bn.process_group or dist.group.WORLD


@torch.no_grad()
def _write_tracked(
    args: DirectionArgs, bns: dict[str, StepBatchNorm | None], rows: list[Tensor]
) -> None:
    """Write the population rows the call tracked into the BN modules. Steps with batch
    statistics beyond max_length are not tracked: the module warns once."""
    for i, (key, (start, k)) in enumerate(args.tracked_rows().items()):
        bn = bns[key]
        mean, var, count = rows[3 * i : 3 * i + 3]
        if k:
            bn.running_mean[start : start + k].copy_(mean)
            bn.running_var[start : start + k].copy_(var)
            bn.num_batches_tracked[start : start + k].copy_(count)
        sequence = key == "ih" and args.sequence_ih
        sizes = counted_sizes(args.stat_sizes, args.active, sequence)
        last = args.time_offset + batch_steps(sizes, True, sequence) - 1
        if not sequence and last >= bn.max_length:
            bn._warn_beyond(max(bn.max_length, args.time_offset))
