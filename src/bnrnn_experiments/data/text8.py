"""text8 (Mahoney): the first 10^8 bytes of cleaned English Wikipedia, for character models.

The file lives in ``<data_dir>/text8/text8.zip`` (member ``text8``, 100,000,000 bytes of
``a``-``z`` and space: 27 symbols) and is downloaded on first use, verified by sha1. The
standard split is the first 90M characters for training, the next 5M for validation and
the last 5M for testing; other lengths (small files in tests) split 90% / 5% / 5%.
"""

from __future__ import annotations

import os
import zipfile
from pathlib import Path

from .download import DataFileError, dataset_dir, ensure_file

__all__ = [
    "TEXT8_SHA1",
    "TEXT8_SIZE",
    "TEXT8_URL",
    "TEXT8_ZIP_SHA1",
    "ensure_text8",
    "load_text8",
    "text8_split_sizes",
]

TEXT8_URL = "http://mattmahoney.net/dc/text8.zip"
TEXT8_ZIP_SHA1 = "6c70299b93b7e1f927b42cd8f6ac1a31547c7a2e"  # 31,344,016 bytes
TEXT8_SHA1 = "0dc3edebc970dcc96137e7deda4d9995af9d93de"  # of the member `text8`
TEXT8_SIZE = 100_000_000
_MEMBER = "text8"


def text8_split_sizes(n: int) -> tuple[int, int, int]:
    """Train / valid / test lengths for ``n`` characters: 90% / 5% / the rest (5%)."""
    n_train = n * 90 // 100
    n_valid = n * 5 // 100
    return n_train, n_valid, n - n_train - n_valid


def ensure_text8(
    data_dir: str | os.PathLike[str] | None = None,
    *,
    verify: bool = True,
    download: bool = True,
    timeout: float = 60.0,
    progress: bool = True,
) -> Path:
    """Make sure ``text8/text8.zip`` is present (sha1-verified unless ``verify=False``)."""
    path = dataset_dir("text8", data_dir) / "text8.zip"
    return ensure_file(
        path,
        [TEXT8_URL],
        sha1=TEXT8_ZIP_SHA1,
        verify=verify,
        download=download,
        timeout=timeout,
        progress=progress,
    )


def load_text8(
    data_dir: str | os.PathLike[str] | None = None,
    *,
    verify: bool = True,
    download: bool = True,
    split_sizes: tuple[int, int, int] | None = None,
) -> dict[str, str]:
    """Load text8 split into ``{"train", "valid", "test"}`` strings.

    ``split_sizes`` (train, valid, test) must add up to the text length; by default it is
    :func:`text8_split_sizes` (90M / 5M / 5M for the real file). ``verify=False`` skips the
    zip's sha1 check, e.g. for a small test file; the zip's own CRC is always checked.
    """
    path = ensure_text8(data_dir, verify=verify, download=download)
    try:
        with zipfile.ZipFile(path) as zf, zf.open(_MEMBER) as f:
            raw = f.read()
    except KeyError as e:
        raise DataFileError(
            f"{path} has no member {_MEMBER!r}: not a text8 archive. Delete it and run again "
            "to re-download it."
        ) from e
    except (zipfile.BadZipFile, OSError, EOFError) as e:
        raise DataFileError(
            f"Corrupt text8 archive {path} ({e}). Delete it and run again to re-download it."
        ) from e
    try:
        text = raw.decode("ascii")
    except UnicodeDecodeError as e:
        raise DataFileError(f"{path}: member {_MEMBER!r} is not ASCII text ({e})") from e
    n = len(text)
    sizes = text8_split_sizes(n) if split_sizes is None else tuple(split_sizes)
    if len(sizes) != 3 or any(s < 0 for s in sizes) or sum(sizes) != n:
        raise ValueError(f"split_sizes {sizes} must be 3 non-negative sizes adding up to {n}")
    a, b, _ = sizes
    return {"train": text[:a], "valid": text[a : a + b], "test": text[a + b :]}
