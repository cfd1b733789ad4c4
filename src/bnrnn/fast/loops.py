"""The recurrence of the fast path as a Python loop over steps, on any device.

Two functions, `forward_loop` and `backward_loop`, run steps ``t0 <= t < t1`` of one
direction of one layer over buffers the caller (`bnrnn.fast.direction`) allocated: the
compiled loops in ``csrc/`` do exactly the same on the CPU, with the same arguments.
Everything that does not depend on the recurrence (the input GEMM, the weight gradients)
is done outside, as one large matmul over all steps.

Notation: T steps, N sequences (sorted by decreasing length: the present ones at step t are
the first ``sizes[t]`` rows), H hidden units, G = gates * H. A BN module's statistics for a
step are a mean row ``M[t]`` and a biased-variance row ``V[t]``: for a step with batch
statistics (``B[t]`` true) the loop computes and stores them, otherwise the caller has
filled them with the population row.

Buffers (``save``: kept for the backward; otherwise a one-step scratch, index 0):
    WX  (T, N, G)  in: W_ih x_t; out: the normalised input term xhat_ih ("cooijmans",
                   "input"), or the normalised pre-activation xhat_pre ("preactivation").
                   Kept for the backward only for "preactivation", sequence-wise
                   statistics and inputs wider than H (keep_ih); else the backward
                   recomputes xhat_ih a chunk at a time, and its WX holds steps [t0, t1)
                   of the chunk at t - t0 (the compiled loops recompute it at each step
                   into XS instead, with step_ih).
    XH  (T|1, N, G) xhat of W_hh h_{t-1} ("cooijmans"), else scratch for W_hh h_{t-1}
    ACT (T|1, N, G) LSTM gate activations sig(i), sig(f), tanh(g), sig(o) (one step with
                   recompute_act: the compiled backward recomputes them); RNN scratch
    C   (T|1, N, H) LSTM un-normalised cell c_t (without ``save``: the running cell state)
    TC  (1, N, H)   LSTM tanh(BN(c_t)) (or tanh(c_t)), scratch: the backward recomputes it
    OUT (T, N, H)   h_t, zero beyond each length
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

LSTM, RNN_TANH, RNN_RELU = 0, 1, 2


@dataclass
class Plan:
    """Static description of one direction's computation."""

    kind: int  # LSTM, RNN_TANH or RNN_RELU
    sizes: list[int]  # (T,) sequences present at each step
    H: int
    G: int
    has_ih: bool = False  # BN of W_ih x (Cooijmans eq. 6, Laurent eq. 18)
    ih_seq: bool = False  # ... with one statistic over all frames (Laurent eq. 20-21)
    ih_seq_batch: bool = False  # ... computed from the batch (else the population row)
    has_hh: bool = False  # BN of W_hh h (Cooijmans eq. 6)
    has_pre: bool = False  # BN of W_hh h + W_ih x (Laurent eq. 17)
    has_c: bool = False  # BN of c_t (Cooijmans eq. 8)
    keep_ih: bool = False  # keep xhat_ih for the backward rather than recompute it
    eps: tuple[float, float, float, float] = (1e-5, 1e-5, 1e-5, 1e-5)  # ih, hh, pre, c
    save: bool = True
    # compiled loops only: W_ih x_t computed inside the step from x (small input sizes)
    inline_ih: bool = False
    wx_base: int = 0  # WX holds steps wx_base, ... (the forward computes it in chunks)
    # compiled loops only: W_ih x_t computed at each step into a one-step WX, by each block
    # for its own columns
    step_ih: bool = False
    # compiled loops only, without a backward: x and the output run in reversed time (the
    # reverse direction of a batch with no padding, without flipping x and the output)
    reverse: bool = False
    # compiled loops only, LSTM with BN of both W_ih x and W_hh h, or of the pre-activation:
    # ACT is one step, and the backward recomputes the gate activations
    recompute_act: bool = False

    @property
    def keep_wx(self) -> bool:
        """WX (normalised) is kept for the backward: it holds xhat of the whole
        pre-activation, or sequence-wise statistics need all steps at once, or the input
        is wide (keep_ih)."""
        return self.save and (self.has_pre or self.ih_seq or self.keep_ih)


