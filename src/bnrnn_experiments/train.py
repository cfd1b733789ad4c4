"""The training loop: one flat loop for every task (nanoGPT style).

    step -> (epoch, index) -> batch -> loss -> backward -> clip -> optimiser step
         -> log line every `log_interval` steps
         -> validation every `eval_interval` steps (best checkpoint, early stopping)
         -> last checkpoint every `save_interval` steps
    then: best checkpoint -> scores with the running population statistics and with
    statistics re-estimated over training batches -> results.json

Resume (`resume=True`) restores the model, optimiser, RNG states, counters (`TrainState`,
with the sums of the current log window, `MetricsWindow`) and the carried hidden state of
the word LM from ``ckpt_last.pt``; since batches are a function of (seed, epoch, index), the
resumed run is bit-identical to an uninterrupted one.

Under ``torchrun`` (see `bnrnn_experiments.distributed`) every process trains on its rows of
each global batch, in `torch.nn.parallel.DistributedDataParallel` with the BN statistics
synchronised (``sync_stats``); rank 0 alone writes the run directory and prints, validates
and tests while the others wait; the population statistics are re-estimated by all
processes together (sharded batches, synchronised), so they agree on every rank.
"""

from __future__ import annotations

import contextlib
import math
import os
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
from torch import nn

import bnrnn

from . import distributed as du
from . import rundir as rd
from .checkpoint import (
    CheckpointError,
    clean_stale_temporaries,
    load_checkpoint,
    read_checkpoint,
    rng_state,
    save_checkpoint,
    seed_everything,
    set_rng_state,
)
from .config import Config, resume_conflicts
from .errors import TrainingDiverged
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

    def open_bar(self, total: int, initial: int) -> None:
        """Show a progress bar of the steps under the log lines (interactive terminals)."""
        self.bar = None if self.quiet else _progress_bar(total, initial)

    def advance(self, loss: float, epoch: int) -> None:
        """Move the progress bar on by a step, showing its loss and epoch."""
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix(loss=f"{loss:.3f}", epoch=epoch + 1, refresh=False)

    def close_bar(self) -> None:
        """Remove the progress bar, so that later lines (scores, errors) print plainly."""
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def _progress_bar(total: int, initial: int) -> Any:
    if not _interactive():
        return None
    from tqdm import tqdm

    return tqdm(total=total, initial=initial, unit="step", dynamic_ncols=True, leave=False)


def check_run_dir(run_dir: Path, cfg: Config, resume: bool, force: bool) -> bool:
    """Decide, without writing anything, whether ``run_dir`` is resumed (True: ``resume``
    and a last checkpoint) or started afresh (False).

    An existing run (metrics or a checkpoint) is an error unless ``resume`` (continue it)
    or ``force`` (start over; its files are deleted once training can start). A resume
    that changes an option outside `RESUMABLE` is an error listing the options."""
    if resume and (run_dir / rd.LAST).is_file():
        if (run_dir / rd.CONFIG).is_file():
            conflicts = resume_conflicts(rd.read_config(run_dir), cfg)
            if conflicts:
                listed = ", ".join(f"--{k.replace('_', '-')} (run: {a!r}, asked: {b!r})"
                                   for k, (a, b) in conflicts.items())  # fmt: skip
                raise ValueError(
                    f"--resume cannot change {listed}: {run_dir / rd.LAST} was trained with "
                    "the run's values; drop them, or train a new run (--run-dir) or start "
                    "this one over (--force)"
                )
        return True
    # config.json and the command history alone: a start that failed before its first record
    started = [n for n in (rd.METRICS, rd.LAST, rd.BEST) if (run_dir / n).exists()]
    if started and not (force or resume):
        raise FileExistsError(
            f"{run_dir} already holds a run ({', '.join(started)}); pass --resume to continue "
            "it, --force to start over, or --run-dir for another directory"
        )
    return False


