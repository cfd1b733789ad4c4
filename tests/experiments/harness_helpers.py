"""Shared helpers of the experiment-harness tests (real-data location, skip markers)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest


def real_data_dir() -> Path:
    override = os.environ.get("BNRNN_TEST_DATA_DIR")
    if override:
        return Path(override)
    return Path(__file__).resolve().parents[2].parent / "shared" / "data"


REAL_DATA = real_data_dir()
HAVE_MNIST = (REAL_DATA / "mnist" / "train-images-idx3-ubyte.gz").is_file()
HAVE_PTB = (REAL_DATA / "ptb" / "ptb.train.txt").is_file()


def needs(task: str) -> pytest.MarkDecorator:
    """Skip marker for tasks whose real data is absent."""
    if task in ("smnist", "pmnist"):
        return pytest.mark.skipif(not HAVE_MNIST, reason=f"MNIST not found in {REAL_DATA}")
    if task in ("ptb-char", "ptb-word"):
        return pytest.mark.skipif(not HAVE_PTB, reason=f"PTB not found in {REAL_DATA}")
    return pytest.mark.skipif(False, reason="")
