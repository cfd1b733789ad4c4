"""The tensors one call of the fast path's loops reads and writes, grouped by concern. The
Python loops (`bnrnn.fast.loops`) and the compiled ones (``csrc/``, through
`bnrnn.fast.compiled`) take the same groups; the compiled operators' arguments carry the
field names below (the statistics as ``mean_<key>`` and ``var_<key>``, the accumulators as
``grad_<name>``). ``None``: not used in this call.

Notation as in `bnrnn.fast.plan`; "T|1": T steps when the plan saves them for the
backward, else a one-step scratch (index 0); "K": the steps of one chunk of the backward.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import Tensor


@dataclass
class Params:
    """What the loops read and never write."""

    h0: Tensor  # (N, H) initial state
    c0: Tensor | None  # (N, H) LSTM initial cell
    w_hh_t: Tensor | None  # (H, G) W_hh^T for the forward (a view for the compiled loops)
    w_hh: Tensor | None  # (G, H) contiguous, for the backward's dh = da W_hh
    bias: Tensor | None  # (G,) bias_ih + bias_hh and the shifts of the ih, hh, pre BNs
    gamma: dict[str, Tensor]  # (F,) the scale of each BN present, by placement key
    beta_c: Tensor | None  # (H,) the shift of BN(c)
    # W_ih x_t computed in the step (plan.inline_ih, plan.step_ih)
    x: Tensor | None = None  # (T, N, I)
    w_ih_t: Tensor | None = None  # (I, G)
    w_ih: Tensor | None = None  # (G, I), for the inline projection's dx


@dataclass
class NormStats:
    """One BN's statistics for the steps of a call: mean and biased variance rows (T, F),
    or (1, F) for sequence-wise statistics. The loops compute the rows of the steps with
    batch statistics (`NormPlan.batch_steps`); the caller fills the others with population
    rows. A layer normalisation (`NormPlan.layer`, norm="layer") has (T, N) rows instead:
    the mean and biased variance of each row over its features, computed at every step."""

    mean: Tensor
    var: Tensor


@dataclass
class Buffers:
    """The forward's buffers; with ``plan.save`` what the backward reads."""

    # in: W_ih x_t; out: xhat_ih (BN of W_ih x), or xhat_pre (BN of the pre-activation).
    # (T, N, G) for all steps, (EVAL_CHUNK, N, G) for a chunk of them (steps from the
    # forward's wx_base), or (1, N, G) when W_ih x_t is computed in the step. The backward
    # reads a chunk's steps: the kept buffer's, or xhat_ih recomputed from x.
    wx: Tensor | None
    wh: Tensor | None  # (T|1, N, G) xhat of W_hh h_{t-1} ("cooijmans"), else W_hh h_{t-1}
    # (T|1, N, G) LSTM gate activations sig(i), sig(f), tanh(g), sig(o) (one step with
    # plan.recompute_act: the compiled backward recomputes them); the RNN's pre-activation
    gates: Tensor | None
    out: Tensor  # (T, N, H) h_t, zero beyond each length
    cell: Tensor | None = None  # (T|1, N, H) LSTM c_t (without save: c_{t-1} in, c_t out)
    tanh_cell: Tensor | None = None  # (1, N, H) LSTM tanh(BN(c_t)), scratch
    stats: dict[str, NormStats] = field(default_factory=dict)  # by placement key


@dataclass
class GradSums:
    """The backward's accumulators over the steps: gradients of the bias, each BN's gamma
    (by placement key) and BN(c)'s beta, and of W_ih^T for the inline projection."""

    bias: Tensor  # (G,)
    gamma: dict[str, Tensor]  # (F,)
    beta_c: Tensor | None = None  # (H,)
    w_ih_t: Tensor | None = None  # (I, G)


@dataclass
class GradBuffers:
    """The backward's buffers for one chunk of steps [t0, t1)."""

    d_out: Tensor  # (T, N, H) dL/dh_t from the output
    d_h: Tensor  # (N, H) in: dL/dh after step t1 - 1; out: after step t0 - 1
    d_c: Tensor | None  # (N, H) likewise for the LSTM cell
    # out: dL/d(W_ih x_t) of the chunk's steps at t - t0 (K, N, G), zero beyond each length
    # (one step when the inline projection needs it for nothing else)
    d_wx: Tensor
    d_wh: Tensor | None  # (K, N, G) dL/d(W_hh h_{t-1}); None: d_wx (no separate BN)
    sums: GradSums
    xhat_ih: Tensor | None = None  # (1, N, G) the step's xhat_ih, recomputed in the step
    recomputed_gates: Tensor | None = None  # (1, N, G) plan.recompute_act: the step's gates
    d_x: Tensor | None = None  # (T, N, I) inline projection: dL/dx, rows [t0, t1) written
    # Plan.active (Cooijmans §5.4): dL/dh0 and dL/dc0 (N, H) of the rows in their leading
    # padding, accumulated: at each step the loops move d_h and d_c of the rows not updated
    # there into these (and zero them), since those rows' state is the initial one. The
    # caller adds them to d_h and d_c after the last step.
    hold_h: Tensor | None = None
    hold_c: Tensor | None = None
