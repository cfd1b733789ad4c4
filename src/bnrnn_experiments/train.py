"""The training loop: one flat loop for every task (nanoGPT style).

    step -> (epoch, index) -> batch -> loss -> backward -> clip -> optimiser step
         -> log line every `log_interval` steps
         -> validation every `eval_interval` steps (best checkpoint, early stopping)
         -> last checkpoint every `save_interval` steps
    then: best checkpoint -> scores with the running population statistics and with
    statistics re-estimated over training batches -> results.json

Resume (`resume=True`) restores the model, optimiser, RNG states, counters and the carried
hidden state of the word LM from ``ckpt_last.pt``; since batches are a function of
(seed, epoch, index), the resumed run is bit-identical to an uninterrupted one.

Under ``torchrun`` (see `bnrnn_experiments.distributed`) every process trains on its rows of
each global batch, in `torch.nn.parallel.DistributedDataParallel` with the BN statistics
synchronised (``sync_stats``); rank 0 alone writes the run directory and prints, validates
and tests while the others wait; the population statistics are re-estimated by all
processes together (sharded batches, synchronised), so they agree on every rank.
"""

from __future__ import annotations

import math
import os
import sys
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

import bnrnn

from . import distributed as du
from . import rundir as rd
from .checkpoint import (
    clean_stale_temporaries,
    load_checkpoint,
    rng_state,
    save_checkpoint,
    seed_everything,
    set_rng_state,
)
from .config import Config
from .evaluate import format_scores, has_bn, scores_with_population
from .tasks import make_task, model_summary


def make_optimizer(cfg: Config, params: list[nn.Parameter]) -> torch.optim.Optimizer:
    if cfg.optimizer == "rmsprop":  # Cooijmans §5.1: RMSProp lr 1e-3, momentum 0.9
        return torch.optim.RMSprop(params, lr=cfg.lr, momentum=cfg.optim_momentum)
    if cfg.optimizer == "adam":  # Cooijmans §5.2-5.3
        return torch.optim.Adam(params, lr=cfg.lr)
    return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.optim_momentum)  # Laurent §5.2


def lr_at(cfg: Config, epoch: int) -> float:
    """Learning rate of 0-based ``epoch``: constant for ``lr_decay_start`` epochs, then
    multiplied by ``lr_decay`` every epoch (Laurent §5.2: "halve the learning rate every
    epoch after the 6th")."""
    return cfg.lr * cfg.lr_decay ** max(0, epoch + 1 - cfg.lr_decay_start)


def total_steps(cfg: Config, steps_per_epoch: int) -> int:
    limits = [cfg.max_steps] if cfg.max_steps else []
    if cfg.max_epochs:
        limits.append(cfg.max_epochs * steps_per_epoch)
    return min(limits)


def _interactive() -> bool:
    return (
        sys.stderr.isatty() and not os.environ.get("CI") and "PYTEST_CURRENT_TEST" not in os.environ
    )


def _fmt_time(seconds: float) -> str:
    seconds = int(round(seconds))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"


class Logger:
    """Prints log lines (above the progress bar, if any) and appends them to train.log.
    ``enabled=False`` (ranks other than 0): does nothing."""

    def __init__(self, run_dir: Path, quiet: bool = False, enabled: bool = True) -> None:
        self.path = run_dir / rd.LOG
        self.quiet = quiet or not enabled
        self.enabled = enabled
        self.bar: Any = None

    def __call__(self, line: str) -> None:
        if not self.enabled:
            return
        if not self.quiet:
            if self.bar is not None:
                self.bar.write(line)
            else:
                print(line, flush=True)
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(line + "\n")


def _progress_bar(total: int, initial: int) -> Any:
    if not _interactive():
        return None
    from tqdm import tqdm

    return tqdm(total=total, initial=initial, unit="step", dynamic_ncols=True, leave=False)


