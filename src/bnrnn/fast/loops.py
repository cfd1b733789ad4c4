"""The recurrence of the fast path as a Python loop over steps, on any device.

Two functions, `forward_loop` and `backward_loop`, run steps ``t0 <= t < t1`` of one
direction of one layer with a `~bnrnn.fast.plan.Plan` over buffers the caller
(`bnrnn.fast.run`) allocated (`bnrnn.fast.buffers`): the compiled loops (``csrc/``) do
exactly the same on the CPU, with the same plan and buffers. Everything that does not
depend on the recurrence (the input GEMM, the weight gradients) is done outside, as large
matmuls over many steps.

A BN's statistics for a step are a mean row ``mean[t]`` and a biased-variance row
``var[t]``: for a step with batch statistics (`NormPlan.batch_at`) the loop computes and
stores them, otherwise the caller has filled them with the population row. A layer
normalisation (``NormPlan.layer``, Ba et al. §6.5) has a mean and a variance per row
instead, ``mean[t, r]``, over the row's features, computed at every step.

With synchronised statistics (``plan.sync``) a step's statistics and its BN backward's
means are over the sequences present on every process of the group: each is one
all-reduce of one flat buffer (`bnrnn.fast.sync`), issued here for the terms that feed the
recurrence (W_hh h, the pre-activation, the cell); the input term's are issued by the
caller for many steps at once (``plan.deferred_ih``).

A padded batch read flipped in time (``Plan.active``, Cooijmans §5.4) has every row present
at every step; the rows [plan.updated(t), N) are in their leading padding: computed (they
enter the statistics), but their state stays (h0, c0) (`Plan.initial_from`: the rows read
as state) and their output is zero. The backward lets their incoming dL/dh and dL/dc
bypass the step into ``hold_h``, ``hold_c`` (their state is the initial one).
"""

from __future__ import annotations

import torch
from torch import Tensor

from .buffers import Buffers, GradBuffers, Params
from .plan import RNN_TANH, Plan


def _normalise(plan: Plan, b: Buffers, key: str, z: Tensor, t: int) -> Tensor:
    """xhat of step t's present rows z (n, F); batch statistics are stored in the rows."""
    nm, stats = plan.norm(key), b.stats[key]
    if nm.layer:  # each row over its features (Ba et al. §3.1 eq. 4), stored per row (n,)
        n = z.shape[0]
        mean, var = stats.mean[t, :n], stats.var[t, :n]
        mean.copy_(z.mean(1))
        var.copy_(z.var(1, unbiased=False))
        return (z - mean[:, None]) * torch.rsqrt(var[:, None] + nm.eps)
    row = 0 if nm.sequence else t
    if plan.sync is not None and nm.batch_at(t):
        if not (key == "ih" and plan.deferred_ih):  # (else reduced before the loop)
            stats.mean[row], stats.var[row] = plan.sync.step_moments(z, t)
    elif nm.batch_at(t):
        stats.mean[row] = z.mean(0)
        stats.var[row] = z.var(0, unbiased=False)
    return (z - stats.mean[row]) * torch.rsqrt(stats.var[row] + nm.eps)


def _from_initial(plan: Plan, t: int, prev: Tensor, initial: Tensor, n: int) -> Tensor:
    """The state (n, H) step t reads: ``prev``'s rows, the initial state's for the rows still
    in their leading padding (Cooijmans §5.4: the state is not updated from padding)."""
    m = plan.initial_from(t)
    return prev[:n] if m >= n else torch.cat([prev[:m], initial[m:n]])


@torch.no_grad()
def forward_loop(plan: Plan, p: Params, b: Buffers, t0: int, t1: int, wx_base: int = 0) -> None:
    """Steps t0 to t1 - 1; b.wx holds steps from wx_base."""
    H = plan.H
    for t in range(t0, t1):
        n = plan.sizes[t]
        s = t if plan.save else 0
        h_prev = p.h0[:n] if t == 0 else _from_initial(plan, t, b.out[t - 1], p.h0, n)
        wh = torch.mm(h_prev, p.w_hh_t, out=b.wh[s if plan.hh else 0, :n])  # (n, G)
        wx = b.wx[t - wx_base, :n]
        if plan.hh:
            wh.copy_(_normalise(plan, b, "hh", wh, t))
            wh_term = wh * p.gamma["hh"]
        else:
            wh_term = wh
        if plan.ih:
            wx.copy_(_normalise(plan, b, "ih", wx, t))
            a = wx * p.gamma["ih"] + wh_term
        else:
            a = wx + wh_term
        if plan.pre:
            wx.copy_(_normalise(plan, b, "pre", a, t))
            a = wx * p.gamma["pre"]
        if p.bias is not None:
            a = a + p.bias
        if plan.lstm:
            act = b.gates[s, :n]
            torch.sigmoid(a, out=act)
            torch.tanh(a[:, 2 * H : 3 * H], out=act[:, 2 * H : 3 * H])
            i, f, g, o = act.chunk(4, 1)
            c_prev = p.c0[:n] if (t == 0 and plan.save) else b.cell[t - 1 if plan.save else 0, :n]
            c_prev = _from_initial(plan, t, c_prev, p.c0, n)
            c = b.cell[s, :n]
            torch.addcmul(i * g, f, c_prev, out=c)
            tc = b.tanh_cell[0, :n]
            if plan.c:
                torch.tanh(_normalise(plan, b, "c", c, t) * p.gamma["c"] + p.beta_c, out=tc)
            else:
                torch.tanh(c, out=tc)
            torch.mul(o, tc, out=b.out[t, :n])
        elif plan.kind == RNN_TANH:
            torch.tanh(a, out=b.out[t, :n])
        else:
            torch.clamp(a, min=0, out=b.out[t, :n])
        b.out[t, plan.updated(t) :].zero_()  # (leading padding: computed, not output)


