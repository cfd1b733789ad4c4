"""Build, load and call the compiled loops (``csrc/``: the operators ``bnrnn_fast::forward_loop``
and ``bnrnn_fast::backward_loop``, called by keyword).

The extension is compiled at first use with `torch.utils.cpp_extension.load` (gcc and
ninja; the ``ninja`` package from PyPI is found even outside an activated virtualenv) into
the per-user torch extensions directory (``$TORCH_EXTENSIONS_DIR`` or
``~/.cache/torch_extensions``). Its name carries a hash of the source, the torch version
and the CPU, so a build is done once per machine and reused by every later process; a
lock in the build directory makes concurrent first uses wait for one build.

`load` raises if the build fails; `load_or_warn` warns once and returns None, and the
caller then runs the Python loops (`bnrnn.fast.loops`), which compute the same thing.
"""

from __future__ import annotations

import hashlib
import os
import platform
import shutil
import threading
import warnings
from pathlib import Path
from typing import Any

import torch

from .loops import LSTM, RNN_RELU, RNN_TANH, Buffers, Plan

SOURCES = Path(__file__).with_name("csrc")  # ops.cpp includes the headers beside it

# -fno-math-errno, -fno-trapping-math: let gcc vectorise sqrt and the branch-free exp/tanh
# (no -ffast-math: NaN and inf keep their IEEE meaning).
_CFLAGS = [
    "-O3",
    "-march=native",
    "-mprefer-vector-width=512",
    "-fno-math-errno",
    "-fno-trapping-math",
    "-std=c++17",
    # at::parallel_for is a header template whose `#pragma omp parallel` is compiled here:
    # without -fopenmp it silently runs serially. Linking names libgomp.so.1, which the
    # loader resolves to the copy torch has already loaded (same soname, one thread pool).
    "-fopenmp",
]
_LDFLAGS = ["-fopenmp"]
_lock = threading.Lock()
_module: Any = None
_error: BaseException | None = None
_warned = False


def _cpu_tag() -> str:
    """What the build depends on besides the source: it is compiled for this CPU."""
    flags = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "model name")):
                flags += line
    except OSError:
        flags = platform.processor()
    return flags


def build_name() -> str:
    h = hashlib.sha256()
    for path in sorted(SOURCES.iterdir()):
        h.update(path.name.encode())
        h.update(path.read_bytes())
    h.update(torch.__version__.encode())
    h.update(_cpu_tag().encode())
    h.update(" ".join(_CFLAGS + _LDFLAGS).encode())
    return f"bnrnn_fast_{h.hexdigest()[:16]}"


def _ensure_ninja_on_path() -> None:
    if shutil.which("ninja"):
        return
    try:
        import ninja  # the PyPI package ships the binary

        os.environ["PATH"] = ninja.BIN_DIR + os.pathsep + os.environ.get("PATH", "")
    except ImportError:
        pass


def load() -> Any:
    """The compiled ops (built now if needed); raises if the build fails."""
    global _module, _error
    with _lock:
        if _module is not None:
            return _module
        if _error is not None:
            raise RuntimeError(f"building the compiled fast path failed: {_error}") from _error
        try:
            from torch.utils.cpp_extension import load as load_extension

            _ensure_ninja_on_path()
            load_extension(
                name=build_name(),
                sources=[str(SOURCES / "ops.cpp")],
                extra_cflags=_CFLAGS,
                extra_ldflags=_LDFLAGS,
                is_python_module=False,
                verbose=os.environ.get("BNRNN_BUILD_VERBOSE") == "1",
            )
            _module = _Ops()
        except Exception as e:  # compiler missing, ninja missing, build error
            _error = e
            raise RuntimeError(f"building the compiled fast path failed: {e}") from e
        return _module


def load_or_warn() -> Any:
    """The compiled ops, or None (with a warning once) if they cannot be built."""
    global _warned
    try:
        return load()
    except RuntimeError as e:
        if not _warned:
            warnings.warn(
                f"{e}; the fast path runs its Python loops instead (slower on small layers)",
                stacklevel=4,
            )
            _warned = True
        return None


def set_gemm(name: str) -> bool:
    """The GEMM of the per-step products in float32: ``"brgemm"`` (default: oneDNN's
    micro-kernel, or torch's gemm where that is not built), ``"packed"``: MKL's packed GEMM
    (when the torch build exports it), ``"mm"``: at::mm. Returns whether the choice is
    available (if not, the loops use at::mm)."""
    return bool(torch.ops.bnrnn_fast.set_gemm(name))


def set_block_macs(macs: int) -> int:
    """Multiply-adds of a step's GEMM per thread below which the step runs on one thread
    (the compiled loops split larger steps by hidden units, one block per thread).
    Returns the previous value; for tests and tuning."""
    return int(torch.ops.bnrnn_fast.set_block_macs(macs))


