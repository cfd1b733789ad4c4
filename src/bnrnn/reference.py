"""The plain reference implementation: one direction of one layer as a Python loop over
steps, each step calling the stateless step function. It is the fallback on any device and
the oracle the fast path is tested against.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from .functional import State, StepNorms
from .layernorm import StepLayerNorm
from .norm import StepBatchNorm

# A normalisation of the direction: batch (statistics per step) or layer (per row).
Norm = StepBatchNorm | StepLayerNorm

StepFn = Callable[[Tensor, State, Tensor, "Tensor | None", StepNorms], State]


@dataclass
class DirectionParams:
    """Everything one direction of one layer computes with.

    weight_ih: (G*H, I); weight_hh: (G*H, H); bias: (G*H,) = bias_ih + bias_hh, or None.
    The normalisation modules present depend on the placement (see `bnrnn.placement`):
    `StepBatchNorm`, or `StepLayerNorm` for norm="layer".
    """

    weight_ih: Tensor
    weight_hh: Tensor
    bias: Tensor | None
    bn_ih: Norm | None = None
    bn_hh: Norm | None = None
    bn_pre: Norm | None = None
    bn_c: Norm | None = None
    input_stats: str = "frame"
    # synchronised statistics: the sequences present at each step over the process group
    # (T,), agreed by the layer once per forward (the fast path reads it; None: not known)
    group_sizes: list[int] | None = None

    def step_norms(self, t: int) -> StepNorms:
        """The normalisations of step ``t`` (absolute index, offset included)."""

        def at(bn: Norm | None):
            return None if bn is None else functools.partial(bn.step, t=t)

        return StepNorms(hh=at(self.bn_hh), pre=at(self.bn_pre), c=at(self.bn_c))


def reference_direction(
    x: Tensor,
    batch_sizes: list[int],
    state: State,
    p: DirectionParams,
    step: StepFn,
    time_offset: int = 0,
    active: list[int] | None = None,
) -> tuple[Tensor, State]:
    """Run one direction over a sorted, zero-padded batch.

    x: (T, N, I), the sequences present at step t are the first batch_sizes[t] rows;
    state: tuple of (N, H). Returns the output (T, N, H), zero beyond each length, and the
    state of each sequence at its own last step.

    ``active`` (T,), for a padded batch read flipped in time (``reverse="padded"``,
    Cooijmans §5.4: the padding comes first): the rows [active[t], batch_sizes[t]) are
    still in their leading padding at step t. They are computed with the others (their zero
    input, their state) and enter the step's statistics, but their state is not updated
    (it stays the initial state) and their output is zero. ``active`` increases (rows
    sorted by decreasing length); its counts are the unpadded frames of sequence-wise
    statistics.
    """
    N = x.shape[1]
    present_sizes = batch_sizes if active is None else active
    if p.bn_ih is not None and p.input_stats == "sequence":
        # Laurent eq. 20-21: one mean and variance over all unpadded frames.
        wx_steps = p.bn_ih.sequence(F.linear(x, p.weight_ih), present_sizes).unbind(0)
    else:
        wx_steps = None
    outputs = []
    for t, x_t in enumerate(x.unbind(0)):  # unbind: indexing x[t] makes backward O(T^2)
        n = batch_sizes[t]
        if wx_steps is not None:
            wx = wx_steps[t][:n]
        else:
            wx = F.linear(x_t[:n], p.weight_ih)  # (n, G*H)
            if p.bn_ih is not None:
                wx = p.bn_ih.step(wx, t + time_offset)
        new = step(
            wx, tuple(s[:n] for s in state), p.weight_hh, p.bias, p.step_norms(t + time_offset)
        )
        if active is not None and active[t] < n:
            # Cooijmans §5.4: the state is not updated from the (leading) padding: those
            # rows keep their state, which is still the initial one, and output zero.
            m = active[t]
            new = tuple(torch.cat([a[:m], s[m:n]]) for a, s in zip(new, state))
            h = new[0]
            new_out = torch.cat([h[:m], h.new_zeros(n - m, h.shape[1])])
        else:
            new_out = new[0]
        if n < N:  # finished sequences keep their last state
            state = tuple(torch.cat([a, s[n:]]) for a, s in zip(new, state))
            outputs.append(torch.cat([new_out, new_out.new_zeros(N - n, new_out.shape[1])]))
        else:
            state = new
            outputs.append(new_out)
    return torch.stack(outputs), state
