"""Build, load and call the compiled loops (``loops.cpp``).

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
from torch import Tensor

from .loops import Buffers, Plan

SOURCE = Path(__file__).with_name("loops.cpp")
# Order of the tensor list, shared with `enum Fwd` in loops.cpp.
# fmt: off
_ORDER = (
    "WX", "XH", "ACT", "OUT", "h0", "whT", "C", "TC", "c0", "bias",
    "g_ih", "g_hh", "g_pre", "g_c", "b_c",
    "M_ih", "V_ih", "M_hh", "V_hh", "M_pre", "V_pre", "M_c", "V_c",
    "B_ih", "B_hh", "B_pre", "B_c",
    # backward
    "dOUT", "dh", "dc", "DWX", "DWH", "w_hh",
    "gs_sum", "gs_ih", "gs_hh", "gs_pre", "gs_c", "gs_b_c",
    # the input projection inside the loop (Plan.inline_ih, Plan.step_ih)
    "x", "w_ihT", "w_ih", "XS", "gs_w_ihT", "dX",
)
# fmt: on

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
    h.update(SOURCE.read_bytes())
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
                sources=[str(SOURCE)],
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


class _Ops:
    """Calls the compiled loops with the arguments of `bnrnn.fast.loops`."""

    @staticmethod
    def _cfg(plan: Plan, b: Buffers) -> list[int]:
        return [
            plan.kind,
            int(plan.has_ih),
            int(plan.ih_seq),
            int(plan.has_hh),
            int(plan.has_pre),
            int(plan.has_c),
            int(plan.save),
            plan.H,
            plan.G,
            b.OUT.shape[1],
            int(plan.inline_ih),
            plan.wx_base,
            int(plan.step_ih),
            int(plan.reverse),
            int(plan.recompute_act),
        ]

    @staticmethod
    def _tensors(plan: Plan, b: Buffers, backward: bool) -> list[Tensor | None]:
        ts: dict[str, Tensor | None] = {
            name: getattr(b, name, None)
            for name in ("WX", "XH", "ACT", "OUT", "h0", "C", "TC", "c0", "bias")
        }
        ts.update(g_ih=b.g_ih, g_hh=b.g_hh, g_pre=b.g_pre, g_c=b.g_c, b_c=b.b_c)
        ts.update(x=b.x, w_ihT=b.w_ihT, w_ih=b.w_ih, XS=b.XS, dX=b.dX)
        for key in ("ih", "hh", "pre", "c"):
            ts[f"M_{key}"] = b.M.get(key)
            ts[f"V_{key}"] = b.V.get(key)
            flags = b.B.get(key)
            ts[f"B_{key}"] = None if flags is None else _flags(flags)
        if backward:  # the backward multiplies by W_hh itself
            ts.update(dOUT=b.dOUT, dh=b.dh, dc=b.dc, DWX=b.DWX, DWH=b.DWH, w_hh=b.w_hh)
            for key in ("sum", "ih", "hh", "pre", "c", "b_c", "w_ihT"):
                ts[f"gs_{key}"] = b.grads.get(key)
        else:
            ts["whT"] = b.whT
        # W_hh^T goes as the view it is (the loops copy the columns they need)
        return [
            _detached(ts.get(name)) if name == "whT" else _contiguous(ts.get(name))
            for name in _ORDER
        ]

    def forward_loop(self, plan: Plan, b: Buffers, t0: int, t1: int) -> None:
        torch.ops.bnrnn_fast.forward_loop(
            self._cfg(plan, b), list(plan.eps), plan.sizes, self._tensors(plan, b, False), t0, t1
        )

    def backward_loop(self, plan: Plan, b: Buffers, t0: int, t1: int) -> None:
        torch.ops.bnrnn_fast.backward_loop(
            self._cfg(plan, b), list(plan.eps), plan.sizes, self._tensors(plan, b, True), t0, t1
        )


def _flags(flags: list[bool]) -> Tensor:
    """The per-step flags as uint8 (torch.frombuffer: a tenth of torch.tensor's cost)."""
    if not flags:
        return torch.empty(0, dtype=torch.uint8)
    return torch.frombuffer(bytearray(flags), dtype=torch.uint8)


def _detached(t: Tensor | None) -> Tensor | None:
    return None if t is None else t.detach()


def _contiguous(t: Tensor | None) -> Tensor | None:
    """Inputs read by the loops may be views; buffers written by them are contiguous."""
    return None if t is None else t.detach().contiguous()