def prepare_run_dir(run_dir: Path, resuming: bool, resume: bool) -> None:
    """Create ``run_dir`` and clear it for a fresh start (``resuming`` False: a fresh start;
    after `--resume` without a checkpoint, killed before the first one, the command history
    is kept). A resumed run loses its results.json, which this run replaces."""
    run_dir.mkdir(parents=True, exist_ok=True)
    clean_stale_temporaries(run_dir)
    names = [rd.RESULTS]
    if not resuming:
        names += [rd.METRICS, rd.LAST, rd.BEST, rd.EVAL, rd.LOG] + ([] if resume else [rd.COMMAND])
    for name in names:
        (run_dir / name).unlink(missing_ok=True)


def train(
    cfg: Config,
    run_dir: str | os.PathLike[str] | None = None,
    *,
    resume: bool = False,
    force: bool = False,
    argv: list[str] | None = None,
    quiet: bool = False,
) -> dict[str, Any]:
    """Train ``cfg`` in ``run_dir`` (default ``runs/{task}-{preset}-{model}``); return the
    final results (also in ``results.json``).

    ``resume``: continue from ``ckpt_last.pt`` if there is one (else start afresh).

    Nothing is written to ``run_dir`` before the data, the model and (on resume) the
    checkpoint are loaded: a run that cannot start leaves the directory as it was.
    Raises `TrainingDiverged` on a non-finite loss, gradient norm (after
    ``max_skipped_steps`` skipped steps in a row) or parameter.
    """
    run_dir = Path(run_dir) if run_dir is not None else rd.default_runs_dir() / rd.run_name(cfg)
    with du.session():
        # rank 0 decides (and alone touches the run directory); the others follow its
        # configuration, so that they agree even if their command lines resolved another one
        cfg = du.broadcast_object(cfg)
        resuming = du.on_main(lambda: check_run_dir(run_dir, cfg, resume, force))

        def start(ckpt: dict[str, Any] | None) -> None:  # rank 0: training can start
            prepare_run_dir(run_dir, resuming, resume)
            rd.write_command(run_dir, argv, note="resume" if resuming else "")
            rd.write_config(run_dir, cfg)
            if ckpt is not None:
                rd.truncate_metrics(run_dir, ckpt["state"]["step"])

        log = Logger(run_dir, quiet, enabled=du.is_main())
        threads = torch.get_num_threads()
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        try:
            return _train(cfg, run_dir, resuming, start, log)
        finally:
            torch.set_num_threads(threads)


@dataclass
class MetricsWindow:
    """Sums over the training steps since the last log line, which reports their means."""

    loss: float = 0.0  # sum of the batches' mean losses (under DDP, this rank's shares)
    batches: int = 0
    correct: int = 0
    count: int = 0
    seconds: float = 0.0

    def add(self, loss: float, correct: int, count: int, seconds: float) -> None:
        """Count one training step."""
        self.loss += loss
        self.batches += 1
        self.correct += correct
        self.count += count
        self.seconds += seconds

    def summed_over_ranks(self, world: int) -> MetricsWindow:
        """The global window (a collective): loss shares, correct and count summed over the
        ranks; batches and seconds are this rank's."""
        if world == 1:
            return self
        loss, correct, count = du.all_reduce_sum([self.loss, self.correct, self.count])
        return MetricsWindow(loss, self.batches, int(correct), int(count), self.seconds)

    def to_list(self) -> list[Any]:
        """The checkpoint's form: [loss, batches, correct, count, seconds]."""
        return [self.loss, self.batches, self.correct, self.count, self.seconds]