def set_row_split_bytes(nbytes: int) -> int:
    """Bytes of the step's weights up to which a forward without batch statistics and
    without a backward (evaluation) splits the batch rows over threads, each running every
    step for its rows with no barrier; above it, hidden units are split as in training.
    0 disables the row split. Returns the previous value; for tests and tuning."""
    return int(torch.ops.bnrnn_fast.set_row_split_bytes(nbytes))


def empty_cache() -> None:
    """Return the free blocks kept by the compiled loops' buffer cache to the system (as
    torch.cuda.empty_cache does for CUDA). A no-op when the loops are not loaded."""
    if _module is not None:
        torch.ops.bnrnn_fast.empty_cache()


def cache_info() -> dict[str, int]:
    """The buffer cache: ``free_bytes`` and ``free_blocks`` kept for reuse, and ``limit``,
    the most free bytes it keeps (zeros when the loops are not loaded)."""
    if _module is None:
        return {"free_bytes": 0, "free_blocks": 0, "limit": 0}
    free_bytes, free_blocks, limit = torch.ops.bnrnn_fast.cache_info()
    return {"free_bytes": free_bytes, "free_blocks": free_blocks, "limit": limit}


def set_cache_limit(nbytes: int) -> int:
    """The most free bytes the buffer cache keeps (default 1 GiB; 0: keep none, every
    buffer is returned to the system when freed). Returns the previous limit. Loads the
    compiled loops."""
    load()
    return int(torch.ops.bnrnn_fast.set_cache_limit(nbytes))


_KINDS = {LSTM: "lstm", RNN_TANH: "rnn_tanh", RNN_RELU: "rnn_relu"}
NORM_KEYS = ("ih", "hh", "pre", "c")


class _Ops:
    """Calls the compiled loops with the arguments of `bnrnn.fast.loops`, by keyword."""

    @staticmethod
    def _common(plan: Plan, b: Buffers, t0: int, t1: int) -> dict[str, Any]:
        kw: dict[str, Any] = dict(
            kind=_KINDS[plan.kind],
            batch_sizes=plan.sizes,
            t0=t0,
            t1=t1,
            sequence_ih=plan.ih_seq,
            inline_ih=plan.inline_ih,
            step_ih=plan.step_ih,
            recompute_act=plan.recompute_act,
            out=b.OUT,
            h0=b.h0,
            c0=b.c0,
            bias=b.bias,
            gamma_ih=b.g_ih,
            gamma_hh=b.g_hh,
            gamma_pre=b.g_pre,
            gamma_c=b.g_c,
            beta_c=b.b_c,
            x=b.x,
            w_ih_t=b.w_ihT,
        )
        for key, eps in zip(NORM_KEYS, plan.eps):
            kw[f"eps_{key}"] = eps
            kw[f"mean_{key}"] = b.M.get(key)
            kw[f"var_{key}"] = b.V.get(key)
            kw[f"batch_steps_{key}"] = sum(b.B.get(key, ()))  # (a prefix of the steps)
        return kw

    def forward_loop(self, plan: Plan, b: Buffers, t0: int, t1: int) -> None:
        torch.ops.bnrnn_fast.forward_loop(
            **self._common(plan, b, t0, t1),
            wx=b.WX,
            wh=b.XH,
            gates=b.ACT,
            cell=b.C,
            tanh_cell=b.TC,
            w_hh_t=b.whT,  # a view: the loops copy the columns they need
            save=plan.save,
            reverse=plan.reverse,
            wx_base=plan.wx_base,
        )

    def backward_loop(self, plan: Plan, b: Buffers, t0: int, t1: int) -> None:
        torch.ops.bnrnn_fast.backward_loop(
            **self._common(plan, b, t0, t1),
            wx=b.WX,
            wh=b.XH if plan.has_hh else None,
            gates=None if plan.recompute_act else b.ACT,
            recomputed_gates=b.ACT if plan.recompute_act else None,
            cell=b.C,
            w_hh=b.w_hh,
            w_ih=b.w_ih,
            d_out=b.dOUT,
            d_h=b.dh,
            d_c=b.dc,
            d_wx=b.DWX,
            d_wh=None if b.DWH is b.DWX else b.DWH,
            xhat_ih=b.XS,
            d_x=b.dX,
            grad_bias=b.grads["sum"],
            grad_gamma_ih=b.grads.get("ih"),
            grad_gamma_hh=b.grads.get("hh"),
            grad_gamma_pre=b.grads.get("pre"),
            grad_gamma_c=b.grads.get("c"),
            grad_beta_c=b.grads.get("b_c"),
            grad_w_ih_t=b.grads.get("w_ihT"),
        )
