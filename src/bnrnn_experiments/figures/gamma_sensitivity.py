"""``bnrnn figure gamma-sensitivity``: Cooijmans Fig. 6 (Appendix B), training curves of one
task for several initial BN scales gamma, overlaid.

Either give run directories (``--runs DIR...``, any runs of one task; each is labelled by
its ``gamma_init``), or let the command launch one BN-LSTM run per gamma through the
harness's training function, in ``RUNS_DIR/gamma-sensitivity/{task}-{preset}-bnlstm-gamma{g}``
(finished runs are reused unless ``--force``). The left panel is the training loss, the
right one the validation score, against training steps; the curves need nothing but each
run's ``config.json`` and ``metrics.jsonl``.

The paper's claim: on pMNIST larger initial gammas train worse (the gradient has to travel
through all 784 steps, Cooijmans §4); on Penn Treebank the effect is gone (a prediction at
every step gives a fresh learning signal).
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path
from typing import Any

from .common import DEFAULT_OUT, new_figure, parse_floats, write_figure

PAPER_GAMMAS = (0.1, 0.3, 0.5, 0.7, 1.0)
DEFAULT_GAMMAS = (0.1, 0.5, 1.0)
METRIC_LABELS = {
    "acc": "validation accuracy (%)",
    "bpc": "validation bits per character",
    "ppl": "validation perplexity",
}


def run_dir_for(runs_dir: Path, task: str, preset: str, gamma: float, dry_run: bool) -> Path:
    name = f"{task}-{preset}-bnlstm-gamma{gamma:g}" + ("-dry-run" if dry_run else "")
    return runs_dir / "gamma-sensitivity" / name


def parse_sets(items: list[str] | None) -> dict[str, Any]:
    """``["max_steps=200", "hidden-size=32"]`` -> {"max_steps": "200", "hidden_size": "32"}
    (values are converted by the harness's configuration)."""
    out: dict[str, Any] = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"--set expects KEY=VALUE, got {item!r}")
        out[key.strip().replace("-", "_")] = value.strip()
    return out


def launch(
    task: str,
    gammas: list[float],
    preset: str,
    runs_dir: Path,
    overrides: dict[str, Any],
    *,
    dry_run: bool = False,
    force: bool = False,
    quiet: bool = True,
    argv: list[str] | None = None,
    log: Any = print,
) -> list[Path]:
    """Train (or reuse) one BN-LSTM run per gamma, one after the other; their directories."""
    from ..config import make_config
    from ..rundir import RESULTS
    from ..train import train

    dirs = []
    for gamma in gammas:
        cfg = make_config(task, "bnlstm", preset, dry_run, **{**overrides, "gamma_init": gamma})
        run_dir = run_dir_for(runs_dir, task, preset, gamma, dry_run)
        dirs.append(run_dir)
        if (run_dir / RESULTS).is_file() and not force:
            log(f"| gamma {gamma:g}: {run_dir} is finished, reusing it (--force to retrain)")
            continue
        t0 = time.perf_counter()
        log(f"| gamma {gamma:g}: training {task} bnlstm ({preset}) in {run_dir}")
        train(cfg, run_dir, resume=not force, force=force, argv=argv, quiet=quiet)
        log(f"| gamma {gamma:g}: done in {time.perf_counter() - t0:.0f} s")
    return dirs


def load_curves(run_dir: Path) -> dict[str, Any]:
    """gamma, task, metric and the train / valid curves of a run directory."""
    from ..rundir import read_metrics

    cfg_path = run_dir / "config.json"
    if not cfg_path.is_file():
        raise FileNotFoundError(f"{run_dir} is not a run directory (no config.json)")
    cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
    records = read_metrics(run_dir)
    metric = next((m for r in records for m in METRIC_LABELS if m in r), None)
    if metric is None:
        raise ValueError(f"{run_dir}: metrics.jsonl holds no validation score yet")
    train = [(r["step"], r["loss"]) for r in records if r.get("kind") == "train" and "loss" in r]
    valid = [(r["step"], r[metric]) for r in records if r.get("kind") == "valid" and metric in r]
    grads = [r["grad_norm"] for r in records if r.get("kind") == "train" and "grad_norm" in r]
    return {
        "path": run_dir,
        "gamma": float(cfg.get("gamma_init", float("nan"))),
        "task": cfg.get("task"),
        "model": cfg.get("model"),
        "config": cfg,
        "metric": metric,
        "train": train,
        "valid": valid,
        "grad_norms": grads,
    }


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--runs",
        nargs="+",
        metavar="RUN_DIR",
        help="existing runs of one task to overlay (instead of launching runs)",
    )
    p.add_argument("--task", default="pmnist", help="task of the launched runs (default pmnist)")
    p.add_argument(
        "--gammas",
        default=",".join(f"{g:g}" for g in DEFAULT_GAMMAS),
        help="initial gammas to launch (default 0.1,0.5,1; the paper: 0.1,0.3,0.5,0.7,1)",
    )
    p.add_argument("--preset", default="quick", help="harness preset of the launched runs")
    p.add_argument(
        "--max-steps",
        type=int,
        help="training steps of each run (default: 150 for the quick preset, else the preset's)",
    )
    p.add_argument(
        "--set",
        action="append",
        metavar="KEY=VALUE",
        help="any other configuration field of the launched runs, e.g. "
        "--set hidden_size=32 (repeatable)",
    )
    p.add_argument("--data-dir", help="data directory (default: $BNRNN_DATA_DIR)")
    p.add_argument("--runs-dir", help="parent of the run directories (default: runs)")
    p.add_argument("--dry-run", action="store_true", help="launch tiny smoke-test runs")
    p.add_argument("--force", action="store_true", help="retrain runs that are already finished")
    p.add_argument("--verbose", action="store_true", help="print the runs' training log lines")
    p.add_argument("--out", default=DEFAULT_OUT, help="output directory (default: figures)")
    p.add_argument("--name", default="gamma_sensitivity", help="base name of the output files")


