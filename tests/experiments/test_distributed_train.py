"""`bnrnn train` on 2 processes (gloo, localhost): a torchrun dry run, gradients equal to
one process on the global batch, an interrupted + resumed 2-process run equal to an
uninterrupted one, and population statistics re-estimated alike on both ranks. Every launch
has a timeout and its processes are killed on failure."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from unittest import mock

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from harness_helpers import REAL_DATA, Crash, crash_after, needs

from bnrnn_experiments import distributed as du
from bnrnn_experiments import rundir as rd
from bnrnn_experiments import train as train_module
from bnrnn_experiments.config import make_config
from bnrnn_experiments.tasks import make_task
from bnrnn_experiments.train import parallelize, train

pytestmark = needs("ptb-char")

CHAR = dict(seq_len=20, data_dir=str(REAL_DATA))


def _stats(state: dict) -> dict:
    return {k: v for k, v in state.items() if "running" in k or "tracked" in k}


def test_torchrun_dry_run(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    env = dict(os.environ, BNRNN_DATA_DIR=str(REAL_DATA), PYTHONWARNINGS="ignore")
    env.pop("WORLD_SIZE", None)
    # fmt: off
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
           "--standalone", "-m", "bnrnn_experiments", "train", "ptb-char", "--model", "bnlstm",
           "--dry-run", "--seq-len", "20", "--batch-size", "5", "--run-dir", str(run_dir)]
    # fmt: on
    proc = subprocess.Popen(
        cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True
    )
    try:
        out, _ = proc.communicate(timeout=120)
    except BaseException:
        os.killpg(proc.pid, signal.SIGKILL)  # torchrun and both workers
        proc.communicate()
        raise
    text = out.decode(errors="replace")
    assert proc.returncode == 0, text[-3000:]
    for name in (rd.CONFIG, rd.METRICS, rd.LOG, rd.LAST, rd.BEST, rd.RESULTS, rd.COMMAND):
        assert (run_dir / name).is_file(), name
    results = json.loads((run_dir / rd.RESULTS).read_text())
    assert results["world_size"] == 2 and results["sync_stats"] is True
    assert results["reestimated"] is not None
    steps = [r["step"] for r in rd.read_metrics(run_dir) if r["kind"] == "train"]
    assert steps == [1, 2, 3]  # rank 0 alone wrote them
    assert text.count("| final evaluation") == 1  # rank 1 printed no log line


def _first_step(rank: int, out_dir: str, sync: bool) -> None:
    cfg = make_config("ptb-char", "bnlstm", dry_run=True, batch_size=5, sync_stats=sync, **CHAR)
    torch.manual_seed(cfg.seed)
    task = make_task(cfg)
    model = task.build_model()
    net, weight, synced = parallelize(cfg, task, model)
    assert synced == sync
    loss, _, _, _ = task.train_loss(net, task.train_batch(0, 0), None)
    (loss * weight).backward()
    global_loss = du.all_reduce_sum([loss.item() * weight / 2])[0]
    grads = {n: p.grad for n, p in model.named_parameters()}
    torch.save({"loss": global_loss, "grads": grads}, os.path.join(out_dir, f"{sync}-{rank}.pt"))


@contextlib.contextmanager
def _keep_final_model(path: str) -> Iterator[None]:
    """Save this rank's model to ``path`` once the final scoring has re-estimated its
    population statistics."""
    scores_with_population = train_module.scores_with_population

    def scoring(task: Any, model: torch.nn.Module, *args: Any, **kwargs: Any) -> Any:
        scores = scores_with_population(task, model, *args, **kwargs)
        torch.save(model.state_dict(), path)
        return scores

    with mock.patch.object(train_module, "scores_with_population", scoring):
        yield


def _interrupted_and_resumed(rank: int, out_dir: str) -> None:
    # word LM: the hidden state is carried per row, so per rank; dropout differs per rank
    cfg = make_config("ptb-word", "bnlstm", dry_run=True, data_dir=str(REAL_DATA),
                      dropout=0.2, eval_interval=100, save_interval=2)  # fmt: skip
    a, b = os.path.join(out_dir, "a"), os.path.join(out_dir, "b")
    with _keep_final_model(os.path.join(out_dir, f"final-{rank}.pt")):
        train(cfg, a, quiet=True)
    with crash_after(2), pytest.raises(Crash):  # both ranks crash after step 2
        train(cfg, b, quiet=True)
    train(cfg, b, quiet=True, resume=True)


def _worker(rank: int, init: str, out_dir: str) -> None:
    """Everything the 2-process tests below check, in one launch (starting processes that
    import torch is the slow part)."""
    dist.init_process_group("gloo", init_method=f"file://{init}", rank=rank, world_size=2)
    torch.set_num_threads(1)
    try:
        _first_step(rank, out_dir, True)
        _first_step(rank, out_dir, False)
        _interrupted_and_resumed(rank, out_dir)
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def two_processes(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("ddp")
    ctx = mp.start_processes(_worker, args=(str(d / "init"), str(d)), nprocs=2, join=False,
                             start_method="spawn")  # fmt: skip
    try:
        while not ctx.join(timeout=90):
            pass
    finally:
        for p in ctx.processes:
            if p.is_alive():
                p.kill()
                p.join()
    return d


@pytest.mark.parametrize("sync", [True, False])
def test_two_processes_first_step_equals_one_process(two_processes: Path, sync: bool) -> None:
    """Unequal shards (5 rows: 3 + 2) and synchronised statistics: the loss and every
    gradient equal one process on the global batch; unsynchronised, they differ."""
    ranks = [torch.load(two_processes / f"{sync}-{r}.pt") for r in range(2)]
    cfg = make_config("ptb-char", "bnlstm", dry_run=True, batch_size=5, **CHAR)
    torch.manual_seed(cfg.seed)
    task = make_task(cfg)
    model = task.build_model()
    loss, _, _, _ = task.train_loss(model, task.train_batch(0, 0), None)
    loss.backward()
    for got in ranks:
        close = [torch.allclose(got["grads"][n], p.grad, rtol=1e-4, atol=1e-6)
                 for n, p in model.named_parameters()]  # fmt: skip
        if sync:
            assert got["loss"] == pytest.approx(loss.item(), rel=1e-6)
            assert all(close)
        else:
            assert not all(close)
    for n, g in ranks[0]["grads"].items():  # DDP: the same gradient on both ranks
        torch.testing.assert_close(g, ranks[1]["grads"][n], rtol=0, atol=0)


def test_two_process_resume_is_exact(two_processes: Path) -> None:
    """ptb-word (carried state per row) with dropout: crashed after step 2 and resumed, the
    2-process run equals the uninterrupted one: metrics, weights, final scores."""
    a, b = two_processes / "a", two_processes / "b"
    drop = ("ms_per_batch", "eval_seconds")
    ma, mb = ([{k: v for k, v in r.items() if k not in drop} for r in rd.read_metrics(x)]
              for x in (a, b))  # fmt: skip
    assert ma == mb and len([r for r in ma if r["kind"] == "train"]) == 3
    assert "resume" in (b / rd.COMMAND).read_text()
    ca, cb = (torch.load(x / rd.LAST, weights_only=False) for x in (a, b))
    assert len(ca["rng_ranks"]) == 2 and ca["carry"][0].shape[1] == 4  # the global carry
    for k, v in ca["model"].items():
        assert torch.equal(v, cb["model"][k]), k
    ra, rb = (json.loads((x / rd.RESULTS).read_text()) for x in (a, b))
    assert ra["reestimated"] == rb["reestimated"]


def test_two_processes_agree_on_the_reestimated_statistics(two_processes: Path) -> None:
    """Synchronised BN statistics: the final re-estimation runs on both ranks together, so
    their population statistics are the same."""
    results = json.loads((two_processes / "a" / rd.RESULTS).read_text())
    assert results["sync_stats"] is True and results["reestimated"] is not None
    r0, r1 = (torch.load(two_processes / f"final-{r}.pt") for r in range(2))
    assert _stats(r0)
    for k, v in _stats(r0).items():
        assert torch.equal(v, r1[k]), k
