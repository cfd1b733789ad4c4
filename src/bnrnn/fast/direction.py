"""One direction of one layer on the fast path: `fast_direction`, a drop-in for
`bnrnn.reference.reference_direction` with the same arguments and results.

The whole direction is one `torch.autograd.Function` with a hand-written backward, so that
autograd records one node instead of tens per step:

- forward: the recurrence (per step the GEMMs with ``W_hh`` and ``W_ih`` and fused
  element-wise work, in the compiled loops (``csrc/``); the Python `loops` take ``W_ih x`` for
  all steps as one GEMM), keeping what the backward needs; then the population statistics
  of every step are tracked at once (`StepBatchNorm._track`, as `StepBatchNorm.frames`
  does);
- backward: the recurrence in reverse, a chunk of steps at a time (one GEMM per step for
  the gradient of h_{t-1}, the BN backward through the batch statistics of each step, with
  ``tanh(BN(c_t))`` and the normalised ``W_ih x`` recomputed rather than kept), then the
  weight gradients of the chunk as one large GEMM each.

The statistics follow `StepBatchNorm.step` exactly: batch statistics over the sequences
present at each step; the population row ``min(t, max_length - 1)`` in evaluation and, in
training, at steps where fewer than two sequences are present (read after the earlier
steps of the same call have been tracked, as the step-by-step reference does); steps
beyond ``max_length`` are not tracked in training.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from ..functional import State, lstm_step, rnn_step
from ..norm import StepBatchNorm
from ..packing import unpadded
from ..reference import DirectionParams
from . import loops
from .loops import LSTM, RNN_RELU, RNN_TANH, Buffers, Plan

BACKENDS = ("auto", "compiled", "python")
_backend = "auto"


def set_backend(name: str) -> None:
    """Choose how the recurrence runs: ``"compiled"`` (the C++ loops, built at first use),
    ``"python"`` (a Python loop over steps, any device) or ``"auto"`` (compiled on the CPU
    for float32/float64 when the build succeeds, else Python, with a warning once)."""
    global _backend
    if name not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {name!r}")
    _backend = name


def get_backend() -> str:
    return _backend


def _kind(step: Any) -> int | None:
    if step is lstm_step:
        return LSTM
    if step is rnn_step:
        return RNN_TANH
    if isinstance(step, functools.partial) and step.func is rnn_step and not step.args:
        nonlinearity = step.keywords.get("nonlinearity", "tanh")
        if set(step.keywords) <= {"nonlinearity"} and nonlinearity in ("tanh", "relu"):
            return RNN_TANH if nonlinearity == "tanh" else RNN_RELU
    return None


def supports(x: Tensor, batch_sizes: list[int], p: DirectionParams, step: Any) -> bool:
    """Whether `fast_direction` computes this case (else use the reference)."""
    kind = _kind(step)
    if kind is None or not x.is_floating_point() or min(batch_sizes) < 1:
        return False
    bns = [bn for bn in (p.bn_ih, p.bn_hh, p.bn_pre, p.bn_c) if bn is not None]
    if any(bn.syncing for bn in bns):  # all-reduced statistics: the reference path
        return False
    if p.bn_pre is not None and (p.bn_ih is not None or p.bn_hh is not None):
        return False
    return p.bn_c is None or kind == LSTM


def _use_compiled(x: Tensor) -> Any:
    """The compiled loops module, or None for the Python loops."""
    if _backend == "python" or x.device.type != "cpu" or x.dtype not in _COMPILED_DTYPES:
        if _backend == "compiled":
            raise RuntimeError(
                f"the compiled fast path runs float32/float64 on the CPU, got {x.dtype} on "
                f"{x.device}"
            )
        return None
    from . import compiled

    if _backend == "compiled":
        return compiled.load()
    return compiled.load_or_warn()


_COMPILED_DTYPES = (torch.float32, torch.float64)
# Up to this input size the compiled loops compute W_ih x_t inside each step (sequential
# MNIST has one input): a (T, N, G) buffer and a GEMM with K = 1 cost more than the step.
INLINE_MAX_INPUT = 8
# The backward holds the gradients of W_ih x and W_hh h for chunks of
# max(MIN_CHUNK, ceil(T / CHUNKS)) steps at a time (see _FastDirection.backward): each of
# these (K, N, G) buffers, and the recomputed xhat_ih, is 1 / CHUNKS of a saved one.
# Fewer, larger chunks make larger weight-gradient GEMMs (4 chunks against 8: about 5-10%
# off a training step at the mid and char-PTB sizes); a ragged batch (packed, or lengths)
# already saves padding, so it takes 8 to stay within 1.5x nn.LSTM's memory.
MIN_CHUNK = 16
CHUNKS = 4
CHUNKS_RAGGED = 8
# Steps per W_ih x GEMM in a forward without backward (Python loops).
EVAL_CHUNK = 32


def _onednn_linear() -> bool:
    try:
        return torch.backends.mkldnn.is_available() and bool(torch.ops.mkldnn._linear_pointwise)
    except (AttributeError, RuntimeError):
        return False


_ONEDNN_LINEAR = _onednn_linear()


def _onednn(a: Tensor) -> bool:
    """float32 on the CPU with oneDNN's matmul available and enabled
    (``torch.backends.mkldnn.enabled``)."""
    cpu32 = a.dtype == torch.float32 and a.device.type == "cpu"
    return _ONEDNN_LINEAR and cpu32 and torch._C._get_mkldnn_enabled()


def _linear(a: Tensor, w: Tensor) -> Tensor:
    """a @ w.t() for the large input GEMMs over all steps, through oneDNN's matmul (the
    GEMM nn.LSTM uses) where `_onednn`: 10-30% faster than torch.mm (MKL) on these shapes
    here, 2 threads."""
    if _onednn(a):
        return torch.ops.mkldnn._linear_pointwise(a, w, None, "none", [], "")
    return torch.mm(a, w.t())


def _add_weight_grad(out_t: Tensor, a: Tensor, d: Tensor) -> None:
    """out_t (P, G) += a^T @ d for a (R, P) and d (R, G): a weight gradient accumulated
    transposed, dW^T = sum over rows of a_r d_r^T. oneDNN computes a^T @ d (a^T copied
    contiguous, d^T a view) at 1.5-2x torch.mm's rate here, where the untransposed dW = d^T @ a
    ran at torch.mm's: 2 threads, float32, (R, G, P) = (1600, 1024, 256) 189 -> 315 GFLOP/s,
    (2500, 4000, 1000) 213 -> 414, (12544, 400, 100) 178 -> 297."""
    if _onednn(a):
        # a^T made contiguous here: handed the transposed view, the call took longer than
        # this copy and the call together, (R, P, G) = (1600, 512, 1024) 4.9 -> 4.5 ms,
        # (1600, 1000, 1024) 9.6 -> 8.6 ms
        a_t = a.t().contiguous()
        out_t.add_(torch.ops.mkldnn._linear_pointwise(a_t, d.t(), None, "none", [], ""))
    else:
        out_t.addmm_(a.t(), d)


class _Config:
    """What the autograd function needs besides tensors (not differentiated)."""

    def __init__(self, plan: Plan, p: DirectionParams, time_offset: int, ext: Any) -> None:
        self.plan = plan
        self.bns = {"ih": p.bn_ih, "hh": p.bn_hh, "pre": p.bn_pre, "c": p.bn_c}
        self.time_offset = time_offset
        self.ext = ext


def fast_direction(
    x: Tensor,
    batch_sizes: list[int],
    state: State,
    p: DirectionParams,
    step: Any,
    time_offset: int = 0,
    reverse: bool = False,
) -> tuple[Tensor, State]:
    """Run one direction over a sorted, zero-padded batch; same contract as
    `bnrnn.reference.reference_direction`. x: (T, N, I); state: (h_0, c_0) or (h_0,),
    each (N, H). Returns the output (T, N, H), zero beyond each length, and the state of
    each sequence at its own last step. ``reverse`` (a batch with no padding only): run
    over x in reversed time, the output in x's time order, as ``out(x.flip(0)).flip(0)``."""
    kind = _kind(step)
    assert kind is not None
    G, H = p.weight_hh.shape
    plan = Plan(
        kind=kind,
        sizes=[int(s) for s in batch_sizes],
        H=H,
        G=G,
        has_ih=p.bn_ih is not None,
        ih_seq=p.bn_ih is not None and p.input_stats == "sequence",
        has_hh=p.bn_hh is not None,
        has_pre=p.bn_pre is not None,
        has_c=p.bn_c is not None,
        # Wider input than hidden: recomputing W_ih x in the backward would cost more
        # than the step's own W_hh h; keep xhat_ih instead (one (T, N, G) buffer).
        keep_ih=p.bn_ih is not None and x.shape[2] > H,
        eps=tuple(1e-5 if bn is None else bn.eps for bn in (p.bn_ih, p.bn_hh, p.bn_pre, p.bn_c)),
    )
    # A shift (beta) on the ih, hh or pre BN is a constant added to the pre-activation,
    # exactly as the bias is (Cooijmans §3): fold them into one bias vector.
    bias = p.bias
    for bn in (p.bn_ih, p.bn_hh, p.bn_pre):
        if bn is not None and bn.bias is not None:
            bias = bn.bias if bias is None else bias + bn.bias
    h0 = state[0]
    c0 = state[1] if kind == LSTM else None

    def gamma(bn: StepBatchNorm | None) -> Tensor | None:
        return None if bn is None else bn.weight

    cfg = _Config(plan, p, time_offset, _use_compiled(x))
    # Cooijmans eq. 6 and Laurent eq. 17 in the compiled loops: the backward recomputes the
    # gate activations from xhat_hh (kept) and xhat_ih (kept or recomputed), or from
    # xhat_pre (kept), instead of keeping a (T, N, G) buffer of them. Fresh memory is dear
    # here: writing and freeing 100 MB more per training step cost 66 ms at
    # (64, 1000, 50, 100), 6% of the step.
    plan.recompute_act = (
        cfg.ext is not None and kind == LSTM and ((plan.has_ih and plan.has_hh) or plan.has_pre)
    )
    inputs = (
        x,
        h0,
        c0,
        p.weight_ih,
        p.weight_hh,
        bias,
        gamma(p.bn_ih),
        gamma(p.bn_hh),
        gamma(p.bn_pre),
        gamma(p.bn_c),
        None if p.bn_c is None else p.bn_c.bias,
    )
    needs_grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in inputs)
    # "preactivation" keeps xhat of the whole pre-activation in WX for the backward.
    plan.inline_ih = (
        cfg.ext is not None
        and x.shape[2] <= INLINE_MAX_INPUT
        and not ((plan.has_pre or plan.keep_ih) and needs_grad)
        and not plan.ih_seq
    )
    if reverse:
        if not unpadded(plan.sizes, x.shape[1]):
            raise ValueError("reverse=True needs a batch with no padding")
        # The compiled loops walk x and the output backwards themselves without a backward
        # (saves the two flips: ~6% of a bidirectional evaluation); otherwise flip.
        if needs_grad or cfg.ext is None or plan.ih_seq:
            out, state = fast_direction(x.flip(0), batch_sizes, state, p, step, time_offset)
            return out.flip(0), state
        plan.reverse = True
    if needs_grad:
        out, h_n, c_n = _FastDirection.apply(cfg, *inputs)
    else:
        plan.save = False
        with torch.no_grad():
            out, h_n, c_n, _ = _forward(cfg, *inputs)
    return out, ((h_n, c_n) if kind == LSTM else (h_n,))


