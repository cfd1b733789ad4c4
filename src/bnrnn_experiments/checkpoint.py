"""Checkpoints written atomically, and the random-number state a bit-identical resume needs.

`atomic_write_bytes` / `save_checkpoint` write to a temporary file in the destination's
folder, fsync it, then `os.replace` it over the destination (atomic on POSIX) and fsync the
folder: a process killed at any moment (SIGKILL included) leaves either the previous file
or the new one, never a torn one. A stale temporary file may remain; it is ignored and
removed by `clean_stale_temporaries`.

A checkpoint is `torch.save`'s zip archive followed by one line, ``bnrnn-sha256:<hex>\n``,
the SHA-256 of the archive. Zip readers find an archive from its end record, so
`torch.load` still reads the file as it is; `load_checkpoint` verifies the sum first and
raises `CheckpointError` naming the file when it does not match (a flipped byte, a copy
cut short). A checkpoint written before the sum existed (it ends with the zip's end record)
is loaded unverified, and `read_checkpoint` says so.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
import random
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .errors import CheckpointError, naming

TMP_PREFIX = ".tmp-"
SUM_TAG = b"bnrnn-sha256:"
_TRAILER_LEN = len(SUM_TAG) + 64 + 1  # tag, hex digest, newline
_ZIP_END = b"PK\x05\x06"  # signature of the zip's end-of-central-directory record (22 bytes)


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
    """Write ``payload`` to ``path`` atomically (temp file + fsync + os.replace).

    An `OSError` (read-only folder, disk full) names ``path``, not the temporary file."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=TMP_PREFIX + path.name + ".", dir=path.parent)
    except OSError as e:
        raise naming(e, path) from e
    try:
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600 files; honour the umask
        with os.fdopen(fd, "wb") as f:
            f.write(payload)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        if isinstance(e, OSError):
            raise naming(e, path) from e
        raise
    _fsync_dir(path.parent)


def atomic_write_text(path: str | os.PathLike[str], text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def _trailer(archive: bytes | memoryview) -> bytes:
    return SUM_TAG + hashlib.sha256(archive).hexdigest().encode("ascii") + b"\n"


def save_checkpoint(path: str | os.PathLike[str], obj: dict[str, Any]) -> None:
    """`torch.save` ``obj`` to ``path`` atomically, followed by the archive's SHA-256."""
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    archive = buffer.getbuffer()
    atomic_write_bytes(path, bytes(archive) + _trailer(archive))


def read_checkpoint(path: str | os.PathLike[str]) -> tuple[dict[str, Any], bool]:
    """Load a checkpoint written by `save_checkpoint` (on the CPU); return it and whether
    its checksum was verified (False: an older checkpoint without one).

    Raises `CheckpointError` for a file whose checksum does not match, that is cut short or
    empty, or that `torch.load` cannot read."""
    path = Path(path)
    raw = memoryview(path.read_bytes())
    tail = bytes(raw[-_TRAILER_LEN:])
    if tail.startswith(SUM_TAG) and tail.endswith(b"\n"):
        archive = raw[:-_TRAILER_LEN]
        if _trailer(archive) != tail:
            raise CheckpointError(path, "checksum mismatch: the file is damaged")
        verified = True
    elif len(raw) >= 22 and raw[-22:-18] == _ZIP_END:
        archive, verified = raw, False  # no checksum: written before checkpoints had one
    else:
        why = "the file is empty" if len(raw) == 0 else "the file is cut short or damaged"
        raise CheckpointError(path, f"{why} (no checksum line, no zip end record)")
    try:
        # weights_only=False: the checkpoint holds numpy / python RNG states; our own file.
        obj = torch.load(io.BytesIO(archive), map_location="cpu", weights_only=False)
    except Exception as e:  # torch's zip and unpickling errors have many types
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(path, f"torch.load cannot read it ({first})") from e
    if not isinstance(obj, dict):
        raise CheckpointError(path, f"not a bnrnn checkpoint (holds a {type(obj).__name__})")
    return obj, verified


def load_checkpoint(path: str | os.PathLike[str]) -> dict[str, Any]:
    """`read_checkpoint` without the verified flag."""
    return read_checkpoint(path)[0]


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
