"""The ``bnrnn`` command line.

    bnrnn train pmnist --model bnlstm --preset quick        # minutes on a laptop CPU
    bnrnn train ptb-char --model lstm --preset paper        # the paper's setup
    bnrnn train ptb-word --model bnlstm-input --preset medium --max-epochs 10
    bnrnn train pmnist --model bnlstm --resume               # continue an interrupted run
    bnrnn compare runs/pmnist-quick-*                        # learning curves (PNG) + table
    bnrnn evaluate runs/ptb-char-paper-bnlstm --lengths 100,200,500,1000
    bnrnn reproduce pmnist --preset quick                    # LSTM vs BN-LSTM, then compare

Every field of `bnrnn_experiments.config.Config` is an option of ``train`` and
``reproduce`` (``--hidden-size 128``, ``--gamma-init 1.0``, ``--no-verify-data``); options
given explicitly override the preset.

Errors are one line on stderr with a non-zero exit status (see `bnrnn_experiments.errors`);
``--debug`` or ``BNRNN_DEBUG=1`` adds the traceback.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path
from typing import Any

from .config import (
    ALL_MODELS,
    ALL_TASKS,
    FIELDS,
    PRESETS,
    RESUMABLE,
    Config,
    format_config,
    make_config,
    models_help,
)
from .distributed import env_is_main, launched_by_torchrun
from .errors import run_command
from .figures import add_figure_parser, run_figure
from .figures.cli import DEBUG_HELP

_FIXED = ("task", "model", "preset", "dry_run")  # positional / dedicated options


def _parse_type(f: dataclasses.Field) -> Any:
    kind = str(f.type)
    if kind.startswith("int"):
        return int
    if kind.startswith("float"):
        return float
    return str


def _add_config_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group(
        "configuration (override the preset; see --print-config for the resolved values)"
    )
    for name, f in FIELDS.items():
        if name in _FIXED:
            continue
        flag = "--" + name.replace("_", "-")
        kw: dict[str, Any] = {
            "dest": name,
            "default": argparse.SUPPRESS,
            "help": f.metadata["help"],
        }
        if str(f.type).startswith("bool"):
            group.add_argument(flag, action=argparse.BooleanOptionalAction, **kw)
        else:
            if f.metadata.get("choices"):
                kw["choices"] = f.metadata["choices"]
            group.add_argument(flag, type=_parse_type(f), metavar=name.upper(), **kw)


def _overrides(args: argparse.Namespace) -> dict[str, Any]:
    return {k: getattr(args, k) for k in FIELDS if k not in _FIXED and hasattr(args, k)}


def _add_what(parser: argparse.ArgumentParser, models_default: str | None = "lstm") -> None:
    parser.add_argument("task", choices=ALL_TASKS, help="the task to train on")
    if models_default is not None:
        parser.add_argument(
            "--model", default=models_default, choices=ALL_MODELS, help=models_help()
        )
    parser.add_argument(
        "--preset", default="quick",
        help="named setup: paper (the papers' setups: docs/design.md, Paper presets) or quick "
             "(minutes on a CPU); ptb-word also "
             "has small, medium, large (Laurent §5.2; paper = small). Default: quick",
    )  # fmt: skip
    parser.add_argument(
        "--dry-run", action="store_true", help="a few steps on small data (smoke test)"
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="bnrnn",
        description="Batch-normalised LSTM experiments (Cooijmans 2017; Laurent 2016)",
    )
    sub = parser.add_subparsers(
        dest="command",
        required=True,
        metavar="COMMAND",
        help="train, reproduce, compare, evaluate, tables, figure",
    )

    p = sub.add_parser("train", help="train one model on one task", description=__doc__,
                       formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    _add_what(p)
    p.add_argument("--run-dir", help="run directory (default: RUNS_DIR/{task}-{preset}-{model})")
    p.add_argument(
        "--runs-dir", help="parent of the run directories (default: runs or $BNRNN_RUNS_DIR)"
    )
    p.add_argument(
        "--resume", action="store_true",
        help="continue the run from its last checkpoint (verified by its checksum), with its "
             "saved configuration; only these options may change: "
             + ", ".join("--" + n.replace("_", "-") for n in RESUMABLE)
             + ". Others are refused before anything is written",
    )  # fmt: skip
    p.add_argument("--force", action="store_true", help="delete an existing run and start over")
    p.add_argument("--print-config", action="store_true",
                   help="print the resolved configuration and exit")  # fmt: skip
    p.add_argument("--quiet", action="store_true", help="no log lines on stdout (train.log only)")
    _add_config_options(p)
    p.epilog = (
        "Several processes: torchrun --standalone --nproc-per-node 2 -m bnrnn_experiments "
        "train ... (DDP; rank 0 writes the run directory; --no-sync-stats: per-process BN "
        "statistics). See README.md, 'Distributed training: torchrun'."
    )

    p = sub.add_parser("reproduce", help="train several models on a task, then compare them")
    _add_what(p, models_default=None)
    p.add_argument("--models", default="lstm,bnlstm",
                   help="comma-separated models to train (default: lstm,bnlstm)")  # fmt: skip
    p.add_argument("--runs-dir", help="parent of the run directories (default: runs)")
    p.add_argument("--force", action="store_true",
                   help="start every run over (default: resume or skip finished runs)")  # fmt: skip
    p.add_argument("--quiet", action="store_true", help="no log lines on stdout (train.log only)")
    _add_config_options(p)

    p = sub.add_parser("compare", help="plot validation curves of runs (PNG) and print a table")
    p.add_argument("runs", nargs="+", help="run directories (e.g. runs/pmnist-quick-*)")
    p.add_argument("--out", help="PNG to write (default: compare.png next to the runs)")
    p.add_argument("--title", help="figure title")
    p.add_argument("--no-plot", action="store_true", help="print the table only")

    p = sub.add_parser(
        "evaluate",
        help="evaluate a run's best checkpoint, e.g. on longer sequences",
        description="Scores with the running and with re-estimated population statistics; "
        "for language models on several sequence lengths (Cooijmans Fig. 3b).",
    )
    p.add_argument("run", help="run directory")
    p.add_argument("--lengths", help="comma-separated sequence lengths (language models), "
                   "e.g. 100,200,500,1000; default: the training length")  # fmt: skip
    p.add_argument("--splits", default="test", help="comma-separated splits: valid,test")
    p.add_argument("--checkpoint", default="best", choices=("best", "last"),
                   help="which checkpoint to evaluate")  # fmt: skip
    p.add_argument("--pop-batches", type=int,
                   help="training batches for re-estimating the population statistics "
                        "(0: one epoch; default: the run's setting)")  # fmt: skip
    p.add_argument("--eval-batch-size", type=int, help="evaluation minibatch size")
    p.add_argument("--data-dir", help="data directory (default: the run's, else $BNRNN_DATA_DIR)")
    p.add_argument("--threads", type=int, help="torch CPU threads")
    p = sub.add_parser(
        "tables",
        help="rebuild docs/reproduction.md's papers' tables from docs/results/",
        description='Writes the section "The papers\' tables" of docs/reproduction.md and one '
        "plot per table from the committed run directories; --check only compares.",
    )
    from .paper_tables import add_arguments as add_table_arguments

    add_table_arguments(p)
    add_figure_parser(sub)  # bnrnn figure ...: the papers' analyses (figures/cli.py)
    parser.add_argument("--debug", action="store_true", help=DEBUG_HELP)
    for p in sub.choices.values():  # also after the command: bnrnn train ... --debug
        p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=DEBUG_HELP)
    return parser


def _resolve_train_config(args: argparse.Namespace, run_dir: Path | None) -> Config:
    overrides = _overrides(args)
    if args.resume and run_dir is not None and (run_dir / "config.json").is_file():
        from .config import apply_overrides
        from .rundir import read_config

        saved = read_config(run_dir)
        if (saved.task, saved.model) != (args.task, args.model):
            raise ValueError(
                f"{run_dir} holds a {saved.task} {saved.model} run, not {args.task} {args.model}"
            )
        changed = {k: v for k, v in overrides.items() if getattr(saved, k) != v}
        if changed and env_is_main() and changed.keys() <= set(RESUMABLE):
            print(f"| resuming with changed options: {changed}", flush=True)
        return apply_overrides(saved, overrides)
    return make_config(args.task, args.model, args.preset, args.dry_run, **overrides)


def cmd_train(args: argparse.Namespace, argv: list[str] | None) -> int:
    from .rundir import default_runs_dir, run_name
    from .train import train

    if args.preset not in PRESETS[args.task]:
        raise ValueError(f"preset of {args.task} must be one of {', '.join(PRESETS[args.task])}")
    probe = make_config(args.task, args.model, args.preset, args.dry_run)
    runs_dir = Path(args.runs_dir) if args.runs_dir else default_runs_dir()
    run_dir = Path(args.run_dir) if args.run_dir else runs_dir / run_name(probe)
    cfg = _resolve_train_config(args, run_dir)
    if args.print_config:
        if env_is_main():
            print(format_config(cfg))
        return 0
    train(cfg, run_dir, resume=args.resume, force=args.force, argv=argv, quiet=args.quiet)
    return 0


def cmd_reproduce(args: argparse.Namespace, argv: list[str] | None) -> int:
    from .compare import compare
    from .rundir import RESULTS, default_runs_dir, read_config, run_name
    from .train import train

    models = [m.strip() for m in args.models.split(",") if m.strip()]
    for m in models:
        if m not in ALL_MODELS:
            raise ValueError(f"--models: {m!r} is not one of {', '.join(ALL_MODELS)}")
    runs_dir = Path(args.runs_dir) if args.runs_dir else default_runs_dir()
    overrides = _overrides(args)
    run_dirs = []
    for model in models:
        cfg = make_config(args.task, model, args.preset, args.dry_run, **overrides)
        run_dir = runs_dir / run_name(cfg)
        run_dirs.append(run_dir)
        if not args.force and (run_dir / "config.json").is_file():
            saved = read_config(run_dir)
            if saved != cfg:
                diff = {k: (v, getattr(cfg, k)) for k, v in saved.to_dict().items()
                        if getattr(cfg, k) != v}  # fmt: skip
                raise ValueError(
                    f"{run_dir} holds a run with other settings (saved, asked): {diff}; "
                    "pass --force to start it over, or --runs-dir for another folder"
                )
        if (run_dir / RESULTS).is_file() and not args.force:
            print(f"| {run_dir} is finished (results.json); --force to train it again", flush=True)
            continue
        print(f"| === {args.task} / {model} / {args.preset} -> {run_dir}", flush=True)
        train(cfg, run_dir, resume=not args.force, force=args.force, argv=argv, quiet=args.quiet)
    suffix = "-dry-run" if args.dry_run else ""
    out = runs_dir / f"{args.task}-{args.preset}{suffix}.png"
    png, table = compare(run_dirs, out, title=f"{args.task} ({args.preset} preset)")
    print(table)
    print(f"| learning curves: {png}")
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    from .compare import compare

    runs = [Path(r) for r in args.runs]
    out = None
    if not args.no_plot:
        if args.out:
            out = Path(args.out)
        else:
            parents = {r.resolve().parent for r in runs}
            out = (parents.pop() if len(parents) == 1 else Path.cwd()) / "compare.png"
    png, table = compare(runs, out, title=args.title)
    print(table)
    if png is not None:
        print(f"| learning curves: {png}")
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from .evaluate import evaluate_run

    lengths = [int(x) for x in args.lengths.split(",")] if args.lengths else None
    splits = [s.strip() for s in args.splits.split(",") if s.strip()]
    for s in splits:
        if s not in ("valid", "test"):
            raise ValueError(f"--splits: {s!r} is not valid or test")
    overrides = {k: getattr(args, k) for k in ("eval_batch_size", "data_dir", "threads")}
    overrides = {k: v for k, v in overrides.items() if v is not None}
    evaluate_run(args.run, lengths, splits, args.checkpoint, args.pop_batches, overrides)
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``bnrnn`` console script; returns the exit status."""
    args = build_parser().parse_args(argv)
    raw = sys.argv[1:] if argv is None else list(argv)

    def run() -> int:
        if launched_by_torchrun() and args.command != "train":
            raise ValueError("only `bnrnn train` runs under torchrun (several processes)")
        if args.command == "train":
            return cmd_train(args, raw)
        if args.command == "reproduce":
            return cmd_reproduce(args, raw)
        if args.command == "compare":
            return cmd_compare(args)
        if args.command == "figure":
            return run_figure(args, raw)
        if args.command == "tables":
            from .paper_tables import run as run_tables

            return run_tables(args)
        return cmd_evaluate(args)

    return run_command(args.command, args.debug, run)


if __name__ == "__main__":
    raise SystemExit(main())