def _bn_backward(
    plan: Plan, p: Params, b: Buffers, g: GradBuffers, key: str, dy: Tensor, xhat: Tensor, t: int
) -> Tensor:
    """Gradient of z for y = gamma * xhat(z) over step t's present rows; accumulates the
    gradient of gamma. With batch statistics the mean and variance depend on z."""
    nm = plan.norm(key)
    dy_xhat = (dy * xhat).sum(0)
    g.sums.gamma[key] += dy_xhat
    if nm.layer:  # through the row's own mean and variance: the means are over features
        n = dy.shape[0]
        rstd = torch.rsqrt(b.stats[key].var[t, :n, None] + nm.eps)
        d_xhat = dy * p.gamma[key]
        mean_d = d_xhat.mean(1, keepdim=True)
        mean_d_xhat = (d_xhat * xhat).mean(1, keepdim=True)
        return (d_xhat - mean_d - xhat * mean_d_xhat) * rstd
    if nm.sequence:  # the statistic of all frames: done by the caller, all steps at once
        return dy
    rstd = torch.rsqrt(b.stats[key].var[t] + nm.eps)
    if nm.batch_at(t):
        if plan.sync is None:
            n, sum_dy = dy.shape[0], dy.sum(0)
        else:  # over the group: one all-reduce of both sums (2F,)
            n = plan.sync.sizes[t]
            sum_dy, dy_xhat = plan.sync.sum(dy.sum(0), dy_xhat)
        mean_dy = sum_dy / n
        mean_dy_xhat = dy_xhat / n
        return (dy - mean_dy - xhat * mean_dy_xhat) * (p.gamma[key] * rstd)
    return dy * (p.gamma[key] * rstd)


@torch.no_grad()
def backward_loop(plan: Plan, p: Params, b: Buffers, g: GradBuffers, t0: int, t1: int) -> None:
    """Steps t1 - 1 down to t0. b.wx, g.d_wx and g.d_wh hold steps [t0, t1) at t - t0."""
    sums = g.sums
    for t in reversed(range(t0, t1)):
        n = plan.sizes[t]
        m = plan.updated(t)
        if m < n:  # rows in their leading padding: their state after step t is (h0, c0)
            g.hold_h[m:n] += g.d_h[m:n]
            g.d_h[m:n] = 0
            if plan.lstm:
                g.hold_c[m:n] += g.d_c[m:n]
                g.d_c[m:n] = 0
        dh = g.d_out[t, :n] + g.d_h[:n]
        if plan.lstm:
            i, f, gg, o = b.gates[t, :n].chunk(4, 1)
            if plan.c:
                stats = b.stats["c"]
                mean, var = stats.mean[t], stats.var[t]
                if plan.c.layer:  # (n,) per row
                    mean, var = mean[:n, None], var[:n, None]
                xhat_c = (b.cell[t, :n] - mean) * torch.rsqrt(var + plan.c.eps)
                tc = torch.tanh(xhat_c * p.gamma["c"] + p.beta_c)
            else:
                tc = torch.tanh(b.cell[t, :n])
            d_o = dh * tc
            dcout = dh * o * (1 - tc * tc)
            if plan.c:
                sums.beta_c += dcout.sum(0)
                dcout = _bn_backward(plan, p, b, g, "c", dcout, xhat_c, t)
            dc = g.d_c[:n] + dcout
            c_prev = p.c0[:n] if t == 0 else _from_initial(plan, t, b.cell[t - 1], p.c0, n)
            da = torch.cat(
                [
                    dc * gg * i * (1 - i),
                    dc * c_prev * f * (1 - f),
                    dc * i * (1 - gg * gg),
                    d_o * o * (1 - o),
                ],
                1,
            )
            g.d_c[:n] = dc * f
        elif plan.kind == RNN_TANH:
            h = b.out[t, :n]
            da = dh * (1 - h * h)
        else:
            da = dh * (b.out[t, :n] > 0)
        sums.bias += da.sum(0)
        if plan.pre:
            dwx = dwh = _bn_backward(plan, p, b, g, "pre", da, b.wx[t - t0, :n], t)
        else:
            dwx = da  # (plan.deferred_ih: dL/dy of BN(W_ih x), made dL/d(W_ih x) by the caller)
            if plan.ih and not plan.deferred_ih:
                dwx = _bn_backward(plan, p, b, g, "ih", da, b.wx[t - t0, :n], t)
            dwh = _bn_backward(plan, p, b, g, "hh", da, b.wh[t, :n], t) if plan.hh else da
        k = t - t0
        g.d_wx[k, :n] = dwx
        g.d_wx[k, n:].zero_()
        d_wh = g.d_wx if g.d_wh is None else g.d_wh
        if g.d_wh is not None:
            d_wh[k, :n] = dwh
            d_wh[k, n:].zero_()
        torch.mm(d_wh[k, :n], p.w_hh, out=g.d_h[:n])
