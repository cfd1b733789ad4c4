"""Build, load and call the compiled loops (``csrc/``: the operators ``bnrnn_fast::forward_loop``
and ``bnrnn_fast::backward_loop``, called by keyword).

The extension is compiled at first use with `torch.utils.cpp_extension.load` (gcc and
ninja; the ``ninja`` package from PyPI is found even outside an activated virtualenv) into
the per-user torch extensions directory (``$TORCH_EXTENSIONS_DIR`` or
``~/.cache/torch_extensions``). Its name carries a hash of the source (and its folder), the
torch version and the CPU, so a build is done once per machine and checkout and reused by
every later process; a lock in the build directory makes concurrent first uses wait for
one build.

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

from .buffers import Buffers, GradBuffers, Params
from .plan import NORM_KEYS, Plan

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
    # The build directory's ninja file records the sources' absolute paths: two checkouts
    # with the same sources sharing one directory would rebuild it for each other.
    h.update(str(SOURCES.resolve()).encode())
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
            _module = CompiledLoops()
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


BACKENDS = ("auto", "compiled", "python")
_backend = "auto"
_DTYPES = (torch.float32, torch.float64)


def set_backend(name: str) -> None:
    """Choose how the recurrence runs: ``"compiled"`` (the C++ loops, built at first use),
    ``"python"`` (a Python loop over steps, any device) or ``"auto"`` (compiled on the CPU
    for float32/float64 when the build succeeds, else Python, with a warning once). A
    model compiled with torch.compile keeps the choice made when it was traced."""
    global _backend
    if name not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {name!r}")
    _backend = name


def get_backend() -> str:
    return _backend


def uses_compiled(x: torch.Tensor) -> bool:
    """Whether the compiled loops run a direction over x (else the Python loops); builds
    them at first use. With the backend ``"compiled"``, raises where they cannot run."""
    return _compiled_for(x.device.type, x.dtype)


@torch.compiler.assume_constant_result
def _compiled_for(device: str, dtype: torch.dtype) -> bool:
    if _backend == "python" or device != "cpu" or dtype not in _DTYPES:
        if _backend == "compiled":
            raise RuntimeError(
                f"the compiled fast path runs float32/float64 on the CPU, got {dtype} on {device}"
            )
        return False
    if _backend == "compiled":
        return load() is not None
    return load_or_warn() is not None


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


class CompiledLoops:
    """`forward_loop` and `backward_loop` of `bnrnn.fast.loops`, run by the compiled
    operators: the plan's options and the buffers are passed by keyword, under the names
    of the operators' schemas (``csrc/ops.cpp``)."""

    @staticmethod
    def _common(plan: Plan, p: Params, b: Buffers, t0: int, t1: int) -> dict[str, Any]:
        kw: dict[str, Any] = {
            "kind": plan.kind,
            "batch_sizes": plan.sizes,
            "t0": t0,
            "t1": t1,
            "sequence_ih": plan.sequence_ih,
            "inline_ih": plan.inline_ih,
            "step_ih": plan.step_ih,
            "recompute_act": plan.recompute_act,
            "layer": plan.layer,
            "active": [] if plan.active is None else list(plan.active),
            "out": b.out,
            "h0": p.h0,
            "c0": p.c0,
            "bias": p.bias,
            "beta_c": p.beta_c,
            "x": p.x,
            "w_ih_t": p.w_ih_t,
        }
        for key in NORM_KEYS:
            nm, stats = plan.norm(key), b.stats.get(key)
            kw[f"gamma_{key}"] = p.gamma.get(key)
            kw[f"mean_{key}"] = None if stats is None else stats.mean
            kw[f"var_{key}"] = None if stats is None else stats.var
            kw[f"eps_{key}"] = 0.0 if nm is None else nm.eps
            kw[f"batch_steps_{key}"] = 0 if nm is None else nm.batch_steps
        return kw

    def forward_loop(
        self, plan: Plan, p: Params, b: Buffers, t0: int, t1: int, wx_base: int = 0
    ) -> None:
        torch.ops.bnrnn_fast.forward_loop(
            **self._common(plan, p, b, t0, t1),
            wx=b.wx,
            wh=b.wh,
            gates=b.gates,
            cell=b.cell,
            tanh_cell=b.tanh_cell,
            w_hh_t=p.w_hh_t,  # a view: the loops copy the columns they need
            save=plan.save,
            reverse=plan.reverse,
            wx_base=wx_base,
        )

    def backward_loop(
        self, plan: Plan, p: Params, b: Buffers, g: GradBuffers, t0: int, t1: int
    ) -> None:
        sums = g.sums
        torch.ops.bnrnn_fast.backward_loop(
            **self._common(plan, p, b, t0, t1),
            wx=b.wx,
            wh=b.wh,
            gates=b.gates,
            recomputed_gates=g.recomputed_gates,
            cell=b.cell,
            w_hh=p.w_hh,
            w_ih=p.w_ih,
            d_out=g.d_out,
            d_h=g.d_h,
            d_c=g.d_c,
            d_wx=g.d_wx,
            d_wh=g.d_wh,
            xhat_ih=g.xhat_ih,
            d_x=g.d_x,
            grad_bias=sums.bias,
            grad_gamma_ih=sums.gamma.get("ih"),
            grad_gamma_hh=sums.gamma.get("hh"),
            grad_gamma_pre=sums.gamma.get("pre"),
            grad_gamma_c=sums.gamma.get("c"),
            grad_beta_c=sums.beta_c,
            grad_w_ih_t=sums.w_ih_t,
            hold_h=g.hold_h,
            hold_c=g.hold_c,
        )
