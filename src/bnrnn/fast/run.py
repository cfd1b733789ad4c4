"""Running one direction on the fast path: the buffers, the chunks of steps, the
statistics around the loops, and the GEMMs outside them.

- `forward`: W_ih x for all steps as one GEMM (or in the steps: `Plan.inline_ih`,
  `Plan.step_ih`), the recurrence in the loops (compiled, or `bnrnn.fast.loops`), keeping
  what the backward needs; the statistics follow `StepBatchNorm.step` exactly: batch
  statistics over the sequences present at each step; population rows in evaluation and,
  in training, at steps where fewer than two sequences are present (read after the earlier
  steps of the same call have been tracked, as the step-by-step reference does). Nothing
  is written into the modules: the population rows after this call's batch statistics are
  returned (`Tracked`) for the caller to write.
- `backward`: the recurrence in reverse, a chunk of steps at a time (one GEMM per step for
  the gradient of h_{t-1}, the BN backward through the batch statistics of each step, with
  ``tanh(BN(c_t))`` and the normalised W_ih x recomputed rather than kept), then the
  weight gradients of the chunk as one large GEMM each.

With synchronised statistics (``plan.sync``, design.md, Synchronised statistics) the
statistics are over the sequences of every process of the group: the loops all-reduce the
terms that feed the recurrence step by step (`bnrnn.fast.loops`); here the input term's
statistics of all steps are all-reduced in one call before the loops, and its backward
once per chunk of steps after them (`Plan.deferred_ih`), overlapped with the chunk's
gradient of W_hh.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from ..norm import folded_statistics, sequence_moments
from ..packing import lengths_of, present, unpadded
from . import loops
from . import plan as plans
from .buffers import Buffers, GradBuffers, GradSums, NormStats, Params
from .onednn import add_weight_grad, linear
from .placer import Placer
from .plan import Plan

# The backward holds the gradients of W_ih x and W_hh h for chunks of
# max(MIN_CHUNK, ceil(T / CHUNKS)) steps at a time (see `backward`): each of these
# (K, N, G) buffers, and the recomputed xhat_ih, is 1 / CHUNKS of a saved one. Fewer,
# larger chunks make larger weight-gradient GEMMs; a ragged batch (packed, or lengths)
# already saves padding, so it takes 8 to stay within 1.5x nn.LSTM's memory.
MIN_CHUNK = 16
CHUNKS = 4
CHUNKS_RAGGED = 8


@dataclass(frozen=True)
class Inputs:
    """What one direction computes with (the differentiable inputs)."""

    x: Tensor  # (T, N, I), zero beyond each length
    h0: Tensor  # (N, H)
    c0: Tensor | None  # (N, H), LSTM
    w_ih: Tensor  # (G, I)
    w_hh: Tensor  # (G, H)
    bias: Tensor | None  # (G,): bias_ih + bias_hh + the shifts of the ih, hh, pre BNs
    gamma: dict[str, Tensor]  # (F,) by placement key
    beta_c: Tensor | None  # (H,)


@dataclass(frozen=True)
class Population:
    """A BN module's population statistics, read and never written here: rows
    (max_length, F) of means and unbiased variances, a count of tracked batches per row
    (max_length,), and the momentum of the running average (None: cumulative)."""

    mean: Tensor
    var: Tensor
    count: Tensor
    momentum: float | None

    @property
    def max_length(self) -> int:
        return self.mean.shape[0]

    def last_row(self, tracked: Tracked | None = None) -> int:
        """`StepBatchNorm.last_row` with this call's tracked rows counted as tracked: the
        last row holding statistics, or the last row when none was ever tracked."""
        seen = self.count.nonzero()
        last = int(seen[-1, 0]) if len(seen) else -1
        if tracked is not None and tracked.mean.shape[0] > 0:
            last = max(last, tracked.start + tracked.mean.shape[0] - 1)
        return last if last >= 0 else self.max_length - 1

    def rows(self, steps: Tensor, tracked: Tracked | None = None) -> Tensor:
        """The population row each (absolute) step reads (`StepBatchNorm.population_row`):
        its own up to the last row holding statistics, that row beyond it (Cooijmans §3)."""
        return steps.clamp(max=self.last_row(tracked))

    def row(self, step: int) -> int:
        """`rows` of one step, before this call tracks any."""
        return min(step, self.last_row())


@dataclass(frozen=True)
class Tracked:
    """The population rows [start, start + k) after this call's batch statistics were
    folded in (`folded_statistics`), for the caller to write into the module."""

    start: int
    mean: Tensor  # (k, F)
    var: Tensor  # (k, F)
    count: Tensor  # (k,)


def loops_of(plan: Plan) -> Any:
    """The loops that run the plan: the compiled ones, or `bnrnn.fast.loops`."""
    if plan.compiled:
        from . import compiled

        return compiled.load()
    return loops


# -- forward ------------------------------------------------------------------------------


def forward(
    plan: Plan, inputs: Inputs, populations: dict[str, Population], time_offset: int
) -> tuple[Tensor, Tensor, Tensor | None, Buffers, dict[str, Tracked]]:
    """Run the direction. Returns the output (T, N, H), zero beyond each length, each
    sequence's h and c at its own last step (N, H), the buffers the backward reads (with
    ``plan.save``), and the tracked population rows of the BNs with batch statistics."""
    x = inputs.x
    T, N, I = x.shape
    H, G = plan.H, plan.G
    S = T if plan.save else 1
    run = loops_of(plan)
    place = Placer(x, x, inputs.h0, cached=plan.compiled)
    new = place.new
    if plan.inline_ih or plan.step_ih:  # W_ih x_t is computed inside each step
        wx = new(1, N, G)
    elif plan.eval_chunks:
        wx = new(plans.EVAL_CHUNK, N, G)
    else:  # W_ih x for all steps at once; padded rows of x are zero and never read.
        wx = linear(x.reshape(T * N, I), inputs.w_ih).view(T, N, G)
        place.take(wx)
    p = Params(
        h0=inputs.h0.contiguous(),
        c0=None,
        # the compiled loops copy their blocks' columns from the view themselves
        w_hh_t=inputs.w_hh.t() if plan.compiled else inputs.w_hh.t().contiguous(),
        w_hh=None,
        bias=inputs.bias,
        gamma=inputs.gamma,
        beta_c=inputs.beta_c,
    )
    b = Buffers(
        wx=wx,
        wh=new(S if plan.hh else 1, N, G),
        gates=new(S if plan.lstm and not plan.recompute_act else 1, N, G),
        out=new(T, N, H, escapes=True),
    )
    if plan.inline_ih or plan.step_ih:
        p.x = x.contiguous()
        p.w_ih_t = place.copy(inputs.w_ih.t())
    if plan.lstm:
        b.cell = new(S, N, H)
        b.tanh_cell = new(1, N, H)  # tanh(BN(c_t)): the backward recomputes it
        p.c0 = place.copy(inputs.c0)
        if not plan.save:
            b.cell[0].copy_(inputs.c0)  # the running cell state, updated in place
    in_place = set()
    for key, nm in plan.norms():
        if nm.layer:  # per-row statistics (T, N), all computed by the loops; zero for the
            # padded rows, which are never normalised (a recomputation reads them finite)
            b.stats[key] = NormStats(place.zeros(T, N), place.zeros(T, N))
            continue
        rows = 1 if nm.sequence else T
        pop = populations[key]
        if _reads_in_place(plan, nm, pop, time_offset, rows, x):  # no copy
            b.stats[key] = NormStats(
                pop.mean[time_offset : time_offset + rows],
                pop.var[time_offset : time_offset + rows],
            )
            in_place.add(key)
        else:
            F = H if key == "c" else G
            b.stats[key] = NormStats(new(rows, F), new(rows, F))
    tracked: dict[str, Tracked] = {}
    if plan.sequence_ih:
        tracked.update(_sequence_stats(plan, wx, b.stats["ih"], populations["ih"]))
    if plan.deferred_ih and plan.ih.batch_steps:  # every step's statistics: one all-reduce
        k = plan.ih.batch_steps
        stats = b.stats["ih"]
        stats.mean[:k], stats.var[:k] = plan.sync.steps_moments(wx, plan.sizes, k)
    # Steps with batch statistics come first (batch sizes decrease); the population rows
    # of the later steps are read after tracking them, as the step-by-step reference does.
    split = plans.steps_of_two(plan.stat_sizes)
    frame_keys = [
        key for key, nm in plan.norms() if not (nm.sequence or nm.layer) and key not in in_place
    ]
    for t0, t1 in ((0, split), (split, T)):
        if t0 == t1:
            continue
        for key in frame_keys:
            _fill_population(
                plan.norm(key),
                populations[key],
                b.stats[key],
                time_offset,
                t0,
                t1,
                tracked.get(key),
            )
        step = plans.EVAL_CHUNK if plan.eval_chunks else t1 - t0
        for c0 in range(t0, t1, step):
            c1 = min(t1, c0 + step)
            if plan.eval_chunks:  # W_ih x of the chunk's steps
                k = c1 - c0
                torch.mm(x[c0:c1].reshape(k * N, I), inputs.w_ih.t(), out=wx[:k].view(k * N, G))
            run.forward_loop(plan, p, b, c0, c1, c0 if plan.eval_chunks else 0)
        if t0 == 0:
            for key in frame_keys:
                tracked.update(_track(plan, key, populations[key], b.stats[key], time_offset))
    # Each sequence's state at its own last step.
    last = torch.tensor([n - 1 for n in lengths_of(plan.sizes, N)], device=x.device)
    if plan.reverse:  # (a full batch) the last step wrote time 0
        last.zero_()
    rows = torch.arange(N, device=x.device)
    h_n = b.out[last, rows]
    c_n = None
    if plan.lstm:
        c_n = b.cell[last, rows] if plan.save else b.cell[0].clone()
    if not plan.keep_wx:  # recomputed by the backward (or not needed)
        b.wx = None
    if plan.recompute_act:  # likewise
        b.gates = None
    return b.out, h_n, c_n, b, tracked


def _reads_in_place(
    plan: Plan, nm: plans.NormPlan, pop: Population, time_offset: int, rows: int, like: Tensor
) -> bool:
    """Whether the loops may read the module's population rows themselves: no step has
    batch statistics, nothing is kept for a backward (that reads them later), and the rows
    are the module's own, each step reading its own row."""
    last = time_offset + rows - 1
    return (
        not plan.save
        and nm.batch_steps == 0
        and not nm.sequence
        and pop.row(last) == last
        and pop.mean.dtype == like.dtype
        and pop.mean.device == like.device
    )


