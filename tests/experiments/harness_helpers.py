"""Shared helpers of the experiment-harness tests (real-data location, skip markers, a
simulated crash)."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from unittest import mock

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


class Crash(Exception):
    """The simulated crash of `crash_after`."""


@contextlib.contextmanager
def crash_after(step: int) -> Iterator[None]:
    """`bnrnn_experiments.train.train` crashes right after ``step`` (logged, validated and
    checkpointed as that step is due), as a killed process would: no final evaluation, no
    results.json. Reading the batch of the next step raises `Crash`; works in any process
    (also in the workers of a 2-process test), without pytest's monkeypatch."""
    from bnrnn_experiments import train as train_module

    make_task = train_module.make_task

    def crashing_task(cfg: Any) -> Any:
        task = make_task(cfg)
        batch = task.train_batch

        def train_batch(epoch: int, index: int) -> Any:
            if epoch * task.steps_per_epoch + index >= step:
                raise Crash(f"crashed after step {step}")
            return batch(epoch, index)

        task.train_batch = train_batch  # instance attribute: shadows the method
        return task

    with mock.patch.object(train_module, "make_task", crashing_task):
        yield