@dataclass
class TrainState:
    """The counters of a run: with the model, optimiser, RNGs and carried state, what a
    resume restores (saved as a dict under "state" in ckpt_last.pt)."""

    step: int = 0
    best: float | None = None  # best validation score so far
    best_step: int = 0
    bad_evals: int = 0  # validations since the best one (early stopping)
    stopped: bool = False  # early-stopped
    train_seconds: float = 0.0
    window: MetricsWindow = field(default_factory=MetricsWindow)
    skipped: int = 0  # steps skipped for a non-finite gradient norm, in all
    skipped_in_a_row: int = 0
    skipped_logged: int = 0  # `skipped` at the last log line

    def to_checkpoint(self, window: MetricsWindow) -> dict[str, Any]:
        """The checkpoint's "state" dict, with ``window`` (the global one) as its window."""
        saved = {f.name: getattr(self, f.name) for f in fields(self)}
        saved["window"] = window.to_list()
        return saved

    @classmethod
    def from_checkpoint(cls, saved: dict[str, Any]) -> TrainState:
        """The state of a checkpoint's "state" dict; counters that older checkpoints lack
        start at their defaults."""
        names = {f.name for f in fields(cls)} - {"window"}
        state = cls(**{k: v for k, v in saved.items() if k in names})
        state.window = MetricsWindow(*saved["window"])
        return state


@dataclass
class _Run:
    """What the steps of a run share: fixed from setup to results (the counters are in
    `TrainState`), but for the step of the last checkpoint."""

    cfg: Config
    run_dir: Path
    log: Logger
    task: Any
    model: nn.Module
    net: nn.Module  # what the training forward runs: `model`, or DDP around it
    weight: float  # of this rank's mean loss (see `parallelize`)
    synced: bool  # BN statistics synchronised over the ranks
    params: list[nn.Parameter]
    optimizer: torch.optim.Optimizer
    total: int  # steps of the run
    eval_every: int
    save_every: int
    rank: int
    world: int
    saved_at: int | None = None  # step of the last checkpoint, named if the run diverges

    @property
    def main(self) -> bool:
        """Rank 0 (or the only process): the one that writes, validates and tests."""
        return self.rank == 0

    def loss_share(self, loss: float) -> float:
        """This rank's share of the global batch's mean loss (the shares sum to it)."""
        return loss if self.world == 1 else loss * self.weight / self.world


def _train(
    cfg: Config,
    run_dir: Path,
    resuming: bool,
    start: Callable[[dict[str, Any] | None], None],
    log: Logger,
) -> dict[str, Any]:
    """The steps of training, top to bottom: setup, resume, the loop, the final scores."""
    run = _setup(cfg, run_dir, log)
    task, model, optimizer = run.task, run.model, run.optimizer

    # -- resume: model, optimiser, counters, carried state and RNGs of ckpt_last.pt -----
    state, carry, ckpt, verified = TrainState(), None, None, True
    if resuming:
        # rank 0 reads the checkpoint and sends it (other machines need not see the file)
        ckpt, verified = du.on_main(lambda: _load_last(run_dir))
        state, carry = _restore(run, ckpt)
    du.on_main(lambda: start(ckpt))  # training can start: now the run directory is written
    if resuming:
        log(f"| resumed from {run_dir / rd.LAST} at step {state.step}")
        if not verified:
            log(f"| note: {rd.LAST} has no checksum (written by an older bnrnn): not verified")
    if run.main:
        task.save_artifacts(run_dir)
    _log_setup(run)

    # -- the loop ------------------------------------------------------------------------
    model.train()
    log.open_bar(run.total, state.step)
    clock = _Stopwatch()
    while state.step < run.total and not state.stopped:
        epoch, index = divmod(state.step, task.steps_per_epoch)
        lr = lr_at(cfg, epoch)
        for group in optimizer.param_groups:
            group["lr"] = lr
        if index == 0:
            carry = None  # every epoch starts from a zero state
        batch = task.train_batch(epoch, index)
        loss, correct, count, carry = task.train_loss(run.net, batch, carry)
        grad_norm = _backward(run, loss)
        loss_value = loss.item()
        state.step += 1
        _optimizer_step(run, state, lr, loss_value, grad_norm)
        seconds = clock.lap()
        state.window.add(run.loss_share(loss_value), correct, count, seconds)
        state.train_seconds += seconds
        log.advance(loss_value, epoch)

        step = state.step
        if step % cfg.log_interval == 0 or step == run.total:
            _log_window(run, state, epoch, index, lr, grad_norm)
        if step % run.eval_every == 0 or step == run.total:
            with clock.paused():  # validation time is not training time
                _validate_everywhere(run, state, epoch)
        if step % run.save_every == 0 or step == run.total or state.stopped:
            with clock.paused():
                _save_last(run, state, carry)
    log.close_bar()
    wall = clock.since_start()

    # -- the best model, with running and with re-estimated population statistics -------
    scores = _final_scores(run, state)
    if state.skipped:
        log(f"| {state.skipped} steps skipped for a non-finite gradient norm")
    results = _results(run, state, scores, wall)
    if run.main:
        rd.write_json(run_dir / rd.RESULTS, results)
    return results