def _population_rows(
    pop: Population, steps: Tensor, tracked: Tracked | None
) -> tuple[Tensor, Tensor]:
    """The population rows (k, F) that the (absolute) steps read, with this call's tracked
    rows in place of the module's."""
    rows = pop.rows(steps, tracked)
    mean, var = pop.mean.index_select(0, rows), pop.var.index_select(0, rows)
    if tracked is not None and tracked.mean.shape[0] > 0:
        k = tracked.mean.shape[0]
        inside = ((rows >= tracked.start) & (rows < tracked.start + k))[:, None]
        local = (rows - tracked.start).clamp(0, k - 1)
        mean = torch.where(inside, tracked.mean.index_select(0, local), mean)
        var = torch.where(inside, tracked.var.index_select(0, local), var)
    return mean, var


def _fill_population(
    nm: plans.NormPlan,
    pop: Population,
    stats: NormStats,
    time_offset: int,
    t0: int,
    t1: int,
    tracked: Tracked | None,
) -> None:
    """The rows of the steps in [t0, t1) without batch statistics (the last ones)."""
    first = max(t0, nm.batch_steps)
    if first >= t1:
        return
    steps = torch.arange(first + time_offset, t1 + time_offset, device=pop.mean.device)
    mean, var = _population_rows(pop, steps, tracked)
    stats.mean[first:t1].copy_(mean)
    stats.var[first:t1].copy_(var)


