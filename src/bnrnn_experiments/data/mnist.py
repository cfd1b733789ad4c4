"""MNIST (LeCun, Cortes, Burges): the four gzipped idx files, parsed into tensors.

Files live in ``<data_dir>/mnist/`` and are downloaded on first use from the canonical
mirrors (ossci-datasets first), verified by md5. Licence: CC BY-SA 3.0 (Yann LeCun and
Corinna Cortes).
"""

from __future__ import annotations

import gzip
import os
import struct
import zlib
from pathlib import Path

import torch

from .download import DataFileError, DataUnavailableError, dataset_dir, ensure_file

__all__ = ["MNIST_FILES", "MNIST_MIRRORS", "ensure_mnist", "load_mnist", "read_idx"]

MNIST_MIRRORS: tuple[str, ...] = (
    "https://ossci-datasets.s3.amazonaws.com/mnist/",
    "http://yann.lecun.com/exdb/mnist/",
    "https://storage.googleapis.com/cvdf-datasets/mnist/",
)

#: file name -> md5 of the gzipped file as released.
MNIST_FILES: dict[str, str] = {
    "train-images-idx3-ubyte.gz": "f68b3c2dcbeaaa9fbdd348bbdeb94873",
    "train-labels-idx1-ubyte.gz": "d53e105ee54ea40749a09fcbcd1e9432",
    "t10k-images-idx3-ubyte.gz": "9fb629c4189551a2d022fa330f9573f3",
    "t10k-labels-idx1-ubyte.gz": "ec29112dd5afa0611ce80d1b7f02629c",
}

# split -> (images file, labels file)
_SPLITS: dict[str, tuple[str, str]] = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}

_IDX_UBYTE = 0x08  # idx type code of unsigned bytes, the only one MNIST uses


def read_idx(path: str | os.PathLike[str], ndim: int | None = None) -> torch.Tensor:
    """Parse a (gzipped if named ``*.gz``) idx file of unsigned bytes into a uint8 tensor.

    Checks the magic number (two zero bytes, type code 0x08, number of dimensions), the
    expected ``ndim`` if given, and that the payload size matches the header; raises
    :class:`DataFileError` (a RuntimeError) naming the file otherwise.
    """
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError, zlib.error) as e:  # BadGzipFile is an OSError
        raise DataFileError(
            f"Corrupt MNIST file {path}: cannot decompress ({e}). Delete it and run again to "
            "re-download it."
        ) from e

    def corrupt(why: str) -> DataFileError:
        return DataFileError(
            f"Corrupt MNIST file {path}: {why}. Delete it and run again to re-download it."
        )

    if len(raw) < 4:
        raise corrupt("file too short for an idx header")
    zero, dtype, dims = struct.unpack(">HBB", raw[:4])
    if zero != 0 or dtype != _IDX_UBYTE or dims == 0:
        raise corrupt(f"bad idx magic number 0x{int.from_bytes(raw[:4], 'big'):08x}")
    if ndim is not None and dims != ndim:
        raise corrupt(f"expected {ndim} dimensions, header says {dims}")
    header = 4 + 4 * dims
    if len(raw) < header:
        raise corrupt("truncated idx header")
    shape = struct.unpack(f">{dims}I", raw[4:header])
    size = 1
    for n in shape:
        size *= n
    if len(raw) - header != size:
        raise corrupt(f"payload is {len(raw) - header} bytes, header shape {shape} needs {size}")
    return torch.frombuffer(bytearray(raw[header:]), dtype=torch.uint8).reshape(shape)


def ensure_mnist(
    data_dir: str | os.PathLike[str] | None = None,
    split: str | None = None,
    *,
    verify: bool = True,
    download: bool = True,
) -> list[Path]:
    """Make sure the MNIST files of ``split`` (default: both) are present; return their paths."""
    splits = list(_SPLITS) if split is None else [_check_split(split)]
    folder = dataset_dir("mnist", data_dir)
    names = [name for s in splits for name in _SPLITS[s]]
    paths = []
    for name in names:
        urls = [mirror + name for mirror in MNIST_MIRRORS]
        try:
            paths.append(
                ensure_file(
                    folder / name, urls, md5=MNIST_FILES[name], verify=verify, download=download
                )
            )
        except DataUnavailableError as e:
            # List every missing file at once, so that one manual fetch is enough.
            others = [folder / n for n in names if n != name and not (folder / n).is_file()]
            if not others:
                raise
            also = "\n".join(f"  {p}" for p in others)
            raise DataUnavailableError(
                f"{e}\nAlso missing (same mirrors):\n{also}"
            ) from e.__cause__
    return paths


def _check_split(split: str) -> str:
    if split not in _SPLITS:
        raise ValueError(f"MNIST split must be one of {sorted(_SPLITS)}, got {split!r}")
    return split


def load_mnist(
    data_dir: str | os.PathLike[str] | None = None,
    split: str = "train",
    *,
    verify: bool = True,
    download: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Load an MNIST split (``"train"``: 60,000 examples, ``"test"``: 10,000).

    Returns ``(images, labels)``: images uint8 of shape (N, 28, 28) with values 0..255,
    labels int64 of shape (N,) with values 0..9. Missing files are downloaded (unless
    ``download=False``); present files are md5-verified unless ``verify=False``.
    """
    images_path, labels_path = ensure_mnist(data_dir, split, verify=verify, download=download)
    images = read_idx(images_path, ndim=3)
    labels = read_idx(labels_path, ndim=1).long()
    if tuple(images.shape[1:]) != (28, 28):
        raise DataFileError(f"Corrupt MNIST file {images_path}: images are {images.shape[1:]}")
    if images.shape[0] != labels.shape[0]:
        raise DataFileError(
            f"MNIST {split}: {images.shape[0]} images in {images_path} but "
            f"{labels.shape[0]} labels in {labels_path}"
        )
    if labels.numel() and int(labels.max()) > 9:
        raise DataFileError(f"Corrupt MNIST file {labels_path}: label {int(labels.max())} > 9")
    return images, labels
