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
) -> tuple[Tensor, State]:
    """Run one direction over a sorted, zero-padded batch.

    x: (T, N, I), the sequences present at step t are the first batch_sizes[t] rows;
    state: tuple of (N, H). Returns the output (T, N, H), zero beyond each length, and the
    state of each sequence at its own last step.
    """
    N = x.shape[1]
    if p.bn_ih is not None and p.input_stats == "sequence":
        # Laurent eq. 20-21: one mean and variance over all unpadded frames.
        wx_steps = p.bn_ih.sequence(F.linear(x, p.weight_ih), batch_sizes).unbind(0)
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
        if n < N:  # finished sequences keep their last state
            state = tuple(torch.cat([a, s[n:]]) for a, s in zip(new, state))
            outputs.append(torch.cat([new[0], new[0].new_zeros(N - n, new[0].shape[1])]))
        else:
            state = new
            outputs.append(new[0])
    return torch.stack(outputs), state