@dataclass
class Buffers:
    """Tensors the loops read and write; see the module docstring. ``None``: not used."""

    WX: Tensor
    XH: Tensor
    ACT: Tensor
    OUT: Tensor
    h0: Tensor
    whT: Tensor  # (H, G) = W_hh^T (contiguous for these loops; a view for the compiled ones)
    w_hh: Tensor  # (G, H)
    C: Tensor | None = None
    TC: Tensor | None = None
    c0: Tensor | None = None
    bias: Tensor | None = None  # (G,)
    # scales (gamma) of the BNs, and the shift of BN(c)
    g_ih: Tensor | None = None
    g_hh: Tensor | None = None
    g_pre: Tensor | None = None
    g_c: Tensor | None = None
    b_c: Tensor | None = None
    # statistics: mean and biased variance rows (T, F) ((1, G) for sequence-wise ih), and
    # per-step flags (T,) bool: batch statistics at that step
    M: dict[str, Tensor] = field(default_factory=dict)
    V: dict[str, Tensor] = field(default_factory=dict)
    B: dict[str, list[bool]] = field(default_factory=dict)
    # backward only
    dOUT: Tensor | None = None  # (T, N, H)
    dh: Tensor | None = None  # (N, H) in: grad of h_n; out: grad of h_0
    dc: Tensor | None = None  # (N, H) likewise for c
    # out: grads of W_ih x_t and of W_hh h_{t-1} for the steps of one backward chunk
    # (zero beyond each length); DWH may be DWX itself
    DWX: Tensor | None = None  # (K, N, G)
    DWH: Tensor | None = None  # (K, N, G)
    grads: dict[str, Tensor] = field(default_factory=dict)  # (F,) accumulators
    # the inline input projection (Plan.inline_ih, compiled loops only)
    x: Tensor | None = None  # (T, N, I)
    w_ihT: Tensor | None = None  # (I, G)
    w_ih: Tensor | None = None  # (G, I)
    XS: Tensor | None = None  # (1, N, G) scratch for xhat_ih in the backward
    dX: Tensor | None = None  # (T, N, I) grad of x, or None


def _normalise(plan: Plan, b: Buffers, key: str, z: Tensor, t: int, eps: float) -> Tensor:
    """xhat of step t's present rows z (n, F); batch statistics are stored in M, V."""
    row = 0 if (key == "ih" and plan.ih_seq) else t
    if key in b.B and b.B[key][t]:
        b.M[key][row] = z.mean(0)
        b.V[key][row] = z.var(0, unbiased=False)
    return (z - b.M[key][row]) * torch.rsqrt(b.V[key][row] + eps)


@torch.no_grad()
def forward_loop(plan: Plan, b: Buffers, t0: int, t1: int) -> None:
    eps_ih, eps_hh, eps_pre, eps_c = plan.eps
    H = plan.H
    lstm = plan.kind == LSTM
    for t in range(t0, t1):
        n = plan.sizes[t]
        s = t if plan.save else 0
        h_prev = b.h0[:n] if t == 0 else b.OUT[t - 1, :n]
        wh = torch.mm(h_prev, b.whT, out=b.XH[s if plan.has_hh else 0, :n])  # (n, G)
        wx = b.WX[t - plan.wx_base, :n]
        if plan.has_hh:
            wh.copy_(_normalise(plan, b, "hh", wh, t, eps_hh))
            wh_term = wh * b.g_hh
        else:
            wh_term = wh
        if plan.has_ih:
            wx.copy_(_normalise(plan, b, "ih", wx, t, eps_ih))
            a = wx * b.g_ih + wh_term
        else:
            a = wx + wh_term
        if plan.has_pre:
            wx.copy_(_normalise(plan, b, "pre", a, t, eps_pre))
            a = wx * b.g_pre
        if b.bias is not None:
            a = a + b.bias
        if lstm:
            act = b.ACT[s, :n]
            torch.sigmoid(a, out=act)
            torch.tanh(a[:, 2 * H : 3 * H], out=act[:, 2 * H : 3 * H])
            i, f, g, o = act.chunk(4, 1)
            c_prev = b.c0[:n] if (t == 0 and plan.save) else b.C[t - 1 if plan.save else 0, :n]
            c = b.C[s, :n]
            torch.addcmul(i * g, f, c_prev, out=c)
            tc = b.TC[0, :n]
            if plan.has_c:
                torch.tanh(_normalise(plan, b, "c", c, t, eps_c) * b.g_c + b.b_c, out=tc)
            else:
                torch.tanh(c, out=tc)
            torch.mul(o, tc, out=b.OUT[t, :n])
        elif plan.kind == RNN_TANH:
            torch.tanh(a, out=b.OUT[t, :n])
        else:
            torch.clamp(a, min=0, out=b.OUT[t, :n])
        b.OUT[t, n:].zero_()


