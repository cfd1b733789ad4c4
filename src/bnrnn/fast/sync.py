"""Synchronised statistics on the fast path (design.md, Synchronised statistics): the
reductions the Python loops and `bnrnn.fast.run` issue so that W processes compute what
one process computes on the concatenated batch.

Every reduction is a sum over the process group of one flat buffer, one
``torch.distributed.all_reduce`` per call of `Sync.sum`, whatever it carries: the sum and
the sum of squares of one term's step (forward), the sums of dy and dy * xhat of one term's
step (backward), or those of every step of the input term at once. The counts are not
reduced: every process knows the sequences present at each step over the group
(``Sync.sizes``), agreed once per forward of the layers.

Every process issues the same reductions in the same order: which steps have batch
statistics and how the backward is chunked are decided from ``sizes``, the same on every
process, and a process whose batch has ended (no sequence present) still takes part in
each step's reductions with zero sums.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from ..norm import moments_of_sums
from ..packing import present


@dataclass(frozen=True)
class Sync:
    """The process group of a synchronised direction and the sequences present at each of
    its steps over the whole group, sizes (T,)."""

    group: Any  # a torch.distributed ProcessGroup
    sizes: tuple[int, ...]

    @staticmethod
    def of(group_name: str | None, sizes: list[int] | None) -> Sync | None:
        """The `Sync` of an operator's options (the group by its name), or None."""
        if group_name is None:
            return None
        from torch.distributed.distributed_c10d import _resolve_process_group

        assert sizes is not None
        return Sync(_resolve_process_group(group_name), tuple(sizes))

    def sum(self, *parts: Tensor, async_op: bool = False) -> Any:
        """Each of ``parts`` summed over the group, in one all-reduce of one flat buffer:
        new tensors of the same shapes (with ``async_op``: a `Pending` of them)."""
        flat = torch.cat([p.reshape(-1) for p in parts])
        work = dist.all_reduce(flat, group=self.group, async_op=async_op)
        pending = Pending(work, flat, [p.shape for p in parts])
        return pending if async_op else pending.wait()

    def step_moments(self, z: Tensor, t: int) -> tuple[Tensor, Tensor]:
        """The mean and biased variance (F,) of step t over the group; z (n, F) holds this
        process's present rows. One all-reduce of (2F,)."""
        total, squares = self.sum(z.sum(0), z.square().sum(0))
        return moments_of_sums(total, squares, self.sizes[t])

    def steps_moments(self, z: Tensor, local: tuple[int, ...], t1: int) -> tuple[Tensor, Tensor]:
        """The means and biased variances (t1, F) of steps [0, t1) over the group; z
        (T, N, F) holds this process's rows, ``local[t]`` of them present at step t. One
        all-reduce of (t1, 2F)."""
        frames = torch.where(present(local[:t1], z.shape[1], z.device)[..., None], z[:t1], 0)
        total, squares = self.sum(frames.sum(1), frames.square().sum(1))
        n = torch.tensor(self.sizes[:t1], dtype=z.dtype, device=z.device)[:, None]
        return moments_of_sums(total, squares, n)

    def sequence_moments(self, z: Tensor, local: tuple[int, ...]) -> tuple[Tensor, Tensor]:
        """The mean and biased variance (F,) over every unpadded frame of the group
        (Laurent eq. 20-21); z (T, N, F) as for `steps_moments`. One all-reduce of (2F,)."""
        frames = torch.where(present(local, z.shape[1], z.device)[..., None], z, 0)
        total, squares = self.sum(frames.sum((0, 1)), frames.square().sum((0, 1)))
        return moments_of_sums(total, squares, sum(self.sizes))


@dataclass
class Pending:
    """An all-reduce in flight (`Sync.sum` with ``async_op``): `wait` gives its parts."""

    work: Any
    flat: Tensor
    shapes: list[torch.Size]

    def wait(self) -> list[Tensor]:
        if self.work is not None:
            self.work.wait()
        sizes = [s.numel() for s in self.shapes]
        return [v.view(s) for v, s in zip(self.flat.split(sizes), self.shapes)]