QUICK_STEPS = 150  # the quick preset's budget per run, so that 3 gammas take minutes


def run(args: argparse.Namespace, argv: list[str] | None = None) -> Any:
    from ..rundir import default_runs_dir

    t_start = time.perf_counter()
    if args.runs:
        dirs = [Path(d) for d in args.runs]
        launched = False
    else:
        gammas = parse_floats(args.gammas, "--gammas")
        overrides = parse_sets(args.set)
        if args.max_steps is not None:
            overrides["max_steps"] = args.max_steps
        elif args.preset == "quick" and not args.dry_run and "max_steps" not in overrides:
            overrides["max_steps"] = QUICK_STEPS
        if args.data_dir:
            overrides["data_dir"] = args.data_dir
        runs_dir = Path(args.runs_dir) if args.runs_dir else default_runs_dir()
        dirs = launch(
            args.task,
            gammas,
            args.preset,
            runs_dir,
            overrides,
            dry_run=args.dry_run,
            force=args.force,
            quiet=not args.verbose,
            argv=argv,
        )
        launched = True
    curves = sorted((load_curves(d) for d in dirs), key=lambda c: c["gamma"])
    tasks = {c["task"] for c in curves}
    metrics = {c["metric"] for c in curves}
    if len(tasks) > 1 or len(metrics) > 1:
        raise ValueError(f"the runs mix tasks {sorted(map(str, tasks))}; give runs of one task")
    metric = metrics.pop()
    task = tasks.pop()

    from matplotlib import colormaps

    cmap = colormaps["viridis"]
    fig, (ax_loss, ax_valid) = new_figure(11, 4.4, 1, 2)
    for k, c in enumerate(curves):
        color = cmap(k / max(1, len(curves) - 1) * 0.9)
        label = f"gamma {c['gamma']:g}" + ("" if c["model"] == "bnlstm" else f" ({c['model']})")
        if c["train"]:
            ax_loss.plot(*zip(*c["train"]), color=color, lw=1.2, label=label)
        if c["valid"]:
            ax_valid.plot(*zip(*c["valid"]), color=color, marker="o", ms=3, lw=1.2, label=label)
    ax_loss.set_xlabel("training steps")
    ax_loss.set_ylabel("training loss (nats)")
    ax_valid.set_xlabel("training steps")
    ax_valid.set_ylabel(METRIC_LABELS[metric])
    for ax in (ax_loss, ax_valid):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"Sensitivity to the initial gamma on {task} (Cooijmans Fig. 6)")

    higher = metric == "acc"
    summary: dict[str, Any] = {"metric": metric, "runs": {}}
    header = ["gamma", "run", "kind", "step", "value"]
    rows: list[list[Any]] = []
    for c in curves:
        vals = [v for _, v in c["valid"]]
        best = (max if higher else min)(vals) if vals else None
        summary["runs"][f"gamma={c['gamma']:g}"] = {
            "run": str(c["path"]),
            "model": c["model"],
            "steps": c["train"][-1][0] if c["train"] else None,
            "final_train_loss": c["train"][-1][1] if c["train"] else None,
            "best_valid": best,
            "final_valid": vals[-1] if vals else None,
            # gradient norm before clipping at the logged steps: inf means it overflowed
            "max_finite_logged_grad_norm": max(
                (g for g in c["grad_norms"] if math.isfinite(g)), default=None
            ),
            "nonfinite_logged_grad_norms": sum(not math.isfinite(g) for g in c["grad_norms"]),
        }
        rows += [[c["gamma"], str(c["path"]), "train_loss", s, v] for s, v in c["train"]]
        rows += [[c["gamma"], str(c["path"]), f"valid_{metric}", s, v] for s, v in c["valid"]]
    bests = [(c["gamma"], summary["runs"][f"gamma={c['gamma']:g}"]["best_valid"]) for c in curves]
    ordered = [b for _, b in bests if b is not None]
    if len(ordered) > 1:
        worse = [(b2 < b1) if higher else (b2 > b1) for b1, b2 in zip(ordered, ordered[1:])]
        summary["best_valid_worsens_with_gamma_at_every_step_up"] = all(worse)
    summary["launched"] = launched
    summary["wall_seconds"] = round(time.perf_counter() - t_start, 1)
    cfg0 = curves[0]["config"]
    settings: dict[str, Any] = {
        "task": task,
        "gammas": [c["gamma"] for c in curves],
        "model": ",".join(sorted({str(c["model"]) for c in curves})),
    }
    for key in (
        "preset",
        "hidden_size",
        "batch_size",
        "max_steps",
        "optimizer",
        "lr",
        "train_subset",
        "valid_subset",
    ):
        if key in cfg0:
            settings[key] = cfg0[key]
    note = (
        "One run per initial gamma (the BN scale of every normalised term). Paper: 100 units "
        "(pMNIST) / 1000 units (PTB), about 50k / 15k steps."
    )
    return write_figure(
        fig,
        args.out,
        args.name,
        settings=settings,
        summary=summary,
        header=header,
        rows=rows,
        note=note,
        argv=argv,
    )
