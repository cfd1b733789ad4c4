"""Checkpoints written atomically, and the random-number state a bit-identical resume needs.

`atomic_write_bytes` / `save_checkpoint` write to a temporary file in the destination's
folder, fsync it, then `os.replace` it over the destination (atomic on POSIX) and fsync the
folder: a process killed at any moment (SIGKILL included) leaves either the previous file
or the new one, never a torn one. A stale temporary file may remain; it is ignored and
removed by `clean_stale_temporaries`.
"""

from __future__ import annotations

import contextlib
import io
import os
import random
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

TMP_PREFIX = ".tmp-"


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # e.g. platforms without directory fds
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def atomic_write_bytes(path: str | os.PathLike[str], payload: bytes) -> None:
    """Write ``payload`` to ``path`` atomically (temp file + fsync + os.replace)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=TMP_PREFIX + path.name + ".", dir=path.parent)
    try:
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600 files; honour the umask
        with os.fdopen(fd, "wb") as f:
            f.write(payload)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    _fsync_dir(path.parent)


def atomic_write_text(path: str | os.PathLike[str], text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def save_checkpoint(path: str | os.PathLike[str], obj: dict[str, Any]) -> None:
    """`torch.save` ``obj`` to ``path`` atomically."""
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    atomic_write_bytes(path, buffer.getvalue())


def load_checkpoint(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Load a checkpoint written by `save_checkpoint` (on the CPU)."""
    # weights_only=False: the checkpoint holds numpy / python RNG states; it is our own file.
    return torch.load(path, map_location="cpu", weights_only=False)


def clean_stale_temporaries(folder: str | os.PathLike[str]) -> list[Path]:
    """Remove temporary files left by writers that were killed mid-write."""
    removed = []
    for p in Path(folder).glob(TMP_PREFIX + "*"):
        try:
            p.unlink()
            removed.append(p)
        except OSError:
            pass
    return removed


def rng_state() -> dict[str, Any]:
    """The state of every random-number generator the training touches."""
    return {
        "torch": torch.get_rng_state(),
        "numpy": np.random.get_state(),
        "python": random.getstate(),
    }


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch (CPU runs are then deterministic)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
