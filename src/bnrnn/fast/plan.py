"""The plan of one call of the fast path: every decision about how one direction runs,
made once per call from the shapes and the options (`make_plan`) and frozen; the tensors
the call fills are apart (`bnrnn.fast.buffers`).

Notation: T steps, N sequences sorted by decreasing length (the ``sizes[t]`` first rows are
present at step t), H hidden units, G = gates * H (LSTM 4 gates, RNN 1), I input features.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .sync import Sync

# The kinds of recurrence (the compiled loops' ``kind``).
LSTM, RNN_TANH, RNN_RELU = "lstm", "rnn_tanh", "rnn_relu"

# The BN placements of a direction, by key: what each normalises. Every per-BN argument of
# the operators and every per-BN field below follows this table (``mean_<key>``, ...).
NORMS = {
    "ih": "W_ih x (Cooijmans eq. 6, Laurent eq. 18)",
    "hh": "W_hh h (Cooijmans eq. 6)",
    "pre": "W_hh h + W_ih x, the whole pre-activation (Laurent eq. 17)",
    "c": "the cell c_t (Cooijmans eq. 8)",
}
NORM_KEYS = tuple(NORMS)
# With norm="layer" the ih, hh and c keys are layer normalisations (Ba et al. §6.5,
# supplementary): statistics of each row over its features, (T, N) rows of means and
# biased variances, always from the batch, never population rows nor tracked.

# Up to this input size the compiled loops compute W_ih x_t inside each step (sequential
# MNIST has one input): a (T, N, G) buffer and a GEMM with K = 1 cost more than the step.
INLINE_MAX_INPUT = 8
# Steps per W_ih x GEMM in a forward without backward (Python loops).
EVAL_CHUNK = 32


@dataclass(frozen=True)
class NormPlan:
    """One BN of the direction in this call. ``batch_steps``: steps [0, batch_steps) have
    batch statistics (the sequences present decrease, so they come first), computed by
    the loops; the later steps read population rows. ``sequence``: one statistic over all
    unpadded frames (Laurent eq. 20-21), computed before the loops; ``batch_steps`` is then
    T (from the batch) or 0 (the population row)."""

    eps: float
    batch_steps: int
    sequence: bool = False
    # layer normalisation (Ba et al.): per-row statistics (T, N), computed at every step
    # by the loops; batch_steps is 0 (no per-feature batch statistics, nothing tracked)
    layer: bool = False

    def batch_at(self, t: int) -> bool:
        """Whether the loops compute step t's (per-feature) batch statistics."""
        return not self.sequence and t < self.batch_steps


