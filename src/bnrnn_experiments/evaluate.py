"""Evaluation: scores with the running population statistics and with statistics
re-estimated over training batches (Cooijmans §3), and scores on longer sequences than the
model was trained on (Cooijmans Fig. 3b).

`scores_with_population` is what the training run reports at the end; `evaluate_run` is
``bnrnn evaluate RUN --lengths 100,200,500,1000``.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

import bnrnn

from .checkpoint import CheckpointError, load_checkpoint, seed_everything
from .config import Config, apply_overrides
from .rundir import BEST, EVAL, LAST, read_config, write_json
from .tasks import Task, make_task

Log = Callable[[str], None]


def has_bn(model: nn.Module) -> bool:
    return any(isinstance(m, bnrnn.StepBatchNorm) for m in model.modules())


def reestimate_population_stats(task: Task, model: nn.Module, n_batches: int) -> int:
    """`bnrnn.update_population_stats` over the first ``n_batches`` training batches
    (0: one epoch). Returns the number of batches used."""
    batches, forward_fn = task.pop_stats_batches(n_batches)
    return bnrnn.update_population_stats(model, batches, forward_fn)


def evaluate_all(
    task: Task, model: nn.Module, splits: Sequence[str], lengths: Sequence[int | None] = (None,)
) -> dict[str, dict[str, Any]]:
    """{"valid": {...}, "test@500": {...}}: one entry per split and length."""
    out: dict[str, dict[str, Any]] = {}
    for split in splits:
        for length in lengths:
            key = split if length is None else f"{split}@{length}"
            out[key] = task.evaluate(model, split, length)
    return out


def scores_with_population(
    task: Task,
    model: nn.Module,
    pop_batches: int,
    splits: Sequence[str] = ("valid", "test"),
    lengths: Sequence[int | None] = (None,),
    log: Log = print,
    evaluate_here: bool = True,
) -> dict[str, Any]:
    """Scores with the running estimates, then (BN models only) with population statistics
    re-estimated over ``pop_batches`` training batches; ``model`` keeps the re-estimated
    statistics afterwards.

    ``evaluate_here=False`` (ranks other than 0 under torchrun): only the re-estimation,
    which every process must run when the statistics are synchronised; scores are None."""
    t0 = time.perf_counter()

    def scores() -> dict[str, dict[str, Any]] | None:
        return evaluate_all(task, model, splits, lengths) if evaluate_here else None

    result: dict[str, Any] = {"running": scores()}
    result["reestimated"] = None
    if has_bn(model):
        n = reestimate_population_stats(task, model, pop_batches)
        log(f"| re-estimated the population statistics over {n} training batches")
        result["pop_batches"] = n
        result["reestimated"] = scores()
    result["eval_seconds"] = round(time.perf_counter() - t0, 2)
    return result


def format_scores(metric: str, scores: dict[str, Any]) -> str:
    """A small table: one row per split(@length), columns running / re-estimated."""
    running, reest = scores["running"], scores.get("reestimated")
    # "running stats" only beside re-estimated ones: models without BN (the LSTM, layer
    # normalisation) have no population statistics
    first = metric + " (running stats)" if reest is not None else metric
    head = f"| {'split':<12} | {first:>22} |"
    rule = f"|{'-' * 14}|{'-' * 24}|"
    if reest is not None:
        head += f" {metric + ' (re-estimated)':>22} |"
        rule += f"{'-' * 24}|"
    lines = [head, rule]
    for key, value in running.items():
        row = f"| {key:<12} | {value[metric]:>22.4f} |"
        if reest is not None:
            row += f" {reest[key][metric]:>22.4f} |"
        lines.append(row)
    return "\n".join(lines)


def load_run_model(
    run_dir: str | os.PathLike[str],
    checkpoint: str = "best",
    overrides: dict[str, Any] | None = None,
) -> tuple[Config, Task, nn.Module, dict[str, Any]]:
    """Rebuild a run's task and model from its directory and load a checkpoint
    (``"best"``, falling back to ``"last"``, or ``"last"``)."""
    run_dir = Path(run_dir)
    cfg = read_config(run_dir)
    if overrides:
        cfg = apply_overrides(cfg, overrides)
    path = run_dir / (BEST if checkpoint == "best" else LAST)
    if checkpoint == "best" and not path.is_file():
        path = run_dir / LAST
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint in {run_dir} (expected {BEST} or {LAST})")
    try:
        ckpt = load_checkpoint(path)
    except CheckpointError as e:
        other = "best" if path.name == LAST else "last"
        raise CheckpointError(
            e.path,
            f"{e.why}; evaluate the other checkpoint (--checkpoint {other}) or restore "
            "this one from a copy",
        ) from e
    seed_everything(cfg.seed)
    task = make_task(cfg)
    model = task.build_model()
    model.load_state_dict(ckpt["model"])
    return cfg, task, model, ckpt


def evaluate_run(
    run_dir: str | os.PathLike[str],
    lengths: Sequence[int] | None = None,
    splits: Sequence[str] = ("test",),
    checkpoint: str = "best",
    pop_batches: int | None = None,
    overrides: dict[str, Any] | None = None,
    log: Log = print,
) -> dict[str, Any]:
    """Evaluate a finished (or interrupted) run; write ``eval.json`` into its directory.

    ``lengths``: sequence lengths to evaluate the language models on (default: the
    training length); BN models use the last step's population statistics beyond
    ``max_length`` (Cooijmans §3). Scores are given with the running population statistics
    and re-estimated over ``pop_batches`` training batches (default: the run's setting).
    """
    cfg, task, model, ckpt = load_run_model(run_dir, checkpoint, overrides)
    threads = torch.get_num_threads()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    try:
        return _evaluate_run(run_dir, cfg, task, model, ckpt, lengths, splits, checkpoint,
                             pop_batches, log)  # fmt: skip
    finally:
        torch.set_num_threads(threads)


def _evaluate_run(run_dir, cfg, task, model, ckpt, lengths, splits, checkpoint, pop_batches, log):
    if lengths and task.metric == "acc":
        raise ValueError(f"--lengths applies to the language models, not to {cfg.task}")
    log(f"| {run_dir}: {cfg.task} {cfg.model}, checkpoint at step {ckpt.get('step', '?')}")
    scores = scores_with_population(
        task,
        model,
        cfg.pop_batches if pop_batches is None else pop_batches,
        splits=splits,
        lengths=list(lengths) if lengths else [None],
        log=log,
    )
    log(format_scores(task.metric, scores))
    out = {
        "task": cfg.task,
        "model": cfg.model,
        "metric": task.metric,
        "checkpoint": checkpoint,
        "step": ckpt.get("step"),
        "train_length": cfg.seq_len,
        "max_length": cfg.bn_max_length if cfg.is_bn else None,
        **scores,
    }
    write_json(Path(run_dir) / EVAL, out)
    return out
