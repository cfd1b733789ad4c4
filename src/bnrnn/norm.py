"""Batch normalisation with population statistics kept per time step.

`StepBatchNorm` is the one normalisation module of the library. It holds the scale (and
optional shift) shared over time and one row of population statistics per step
(Cooijmans §3, footnote 1: "we separate only the statistics over time and not the gamma and
beta parameters"). It normalises in three shapes:

- `step(z, t)`: one step's present rows, (n, F). The reference path and the cells use it.
- `frames(z, batch_sizes)`: every step at once, (T, N, F), frame-wise statistics over the
  sequences present at each step (Laurent §4.1). Equal to calling `step` for each t.
- `sequence(z, batch_sizes)`: one mean and variance over all unpadded frames of the batch
  (Laurent eq. 20-21); the module then has a single row of statistics.

Rows of a batch are sorted by decreasing length, so the sequences present at step t are
the first `batch_sizes[t]` rows (as in `torch.nn.utils.rnn.PackedSequence`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TypeVar

import torch
import torch.distributed as dist
from torch import Tensor, nn

from .checks import finite, momentum_value, positive_eps, positive_int, warn_user
from .packing import present

T_steps = TypeVar("T_steps", int, Tensor)


class StepBatchNorm(nn.Module):
    """BN(z; gamma, beta) = beta + gamma * (z - mean) / sqrt(var + eps), statistics per step.

    Parameters: ``weight`` (gamma) of shape (F,), initialised to ``gamma_init`` (Cooijmans §4:
    0.1); ``bias`` (beta) of shape (F,), initialised to 0, or ``None`` when ``shift=False``
    (Cooijmans §3: the ih and hh terms have no shift, the LSTM bias plays that role).

    Buffers: ``running_mean`` and ``running_var`` of shape (max_length, F) (unbiased variance
    stored, as `torch.nn.BatchNorm1d` does) and ``num_batches_tracked`` of shape
    (max_length,), one count per row. ``momentum=None`` makes each row a cumulative average.

    Population statistics are read through `population_row`: step t reads its own row up
    to the last tracked row (``num_batches_tracked > 0``) and that row beyond it, so steps
    past the longest sequence trained on (or past max_length) reuse the last step's
    statistics (Cooijmans §3: "we use the population statistic of time T_max for all time
    steps beyond it"). In training, steps beyond max_length use batch statistics and are not
    tracked, with a warning once (design.md, Training beyond max_length), so that the last
    row is never silently corrupted.

    A training step with fewer than two sequences present has no batch variance: it uses
    that step's population statistics instead (design.md, Degenerate steps), so that no NaN
    or inf appears.
    """

    weight: Tensor
    bias: Tensor | None
    running_mean: Tensor
    running_var: Tensor
    num_batches_tracked: Tensor

    def __init__(
        self,
        num_features: int,
        max_length: int,
        shift: bool = False,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        gamma_init: float = 0.1,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        num_features = positive_int("num_features", num_features)
        max_length = positive_int("max_length", max_length)
        eps = positive_eps(eps)
        momentum = momentum_value(momentum)
        gamma_init = finite("gamma_init", gamma_init)
        factory = {"device": device, "dtype": dtype}
        self.num_features = num_features
        self.max_length = max_length
        self.eps = eps
        self.momentum = momentum
        self.gamma_init = gamma_init
        # Set by `update_population_stats`: batch statistics and tracking even in eval mode.
        self.collecting = False
        # Set by `convert_sync_batchnorm` / `sync_stats=True`: all-reduce the statistics.
        self.sync = False
        self.process_group: object | None = None
        self._warned_beyond = False
        self.weight = nn.Parameter(torch.empty(num_features, **factory))
        if shift:
            self.bias = nn.Parameter(torch.empty(num_features, **factory))
        else:
            self.register_parameter("bias", None)
        self.register_buffer("running_mean", torch.zeros(max_length, num_features, **factory))
        self.register_buffer("running_var", torch.ones(max_length, num_features, **factory))
        self.register_buffer(
            "num_batches_tracked", torch.zeros(max_length, dtype=torch.long, device=device)
        )
        self.reset_parameters()

    def reset_running_stats(self) -> None:
        self.running_mean.zero_()
        self.running_var.fill_(1.0)
        self.num_batches_tracked.zero_()

    def reset_parameters(self) -> None:
        self.reset_running_stats()
        nn.init.constant_(self.weight, self.gamma_init)
        if self.bias is not None:
            nn.init.zeros_(self.bias)

    def extra_repr(self) -> str:
        return (
            f"{self.num_features}, max_length={self.max_length}, eps={self.eps}, "
            f"momentum={self.momentum}, shift={self.bias is not None}"
        )

    @property
    def uses_batch_stats(self) -> bool:
        return self.training or self.collecting

    @property
    def syncing(self) -> bool:
        """Whether batch statistics are all-reduced over the process group now."""
        if not (
            self.sync and self.uses_batch_stats and dist.is_available() and dist.is_initialized()
        ):
            return False
        return dist.get_world_size(self.process_group) > 1

    def _synced_moments(
        self, sums: Tensor, squares: Tensor, counts: Tensor
    ) -> tuple[Tensor, Tensor, Tensor]:
        """`synced_moments` over the module's process group (default: the world)."""
        return synced_moments(sums, squares, counts, self.process_group or dist.group.WORLD)

    # -- normalisation ------------------------------------------------------------------

    def step(self, z: Tensor, t: int) -> Tensor:
        """Normalise step ``t``'s present rows ``z`` of shape (n, F)."""
        n = z.shape[0]
        if self.syncing:  # statistics over the step's sequences on every process
            mean, var, count = self._synced_moments(
                z.sum(0, keepdim=True), z.square().sum(0, keepdim=True), z.new_tensor([n])
            )
            mean, var, n = mean[0], var[0], int(count[0])
        elif self.uses_batch_stats and n >= 2:
            mean = z.mean(0)
            var = z.var(0, unbiased=False)
        if self.uses_batch_stats and n >= 2:
            self._track(torch.tensor([t]), mean.detach()[None], var.detach()[None], [n])
        else:
            row = self.population_row(t)
            mean, var = self.running_mean[row], self.running_var[row]
        return self._scale((z - mean) * torch.rsqrt(var + self.eps))

    def frames(self, z: Tensor, batch_sizes: Sequence[int], time_offset: int = 0) -> Tensor:
        """Frame-wise normalisation of all steps at once; ``z`` is (T, N, F), zero-padded."""
        T, N = z.shape[0], z.shape[1]
        steps = torch.arange(time_offset, time_offset + T, device=z.device)
        if not self.uses_batch_stats:
            rows = self.population_row(steps)
            mean, var = self.running_mean[rows], self.running_var[rows]  # (T, F)
        else:
            sizes = torch.as_tensor(list(batch_sizes), device=z.device)
            mask = present(batch_sizes, N, z.device).unsqueeze(-1)
            if self.syncing:
                frames = torch.where(mask, z, 0)
                batch_mean, batch_var, sizes = self._synced_moments(
                    frames.sum(1), frames.square().sum(1), sizes
                )
            else:
                count = sizes.clamp(min=1).to(z.dtype)[:, None]  # (T, 1)
                batch_mean = torch.where(mask, z, 0).sum(1) / count
                centred = torch.where(mask, z - batch_mean[:, None], 0)
                batch_var = centred.square().sum(1) / count
            good = sizes >= 2
            self._track(
                steps[good],
                batch_mean.detach()[good],
                batch_var.detach()[good],
                sizes[good].tolist(),
            )
            # Fewer than two sequences present: no batch variance, use the population row,
            # read after tracking the earlier steps (as `step` called for each t reads it).
            rows = self.population_row(steps)
            ok = good[:, None]
            mean = torch.where(ok, batch_mean, self.running_mean[rows])
            var = torch.where(ok, batch_var, self.running_var[rows])
        return self._scale((z - mean[:, None]) * torch.rsqrt(var[:, None] + self.eps))

    def sequence(self, z: Tensor, batch_sizes: Sequence[int]) -> Tensor:
        """Sequence-wise normalisation (Laurent eq. 20-21): one mean and variance over all
        unpadded frames of ``z`` (T, N, F); statistics live in row 0."""
        n = sum(batch_sizes)
        if self.syncing:
            frames = torch.where(present(batch_sizes, z.shape[1], z.device).unsqueeze(-1), z, 0)
            mean, var, count = self._synced_moments(
                frames.sum((0, 1))[None], frames.square().sum((0, 1))[None], z.new_tensor([n])
            )
            mean, var, n = mean[0], var[0], int(count[0])
        elif self.uses_batch_stats and n >= 2:
            mean, var = sequence_moments(z, batch_sizes)
        if self.uses_batch_stats and n >= 2:
            self._track(torch.tensor([0]), mean.detach()[None], var.detach()[None], [n])
        else:
            mean, var = self.running_mean[0], self.running_var[0]
        return self._scale((z - mean) * torch.rsqrt(var + self.eps))

    def _scale(self, z_hat: Tensor) -> Tensor:
        out = z_hat * self.weight
        return out if self.bias is None else out + self.bias

    # -- population statistics ----------------------------------------------------------

    def last_row(self) -> int:
        """The last row that holds statistics: the last tracked one (``num_batches_tracked``
        > 0), or, when no row was tracked (a new or reset module), the last row: the rows are
        then the initial ones (mean 0, variance 1) or what was written into them directly,
        and each step reads its own."""
        tracked = self.num_batches_tracked.nonzero()
        return int(tracked[-1, 0]) if len(tracked) else self.max_length - 1

    def population_row(self, steps: T_steps) -> T_steps:
        """The population row that step(s) ``steps`` (absolute indices: an int or a tensor)
        read: the step's own row up to `last_row`, that row beyond it (Cooijmans §3: "we use
        the population statistic of time T_max for all time steps beyond it"). So steps
        past the longest sequence trained on (or collected by `update_population_stats`)
        reuse its last step's statistics instead of rows that never held any. Rows before
        `last_row` are read as they are, tracked or not. This is the one place of the rule:
        `step`, `frames` and the fast path all read rows through it."""
        last = self.last_row()
        if isinstance(steps, Tensor):
            return steps.clamp(max=last)
        return min(steps, last)

    @torch.no_grad()
    def _track(
        self, steps: Tensor | range, mean: Tensor, var: Tensor, counts: Sequence[int]
    ) -> None:
        """Fold batch statistics (k, F) of the given steps into their population rows.
        ``steps``: a tensor of step indices, or a range of consecutive ones (updated through
        slices: no gather and scatter of (k, F) rows)."""
        if not self.uses_batch_stats or len(counts) == 0:
            return
        n = torch.as_tensor(list(counts), dtype=var.dtype, device=var.device)
        if isinstance(steps, range):
            if steps.step == 1 and steps.stop <= self.max_length:
                self._fold(slice(steps.start, steps.stop), mean, var, n)
                return
            steps = torch.tensor(list(steps))
        steps = steps.to(self.running_mean.device)
        inside = steps < self.max_length
        if not bool(inside.all()):
            self._warn_beyond(int(steps[~inside].min()))
        if not bool(inside.any()):
            return
        self._fold(steps[inside], mean[inside], var[inside], n[inside])

    def _warn_beyond(self, step: int) -> None:
        """Warn (once per module) that training steps from ``step`` on, beyond max_length,
        are not tracked."""
        if self._warned_beyond:
            return
        warn_user(
            f"training on step {step} (and any later step) beyond "
            f"max_length={self.max_length}: batch statistics are used there and not "
            "tracked; raise max_length to keep population statistics for these steps"
        )
        self._warned_beyond = True

    def _fold(self, rows: Tensor | slice, mean: Tensor, var: Tensor, n: Tensor) -> None:
        """The population rows ``rows`` (indices, or a slice: updated in place through
        views) take in the batch statistics (k, F) of n values each."""
        self.running_mean[rows], self.running_var[rows], self.num_batches_tracked[rows] = (
            folded_statistics(
                self.running_mean[rows],
                self.running_var[rows],
                self.num_batches_tracked[rows],
                mean,
                var,
                n,
                self.momentum,
            )
        )


def sequence_moments(z: Tensor, batch_sizes: Sequence[int]) -> tuple[Tensor, Tensor]:
    """The mean and biased variance (F,) of ``z`` (T, N, F) over all its unpadded frames
    (Laurent eq. 20-21)."""
    mask = present(batch_sizes, z.shape[1], z.device).unsqueeze(-1)
    n = sum(batch_sizes)
    mean = torch.where(mask, z, 0).sum((0, 1)) / n
    var = torch.where(mask, z - mean, 0).square().sum((0, 1)) / n
    return mean, var


def synced_moments(
    sums: Tensor, squares: Tensor, counts: Tensor, group: object
) -> tuple[Tensor, Tensor, Tensor]:
    """All-reduce per-row sums (K, F), sums of squares (K, F) and counts (K,) over the
    process group ``group`` in one differentiable call; return the global mean, biased
    variance and count. Gradients flow back through the reduction to every process's rows
    (design.md, Synchronised statistics)."""
    F = sums.shape[1]
    packed = torch.cat([sums, squares, counts[:, None].to(sums.dtype)], 1)
    packed = _AllReduceSum.apply(packed, group)
    total, total_sq, n = packed.split([F, F, 1], 1)
    n = n.squeeze(1)
    mean, var = moments_of_sums(total, total_sq, n.clamp(min=1)[:, None])
    return mean, var, n.detach().round().long()


def moments_of_sums(total: Tensor, squares: Tensor, n: Tensor | int) -> tuple[Tensor, Tensor]:
    """Mean and biased variance of n values from their sum and sum of squares (the form
    in which synchronised statistics are all-reduced)."""
    mean = total / n
    return mean, (squares / n - mean.square()).clamp(min=0)


def group_batch_sizes(batch_sizes: Sequence[int], group: object, device: torch.device) -> list[int]:
    """The sequences present at each step over the process group (every process passes
    the same number of steps): one all-reduce, on the data's device (NCCL reduces CUDA
    tensors only)."""
    sizes = torch.tensor(list(batch_sizes), device=device)
    dist.all_reduce(sizes, group=group)
    return sizes.tolist()


def folded_statistics(
    mean_rows: Tensor,
    var_rows: Tensor,
    counts: Tensor,
    mean: Tensor,
    var: Tensor,
    n: Tensor,
    momentum: float | None,
) -> tuple[Tensor, Tensor, Tensor]:
    """Population rows (k, F) and their counts (k,) after taking in the batch statistics
    (k, F) of ``n`` (k,) values each (mean, biased variance): a running average with
    ``momentum``, or the cumulative average (``None``, as torch.nn.BatchNorm); the unbiased
    variance is kept. New tensors; the module writes them into its buffers
    (`StepBatchNorm._fold`), the fast path returns them to its caller."""
    unbiased = var * (n / (n - 1))[:, None]
    counts = counts + 1
    if momentum is None:
        factor = (1.0 / counts.to(var.dtype))[:, None]
    else:
        factor = torch.full_like(n, momentum)[:, None]
    return (
        mean_rows + factor * (mean - mean_rows),
        var_rows + factor * (unbiased - var_rows),
        counts,
    )


class _AllReduceSum(torch.autograd.Function):
    """Differentiable all-reduce (sum): the gradient of a sum over processes with respect
    to each process's term is the sum of the processes' incoming gradients."""

    @staticmethod
    def forward(ctx, tensor: Tensor, group: object) -> Tensor:  # type: ignore[override]
        ctx.group = group
        out = tensor.clone()
        dist.all_reduce(out, group=group)
        return out

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:  # type: ignore[override]
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, group=ctx.group)
        return grad, None
