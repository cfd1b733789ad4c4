"""Input handling: every accepted input form to one sorted, zero-padded batch and back.

Accepted, as by `torch.nn.LSTM`: (T, N, I), (N, T, I) with ``batch_first``, unbatched (T, I),
a `PackedSequence`, and a padded tensor with ``lengths``. Internally a batch is time-major
(T, N, I) with rows sorted by decreasing length (so the sequences present at step t are the
first ``batch_sizes[t]`` rows) and the padding set to zero, so that no padding value can
reach a statistic or a gradient.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence, pad_packed_sequence


@dataclass
class SortedBatch:
    """A batch in the internal layout, and what is needed to give results back."""

    x: Tensor  # (T, N, I), rows sorted by decreasing length, zero beyond each length
    lengths: Tensor  # (N,) int64 on the CPU, sorted, decreasing
    batch_sizes: list[int]  # (T,) sequences present at each step
    order: Tensor | None  # sorted row k is the caller's row order[k]; None: identity
    inverse: Tensor | None  # caller's row j is sorted row inverse[j]
    packed: PackedSequence | None  # the input, if packed
    batch_first: bool
    unbatched: bool

    def sort_state(self, state: Tensor) -> Tensor:
        """(L*D, N, H) in the caller's order -> sorted order."""
        return state if self.order is None else state.index_select(1, self.order.to(state.device))

    def unsort_state(self, state: Tensor) -> Tensor:
        """(L*D, N, H) sorted -> the caller's order (unbatched: (L*D, H))."""
        if self.inverse is not None:
            state = state.index_select(1, self.inverse.to(state.device))
        return state.squeeze(1) if self.unbatched else state

    def restore_output(self, out: Tensor) -> Tensor | PackedSequence:
        """(T, N, F) sorted output, zero beyond each length -> the caller's form."""
        if self.packed is not None:
            data = pack_padded_sequence(out, self.lengths, enforce_sorted=True).data
            p = self.packed
            return PackedSequence(data, p.batch_sizes, p.sorted_indices, p.unsorted_indices)
        if self.inverse is not None:
            out = out.index_select(1, self.inverse.to(out.device))
        if self.unbatched:
            return out.squeeze(1)
        return out.transpose(0, 1) if self.batch_first else out


def batch_sizes_of(lengths: Tensor, T: int) -> list[int]:
    """Number of sequences present at each step (the lengths in any order; sorted in
    decreasing order, they are the batch sizes of the sorted rows)."""
    return present_steps(lengths, T).sum(1).tolist()


def present(batch_sizes: Sequence[int], N: int, device: torch.device | None = None) -> Tensor:
    """(T, N) bool: sequence n is present at step t, for the N sequences sorted by
    decreasing length (the ``batch_sizes[t]`` first rows are present at step t)."""
    sizes = torch.as_tensor(list(batch_sizes), device=device)
    return torch.arange(N, device=device)[None, :] < sizes[:, None]


def present_steps(lengths: Tensor, T: int, device: torch.device | None = None) -> Tensor:
    """(T, N) bool: step t of sequence n is within its length ``lengths[n]``, for rows in
    any order (`present` for sorted rows, from the batch sizes)."""
    return (torch.arange(T)[:, None] < lengths.to("cpu")[None, :]).to(device)


def lengths_of(batch_sizes: Sequence[int], N: int) -> list[int]:
    """The length of each of the N sorted sequences, from the batch sizes."""
    return present(batch_sizes, N).sum(0).tolist()


def unpadded(batch_sizes: Sequence[int], N: int) -> bool:
    """Every one of the N sequences is present at every step (no padding)."""
    return all(n == N for n in batch_sizes)