def _setup(cfg: Config, run_dir: Path, log: Logger) -> _Run:
    """Data, model and optimiser, the same on every rank: the seed fixes the initial weights
    and the order of the batches."""
    seed_everything(cfg.seed)
    with du.main_first():  # rank 0 downloads missing data, the others then read it
        task = make_task(cfg)
    model = task.build_model()
    net, weight, synced = parallelize(cfg, task, model)
    params = [p for p in model.parameters() if p.requires_grad]
    eval_every = cfg.eval_interval or task.steps_per_epoch
    return _Run(
        cfg=cfg,
        run_dir=run_dir,
        log=log,
        task=task,
        model=model,
        net=net,
        weight=weight,
        synced=synced,
        params=params,
        optimizer=make_optimizer(cfg, params),
        total=total_steps(cfg, task.steps_per_epoch),
        eval_every=eval_every,
        save_every=cfg.save_interval or eval_every,
        rank=du.rank(),
        world=du.world_size(),
    )


def _load_last(run_dir: Path) -> tuple[dict[str, Any], bool]:
    """ckpt_last.pt and whether its checksum was verified; a damaged one says how to go on."""
    try:
        return read_checkpoint(run_dir / rd.LAST)
    except CheckpointError as e:
        raise CheckpointError(
            e.path,
            f"{e.why}; --resume needs it whole: restore it from a copy, or start the "
            "run over with --force",
        ) from e


def _restore(run: _Run, ckpt: dict[str, Any]) -> tuple[TrainState, Any]:
    """Load ``ckpt`` into the model, optimiser and RNGs; return its state and this rank's
    rows of its carried state, so that the run continues exactly."""
    try:
        run.model.load_state_dict(ckpt["model"])
    except RuntimeError as e:  # config.json edited by hand since the checkpoint
        raise CheckpointError(
            run.run_dir / rd.LAST,
            f"does not fit the model of {run.run_dir / rd.CONFIG} (its "
            "shapes differ); restore the run's config.json, or start over with --force",
        ) from e
    run.optimizer.load_state_dict(ckpt["optimizer"])
    state = TrainState.from_checkpoint(ckpt["state"])
    carry = _shard_carry(ckpt["carry"], run.rank, run.world)
    _restore_rng(run, ckpt, state.step)
    if run.rank > 0:  # the saved window holds every rank's sums: rank 0 counts them
        state.window = MetricsWindow(batches=state.window.batches, seconds=state.window.seconds)
    run.saved_at = state.step
    return state, carry


def _restore_rng(run: _Run, ckpt: dict[str, Any], step: int) -> None:
    """Every rank's generators as saved, for the dropout and noise of an exact continuation."""
    ranks_rng = ckpt.get("rng_ranks")
    if run.world == 1:
        set_rng_state(ckpt["rng"])
    elif ranks_rng is not None and len(ranks_rng) == run.world:
        set_rng_state(ranks_rng[run.rank])  # same world size: each rank's own generators
    else:  # another world size: a valid, but not bit-identical, continuation
        torch.manual_seed(run.cfg.seed + 1_000_003 * run.rank + 7919 * step)