def _track(
    plan: Plan, key: str, pop: Population, stats: NormStats, time_offset: int
) -> dict[str, Tracked]:
    """The population rows of the steps with batch statistics, those within max_length
    (the later ones are not tracked: the caller warns), after folding those in."""
    nm = plan.norm(key)
    if nm.batch_steps == 0:
        return {}
    start, k = plans.tracked_rows(nm.batch_steps, time_offset, pop.max_length)
    n = torch.tensor(plan.stat_sizes[:k], dtype=stats.var.dtype, device=stats.var.device)
    rows = slice(start, start + k)
    mean, var, count = folded_statistics(
        pop.mean[rows],
        pop.var[rows],
        pop.count[rows],
        stats.mean[:k],
        stats.var[:k],
        n,
        pop.momentum,
    )
    return {key: Tracked(start, mean, var, count)}


def _sequence_stats(
    plan: Plan, wx: Tensor, stats: NormStats, pop: Population
) -> dict[str, Tracked]:
    """Laurent eq. 20-21: one mean and variance of W_ih x over all unpadded frames, from
    the batch (and tracked in row 0) or the population row 0."""
    if plan.ih.batch_steps == 0:
        stats.mean[0], stats.var[0] = pop.mean[0], pop.var[0]
        return {}
    if plan.sync is None:
        mean, var = sequence_moments(wx, plan.present_sizes)  # (the padding excluded)
    else:  # over the group's frames: one all-reduce
        mean, var = plan.sync.sequence_moments(wx, plan.sizes)
    stats.mean[0], stats.var[0] = mean, var
    n = torch.tensor([sum(plan.present_sizes if plan.sync is None else plan.stat_sizes)],
                     dtype=var.dtype, device=var.device)  # fmt: skip
    m, v, c = folded_statistics(
        pop.mean[:1], pop.var[:1], pop.count[:1], mean[None], var[None], n, pop.momentum
    )
    return {"ih": Tracked(0, m, v, c)}