# -- forward ------------------------------------------------------------------------------


def _stat_buffers(
    cfg: _Config, key: str, rows: int, F: int, place: _Placer
) -> tuple[Tensor, Tensor, list[bool]]:
    """Mean and variance rows (rows, F), and the per-step batch-statistics flags."""
    plan, bn = cfg.plan, cfg.bns[key]
    if key == "ih" and plan.ih_seq:
        flags = [False] * len(plan.sizes)  # computed before the loop
    else:
        batch = bn.uses_batch_stats
        flags = [batch and n >= 2 for n in plan.sizes]
    if _population_rows(cfg, key, rows, flags, place.like):  # read in place: no copy
        off = cfg.time_offset
        return bn.running_mean[off : off + rows], bn.running_var[off : off + rows], flags
    return place.new(rows, F), place.new(rows, F), flags


def _population_rows(cfg: _Config, key: str, rows: int, flags: list[bool], like: Tensor) -> bool:
    """Whether the loops may read the module's population rows themselves: no step has
    batch statistics, nothing is kept for a backward (that reads them later), and the rows
    are the module's own, with no step beyond max_length (those reuse the last row)."""
    bn = cfg.bns[key]
    return (
        not cfg.plan.save
        and not any(flags)
        and not (key == "ih" and cfg.plan.ih_seq)
        and cfg.time_offset + rows <= bn.max_length
        and bn.running_mean.dtype == like.dtype
        and bn.running_mean.device == like.device
    )