def _log_setup(run: _Run) -> None:
    """The header of the log: run, data, model, schedule and processes."""
    cfg, log, world = run.cfg, run.log, run.world
    per_epoch = run.task.steps_per_epoch
    log(f"| run {run.run_dir}")
    log(f"| {run.task.describe()}")
    optimizer = f"{cfg.optimizer} lr {cfg.lr:g}, clip {cfg.clip:g}"
    log(f"| {cfg.model}: {model_summary(run.model)}; {optimizer}")
    log(f"| {run.total:,} steps ({per_epoch:,} per epoch), validation every {run.eval_every:,}")
    if world > 1:
        rows = du.rows_of(cfg.batch_size, 0, world)
        stats = "synchronised" if run.synced else "per process" if has_bn(run.model) else "n/a"
        log(
            f"| {world} processes (DDP): rank r trains on rows r::{world} of each global batch "
            f"of {cfg.batch_size} ({rows} on rank 0); BN statistics {stats}"
        )


class _Stopwatch:
    """Training time: the time between steps, less validation and checkpoint writes."""

    def __init__(self) -> None:
        self.start = self.last = time.perf_counter()

    def lap(self) -> float:
        """Seconds since the last lap (or the start), pauses excluded."""
        now = time.perf_counter()
        seconds, self.last = now - self.last, now
        return seconds

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        """Leave the time of the block out of the next lap."""
        t0 = time.perf_counter()
        yield
        self.last += time.perf_counter() - t0

    def since_start(self) -> float:
        """Wall-clock seconds since the start, pauses included."""
        return time.perf_counter() - self.start


def _backward(run: _Run, loss: torch.Tensor) -> float:
    """Gradients of this rank's weighted loss, clipped to --clip; returns their norm before
    clipping (under DDP, of the global gradient: the same on every rank)."""
    run.optimizer.zero_grad(set_to_none=True)
    scale = run.weight * run.task.loss_scale
    (loss if scale == 1.0 else loss * scale).backward()
    clip = run.cfg.clip if run.cfg.clip > 0 else math.inf
    return float(torch.nn.utils.clip_grad_norm_(run.params, clip))


def _optimizer_step(run: _Run, state: TrainState, lr: float, loss: float, grad_norm: float) -> None:
    """Update the parameters, or skip the update when the gradient norm is not finite;
    raise `TrainingDiverged` on a non-finite loss, an overflowing update, or too many
    skipped steps in a row."""
    # DDP reduced the gradients: the norm, hence the decision, is the same on every rank
    if math.isfinite(grad_norm):
        try:
            run.optimizer.step()
        except RuntimeError as e:  # an update beyond float32 (e.g. Adam with lr 1e38)
            if "overflow" not in str(e):
                raise
            raise _diverged(run, state.step, f"the optimiser's update overflows (lr {lr:g})") from e
        state.skipped_in_a_row = 0
        return
    # no update from this batch (clip_grad_norm_ would make it zero or NaN)
    if not du.all_true(math.isfinite(loss)):
        raise _diverged(run, state.step, "the training loss is not finite")
    state.skipped += 1
    state.skipped_in_a_row += 1
    if state.skipped_in_a_row >= run.cfg.max_skipped_steps:
        raise _diverged(
            run,
            state.step,
            f"the gradient norm was not finite in {state.skipped_in_a_row} "
            f"steps in a row (--max-skipped-steps {run.cfg.max_skipped_steps})",
        )


