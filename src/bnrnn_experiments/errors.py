"""How the ``bnrnn`` command reports a failure: one line on stderr naming the option or
file and what to do, and a non-zero exit status. The Python traceback only with
``--debug`` or ``BNRNN_DEBUG=1``.

Exit status: 2 bad input (options, configuration, data files, run directories,
checkpoints, a folder that cannot be written); 3 training stopped on a non-finite loss,
gradient or parameter; 1 an unexpected error (a bug: the message says how to see the
traceback); 130 interrupted.
"""

from __future__ import annotations

import errno
import os
import sys
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

DEBUG_ENV = "BNRNN_DEBUG"
EXIT_INTERNAL = 1
EXIT_ERROR = 2
EXIT_DIVERGED = 3
EXIT_INTERRUPTED = 130


class CheckpointError(RuntimeError):
    """A checkpoint file that cannot be trusted: truncated, damaged or not a checkpoint."""

    def __init__(self, path: str | os.PathLike[str], why: str) -> None:
        super().__init__(f"{path}: {why}")
        self.path = Path(path)
        self.why = why

    def __reduce__(self) -> tuple[Any, ...]:  # pickled to the other ranks under torchrun
        return (type(self), (self.path, self.why))


class TrainingDiverged(RuntimeError):
    """Training met a non-finite loss, gradient norm or parameter; the message names the
    step, and the run directory keeps its last finite checkpoint and no results."""


def naming(e: OSError, path: str | os.PathLike[str]) -> OSError:
    """``e`` about ``path`` (the file the user knows, not a temporary one or none); same
    errno, hence same subclass (PermissionError, ...)."""
    return OSError(e.errno, e.strerror, os.fspath(path)) if e.errno is not None else e


def debug_requested(flag: bool = False) -> bool:
    return flag or os.environ.get(DEBUG_ENV, "") not in ("", "0")


def _os_error(e: OSError) -> str:
    name = e.filename if e.filename is not None else "a file"
    if e.errno == errno.ENOSPC:
        return f"{name}: no space left on the device; free some space and run again"
    if e.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return (f"cannot write {name} ({e.strerror}); make its folder writable, or choose "
                "another place")  # fmt: skip
    return f"{name}: {e.strerror}"


def describe(e: Exception, command: str) -> tuple[str, int]:
    """The one-line message and the exit status for ``e``, raised by ``bnrnn command``."""
    from .data import DataFileError, DataUnavailableError

    if isinstance(e, TrainingDiverged):
        return str(e), EXIT_DIVERGED
    if isinstance(e, OSError) and e.errno is not None:  # from the system, not our messages
        hint = " (--resume continues a started run)" if command in ("train", "reproduce") else ""
        return _os_error(e) + hint, EXIT_ERROR
    if isinstance(e, (ValueError, OSError, DataUnavailableError, DataFileError, CheckpointError)):
        return str(e), EXIT_ERROR
    lines = str(e).strip().splitlines()
    return (
        f"unexpected {type(e).__name__}: {lines[0] if lines else ''} ({DEBUG_ENV}=1 or "
        "--debug shows the traceback; please report it)",
        EXIT_INTERNAL,
    )


def run_command(command: str, debug: bool, body: Callable[[], int]) -> int:
    """``body()``'s exit status; an exception becomes a message on stderr and a status."""
    try:
        return body()
    except KeyboardInterrupt:
        print(f"bnrnn {command}: interrupted (resume with --resume)", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception as e:
        message, status = describe(e, command)
        if debug_requested(debug):
            traceback.print_exc()
        print(f"bnrnn {command}: error: {message}", file=sys.stderr)
        return status