def _fill_population(cfg: _Config, b: Buffers, key: str, t0: int, t1: int) -> None:
    """Population rows min(t, max_length - 1) for the steps in [t0, t1) without batch
    statistics, read from the module's buffers now."""
    bn = cfg.bns[key]
    steps = [t for t in range(t0, t1) if not b.B[key][t]]
    if not steps or b.M[key]._base is bn.running_mean:  # read in place (_population_rows)
        return
    # index_select / index_copy_: one gather and one scatter (indexed assignment costs ~1 ms
    # per call at T = 200)
    idx = torch.tensor(steps, device=b.M[key].device)
    rows = (idx + cfg.time_offset).clamp(max=bn.max_length - 1)
    b.M[key].index_copy_(0, idx, bn.running_mean.index_select(0, rows).to(b.M[key].dtype))
    b.V[key].index_copy_(0, idx, bn.running_var.index_select(0, rows).to(b.V[key].dtype))


def _track(cfg: _Config, b: Buffers, key: str, t0: int, t1: int) -> None:
    """Fold the batch statistics of steps [t0, t1) into the population rows."""
    bn = cfg.bns[key]
    steps = [t for t in range(t0, t1) if b.B[key][t]]
    if not steps:
        return
    if len(steps) == t1 - t0:  # every step: views of the rows, no gather
        off = cfg.time_offset
        counts = cfg.plan.sizes[t0:t1]
        bn._track(range(t0 + off, t1 + off), b.M[key][t0:t1], b.V[key][t0:t1], counts)
        return
    idx = torch.tensor(steps, device=b.M[key].device)
    bn._track(
        idx.cpu() + cfg.time_offset,
        b.M[key][idx],
        b.V[key][idx],
        [cfg.plan.sizes[t] for t in steps],
    )