def _log_window(
    run: _Run, state: TrainState, epoch: int, index: int, lr: float, grad_norm: float
) -> None:
    """The log line and metrics.jsonl record of the steps since the last one (their means
    over the global batches), then a new window."""
    w = state.window.summed_over_ranks(run.world)  # a collective: every rank is here
    mean = w.loss / w.batches
    if not math.isfinite(mean):  # e.g. an infinite loss with finite gradients
        raise _diverged(run, state.step, f"the mean training loss is {mean}")
    metric, per_epoch = run.task.metric, run.task.steps_per_epoch
    score = run.task.score(mean, w.correct, w.count)
    ms = 1000.0 * w.seconds / w.batches
    eta = (run.total - state.step) * w.seconds / w.batches
    skipped = state.skipped - state.skipped_logged
    run.log(
        f"| epoch {epoch + 1:3d} | {index + 1:5d}/{per_epoch} batches | lr {lr:.3g} "
        f"| ms/batch {ms:6.1f} | loss {mean:6.3f} | {metric} {score:7.3f} "
        f"| grad {grad_norm:6.2f} | eta {_fmt_time(eta)}"
        + (f" | skipped {skipped} (non-finite gradient)" if skipped else "")
    )
    if run.main:
        rd.append_metrics(
            run.run_dir,
            {"kind": "train", "step": state.step, "epoch": epoch + 1, "lr": lr, "loss": mean,
             metric: score, "grad_norm": grad_norm, "skipped": skipped, "ms_per_batch": ms},
        )  # fmt: skip
    state.window = MetricsWindow()
    state.skipped_logged = state.skipped


def _validate_everywhere(run: _Run, state: TrainState, epoch: int) -> None:
    """Rank 0 validates while the others wait; then every rank takes its best score and
    early-stopping counters, or stops if the model is not finite."""
    trouble = None
    if run.main:  # eval mode uses the population statistics: no collectives
        trouble = _validate(run, state, epoch)
    shared = (state.best, state.best_step, state.bad_evals, state.stopped)
    shared, trouble = du.broadcast_object((shared, trouble))
    if trouble:  # every rank stops (rank 0 found it; the others waited)
        raise _diverged(run, state.step, trouble)
    state.best, state.best_step, state.bad_evals, state.stopped = shared


def _validate(run: _Run, state: TrainState, epoch: int) -> str | None:
    """Validation of rank 0 (or the only process): best checkpoint, early stopping.
    Returns what is not finite (the model or its validation loss), else None."""
    cfg, metric, step = run.cfg, run.task.metric, state.step
    t0 = time.perf_counter()
    if not _finite(run.model):
        return "a parameter or BN statistic is not finite"
    valid = run.task.evaluate(run.model, "valid")
    if not math.isfinite(valid["loss"]):
        return f"the validation loss is {valid['loss']}"
    if run.task.better(valid[metric], state.best):
        state.best, state.best_step, state.bad_evals = valid[metric], step, 0
        save_checkpoint(
            run.run_dir / rd.BEST,
            {"model": run.model.state_dict(), "step": step, metric: valid[metric],
             "config": cfg.to_dict()},
        )  # fmt: skip
    else:
        state.bad_evals += 1
    seconds = time.perf_counter() - t0
    run.log(
        f"| valid | step {step:6d} | epoch {epoch + 1:3d} | loss {valid['loss']:6.3f} "
        f"| {metric} {valid[metric]:7.3f} | best {state.best:7.3f} "
        f"(step {state.best_step}) | {seconds:5.1f} s"
    )
    rd.append_metrics(
        run.run_dir,
        {"kind": "valid", "step": step, "epoch": epoch + 1, "loss": valid["loss"],
         metric: valid[metric], "best": state.best, "eval_seconds": seconds},
    )  # fmt: skip
    if cfg.patience and state.bad_evals >= cfg.patience:
        state.stopped = True
        run.log(f"| early stopping: no improvement in {cfg.patience} validations")
    return None


