"""Resume equivalence and crash safety.

- A run stopped after k steps and resumed to N reaches the same parameters, metrics and
  results as an uninterrupted run to N (word LM with dropout and a carried state across
  epoch boundaries and a learning-rate decay; char LM with BN, random crops and
  initial-state noise).
- A training process killed with SIGKILL, then resumed, ends as the uninterrupted run.
- A writer killed with SIGKILL in the middle of checkpoint writes never leaves a torn file.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from harness_helpers import REAL_DATA, Crash, crash_after, needs

from bnrnn_experiments import rundir as rd
from bnrnn_experiments.checkpoint import load_checkpoint
from bnrnn_experiments.config import make_config
from bnrnn_experiments.train import train

TIMING = {"ms_per_batch", "eval_seconds", "train_seconds", "wall_seconds_this_process"}


def _strip(obj):
    if isinstance(obj, dict):
        return {k: _strip(v) for k, v in obj.items() if k not in TIMING}
    if isinstance(obj, list):
        return [_strip(v) for v in obj]
    return obj


def assert_same_run(a: Path, b: Path) -> None:
    pa = load_checkpoint(a / rd.LAST)["model"]
    pb = load_checkpoint(b / rd.LAST)["model"]
    assert pa.keys() == pb.keys()
    for k in pa:
        assert torch.equal(pa[k], pb[k]), k  # bit-identical
    oa = load_checkpoint(a / rd.LAST)["optimizer"]["state"]
    ob = load_checkpoint(b / rd.LAST)["optimizer"]["state"]
    for i in oa:
        for k, v in oa[i].items():
            assert torch.equal(torch.as_tensor(v), torch.as_tensor(ob[i][k]))
    assert _strip(rd.read_metrics(a)) == _strip(rd.read_metrics(b))
    ra = json.loads((a / rd.RESULTS).read_text())
    rb = json.loads((b / rd.RESULTS).read_text())
    assert _strip(ra) == _strip(rb)


CASES = {
    # 3 steps per epoch: 8 steps cross two epoch boundaries (carry reset, lr decay)
    "ptb-word": dict(model="bnlstm-input", dropout=0.3, train_subset=300, lr_decay=0.5,
                     lr_decay_start=1, max_steps=8, eval_interval=3, save_interval=2),
    "ptb-char": dict(model="bnlstm", init_noise=0.1, train_subset=2500, max_steps=8,
                     eval_interval=3, save_interval=2),
}  # fmt: skip


@pytest.mark.parametrize("task", [pytest.param(t, marks=needs(t)) for t in CASES])
def test_resume_equals_uninterrupted(task: str, tmp_path: Path) -> None:
    kw = dict(CASES[task])
    model = kw.pop("model")
    cfg = make_config(task, model, "quick", dry_run=True, data_dir=str(REAL_DATA), **kw)
    full = train(cfg, tmp_path / "full", quiet=True)

    # crash after step 5: the last checkpoint is from step 4, step 5 is done again
    with crash_after(5), pytest.raises(Crash):
        train(cfg, tmp_path / "resumed", quiet=True)
    assert not (tmp_path / "resumed" / rd.RESULTS).exists()
    assert load_checkpoint(tmp_path / "resumed" / rd.LAST)["step"] == 4
    assert max(r["step"] for r in rd.read_metrics(tmp_path / "resumed")) == 5
    resumed = train(cfg, tmp_path / "resumed", quiet=True, resume=True)

    assert _strip(full) == _strip(resumed)
    assert_same_run(tmp_path / "full", tmp_path / "resumed")
    commands = (tmp_path / "resumed" / rd.COMMAND).read_text()
    assert "resume" in commands  # both invocations are recorded


@needs("ptb-char")
def test_resume_after_sigkill(tmp_path: Path) -> None:
    run = tmp_path / "killed"
    args = ["train", "ptb-char", "--model", "bnlstm", "--dry-run", "--run-dir", str(run),
            "--max-steps", "400", "--save-interval", "1", "--eval-interval", "100",
            "--log-interval", "50", "--train-subset", "20000",
            "--data-dir", str(REAL_DATA)]  # fmt: skip
    proc = subprocess.Popen(
        [sys.executable, "-m", "bnrnn_experiments", *args],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        deadline = time.time() + 60
        while time.time() < deadline and proc.poll() is None:
            if (run / rd.LAST).is_file() and load_checkpoint(run / rd.LAST)["step"] >= 5:
                break
            time.sleep(0.05)
        assert proc.poll() is None, proc.stderr.read().decode()  # still running: kill it
        proc.send_signal(signal.SIGKILL)  # kill -9, possibly in the middle of a write
        proc.wait(10)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.stderr.close()
    killed_at = load_checkpoint(run / rd.LAST)["step"]  # loads: the file is whole
    assert 5 <= killed_at < 400

    cfg = rd.read_config(run)
    cfg = type(cfg)(**{**cfg.to_dict(), "max_steps": killed_at + 6})
    train(cfg, run, quiet=True, resume=True)
    train(cfg, tmp_path / "full", quiet=True)
    assert_same_run(run, tmp_path / "full")


_WRITER = r"""
import sys, torch
from bnrnn_experiments.checkpoint import save_checkpoint
path = sys.argv[1]
i = 0
while True:
    i += 1
    save_checkpoint(path, {"i": i, "x": torch.full((1_000_000,), float(i))})
    print(i, flush=True)
"""


def test_sigkill_never_leaves_a_torn_checkpoint(tmp_path: Path) -> None:
    path = tmp_path / "ckpt.pt"
    for delay in (0.3, 0.6):
        proc = subprocess.Popen(
            [sys.executable, "-c", _WRITER, str(path)], stdout=subprocess.PIPE, text=True
        )
        try:
            proc.stdout.readline()  # at least one complete write
            time.sleep(delay)
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait(10)
        finally:
            if proc.poll() is None:
                proc.kill()
            proc.stdout.close()
        ckpt = load_checkpoint(path)
        assert ckpt["i"] >= 1
        assert torch.equal(ckpt["x"], torch.full((1_000_000,), float(ckpt["i"])))
    # leftovers of interrupted writes are temporary files, never the checkpoint itself
    assert all(p.name.startswith(".tmp-") for p in tmp_path.iterdir() if p != path)


@needs("ptb-char")
def test_resume_without_checkpoint_starts_afresh(tmp_path: Path) -> None:
    # killed before the first checkpoint: --resume starts over, without the stale records
    cfg = make_config("ptb-char", "lstm", "quick", dry_run=True, data_dir=str(REAL_DATA))
    run = tmp_path / "run"
    run.mkdir()
    (run / rd.METRICS).write_text('{"kind": "train", "step": 1, "loss": 99.0}\n')
    (run / rd.COMMAND).write_text("bnrnn train ptb-char (killed)\n")
    train(cfg, run, quiet=True, resume=True)
    assert all(r["loss"] != 99.0 for r in rd.read_metrics(run))
    assert [r["step"] for r in rd.read_metrics(run) if r["kind"] == "train"] == [1, 2, 3]
    assert "(killed)" in (run / rd.COMMAND).read_text()