def _sequence_stats(cfg: _Config, b: Buffers) -> None:
    """Laurent eq. 20-21: one mean and variance of W_ih x over all unpadded frames."""
    plan, bn = cfg.plan, cfg.bns["ih"]
    T, N = len(plan.sizes), b.WX.shape[1]
    total = sum(plan.sizes)
    if bn.uses_batch_stats and total >= 2:
        sizes = torch.tensor(plan.sizes, device=b.WX.device)
        mask = (torch.arange(N, device=b.WX.device)[None, :] < sizes[:, None]).unsqueeze(-1)
        mean = torch.where(mask, b.WX, 0).sum((0, 1)) / total
        var = torch.where(mask, b.WX - mean, 0).square().sum((0, 1)) / total
        b.M["ih"][0], b.V["ih"][0] = mean, var
        plan.ih_seq_batch = True
        bn._track(torch.tensor([0]), mean[None], var[None], [total])
    else:
        b.M["ih"][0] = bn.running_mean[0]
        b.V["ih"][0] = bn.running_var[0]
    del T


def _forward(
    cfg: _Config,
    x: Tensor,
    h0: Tensor,
    c0: Tensor | None,
    w_ih: Tensor,
    w_hh: Tensor,
    bias: Tensor | None,
    g_ih: Tensor | None,
    g_hh: Tensor | None,
    g_pre: Tensor | None,
    g_c: Tensor | None,
    b_c: Tensor | None,
) -> tuple[Tensor, Tensor, Tensor | None, Buffers]:
    plan = cfg.plan
    T, N, I = x.shape
    H, G = plan.H, plan.G
    lstm = plan.kind == LSTM
    save = plan.save
    S = T if save else 1
    # The backward keeps W_ih x (normalised) only for "preactivation" (it holds xhat of the
    # whole pre-activation), sequence-wise statistics and inputs wider than H; otherwise it
    # recomputes xhat_ih. Then the compiled loops compute W_ih x_t at each step, forward
    # and backward, each block its own columns (read back from L1/L2; one GEMM per chunk
    # of steps measured no faster); the Python loops recompute it a chunk at a time in the
    # backward, and without a backward take EVAL_CHUNK steps at a time.
    plan.step_ih = (
        cfg.ext is not None and not plan.inline_ih and not plan.ih_seq and not plan.keep_wx
    )
    chunked = not save and not plan.inline_ih and not plan.ih_seq and not plan.step_ih
    chunked = chunked and T > EVAL_CHUNK
    place = _Placer(x, x, h0, cached=cfg.ext is not None)
    new = place.new
    if plan.inline_ih or plan.step_ih:  # W_ih x_t is computed inside each step
        WX = new(1, N, G)
    elif chunked:
        WX = new(EVAL_CHUNK, N, G)
    else:  # W_ih x for all steps at once; padded rows of x are zero and never read.
        WX = _linear(x.reshape(T * N, I), w_ih).view(T, N, G)
        place.take(WX)
    b = Buffers(
        WX=WX,
        XH=new(S if plan.has_hh else 1, N, G),
        ACT=new(S if lstm and not plan.recompute_act else 1, N, G),
        OUT=new(T, N, H, escapes=True),
        h0=h0.contiguous(),
        # the compiled loops copy their blocks' columns from the view themselves
        whT=w_hh.t() if cfg.ext is not None else w_hh.t().contiguous(),
        w_hh=w_hh,
        bias=bias,
        g_ih=g_ih,
        g_hh=g_hh,
        g_pre=g_pre,
        g_c=g_c,
        b_c=b_c,
    )
    if plan.inline_ih or plan.step_ih:
        b.x = x.contiguous()
        b.w_ihT = place.copy(w_ih.t())
    if lstm:
        b.C = new(S, N, H)
        b.TC = new(1, N, H)  # tanh(BN(c_t)): the backward recomputes it
        b.c0 = place.copy(c0)
        if not save:
            b.C[0].copy_(c0)  # the running cell state, updated in place
    keys = [k for k in ("ih", "hh", "pre", "c") if cfg.bns[k] is not None]
    for key in keys:
        F = H if key == "c" else G
        rows = 1 if (key == "ih" and plan.ih_seq) else T
        b.M[key], b.V[key], b.B[key] = _stat_buffers(cfg, key, rows, F, place)
    if plan.ih_seq:
        _sequence_stats(cfg, b)
    # Steps with batch statistics come first (batch sizes decrease); the population rows
    # of the later steps are read after tracking them, as the step-by-step reference does.
    split = next((t for t, n in enumerate(plan.sizes) if n < 2), T)
    frame_keys = [k for k in keys if not (k == "ih" and plan.ih_seq)]
    for t0, t1 in ((0, split), (split, T)):
        if t0 == t1:
            continue
        for key in frame_keys:
            _fill_population(cfg, b, key, t0, t1)
        step = EVAL_CHUNK if chunked else t1 - t0
        for c0 in range(t0, t1, step):
            c1 = min(t1, c0 + step)
            if chunked:
                k = c1 - c0
                torch.mm(x[c0:c1].reshape(k * N, I), w_ih.t(), out=WX[:k].view(k * N, G))
                plan.wx_base = c0
            if cfg.ext is not None:
                cfg.ext.forward_loop(plan, b, c0, c1)
            else:
                loops.forward_loop(plan, b, c0, c1)
        plan.wx_base = 0
        for key in frame_keys:
            _track(cfg, b, key, t0, t1)
    # Each sequence's state at its own last step.
    last = torch.tensor([n - 1 for n in _lengths(plan.sizes, N)], device=x.device)
    if plan.reverse:  # (a full batch) the last step wrote time 0
        last.zero_()
    rows = torch.arange(N, device=x.device)
    h_n = b.OUT[last, rows]
    c_n = None
    if lstm:
        c_n = b.C[last, rows] if save else b.C[0].clone()
    return b.OUT, h_n, c_n, b