def _save_last(run: _Run, state: TrainState, carry: Any) -> None:
    """Write ckpt_last.pt (rank 0): model, optimiser, global state and carry, every rank's
    RNGs; never a non-finite model over a good checkpoint."""
    if not du.all_true(_finite(run.model)):  # every rank checks: a collective
        raise _diverged(run, state.step, "a parameter or BN statistic is not finite")
    # collectives first (every rank is here at the same step), then rank 0 writes
    saved_state = state.to_checkpoint(state.window.summed_over_ranks(run.world))
    carries = du.gather_objects(carry)
    rngs = du.gather_objects(rng_state())
    run.saved_at = state.step
    if not run.main:
        return
    save_checkpoint(
        run.run_dir / rd.LAST,
        {
            "model": run.model.state_dict(),
            "optimizer": run.optimizer.state_dict(),
            "state": saved_state,
            "carry": _merge_carry(carries),
            "rng": rngs[0],
            "rng_ranks": rngs if run.world > 1 else None,
            "world_size": run.world,
            "step": state.step,
            "config": run.cfg.to_dict(),
        },
    )


def _diverged(run: _Run, step: int, what: str) -> TrainingDiverged:
    """The error that stops a diverged run, naming the checkpoint it keeps."""
    kept = f"{rd.LAST} (step {run.saved_at}) is kept" if run.saved_at else "no checkpoint"
    run.log.close_bar()
    return TrainingDiverged(
        f"training diverged at step {step}: {what}; stopped, {kept}, no results written. "
        "Start over (--force) with a lower --lr or --clip"
    )


def _final_scores(run: _Run, state: TrainState) -> dict[str, Any]:
    """Scores of the best model with its running population statistics and with statistics
    re-estimated over training batches (every rank re-estimates, rank 0 scores)."""
    model = run.model
    best_path = run.run_dir / rd.BEST
    if best_path.is_file():  # every rank raises if rank 0 cannot read it
        du.on_main(lambda: _load_best(model, best_path))
    du.broadcast_module_state(model)  # rank 0's best model everywhere
    run.log(f"| final evaluation of the best model (step {state.best_step})")
    # every rank re-estimates on its shards (collective when synchronised); rank 0 scores
    scores = scores_with_population(
        run.task, model, run.cfg.pop_batches, log=run.log, evaluate_here=run.main
    )
    if run.world > 1 and not run.synced:  # per-process statistics: keep rank 0's everywhere
        du.broadcast_module_state(model)
    scores = du.broadcast_object(scores)
    metric = run.task.metric
    run.log(format_scores(metric, scores))
    bad = [f"{which} {split}" for which in ("running", "reestimated")
           for split, value in (scores[which] or {}).items()
           if not (math.isfinite(value["loss"]) and math.isfinite(value[metric]))]  # fmt: skip
    if bad:
        raise _diverged(run, state.step, f"the final scores are not finite ({', '.join(bad)})")
    return scores


def _results(run: _Run, state: TrainState, scores: dict[str, Any], wall: float) -> dict[str, Any]:
    """The run's results.json: what was trained, for how long, and its scores."""
    cfg = run.cfg
    return {
        "task": cfg.task,
        "model": cfg.model,
        "preset": cfg.preset,
        "metric": run.task.metric,
        "higher_is_better": run.task.higher_is_better,
        "steps": state.step,
        "best_step": state.best_step,
        "best_valid": state.best,
        "early_stopped": state.stopped,
        "skipped_steps": state.skipped,
        "train_seconds": round(state.train_seconds, 2),
        "wall_seconds_this_process": round(wall, 2),
        **({"world_size": run.world, "sync_stats": run.synced} if run.world > 1 else {}),
        **scores,
    }


def _finite(model: nn.Module) -> bool:
    """Are all floating-point parameters and buffers of ``model`` finite?"""
    return all(
        bool(torch.isfinite(t).all()) for t in model.state_dict().values() if t.is_floating_point()
    )


def _load_best(model: nn.Module, path: Path) -> None:
    try:
        model.load_state_dict(load_checkpoint(path)["model"])
    except CheckpointError as e:
        raise CheckpointError(
            e.path,
            f"{e.why}; restore it from a copy, or delete it and run again with "
            "--resume to score the last model instead",
        ) from e


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