def prepare_input(
    input: Tensor | PackedSequence,
    input_size: int,
    batch_first: bool,
    lengths: Tensor | Sequence[int] | None = None,
) -> SortedBatch:
    """Validate ``input`` (and ``lengths``) and bring it to the internal layout."""
    if isinstance(input, PackedSequence):
        if lengths is not None:
            raise ValueError("lengths must be None when input is a PackedSequence")
        _check_features(input.data, input_size, expected_dim=2, what="input.data")
        unsorted_view = PackedSequence(input.data, input.batch_sizes, None, None)
        x, lens = pad_packed_sequence(unsorted_view)  # (T, N, I), lengths decreasing
        order = input.sorted_indices
        inverse = input.unsorted_indices
        return SortedBatch(
            x, lens, input.batch_sizes.tolist(), order, inverse, input, batch_first, False
        )

    if not isinstance(input, Tensor):
        raise TypeError(f"input must be a Tensor or PackedSequence, got {type(input).__name__}")
    if input.dim() not in (2, 3):
        raise ValueError(f"LSTM: Expected input to be 2D or 3D, got {input.dim()}D tensor instead")
    _check_features(input, input_size, expected_dim=input.dim(), what="input")
    unbatched = input.dim() == 2
    x = input.unsqueeze(1) if unbatched else (input.transpose(0, 1) if batch_first else input)
    T, N = x.shape[0], x.shape[1]
    if T == 0 or N == 0:
        raise ValueError(
            f"input must have at least one step and one sequence, got {tuple(x.shape)}"
        )
    if lengths is None:
        lens = torch.full((N,), T, dtype=torch.long)
        return SortedBatch(x, lens, [N] * T, None, None, None, batch_first, unbatched)

    lens = torch.as_tensor(lengths).detach().to("cpu")
    if lens.dtype.is_floating_point or lens.dim() != 1 or lens.numel() != N:
        raise RuntimeError(
            f"lengths must be a 1D integer tensor with one entry per sequence. "
            f"Expected shape ({N},), got {tuple(lens.shape)} of dtype {lens.dtype}"
        )
    lens = lens.long()
    if int(lens.min()) < 1:
        raise RuntimeError(
            f"lengths must be at least 1 (zero-length sequences are not supported), "
            f"got {lens.tolist()}"
        )
    if int(lens.max()) > T:
        raise RuntimeError(
            f"lengths must not exceed the number of steps of the input. "
            f"Expected at most {T}, got {int(lens.max())}"
        )
    lens_sorted, order = torch.sort(lens, descending=True, stable=True)
    inverse = torch.empty_like(order)
    inverse[order] = torch.arange(N)
    x = x.index_select(1, order.to(x.device))
    sizes = batch_sizes_of(lens_sorted, T)
    mask = present(sizes, N, x.device)
    x = torch.where(mask.unsqueeze(-1), x, 0)  # padding values never enter anything
    return SortedBatch(x, lens_sorted, sizes, order, inverse, None, batch_first, unbatched)


def reverse_padded(x: Tensor, lengths: Tensor) -> Tensor:
    """Reverse each sequence's unpadded part, leaving the padding in place (Cooijmans §5.4).

    x: (T, N, F); lengths: (N,). An involution: applying it twice gives ``x`` back.
    """
    T = x.shape[0]
    if bool((lengths == T).all()):  # no padding: a flip (and a flip as its backward)
        return x.flip(0)
    t = torch.arange(T)[:, None]
    L = lengths[None, :]
    index = torch.where(present_steps(lengths, T), L - 1 - t, t).to(x.device)  # (T, N)
    return x.gather(0, index.unsqueeze(-1).expand_as(x))


def _check_features(x: Tensor, input_size: int, expected_dim: int, what: str) -> None:
    if not x.is_floating_point():
        raise TypeError(f"{what} must be a floating point tensor, got dtype {x.dtype}")
    if x.dim() != expected_dim:
        raise ValueError(f"{what} must have {expected_dim} dimensions, got {x.dim()}")
    if x.size(-1) != input_size:
        raise RuntimeError(
            f"input.size(-1) must be equal to input_size. Expected {input_size}, got {x.size(-1)}"
        )