# Smallest buffer taken from the compiled loops' cache (smaller ones come from the heap).
CACHED_MIN = 64 << 10


class _Placer:
    """Buffers placed apart modulo 4 KiB. Buffers that a step reads and writes together
    (XH, C, OUT, WX, DWX, dOUT, ...) starting at nearby offsets modulo 4 KiB alias in the L1
    cache sets and in the store-to-load checks: with XH, ACT and OUT placed so, a mid-sized
    training step ran 1.5x slower (154-184 ms against 105-117 ms), and where the heap put
    them varied from call to call. ``new(*shape)`` makes an empty buffer like ``like``
    starting at the 64-byte offset farthest from every offset taken so far: those of the
    tensors given to ``take`` (made elsewhere: x, W_ih x from oneDNN, autograd's dOUT) and
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
        # the midpoint (a scan of all 64 cost ~1 ms of Python per call).
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


def _lengths(sizes: list[int], N: int) -> list[int]:
    """Length of each of the N sorted sequences from the batch sizes."""
    present = torch.tensor(sizes)[:, None] > torch.arange(N)[None, :]  # (T, N)
    return present.sum(0).tolist()


# -- the autograd function ----------------------------------------------------------------

_SAVED = ("WX", "XH", "ACT", "C", "OUT")
_STAT_KEYS = ("ih", "hh", "pre", "c")


class _FastDirection(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, cfg: _Config, *inputs: Tensor | None) -> tuple[Tensor, ...]:
        cfg.plan.save = True
        out, h_n, c_n, b = _forward(cfg, *inputs)
        ctx.cfg = cfg
        ctx.flags = b.B
        ctx.has = [k in b.M for k in _STAT_KEYS]
        stats = [t for k in _STAT_KEYS if k in b.M for t in (b.M[k], b.V[k])]
        bufs = [getattr(b, name) for name in _SAVED]
        if not cfg.plan.keep_wx:  # recomputed by the backward (or not needed)
            bufs[0] = None
        if cfg.plan.recompute_act:  # likewise
            bufs[2] = None
        ctx.has_buf = [t is not None for t in bufs]
        ctx.save_for_backward(*inputs, *[t for t in bufs if t is not None], *stats)
        if c_n is None:  # the RNN has no cell: an empty placeholder output
            c_n = h_n.new_empty(0)
            ctx.mark_non_differentiable(c_n)
        return out, h_n, c_n

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, d_out: Tensor | None, d_hn: Tensor | None, d_cn: Tensor | None):
        cfg: _Config = ctx.cfg
        plan = cfg.plan
        saved = list(ctx.saved_tensors)
        x, h0, c0, w_ih, w_hh, bias, g_ih, g_hh, g_pre, g_c, b_c = saved[:11]
        rest = saved[11:]
        bufs: dict[str, Tensor | None] = {}
        for name, has in zip(_SAVED, ctx.has_buf):
            bufs[name] = rest.pop(0) if has else None
        T, N, I = x.shape
        H, G = plan.H, plan.G
        lstm = plan.kind == LSTM
        b = Buffers(
            WX=bufs["WX"],
            XH=bufs["XH"],
            ACT=bufs["ACT"],
            OUT=bufs["OUT"],
            C=bufs["C"],
            h0=h0.contiguous(),
            c0=None if c0 is None else c0.contiguous(),
            whT=w_hh.t(),
            w_hh=w_hh.contiguous(),
            bias=bias,
            g_ih=g_ih,
            g_hh=g_hh,
            g_pre=g_pre,
            g_c=g_c,
            b_c=b_c,
        )
        for key, has in zip(_STAT_KEYS, ctx.has):
            if has:
                b.M[key], b.V[key] = rest.pop(0), rest.pop(0)
                b.B[key] = ctx.flags[key]
        b.dOUT = d_out.contiguous() if d_out is not None else x.new_zeros(T, N, H)
        # apart from what the backward steps read: the kept buffers, dOUT, x
        place = _Placer(x, b.XH, b.C, b.OUT, b.WX, b.ACT, b.dOUT, x, cached=cfg.ext is not None)
        new = place.new
        if plan.recompute_act:
            b.ACT = new(1, N, G)  # the step's gate activations, recomputed
        # (dh, dc and the gradients are returned: plain tensors, not from the cache)
        zeros = functools.partial(place.zeros, escapes=True)
        b.dh = place.copy(d_hn, escapes=True) if d_hn is not None else zeros(N, H)
        if lstm:
            b.dc = place.copy(d_cn, escapes=True) if d_cn is not None else zeros(N, H)
        separate = (plan.has_ih or plan.has_hh) and not plan.has_pre
        need = ctx.needs_input_grad[1:]
        wx_kept = b.WX
        recompute = plan.has_ih and not plan.inline_ih and wx_kept is None
        # the compiled loop recomputes W_ih x_t at each step, each block its columns
        in_loop = recompute and plan.step_ih and cfg.ext is not None
        recompute = recompute and not in_loop
        if plan.inline_ih or in_loop:
            b.x = x.contiguous()
            b.w_ihT = place.copy(w_ih.t())
            b.XS = new(1, N, G)
        if plan.inline_ih:
            b.w_ih = w_ih.contiguous()
            b.dX = x.new_zeros(T, N, I) if need[0] else None
        # The backward runs in chunks of K steps: the gradients of W_ih x and W_hh h of a
        # chunk go into the weight gradients as one GEMM each, so only K steps of them are
        # held. Sequence-wise statistics need all steps first (one chunk).
        chunks = CHUNKS if unpadded(plan.sizes, N) else CHUNKS_RAGGED
        K = T if plan.ih_seq else min(T, max(MIN_CHUNK, -(-T // chunks)))
        # (one step when the inline projection needs it for nothing else: its dW_ih is
        # accumulated inside the loop, dx is one GEMM over the chunk)
        b.DWX = new(1 if (plan.inline_ih and separate and not need[0]) else K, N, G)
        b.DWH = new(K, N, G) if separate else b.DWX
        b.grads = {"sum": zeros(G)}
        for key, gamma in (("ih", g_ih), ("hh", g_hh), ("pre", g_pre), ("c", g_c)):
            if gamma is not None:
                b.grads[key] = zeros(gamma.shape[0])
        if b_c is not None:
            b.grads["b_c"] = zeros(H)
        if plan.inline_ih:
            b.grads["w_ihT"] = zeros(I, G)
        dx = x.new_empty(T, N, I) if (need[0] and not plan.inline_ih) else None
        # the weight gradients transposed (see _add_weight_grad), made contiguous at the end
        dw_ihT = x.new_zeros(I, G) if (need[3] and not plan.inline_ih) else None
        dw_hhT = x.new_zeros(H, G) if need[4] else None
        if wx_kept is None:
            b.WX = new(K if recompute else 1, N, G)
        for t1 in range(T, 0, -K):
            t0 = max(0, t1 - K)
            k = t1 - t0
            # WX holds steps [t0, t1): xhat_ih recomputed from x as the forward computed it,
            # or the kept buffer's steps.
            if recompute:
                z = b.WX[:k]
                torch.mm(x[t0:t1].reshape(k * N, I), w_ih.t(), out=z.view(k * N, G))
                rstd = torch.rsqrt(b.V["ih"][t0:t1, None] + plan.eps[0])
                z.sub_(b.M["ih"][t0:t1, None]).mul_(rstd)
            elif wx_kept is not None:
                b.WX = wx_kept[t0:t1]
            if cfg.ext is not None:
                cfg.ext.backward_loop(plan, b, t0, t1)
            else:
                loops.backward_loop(plan, b, t0, t1)
            if plan.ih_seq:  # Laurent eq. 20-21: the statistic of all frames, backward
                _sequence_backward(plan, b, g_ih)
            if not plan.inline_ih:  # (inline: accumulated inside the loop)
                dwx = b.DWX[:k].view(k * N, G)
                if dx is not None:
                    dx[t0:t1].view(k * N, I).copy_(_linear(dwx, w_ih.t()))
                if dw_ihT is not None:
                    _add_weight_grad(dw_ihT, x[t0:t1].reshape(k * N, I), dwx)
            if dw_hhT is not None:  # h_{t-1} is h0 at t = 0, else the previous output
                dwh = b.DWH[:k]
                if t0 == 0:
                    _add_weight_grad(dw_hhT, b.h0, dwh[0])
                    dwh, t0 = dwh[1:], 1
                if t1 > t0:
                    rows = (t1 - t0) * N
                    hs = b.OUT[t0 - 1 : t1 - 1].reshape(rows, H)
                    _add_weight_grad(dw_hhT, hs, dwh.reshape(rows, G))
        dw_ih = None if dw_ihT is None else dw_ihT.t().contiguous()
        dw_hh = None if dw_hhT is None else dw_hhT.t().contiguous()
        if plan.inline_ih:
            dx = b.dX
            dw_ih = b.grads["w_ihT"].t() if need[3] else None
        grads = b.grads
        return (
            None,
            dx,
            b.dh if need[1] else None,
            b.dc if (lstm and need[2]) else None,
            dw_ih,
            dw_hh,
            grads["sum"] if (bias is not None and need[5]) else None,
            grads.get("ih") if need[6] else None,
            grads.get("hh") if need[7] else None,
            grads.get("pre") if need[8] else None,
            grads.get("c") if need[9] else None,
            grads.get("b_c") if need[10] else None,
        )


def _sequence_backward(plan: Plan, b: Buffers, g_ih: Tensor) -> None:
    """Laurent eq. 20-21 backward: DWX holds dL/dy of y = g * xhat for all steps; make it
    dL/d(W_ih x) through the one mean and variance over all unpadded frames."""
    T, N = len(plan.sizes), b.DWX.shape[1]
    total = sum(plan.sizes)
    device = b.DWX.device
    sizes = torch.tensor(plan.sizes, device=device)
    mask = (torch.arange(N, device=device)[None, :] < sizes[:, None]).unsqueeze(-1)
    rstd = torch.rsqrt(b.V["ih"][0] + plan.eps[0])
    dy = b.DWX[:T]
    if plan.ih_seq_batch:
        corr = dy - b.grads["sum"] / total - b.WX * (b.grads["ih"] / total)
        dy.copy_(torch.where(mask, corr * (g_ih * rstd), 0))
    else:
        dy.mul_(g_ih * rstd)
