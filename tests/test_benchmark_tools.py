"""Tools of the speed benchmark: the reading of the vCPUs' placement
(benchmarks/core_latency.py), the split of rnn_speed.py's ratios by it, and its peak-memory
subprocess, and sync_cost.py's run on 2 gloo processes. No timing is asserted: only that the
probe measures something, that the split counts and divides the right calls, that the peak
is measured for every kind of model, and that sync_cost.py's variants run on the paths
they name, with the all-reduces design.md counts."""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent.parent / "benchmarks"))

import core_latency  # noqa: E402
import rnn_speed  # noqa: E402
import sync_cost  # noqa: E402


def test_placement_labels():
    assert core_latency.placement(None) == "?"
    assert core_latency.placement(80.0) == "near"
    assert core_latency.placement(350.0) == "far"


@pytest.mark.skipif(
    len(os.sched_getaffinity(0)) < 2 or shutil.which("cc") is None, reason="needs 2 CPUs, cc"
)
def test_probe_reads_a_round_trip():
    lat = core_latency.CoreLatency()
    assert lat.exe is not None
    ns = lat.probe(iters=2000, repeats=1)
    assert ns is not None and 1.0 < ns < 1e6


def test_by_placement_splits_calls():
    times = {
        ("lstm", "train"): [1.0, 2.0, 4.0, 9.0],
        ("fast", "train"): [1.5, 3.0, 6.0, 9.0],
    }
    places = {
        ("lstm", "train"): ["near", "far", "far", "mixed"],
        ("fast", "train"): ["near", "near", "far", "far"],
    }
    split = rnn_speed.by_placement(times, places, "fast", "train")
    assert split["near"] == (2, 1, pytest.approx(2.25 / 1.0))  # median(1.5, 3) / 1
    assert split["far"] == (2, 2, pytest.approx(7.5 / 3.0))  # median(6, 9) / median(2, 4)
    places["lstm", "train"] = ["far", "far", "far", "mixed"]
    assert rnn_speed.by_placement(times, places, "fast", "train")["near"] == (2, 0, None)


@pytest.mark.parametrize("variant", ["lstm", "fast", "reference"])
def test_peak_subprocess_measures_every_model(variant):
    """The fresh-process peak of one training step (a short mid configuration)."""
    peak = rnn_speed.peak_bytes(rnn_speed.CONFIGS["mid"], variant, threads=2, T=10)
    assert peak is not None and peak > 0


def test_sync_cost_runs_its_variants_on_their_paths():
    """Tiny settings, without the reference variants: the synced variant runs on the fast
    path's PyTorch loops and issues, per training step of the one-direction "cooijmans"
    layer, 2 all-reduces to agree on the steps and their counts, 1 for the input term's
    statistics, 2 per step forward (W_hh h, c) and 2 backward, and 1 for the input term's
    backward (one chunk) (design.md, Synchronised statistics)."""
    import argparse

    T = 4
    args = argparse.Namespace(
        batch=3, hidden=4, input=2, rounds=1, warmup=0, threads=1, reference=False
    )
    res = sync_cost.measure(args, T)
    assert res["paths"]["synced-fast"] == "fast path, PyTorch loops"
    assert res["paths"]["unsynced-python"] == "fast path, PyTorch loops"
    assert set(res["collectives"]) == {"synced-fast"}
    found = res["collectives"]["synced-fast"]
    assert len(found["sizes"]) == 2 + 1 + 4 * T + 1
    assert 0 < found["inside"] < found["step"]
    row = sync_cost.report(args, T, res)
    assert row["per_step"] == (2 + 1 + 4 * T + 1) / T
