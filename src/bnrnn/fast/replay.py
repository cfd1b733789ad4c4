"""The direction replayed differentiably, for gradients whose own graph is wanted
(``create_graph=True``: a gradient penalty, second derivatives).

The fast path's backward is hand-written and not itself differentiable. When a backward
runs with grad mode on, the operator's backward replays the direction instead with the
plain reference loop (`bnrnn.reference.reference_direction`) from the saved inputs, with
the statistics the forward used: batch statistics recomputed from the batch (so that they
are differentiated) at the steps where the forward computed them, the forward's
population rows elsewhere; nothing is tracked. Differentiating the replay with
``create_graph=True`` gives the gradients and their graph. With synchronised statistics
the batch statistics are all-reduced differentiably, step by step, as the reference path
does (`bnrnn.norm.synced_moments`).
"""

from __future__ import annotations

import functools

import torch
from torch import Tensor

from ..functional import lstm_step, rnn_step
from ..norm import sequence_moments, synced_moments
from ..packing import present
from ..reference import DirectionParams, reference_direction
from .buffers import NormStats
from .plan import LSTM, RNN_TANH, NormPlan, Plan
from .run import Inputs
from .sync import Sync


class _ReplayNorm:
    """One BN of the replay with `StepBatchNorm`'s normalising interface (``step``,
    ``sequence``) over the steps of this call (t from 0)."""

    def __init__(
        self,
        nm: NormPlan,
        stats: NormStats,
        gamma: Tensor,
        beta: Tensor | None,
        sync: Sync | None = None,
    ) -> None:
        self.nm, self.stats, self.weight, self.bias = nm, stats, gamma, beta
        self.sync = sync

    def _synced(self, sums: Tensor, squares: Tensor, n: int) -> tuple[Tensor, Tensor]:
        """The mean and variance (F,) over the group from this process's sums (F,) of n
        values."""
        count = sums.new_tensor([n])
        mean, var, _ = synced_moments(sums[None], squares[None], count, self.sync.group)
        return mean[0], var[0]

    def _scale(self, z_hat: Tensor) -> Tensor:
        out = z_hat * self.weight
        return out if self.bias is None else out + self.bias

    def step(self, z: Tensor, t: int) -> Tensor:
        if self.nm.layer:  # each row over its features (Ba et al.)
            mean, var = z.mean(1, keepdim=True), z.var(1, unbiased=False, keepdim=True)
        elif self.nm.batch_at(t) and self.sync is not None:
            mean, var = self._synced(z.sum(0), z.square().sum(0), z.shape[0])
        elif self.nm.batch_at(t):
            mean, var = z.mean(0), z.var(0, unbiased=False)
        else:
            mean, var = self.stats.mean[t], self.stats.var[t]
        return self._scale((z - mean) * torch.rsqrt(var + self.nm.eps))

    def sequence(self, z: Tensor, batch_sizes: list[int]) -> Tensor:
        if self.nm.batch_steps > 0 and self.sync is not None:
            frames = torch.where(present(batch_sizes, z.shape[1], z.device)[..., None], z, 0)
            mean, var = self._synced(
                frames.sum((0, 1)), frames.square().sum((0, 1)), sum(batch_sizes)
            )
        elif self.nm.batch_steps > 0:
            mean, var = sequence_moments(z, batch_sizes)
        else:
            mean, var = self.stats.mean[0], self.stats.var[0]
        return self._scale((z - mean) * torch.rsqrt(var + self.nm.eps))


def replay(
    plan: Plan, inputs: Inputs, stats: dict[str, NormStats]
) -> tuple[Tensor, Tensor, Tensor | None]:
    """The output (T, N, H), h_n and c_n (N, H) of the direction, as the forward computed
    them, differentiably in every input."""
    norms = {}
    for key, nm in plan.norms():
        beta = inputs.beta_c if key == "c" else None
        norms[f"bn_{key}"] = _ReplayNorm(nm, stats[key], inputs.gamma[key], beta, plan.sync)
    params = DirectionParams(
        inputs.w_ih,
        inputs.w_hh,
        inputs.bias,
        input_stats="sequence" if plan.sequence_ih else "frame",
        **norms,
    )
    if plan.kind == LSTM:
        step, state = lstm_step, (inputs.h0, inputs.c0)
    else:
        nonlinearity = "tanh" if plan.kind == RNN_TANH else "relu"
        step, state = functools.partial(rnn_step, nonlinearity=nonlinearity), (inputs.h0,)
    active = None if plan.active is None else list(plan.active)  # Cooijmans §5.4
    out, state = reference_direction(inputs.x, list(plan.sizes), state, params, step, 0, active)
    return out, state[0], (state[1] if plan.kind == LSTM else None)