@dataclass(frozen=True)
class Plan:
    kind: str  # LSTM, RNN_TANH or RNN_RELU
    sizes: tuple[int, ...]  # (T,) sequences present at each step
    N: int
    H: int
    G: int
    I: int
    ih: NormPlan | None  # the BNs present (see NORMS)
    hh: NormPlan | None
    pre: NormPlan | None
    c: NormPlan | None
    save: bool  # a backward follows: keep what it reads
    compiled: bool  # the compiled loops run it (else the Python loops)
    # Wider input than hidden: recomputing W_ih x in the backward would cost more than the
    # step's own W_hh h; keep xhat_ih instead (one (T, N, G) buffer).
    keep_ih: bool
    # compiled loops only: W_ih x_t computed inside the step from x (small input sizes)
    inline_ih: bool
    # compiled loops only: W_ih x_t computed at each step into a one-step wx, by each block
    # for its own columns, forward and backward
    step_ih: bool
    # compiled loops only, without a backward: x and the output run in reversed time (the
    # reverse direction of a batch with no padding, without flipping x and the output)
    reverse: bool
    # compiled loops only, LSTM with BN of both W_ih x and W_hh h, or of the pre-activation:
    # the gate activations are one step, and the backward recomputes them
    recompute_act: bool
    # synchronised statistics (design.md, Synchronised statistics): the process group and
    # the sequences present at each step over it; the Python loops run the call
    sync: Sync | None = None

    @property
    def stat_sizes(self) -> tuple[int, ...]:
        """(T,) the sequences each step's statistics are over: this process's, or the
        whole group's when synchronised. They decide which steps have batch statistics."""
        return self.sizes if self.sync is None else self.sync.sizes

    @property
    def deferred_ih(self) -> bool:
        """Synchronised frame-wise BN of W_ih x: its statistics for all steps are reduced
        in one all-reduce before the loop, and its backward (the sums of dy and dy * xhat)
        for a chunk of steps in one after the chunk's loop; the loops leave it alone (it
        does not feed the recurrence)."""
        return self.sync is not None and self.ih is not None and not self.ih.sequence

    # (T,) or None. A padded batch read flipped in time (reverse="padded", Cooijmans §5.4:
    # the padding first): sizes[t] is N, every row enters the statistics of every step, but
    # only the rows [0, active[t]) are updated; the rows [active[t], N) are in their leading
    # padding: computed, their state held at (h0, c0), their output zero. Increasing.
    active: tuple[int, ...] | None = None

    @property
    def T(self) -> int:
        return len(self.sizes)

    @property
    def lstm(self) -> bool:
        return self.kind == LSTM

    @property
    def present_sizes(self) -> tuple[int, ...]:
        """(T,) the unpadded frames at each step (the rows [0, present_sizes[t])): those of
        sequence-wise statistics (Laurent eq. 20-21)."""
        return self.sizes if self.active is None else self.active

    def updated(self, t: int) -> int:
        """The rows [0, updated(t)) whose state step t updates (the others are padding)."""
        return self.sizes[t] if self.active is None else self.active[t]

    def initial_from(self, t: int) -> int:
        """The first row whose state before step t is still the initial one (h0, c0)
        because it has read only padding so far (Cooijmans §5.4); N when none is."""
        if t == 0:
            return 0
        return self.N if self.active is None else self.active[t - 1]

    @property
    def sequence_ih(self) -> bool:
        """BN of W_ih x with one statistic over all frames (Laurent eq. 20-21)."""
        return self.ih is not None and self.ih.sequence

    @property
    def keep_wx(self) -> bool:
        """wx (normalised) is kept for the backward: it holds xhat of the whole
        pre-activation, or sequence-wise statistics need all steps at once, or the input
        is wide (keep_ih)."""
        return self.save and (self.pre is not None or self.sequence_ih or self.keep_ih)

    @property
    def eval_chunks(self) -> bool:
        """The Python loops' forward without a backward takes W_ih x EVAL_CHUNK steps at a
        time (one GEMM per chunk), not all steps at once."""
        return (
            not self.save
            and self.sync is None
            and not (self.inline_ih or self.step_ih or self.sequence_ih)
            and self.T > EVAL_CHUNK
        )

    @property
    def layer(self) -> bool:
        """Layer normalisation (norm="layer"): every norm present is per row."""
        return any(nm.layer for _, nm in self.norms())

    def norm(self, key: str) -> NormPlan | None:
        return getattr(self, key)

    def norms(self) -> Iterator[tuple[str, NormPlan]]:
        """The BNs present, as (key, plan)."""
        for key in NORM_KEYS:
            nm = getattr(self, key)
            if nm is not None:
                yield key, nm


def batch_steps(sizes: tuple[int, ...] | list[int], batch: bool, sequence: bool) -> int:
    """The steps with batch statistics (the first ones) of a BN that uses batch statistics
    (``batch``): a step with fewer than two sequences present has no batch variance and
    reads the population row; sequence-wise statistics (one for all frames) are from the
    batch (all T steps) if it has two frames or more."""
    if not batch:
        return 0
    if sequence:
        return len(sizes) if sum(sizes) >= 2 else 0
    return steps_of_two(sizes)


def counted_sizes(
    sizes: Sequence[int], active: Sequence[int] | None, sequence: bool
) -> Sequence[int]:
    """(T,) what a BN's batch statistics count at each step: ``sizes`` (the present rows,
    the group's when synchronised), or for sequence-wise statistics of a padded batch read
    flipped (``active``, Cooijmans §5.4) its unpadded frames (Laurent eq. 20-21)."""
    return active if (sequence and active is not None) else sizes


