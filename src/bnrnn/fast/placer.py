"""Where the fast path's buffers start in memory (`Placer`)."""

from __future__ import annotations

import math

import torch
from torch import Tensor

# Smallest buffer taken from the compiled loops' cache (smaller ones come from the heap).
CACHED_MIN = 64 << 10


class Placer:
    """Buffers placed apart modulo 4 KiB. Buffers that a step reads and writes together
    (wh, cell, out, wx, d_wx, d_out, ...) starting at nearby offsets modulo 4 KiB alias in the L1
    cache sets and in the store-to-load checks, which slowed a mid-sized training step by
    half again when three of its buffers were placed so; and where the heap put them
    varied from call to call. ``new(*shape)`` makes an empty buffer like ``like``
    starting at the 64-byte offset farthest from every offset taken so far: those of the
    tensors given to ``take`` (made elsewhere: x, W_ih x from oneDNN, autograd's d_out) and
    of the buffers made here.

    With ``cached`` (the compiled loops loaded), buffers of CACHED_MIN bytes or more come
    from their buffer cache (see csrc/cache.h: reused instead of faulted in afresh),
    except those made with ``escapes=True``: tensors handed to the caller (the output,
    gradients) stay ordinary, resizable tensors."""

    def __init__(self, like: Tensor, *taken: Tensor | None, cached: bool = False) -> None:
        self.like = like
        self.cached = cached and like.device.type == "cpu"
        self.offsets: list[int] = []
        self.take(*taken)

    def take(self, *tensors: Tensor | None) -> None:
        for t in tensors:
            if t is not None and t.numel() > 0 and t.device.type == "cpu":
                self.offsets.append(t.data_ptr() % 4096)

    def _free_offset(self) -> int:
        """The first multiple of 64 in [0, 4096) farthest (circularly) from every offset."""
        if not self.offsets:
            return 0
        us = sorted(set(self.offsets))
        # Between neighbouring offsets a < b the distance to the nearest offset is
        # min(o - a, b - o): the best multiple of 64 in [a, b] is one of the two around
        # the midpoint: no scan of all 64, which is slow in Python.
        best = (1, 0)  # (-distance, offset)
        for a, b in zip(us, us[1:] + [us[0] + 4096]):
            low = (a + b) // 2 // 64 * 64
            for o in (low, low + 64):
                if a <= o <= b:
                    best = min(best, (-min(o - a, b - o), o % 4096))
        return best[1]

    def copy(self, t: Tensor, escapes: bool = False) -> Tensor:
        """A placed contiguous copy of t."""
        return self.new(*t.shape, escapes=escapes).copy_(t)

    def zeros(self, *shape: int, escapes: bool = False) -> Tensor:
        return self.new(*shape, escapes=escapes).zero_()

    def new(self, *shape: int, escapes: bool = False) -> Tensor:
        n = math.prod(shape)
        elem = self.like.element_size()
        size = n + 4096 // elem  # room to shift (allocations are 64-byte aligned)
        if self.cached and not escapes and size * elem >= CACHED_MIN:
            buf = torch.ops.bnrnn_fast.cached_empty(size, self.like.dtype)
        else:
            buf = self.like.new_empty(size)
        target = self._free_offset()
        shift = ((target - buf.data_ptr()) % 4096) // elem
        self.offsets.append(target)
        return buf[shift : shift + n].view(shape)
