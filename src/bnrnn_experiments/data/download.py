"""Data directory resolution, checksummed atomic downloads and offline errors.

Every data set lives in a subfolder of one data directory (see :func:`resolve_data_dir`)::

    <data_dir>/mnist/{train,t10k}-{images-idx3,labels-idx1}-ubyte.gz
    <data_dir>/ptb/ptb.{train,valid,test}.txt and ptb.char.{train,valid,test}.txt
    <data_dir>/text8/text8.zip

Files are downloaded on first use from their canonical URLs. A download is written to a
temporary file next to its target and moved into place with :func:`os.replace` only after
its checksum matched, so an interrupted or failed download never leaves a partial file.

Tests never touch the network: they replace the module-level :func:`_urlopen` (or pass
``fetch=`` to :func:`ensure_file`) with a fake.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import sys
import tempfile
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import IO, Any

__all__ = [
    "DATA_DIR_ENV",
    "DEFAULT_DATA_DIR",
    "ChecksumError",
    "DataFileError",
    "DataUnavailableError",
    "Fetch",
    "dataset_dir",
    "download_url",
    "ensure_file",
    "file_digest",
    "offline_message",
    "resolve_data_dir",
    "verify_checksums",
]

#: Environment variable naming the data directory (overridden by an explicit argument).
DATA_DIR_ENV = "BNRNN_DATA_DIR"
#: Data directory used when neither an argument nor :data:`DATA_DIR_ENV` is given.
DEFAULT_DATA_DIR = Path("~/.cache/bnrnn/data")

_USER_AGENT = "bnrnn-data/0.1 (+python urllib)"
_CHUNK = 1 << 20

#: ``fetch(url, dst)`` writes the bytes at ``url`` into the open binary file ``dst``.
Fetch = Callable[[str, IO[bytes]], None]


class DataUnavailableError(RuntimeError):
    """A data file is missing and could not be downloaded (e.g. the machine is offline)."""


class DataFileError(RuntimeError):
    """A data file is present but unusable (corrupt, cut short, empty); the message names
    the file and what to do."""


class ChecksumError(DataFileError):
    """A data file exists (or was downloaded) but its checksum does not match."""


def resolve_data_dir(data_dir: str | os.PathLike[str] | None = None) -> Path:
    """Return the data directory: ``data_dir``, else ``$BNRNN_DATA_DIR``, else the default.

    The default is ``~/.cache/bnrnn/data``. ``~`` is expanded and the result made absolute
    (so that error messages show full paths); the directory is not created here.
    """
    if data_dir is None or str(data_dir) == "":
        data_dir = os.environ.get(DATA_DIR_ENV) or DEFAULT_DATA_DIR
    # abspath (unlike Path.absolute) also folds "..", for readable error messages
    return Path(os.path.abspath(Path(data_dir).expanduser()))


def dataset_dir(name: str, data_dir: str | os.PathLike[str] | None = None) -> Path:
    """Return the folder of data set ``name`` (``"mnist"``, ``"ptb"``, ``"text8"``)."""
    return resolve_data_dir(data_dir) / name


def file_digest(path: str | os.PathLike[str], algorithm: str = "md5") -> str:
    """Return the hex digest of a file, read in chunks."""
    h = hashlib.new(algorithm)
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(_CHUNK), b""):
            h.update(chunk)
    return h.hexdigest()


def _expected(md5: str | None, sha1: str | None, sha256: str | None) -> dict[str, str]:
    sums = {"md5": md5, "sha1": sha1, "sha256": sha256}
    return {k: v.lower() for k, v in sums.items() if v}


def _mismatch(path: Path, expected: dict[str, str]) -> tuple[str, str, str] | None:
    """Return ``(algorithm, expected, actual)`` for the first mismatching sum, else None."""
    if not expected:
        return None
    hashes = {alg: hashlib.new(alg) for alg in expected}
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(_CHUNK), b""):
            for h in hashes.values():
                h.update(chunk)
    for alg, want in expected.items():
        got = hashes[alg].hexdigest()
        if got != want:
            return alg, want, got
    return None


def verify_checksums(
    path: str | os.PathLike[str],
    md5: str | None = None,
    sha1: str | None = None,
    sha256: str | None = None,
) -> None:
    """Raise :class:`ChecksumError` if ``path`` does not match every given checksum."""
    path = Path(path)
    bad = _mismatch(path, _expected(md5, sha1, sha256))
    if bad is not None:
        alg, want, got = bad
        raise ChecksumError(
            f"Checksum mismatch for {path.absolute()}: expected {alg} {want}, got {got}. "
            "The file is corrupt, incomplete or a different version. Delete it and run "
            "again to re-download it (or replace it with a verified copy)."
        )


def _urlopen(url: str, timeout: float) -> Any:
    """Open ``url`` for reading (module-level so that tests can monkeypatch it)."""
    request = urllib.request.Request(url, headers={"User-Agent": _USER_AGENT})
    return urllib.request.urlopen(request, timeout=timeout)


def download_url(url: str, dst: IO[bytes], *, timeout: float = 60.0, progress: bool = True) -> None:
    """Stream ``url`` into the binary file ``dst`` (tqdm progress bar if the size is known).

    Raises :class:`OSError` (``URLError``, timeouts, ...) on network failures and when fewer
    bytes arrive than the server announced.
    """
    with _urlopen(url, timeout) as response:
        headers = getattr(response, "headers", None)
        length = headers.get("Content-Length") if headers is not None else None
        total = int(length) if length and str(length).isdigit() else None
        bar = _progress_bar(total, Path(url).name) if progress and total else None
        received = 0
        try:
            while chunk := response.read(_CHUNK):
                dst.write(chunk)
                received += len(chunk)
                if bar is not None:
                    bar.update(len(chunk))
        finally:
            if bar is not None:
                bar.close()
    if total is not None and received != total:
        raise OSError(f"incomplete download from {url}: got {received} of {total} bytes")


def _progress_bar(total: int, desc: str) -> Any:
    try:
        from tqdm.auto import tqdm
    except ImportError:  # tqdm is an optional dependency: no progress bar then
        return None
    return tqdm(
        total=total, desc=desc, unit="B", unit_scale=True, unit_divisor=1024, file=sys.stderr
    )


@contextlib.contextmanager
def _temporary_file(directory: Path, name: str) -> Iterator[tuple[Path, IO[bytes]]]:
    """Yield a fresh ``(path, file)`` in ``directory``; the file is deleted unless moved away.

    The temporary file is removed on any exception, KeyboardInterrupt included.
    """
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{name}.", suffix=".part")
    tmp_path = Path(tmp)
    try:
        with os.fdopen(fd, "wb") as f:
            yield tmp_path, f
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp_path.unlink()


def offline_message(
    targets: Sequence[Path], urls: Sequence[str], errors: Sequence[str] = (), note: str = ""
) -> str:
    """Explain which files to put where and where to get them when a download failed."""
    lines = ["Could not download the data (is this machine offline?)."]
    if errors:
        lines.append("Tried:")
        lines += [f"  {e}" for e in errors]
    lines.append("Put the file(s)")
    lines += [f"  {Path(t).absolute()}" for t in targets]
    lines.append("in place by hand, fetched from:")
    lines += [f"  {u}" for u in urls]
    if note:
        lines.append(note)
    lines.append(
        "Or point the loaders at a folder that already holds the data (layout DIR/mnist/, "
        f"DIR/ptb/, DIR/text8/) with --data-dir DIR or the environment variable {DATA_DIR_ENV}."
    )
    return "\n".join(lines)


def ensure_file(
    path: str | os.PathLike[str],
    urls: Sequence[str],
    md5: str | None = None,
    sha1: str | None = None,
    sha256: str | None = None,
    *,
    verify: bool = True,
    download: bool = True,
    timeout: float = 60.0,
    progress: bool = True,
    fetch: Fetch | None = None,
) -> Path:
    """Make sure ``path`` exists with the given checksum(s), downloading it if missing.

    An existing file is verified (unless ``verify=False``): a mismatch raises
    :class:`ChecksumError` naming the file and both checksums. A missing file is fetched
    from each URL in turn into a temporary file in the same folder, verified, then moved
    into place atomically. If every URL fails (or ``download=False``),
    :class:`DataUnavailableError` says where to put the file and where to get it; the last
    download error is chained as its ``__cause__``. ``fetch(url, dst)`` overrides the
    downloader (default :func:`download_url`).
    """
    path = Path(path).absolute()
    expected = _expected(md5, sha1, sha256) if verify else {}
    if path.is_file():
        verify_checksums(path, **expected)
        return path
    if not download or not urls:
        raise DataUnavailableError(offline_message([path], urls, note="Downloading is off."))

    if fetch is None:

        def fetch(url: str, dst: IO[bytes]) -> None:
            download_url(url, dst, timeout=timeout, progress=progress)

    path.parent.mkdir(parents=True, exist_ok=True)
    errors: list[str] = []
    last_error: Exception | None = None
    for url in urls:
        try:
            with _temporary_file(path.parent, path.name) as (tmp, f):
                fetch(url, f)
                f.close()
                verify_checksums(tmp, **expected)
                os.replace(tmp, path)
            return path
        except (OSError, ChecksumError) as e:  # network errors, bad mirrors: try the next
            errors.append(f"{url}: {type(e).__name__}: {e}")
            last_error = e
    sums = ", ".join(f"{k} {v}" for k, v in expected.items())
    note = f"Expected checksum: {sums}." if sums else ""
    raise DataUnavailableError(offline_message([path], urls, errors, note)) from last_error