def steps_of_two(sizes: tuple[int, ...] | list[int]) -> int:
    """The number of first steps with two sequences or more present (sizes decrease)."""
    if sizes[-1] >= 2:  # (the common case without a scan: every step)
        return len(sizes)
    return next(t for t, n in enumerate(sizes) if n < 2)


def tracked_rows(steps: int, time_offset: int, max_length: int) -> tuple[int, int]:
    """(first row, number of rows) of the population rows that the first ``steps`` steps
    from ``time_offset`` update: those within max_length (later steps are not tracked)."""
    return min(time_offset, max_length), max(0, min(steps, max_length - time_offset))


def make_plan(
    kind: str,
    sizes: tuple[int, ...],
    shape: tuple[int, int, int],
    H: int,
    G: int,
    norms: dict[str, tuple[float, bool]],
    sequence_ih: bool,
    save: bool,
    compiled: bool,
    reverse: bool,
    layer: bool = False,
    sync: Sync | None = None,
    active: tuple[int, ...] | None = None,
) -> Plan:
    """The plan of one call over x of ``shape`` (T, N, I). ``norms``: for each BN present,
    (eps, whether it uses batch statistics: training, or collecting population
    statistics). ``layer``: the norms are layer normalisations (norm="layer"; the
    compiled loops run them in csrc/layer.h, with W_ih x given for all steps or computed in
    the step for a small input, and the gate activations kept). ``sync``: synchronised
    statistics, over the group's sequences present at each step (the Python loops).
    ``active``: see `Plan.active` (not with ``reverse``, ``layer`` nor ``sync``)."""
    T, N, I = shape
    assert active is None or not (reverse or layer or sync)
    compiled = compiled and sync is None  # the compiled loops issue no collectives
    stat_sizes = sizes if sync is None else sync.sizes

    def norm(key: str) -> NormPlan | None:
        if key not in norms:
            return None
        eps, batch = norms[key]
        if layer:
            return NormPlan(eps, 0, layer=True)
        sequence = key == "ih" and sequence_ih
        counted = counted_sizes(stat_sizes, active, sequence)
        return NormPlan(eps, batch_steps(counted, batch, sequence), sequence)

    ih, hh, pre, c = (norm(key) for key in NORM_KEYS)
    lstm = kind == LSTM
    keep_ih = ih is not None and I > H
    sequence = ih is not None and ih.sequence
    # Cooijmans eq. 6 and Laurent eq. 17 in the compiled loops: the backward recomputes the
    # gate activations from xhat_hh (kept) and xhat_ih (kept or recomputed), or from
    # xhat_pre (kept), instead of keeping a (T, N, G) buffer of them: fresh memory is dear.
    recompute_act = (
        compiled and lstm and not layer and ((ih is not None and hh is not None) or pre is not None)
    )
    # ("preactivation" keeps xhat of the whole pre-activation in wx for the backward)
    inline_ih = (
        compiled
        and I <= INLINE_MAX_INPUT
        and not ((pre is not None or keep_ih) and save)
        and not sequence
    )
    keep_wx = save and (pre is not None or sequence or keep_ih)
    # The backward keeps W_ih x (normalised) only for "preactivation", sequence-wise
    # statistics and inputs wider than H; otherwise it recomputes xhat_ih. Then the compiled
    # loops compute W_ih x_t at each step, forward and backward, each block its own columns
    # (read back from L1/L2; one GEMM per chunk of steps was no faster). The layer loops
    # keep xhat_ih for their backward, so they compute W_ih x_t in the step only without one.
    step_ih = compiled and not (layer and save) and not inline_ih and not sequence and not keep_wx
    return Plan(
        kind=kind,
        sizes=sizes,
        N=N,
        H=H,
        G=G,
        I=I,
        ih=ih,
        hh=hh,
        pre=pre,
        c=c,
        save=save,
        compiled=compiled,
        keep_ih=keep_ih,
        inline_ih=inline_ih,
        step_ih=step_ih,
        reverse=reverse,
        recompute_act=recompute_act,
        sync=sync,
        active=active,
    )