def prepare_run_dir(run_dir: Path, resume: bool, force: bool) -> bool:
    """Create ``run_dir``; return True if there is a checkpoint to resume from.

    An existing run is an error unless ``resume`` (continue it) or ``force`` (start over:
    its files are deleted)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    clean_stale_temporaries(run_dir)
    if resume and (run_dir / rd.LAST).is_file():
        return True
    started = [n for n in (rd.CONFIG, rd.METRICS, rd.LAST, rd.BEST) if (run_dir / n).exists()]
    if started and not (force or resume):
        raise FileExistsError(
            f"{run_dir} already holds a run ({', '.join(started)}); pass --resume to continue "
            "it, --force to start over, or --run-dir for another directory"
        )
    # a fresh start; --resume without a checkpoint (killed before the first one) keeps the
    # command history
    names = [rd.METRICS, rd.LAST, rd.BEST, rd.RESULTS, rd.EVAL, rd.LOG]
    for name in names + ([] if resume else [rd.COMMAND]):
        (run_dir / name).unlink(missing_ok=True)
    return False


def train(
    cfg: Config,
    run_dir: str | os.PathLike[str] | None = None,
    *,
    resume: bool = False,
    force: bool = False,
    argv: list[str] | None = None,
    quiet: bool = False,
    stop_at_step: int | None = None,
) -> dict[str, Any]:
    """Train ``cfg`` in ``run_dir`` (default ``runs/{task}-{preset}-{model}``); return the
    final results (also in ``results.json``).

    ``resume``: continue from ``ckpt_last.pt`` if there is one (else start afresh).
    ``stop_at_step``: stop right after this step as a crash would, without the final
    evaluation (used by the resume tests).
    """
    run_dir = Path(run_dir) if run_dir is not None else rd.default_runs_dir() / rd.run_name(cfg)
    with du.session():
        # rank 0 decides (and alone touches the run directory); the others follow its
        # configuration, so that they agree even if their command lines resolved another one
        cfg = du.broadcast_object(cfg)
        outcome: tuple[str, Any] = ("ok", False)
        if du.is_main():
            try:
                resuming = prepare_run_dir(run_dir, resume, force)
                rd.write_command(run_dir, argv, note="resume" if resuming else "")
                rd.write_config(run_dir, cfg)
                outcome = ("ok", resuming)
            except Exception as e:  # every rank raises it, none waits forever
                outcome = ("error", e)
        outcome = du.broadcast_object(outcome)
        if outcome[0] == "error":
            raise outcome[1]
        log = Logger(run_dir, quiet, enabled=du.is_main())
        threads = torch.get_num_threads()
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        try:
            return _train(cfg, run_dir, outcome[1], log, stop_at_step)
        finally:
            torch.set_num_threads(threads)


def _train(
    cfg: Config, run_dir: Path, resuming: bool, log: Logger, stop_at_step: int | None
) -> dict[str, Any]:

    # -- setup: data, model, optimiser (the seed fixes the init and the data order) -----
    main, rank, world = du.is_main(), du.rank(), du.world_size()
    seed_everything(cfg.seed)
    with du.main_first():  # rank 0 downloads missing data, the others then read it
        task = make_task(cfg)
    model = task.build_model()
    # what the training forward runs (`model`, or DDP around it), this rank's loss weight
    net, weight, synced = parallelize(cfg, task, model)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = make_optimizer(cfg, params)
    spe = task.steps_per_epoch
    total = total_steps(cfg, spe)
    eval_every = cfg.eval_interval or spe
    save_every = cfg.save_interval or eval_every
    metric = task.metric

    # Everything below `state` (plus model, optimiser, RNGs) is what a resume restores.
    state: dict[str, Any] = {
        "step": 0,
        "best": None,  # best validation score so far
        "best_step": 0,
        "bad_evals": 0,  # validations since the best one (early stopping)
        "stopped": False,  # early-stopped
        "train_seconds": 0.0,
        "window": [0.0, 0, 0, 0, 0.0],  # loss sum, batches, correct, count, seconds since last log
    }
    carry: Any = None  # hidden state carried between batches (word LM)
    if resuming:
        # rank 0 reads the checkpoint and sends it (other machines need not see the file)
        ckpt = du.broadcast_object(load_checkpoint(run_dir / rd.LAST) if main else None)
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        state.update(ckpt["state"])
        carry = _shard_carry(ckpt["carry"], rank, world)
        ranks_rng = ckpt.get("rng_ranks")
        if world == 1:
            set_rng_state(ckpt["rng"])
        elif ranks_rng is not None and len(ranks_rng) == world:
            set_rng_state(ranks_rng[rank])  # same world size: each rank's own generators
        else:  # another world size: a valid, but not bit-identical, continuation
            torch.manual_seed(cfg.seed + 1_000_003 * rank + 7919 * state["step"])
        if rank > 0:  # the saved window holds every rank's sums: count them once
            state["window"] = [0.0, state["window"][1], 0, 0, state["window"][4]]
        if main:
            rd.truncate_metrics(run_dir, state["step"])
        log(f"| resumed from {run_dir / rd.LAST} at step {state['step']}")
    if main:
        task.save_artifacts(run_dir)
    log(f"| run {run_dir}")
    log(f"| {task.describe()}")
    log(f"| {cfg.model}: {model_summary(model)}; {cfg.optimizer} lr {cfg.lr:g}, clip {cfg.clip:g}")
    log(f"| {total:,} steps ({spe:,} per epoch), validation every {eval_every:,}")
    if world > 1:
        rows = du.rows_of(cfg.batch_size, 0, world)
        log(
            f"| {world} processes (DDP): rank r trains on rows r::{world} of each global batch "
            f"of {cfg.batch_size} ({rows} on rank 0); BN statistics "
            + ("synchronised" if synced else "per process" if has_bn(model) else "n/a")
        )

    def save_last() -> None:
        # collectives first (every rank is here at the same step), then rank 0 writes:
        # the global carry (ranks' rows interleaved back) and window, every rank's RNG
        saved_state = dict(state, window=_reduce_window(state["window"], world))
        carries = du.gather_objects(carry)
        rngs = du.gather_objects(rng_state())
        if not main:
            return
        save_checkpoint(
            run_dir / rd.LAST,
            {
                "model": model.state_dict(),
                "optimizer": optimizer.state_dict(),
                "state": saved_state,
                "carry": _merge_carry(carries),
                "rng": rngs[0],
                "rng_ranks": rngs if world > 1 else None,
                "world_size": world,
                "step": state["step"],
                "config": cfg.to_dict(),
            },
        )

    # -- the loop ------------------------------------------------------------------------
    model.train()
    bar = None if log.quiet else _progress_bar(total, state["step"])
    log.bar = bar
    t_run = time.perf_counter()
    t_last = time.perf_counter()
    while state["step"] < total and not state["stopped"]:
        epoch, index = divmod(state["step"], spe)
        lr = lr_at(cfg, epoch)
        for group in optimizer.param_groups:
            group["lr"] = lr
        if index == 0:
            carry = None  # every epoch starts from a zero state
        batch = task.train_batch(epoch, index)
        loss, correct, count, carry = task.train_loss(net, batch, carry)
        optimizer.zero_grad(set_to_none=True)
        scale = weight * task.loss_scale
        (loss if scale == 1.0 else loss * scale).backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.clip if cfg.clip > 0 else math.inf)
        optimizer.step()
        state["step"] += 1
        step = state["step"]

        now = time.perf_counter()
        w = state["window"]
        w[0] += loss.item() if world == 1 else loss.item() * weight / world
        w[1] += 1
        w[2] += correct
        w[3] += count
        w[4] += now - t_last
        state["train_seconds"] += now - t_last
        t_last = now
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{loss.item():.3f}", epoch=epoch + 1, refresh=False)

        if step % cfg.log_interval == 0 or step == total:
            w = state["window"] = _reduce_window(w, world)  # global sums, on every rank
            mean = w[0] / w[1]
            score = task.score(mean, w[2], w[3])
            ms = 1000.0 * w[4] / w[1]
            eta = (total - step) * w[4] / w[1]
            log(
                f"| epoch {epoch + 1:3d} | {index + 1:5d}/{spe} batches | lr {lr:.3g} "
                f"| ms/batch {ms:6.1f} | loss {mean:6.3f} | {metric} {score:7.3f} "
                f"| grad {float(grad_norm):6.2f} | eta {_fmt_time(eta)}"
            )
            if main:
                rd.append_metrics(
                    run_dir,
                    {"kind": "train", "step": step, "epoch": epoch + 1, "lr": lr, "loss": mean,
                     metric: score, "grad_norm": float(grad_norm), "ms_per_batch": ms},
                )  # fmt: skip
            state["window"] = [0.0, 0, 0, 0, 0.0]

        if step % eval_every == 0 or step == total:
            t0 = time.perf_counter()
            if main:  # eval mode uses the population statistics: no collectives
                _validate(task, model, cfg, run_dir, state, step, epoch, log)
            keys = ("best", "best_step", "bad_evals", "stopped")
            state.update(du.broadcast_object({k: state[k] for k in keys}))  # others waited
            t_last += time.perf_counter() - t0  # validation time is not training time

        if step % save_every == 0 or step == total or state["stopped"]:
            t0 = time.perf_counter()
            save_last()
            t_last += time.perf_counter() - t0
        if stop_at_step is not None and step >= stop_at_step:
            if bar is not None:
                bar.close()
            log(f"| stopped at step {step} (stop_at_step)")
            return {"interrupted": True, "step": step}
    if bar is not None:
        bar.close()
    log.bar = None
    wall = time.perf_counter() - t_run

    # -- final evaluation: best model, running vs re-estimated population statistics ----
    best_path = run_dir / rd.BEST
    if main and best_path.is_file():
        model.load_state_dict(load_checkpoint(best_path)["model"])
    du.broadcast_module_state(model)  # rank 0's best model everywhere
    log(f"| final evaluation of the best model (step {state['best_step']})")
    # every rank re-estimates on its shards (collective when synchronised); rank 0 scores
    scores = scores_with_population(task, model, cfg.pop_batches, log=log, evaluate_here=main)
    if world > 1 and not synced:  # per-process statistics: keep rank 0's everywhere
        du.broadcast_module_state(model)
    _save_rank_state(model, rank)
    scores = du.broadcast_object(scores)
    log(format_scores(metric, scores))
    results = {
        "task": cfg.task,
        "model": cfg.model,
        "preset": cfg.preset,
        "metric": metric,
        "higher_is_better": task.higher_is_better,
        "steps": state["step"],
        "best_step": state["best_step"],
        "best_valid": state["best"],
        "early_stopped": state["stopped"],
        "train_seconds": round(state["train_seconds"], 2),
        "wall_seconds_this_process": round(wall, 2),
        **({"world_size": world, "sync_stats": synced} if world > 1 else {}),
        **scores,
    }
    if main:
        rd.write_json(run_dir / rd.RESULTS, results)
    return results


def _validate(task, model, cfg, run_dir, state, step, epoch, log) -> None:
    """Validation of rank 0 (or the only process): best checkpoint, early stopping."""
    metric = task.metric
    t0 = time.perf_counter()
    valid = task.evaluate(model, "valid")
    if task.better(valid[metric], state["best"]):
        state.update(best=valid[metric], best_step=step, bad_evals=0)
        save_checkpoint(
            run_dir / rd.BEST,
            {"model": model.state_dict(), "step": step, metric: valid[metric],
             "config": cfg.to_dict()},
        )  # fmt: skip
    else:
        state["bad_evals"] += 1
    seconds = time.perf_counter() - t0
    log(
        f"| valid | step {step:6d} | epoch {epoch + 1:3d} | loss {valid['loss']:6.3f} "
        f"| {metric} {valid[metric]:7.3f} | best {state['best']:7.3f} "
        f"(step {state['best_step']}) | {seconds:5.1f} s"
    )
    rd.append_metrics(
        run_dir,
        {"kind": "valid", "step": step, "epoch": epoch + 1, "loss": valid["loss"],
         metric: valid[metric], "best": state["best"], "eval_seconds": seconds},
    )  # fmt: skip
    if cfg.patience and state["bad_evals"] >= cfg.patience:
        state["stopped"] = True
        log(f"| early stopping: no improvement in {cfg.patience} validations")


def parallelize(cfg: Config, task: Any, model: nn.Module) -> tuple[nn.Module, float, bool]:
    """Under torchrun: shard ``task``'s batches (rank r: rows r::W), synchronise the BN
    statistics (``cfg.sync_stats``), wrap ``model`` in DDP and give each rank its own dropout
    / noise generator. Returns (the module to train, the weight of this rank's mean loss,
    whether statistics are synchronised); single process: (model, 1.0, False)."""
    rank, world = du.rank(), du.world_size()
    if world == 1:
        return model, 1.0, False
    du.shard_task(task, rank, world)
    if cfg.batch_size < world:
        raise ValueError(f"batch_size {cfg.batch_size} < {world} processes: a rank has no row")
    # DDP averages the ranks' gradients of their mean losses; weighting rank r's loss by
    # W * n_r / N makes that average the gradient of the mean over the global batch, also
    # when the shards are unequal (the weight is 1 when W divides N)
    weight = world * du.rows_of(cfg.batch_size, rank, world) / cfg.batch_size
    synced = cfg.sync_stats and has_bn(model)
    if synced:  # own group: its collectives never interleave with DDP's buckets
        bnrnn.convert_sync_batchnorm(model, torch.distributed.new_group())
    net = _ddp(model)
    torch.manual_seed(cfg.seed + 1_000_003 * rank)  # dropout / noise differ per rank
    return net, weight, synced


def _ddp(model: nn.Module) -> nn.Module:
    """DDP without buffer broadcasts in forward (``forward_sync_buffers=False`` where this
    torch has it, else ``broadcast_buffers=False``); all ranks hold the same initial
    buffers, and later ones agree by synchronisation (or are per rank on purpose)."""
    import inspect

    DDP = torch.nn.parallel.DistributedDataParallel
    if "forward_sync_buffers" in inspect.signature(DDP.__init__).parameters:
        return DDP(model, forward_sync_buffers=False)
    return DDP(model, broadcast_buffers=False)


def _reduce_window(w: list, world: int) -> list:
    """The log window summed over the ranks (loss shares, correct, count); batch count and
    seconds are rank 0's."""
    if world == 1:
        return w
    loss, correct, count = du.all_reduce_sum([w[0], w[2], w[3]])
    return [loss, w[1], int(correct), int(count), w[4]]


def _shard_carry(carry: Any, rank: int, world: int) -> Any:
    """This rank's rows of the global carried state (h, c), each (layers, N, H)."""
    if carry is None or world == 1:
        return carry
    return tuple(s[:, du.shard_rows(s.shape[1], rank, world)].contiguous() for s in carry)


def _merge_carry(carries: list | None) -> Any:
    """The global carried state from the ranks' (rank 0 only; None elsewhere)."""
    if carries is None or carries[0] is None:
        return None
    if len(carries) == 1:
        return carries[0]
    return tuple(du.merge_rows([c[k] for c in carries], 1) for k in range(len(carries[0])))


#: Test hook: if set, every rank saves its model's state dict (after the final population
#: re-estimation) as ``rank{r}.pt`` in this folder.
RANK_STATE_DIR_ENV = "BNRNN_RANK_STATE_DIR"


def _save_rank_state(model: nn.Module, rank: int) -> None:
    folder = os.environ.get(RANK_STATE_DIR_ENV)
    if folder:
        Path(folder).mkdir(parents=True, exist_ok=True)
        torch.save(model.state_dict(), Path(folder) / f"rank{rank}.pt")
