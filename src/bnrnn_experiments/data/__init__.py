"""Data sets for the experiments: MNIST, Penn Treebank (word and char) and text8.

All loaders take ``data_dir`` (else ``$BNRNN_DATA_DIR``, else ``~/.cache/bnrnn/data``),
download missing files from their canonical URLs with checksum verification, and raise
:class:`DataUnavailableError` saying which file to put where when offline.
"""

from __future__ import annotations

import os

from .download import (
    DATA_DIR_ENV,
    DEFAULT_DATA_DIR,
    ChecksumError,
    DataFileError,
    DataUnavailableError,
    dataset_dir,
    download_url,
    ensure_file,
    file_digest,
    resolve_data_dir,
    verify_checksums,
)
from .mnist import MNIST_FILES, ensure_mnist, load_mnist, read_idx
from .ptb import (
    PTB_CHECKSUMS,
    Vocabulary,
    encode_splits,
    ensure_ptb,
    load_ptb_chars,
    load_ptb_words,
    tokenize_lines,
)
from .text8 import ensure_text8, load_text8, text8_split_sizes

__all__ = [
    "DATA_DIR_ENV",
    "DEFAULT_DATA_DIR",
    "ChecksumError",
    "DataFileError",
    "DataUnavailableError",
    "Vocabulary",
    "data_summary",
    "dataset_dir",
    "download_url",
    "encode_splits",
    "ensure_file",
    "ensure_mnist",
    "ensure_ptb",
    "ensure_text8",
    "file_digest",
    "load_mnist",
    "load_ptb_chars",
    "load_ptb_words",
    "load_text8",
    "read_idx",
    "resolve_data_dir",
    "text8_split_sizes",
    "tokenize_lines",
    "verify_checksums",
]


def data_summary(data_dir: str | os.PathLike[str] | None = None) -> str:
    """Which data files are present under the data directory (no checksums, no network)."""
    root = resolve_data_dir(data_dir)
    files = (
        [f"mnist/{name}" for name in MNIST_FILES]
        + [f"ptb/{name}" for name in PTB_CHECKSUMS]
        + ["text8/text8.zip"]
    )
    lines = [f"data directory: {root}"]
    for rel in files:
        path = root / rel
        state = f"{path.stat().st_size:>12,d} bytes" if path.is_file() else "     missing"
        lines.append(f"  {state}  {rel}")
    return "\n".join(lines)