# -- backward -----------------------------------------------------------------------------


def backward(
    plan: Plan,
    inputs: Inputs,
    saved: Buffers,
    d_out: Tensor | None,
    d_hn: Tensor | None,
    d_cn: Tensor | None,
    need_x: bool,
    need_w_ih: bool,
    need_w_hh: bool,
) -> dict[str, Tensor | None]:
    """The gradients of the inputs (by the names of `Inputs`, gamma as ``gamma_<key>``)
    from those of the output, h_n and c_n (None: zero); dx, dW_ih and dW_hh only where
    needed."""
    x, w_ih = inputs.x, inputs.w_ih
    T, N, I = x.shape
    H, G = plan.H, plan.G
    run = loops_of(plan)
    b = Buffers(wx=None, wh=saved.wh, gates=saved.gates, out=saved.out, cell=saved.cell)
    b.stats = saved.stats
    p = Params(
        h0=inputs.h0.contiguous(),
        c0=None if inputs.c0 is None else inputs.c0.contiguous(),
        w_hh_t=None,
        w_hh=inputs.w_hh.contiguous(),
        bias=inputs.bias,
        gamma=inputs.gamma,
        beta_c=inputs.beta_c,
    )
    d_out = d_out.contiguous() if d_out is not None else x.new_zeros(T, N, H)
    if plan.active is not None:  # the output is zero in the leading padding (a constant)
        d_out = torch.where(present(plan.active, N, x.device).unsqueeze(-1), d_out, 0)
    # apart from what the backward steps read: the kept buffers, d_out, x
    place = Placer(
        x, saved.wh, saved.cell, saved.out, saved.wx, saved.gates, d_out, x, cached=plan.compiled
    )
    new = place.new
    # (the buffers in the order the steps' offsets were measured with)
    recomputed_gates = new(1, N, G) if plan.recompute_act else None  # the step's gates
    # (dh, dc and the gradients are returned: plain tensors, not from the cache)
    zeros = functools.partial(place.zeros, escapes=True)
    d_h = place.copy(d_hn, escapes=True) if d_hn is not None else zeros(N, H)
    d_c = None
    if plan.lstm:
        d_c = place.copy(d_cn, escapes=True) if d_cn is not None else zeros(N, H)
    separate = (plan.ih is not None or plan.hh is not None) and plan.pre is None
    # xhat_ih of a chunk's steps: the kept buffer's, or recomputed from x as the forward
    # computed it (by the compiled loops at each step, each block its columns, with step_ih)
    recompute = plan.ih is not None and not plan.inline_ih and saved.wx is None
    in_loop = recompute and plan.step_ih
    recompute = recompute and not in_loop
    xhat_ih = None
    if plan.inline_ih or in_loop:
        p.x = x.contiguous()
        p.w_ih_t = place.copy(w_ih.t())
        xhat_ih = new(1, N, G)
    if plan.inline_ih:
        p.w_ih = w_ih.contiguous()
    # The backward runs in chunks of K steps: the gradients of W_ih x and W_hh h of a
    # chunk go into the weight gradients as one GEMM each, so only K steps of them are
    # held. Sequence-wise statistics need all steps first (one chunk).
    # (synchronised: the group's sizes, so that every process runs the same chunks)
    chunks = CHUNKS if unpadded(plan.stat_sizes, plan.stat_sizes[0]) else CHUNKS_RAGGED
    K = T if plan.sequence_ih else min(T, max(MIN_CHUNK, -(-T // chunks)))
    # (one step when the inline projection needs it for nothing else: its dW_ih is
    # accumulated inside the loop, dx is one GEMM over the chunk)
    d_wx = new(1 if (plan.inline_ih and separate and not need_x) else K, N, G)
    d_wh = new(K, N, G) if separate else None
    sums = GradSums(
        bias=zeros(G),
        gamma={key: zeros(gamma.shape[0]) for key, gamma in inputs.gamma.items()},
        beta_c=None if inputs.beta_c is None else zeros(H),
        w_ih_t=zeros(I, G) if plan.inline_ih else None,
    )
    g = GradBuffers(
        d_out=d_out,
        d_h=d_h,
        d_c=d_c,
        d_wx=d_wx,
        d_wh=d_wh,
        sums=sums,
        xhat_ih=xhat_ih,
        recomputed_gates=recomputed_gates,
        d_x=x.new_zeros(T, N, I) if (plan.inline_ih and need_x) else None,
        hold_h=None if plan.active is None else x.new_zeros(N, H),
        hold_c=None if (plan.active is None or not plan.lstm) else x.new_zeros(N, H),
    )
    dx = x.new_empty(T, N, I) if (need_x and not plan.inline_ih) else None
    # the weight gradients transposed (see add_weight_grad), made contiguous at the end
    dw_ih_t = x.new_zeros(I, G) if (need_w_ih and not plan.inline_ih) else None
    dw_hh_t = x.new_zeros(H, G) if need_w_hh else None
    if recompute:
        b.wx = new(K, N, G)
    for t1 in range(T, 0, -K):
        t0 = max(0, t1 - K)
        k = t1 - t0
        if recompute:  # xhat_ih of steps [t0, t1)
            z = b.wx[:k]
            torch.mm(x[t0:t1].reshape(k * N, I), w_ih.t(), out=z.view(k * N, G))
            stats = b.stats["ih"]
            if plan.ih.layer:  # per row: (k, N, 1)
                mean, var = stats.mean[t0:t1, :, None], stats.var[t0:t1, :, None]
            else:  # per feature: (k, 1, G)
                mean, var = stats.mean[t0:t1, None], stats.var[t0:t1, None]
            z.sub_(mean).mul_(torch.rsqrt(var + plan.ih.eps))
        elif saved.wx is not None:
            b.wx = saved.wx[t0:t1]
        run.backward_loop(plan, p, b, g, t0, t1)
        if plan.sequence_ih:  # Laurent eq. 20-21: the statistic of all frames, backward
            _sequence_backward(plan, b, g, inputs.gamma["ih"])
        pending = _deferred_ih_sums(plan, b, g, t0, t1) if plan.deferred_ih else None
        if dw_hh_t is not None:  # h_{t-1} is h0 at t = 0, else the previous output
            dwh = (g.d_wx if g.d_wh is None else g.d_wh)[:k]
            first = t0
            if first == 0:
                add_weight_grad(dw_hh_t, p.h0, dwh[0])
                dwh, first = dwh[1:], 1
            if t1 > first:
                rows = (t1 - first) * N
                hs = b.out[first - 1 : t1 - 1].reshape(rows, H)
                add_weight_grad(dw_hh_t, hs, dwh.reshape(rows, G))
            if plan.active is not None and t1 > first:
                # Cooijmans §5.4: h_{t-1} of a row still in its leading padding is h0, where
                # the output (read above) is zero: add h0^T of those rows' dL/d(W_hh h).
                held = ~present(plan.active[first - 1 : t1 - 1], N, x.device)  # (k, N)
                add_weight_grad(dw_hh_t, p.h0, (dwh * held.unsqueeze(-1)).sum(0))
        if plan.deferred_ih:
            _deferred_ih_backward(plan, p, b, g, t0, t1, pending)
        if not plan.inline_ih:  # (inline: accumulated inside the loop)
            dwx = g.d_wx[:k].view(k * N, G)
            if dx is not None:
                dx[t0:t1].view(k * N, I).copy_(linear(dwx, w_ih.t()))
            if dw_ih_t is not None:
                add_weight_grad(dw_ih_t, x[t0:t1].reshape(k * N, I), dwx)
    if g.hold_h is not None:  # the gradients of the held rows' initial state
        g.d_h += g.hold_h
    if g.hold_c is not None:
        g.d_c += g.hold_c
    grads: dict[str, Tensor | None] = {
        "x": g.d_x if plan.inline_ih else dx,
        "h0": g.d_h,
        "c0": g.d_c,
        "w_ih": None if dw_ih_t is None else dw_ih_t.t().contiguous(),
        "w_hh": None if dw_hh_t is None else dw_hh_t.t().contiguous(),
        "bias": sums.bias,
        "beta_c": sums.beta_c,
    }
    if plan.inline_ih and need_w_ih:
        grads["w_ih"] = sums.w_ih_t.t().contiguous()  # (I is small)
    for key, grad in sums.gamma.items():
        grads[f"gamma_{key}"] = grad
    return grads


def _sequence_backward(plan: Plan, b: Buffers, g: GradBuffers, gamma: Tensor) -> None:
    """Laurent eq. 20-21 backward: d_wx holds dL/dy of y = gamma * xhat for all steps;
    make it dL/d(W_ih x) through the one mean and variance over all unpadded frames."""
    T = plan.T
    total = sum(plan.present_sizes if plan.sync is None else plan.stat_sizes)
    mask = present(plan.present_sizes, plan.N, g.d_wx.device).unsqueeze(-1)
    rstd = torch.rsqrt(b.stats["ih"].var[0] + plan.ih.eps)
    dy = g.d_wx[:T]
    if plan.ih.batch_steps > 0:
        # the sums of dy and dy * xhat over all frames are the bias's and gamma's gradients
        sum_dy, sum_dy_xhat = g.sums.bias, g.sums.gamma["ih"]
        if plan.sync is not None:  # over the group's frames: one all-reduce
            sum_dy, sum_dy_xhat = plan.sync.sum(sum_dy, sum_dy_xhat)
        corr = dy - sum_dy / total - b.wx * (sum_dy_xhat / total)
        dy.copy_(torch.where(mask, corr * (gamma * rstd), 0))
    else:
        dy.mul_(gamma * rstd)


def _deferred_ih_sums(plan: Plan, b: Buffers, g: GradBuffers, t0: int, t1: int) -> Any:
    """The synchronised backward of BN(W_ih x) over steps [t0, t1), first half
    (`Plan.deferred_ih`): d_wx holds dL/dy of y = gamma * xhat at t - t0 (zero beyond each
    length), b.wx xhat; accumulate gamma's gradient and start the all-reduce of the sums
    of dy and dy * xhat of the steps with batch statistics, (k, 2G) in one buffer. Returns
    it in flight (None: no such step)."""
    k = t1 - t0
    dy, xhat = g.d_wx[:k], b.wx[:k]
    mask = present(plan.sizes[t0:t1], plan.N, dy.device)[..., None]  # (k, N, 1)
    dy_xhat = torch.where(mask, dy * xhat, 0).sum(1)  # (k, G)
    g.sums.gamma["ih"] += dy_xhat.sum(0)
    kb = max(0, min(t1, plan.ih.batch_steps) - t0)  # the chunk's steps with batch statistics
    if kb == 0:
        return None
    return plan.sync.sum(dy[:kb].sum(1), dy_xhat[:kb], async_op=True)


def _deferred_ih_backward(
    plan: Plan, p: Params, b: Buffers, g: GradBuffers, t0: int, t1: int, pending: Any
) -> None:
    """Second half: make d_wx dL/d(W_ih x) of steps [t0, t1), through the group's batch
    statistics (``pending``: the all-reduce of their sums) where the step has them, else
    through the population row."""
    k = t1 - t0
    kb = max(0, min(t1, plan.ih.batch_steps) - t0)
    dy, xhat = g.d_wx[:k], b.wx[:k]
    rstd = torch.rsqrt(b.stats["ih"].var[t0:t1, None] + plan.ih.eps)  # (k, 1, G)
    if kb:
        sum_dy, sum_dy_xhat = pending.wait()  # (kb, G)
        n = torch.tensor(plan.sync.sizes[t0 : t0 + kb], dtype=dy.dtype, device=dy.device)
        n = n[:, None, None]
        mask = present(plan.sizes[t0 : t0 + kb], plan.N, dy.device)[..., None]
        corr = dy[:kb] - sum_dy[:, None] / n - xhat[:kb] * (sum_dy_xhat[:, None] / n)
        dy[:kb] = torch.where(mask, corr, 0)
    dy.mul_(p.gamma["ih"] * rstd)