def _bn_backward(
    plan: Plan, b: Buffers, key: str, dy: Tensor, xhat: Tensor, t: int, gamma: Tensor, eps: float
) -> Tensor:
    """Gradient of z for y = gamma * xhat(z) over step t's present rows; accumulates the
    gradient of gamma. With batch statistics the mean and variance depend on z."""
    b.grads[key] += (dy * xhat).sum(0)
    row = 0 if (key == "ih" and plan.ih_seq) else t
    rstd = torch.rsqrt(b.V[key][row] + eps)
    if key == "ih" and plan.ih_seq:  # the whole-batch statistic is done by the caller
        return dy
    if b.B[key][t]:
        n = dy.shape[0]
        mean_dy = dy.sum(0) / n
        mean_dy_xhat = (dy * xhat).sum(0) / n
        return (dy - mean_dy - xhat * mean_dy_xhat) * (gamma * rstd)
    return dy * (gamma * rstd)


@torch.no_grad()
def backward_loop(plan: Plan, b: Buffers, t0: int, t1: int) -> None:
    """Steps t1 - 1 down to t0. DWX and DWH hold steps [t0, t1) at indices t - t0."""
    eps_ih, eps_hh, eps_pre, eps_c = plan.eps
    lstm = plan.kind == LSTM
    for t in reversed(range(t0, t1)):
        n = plan.sizes[t]
        dh = b.dOUT[t, :n] + b.dh[:n]
        if lstm:
            i, f, g, o = b.ACT[t, :n].chunk(4, 1)
            if plan.has_c:
                row_m, row_v = b.M["c"][t], b.V["c"][t]
                xhat_c = (b.C[t, :n] - row_m) * torch.rsqrt(row_v + eps_c)
                tc = torch.tanh(xhat_c * b.g_c + b.b_c)
            else:
                tc = torch.tanh(b.C[t, :n])
            d_o = dh * tc
            dcout = dh * o * (1 - tc * tc)
            if plan.has_c:
                b.grads["b_c"] += dcout.sum(0)
                dcout = _bn_backward(plan, b, "c", dcout, xhat_c, t, b.g_c, eps_c)
            dc = b.dc[:n] + dcout
            c_prev = b.c0[:n] if t == 0 else b.C[t - 1, :n]
            da = torch.cat(
                [
                    dc * g * i * (1 - i),
                    dc * c_prev * f * (1 - f),
                    dc * i * (1 - g * g),
                    d_o * o * (1 - o),
                ],
                1,
            )
            b.dc[:n] = dc * f
        elif plan.kind == RNN_TANH:
            h = b.OUT[t, :n]
            da = dh * (1 - h * h)
        else:
            da = dh * (b.OUT[t, :n] > 0)
        b.grads["sum"] += da.sum(0)
        if plan.has_pre:
            dz = _bn_backward(plan, b, "pre", da, b.WX[t - t0, :n], t, b.g_pre, eps_pre)
            dwx = dwh = dz
        else:
            dwx = (
                _bn_backward(plan, b, "ih", da, b.WX[t - t0, :n], t, b.g_ih, eps_ih)
                if plan.has_ih
                else da
            )
            dwh = (
                _bn_backward(plan, b, "hh", da, b.XH[t, :n], t, b.g_hh, eps_hh)
                if plan.has_hh
                else da
            )
        k = t - t0
        b.DWX[k, :n] = dwx
        b.DWX[k, n:].zero_()
        if b.DWH is not b.DWX:
            b.DWH[k, :n] = dwh
            b.DWH[k, n:].zero_()
        torch.mm(b.DWH[k, :n], b.w_hh, out=b.dh[:n])
