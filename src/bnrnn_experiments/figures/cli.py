"""The ``figure`` command: `add_figure_parser` mounts it on the ``bnrnn`` parser, and
`run_figure` runs the parsed arguments; `main_figure` parses and runs on its own
(``python -m bnrnn_experiments.figures gradient-flow ...``).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from types import ModuleType
from typing import Any

from ..errors import DEBUG_ENV, run_command
from . import (
    gamma_sensitivity,
    gradient_flow,
    length_generalization,
    population_stats,
    tanh_derivative,
)

DEBUG_HELP = f"on an error, show the Python traceback too (also: {DEBUG_ENV}=1)"
USAGE = """The papers' analyses as commands. Each writes NAME.png, NAME.csv (the numbers
plotted) and NAME.json (settings, summary, caption, command) into --out (default: figures).

    bnrnn figure gradient-flow --out docs/figures            # Cooijmans Fig. 1a
    bnrnn figure tanh-derivative                             # Cooijmans Fig. 1b
    bnrnn figure population-stats runs/ptb-char-quick-bnlstm # Cooijmans Fig. 5
    bnrnn figure length-generalization runs/ptb-char-quick-bnlstm runs/ptb-char-quick-lstm
    bnrnn figure gamma-sensitivity --task pmnist --gammas 0.1,0.5,1.0   # Cooijmans Fig. 6
"""

# name -> (module with add_arguments/run, one-line help)
FIGURES: dict[str, tuple[ModuleType, str]] = {
    "gradient-flow": (
        gradient_flow,
        "Cooijmans Fig. 1a: ||dL/dh_t|| over time in a BN tanh RNN on sMNIST, per gamma",
    ),
    "tanh-derivative": (
        tanh_derivative,
        "Cooijmans Fig. 1b: expected derivative of tanh and its IQR vs the input's std",
    ),
    "population-stats": (
        population_stats,
        "Cooijmans Fig. 5: per-step population mean/variance of a trained run's BN",
    ),
    "length-generalization": (
        length_generalization,
        "Cooijmans Fig. 3b: bits per character vs evaluation length (100-1000)",
    ),
    "gamma-sensitivity": (
        gamma_sensitivity,
        "Cooijmans Fig. 6: training curves for several initial gammas",
    ),
}


def _fill(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="figure", required=True, metavar="FIGURE")
    for name, (module, help_text) in FIGURES.items():
        p = sub.add_parser(
            name,
            help=help_text,
            description=module.__doc__,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        module.add_arguments(p)
        p.add_argument(
            "--threads",
            type=int,
            default=1,
            help="torch CPU threads (default 1: these small recurrent nets run several times "
            "faster on one thread of a busy 2-core machine; 0: torch's default)",
        )


def add_figure_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add ``figure`` to the ``bnrnn`` sub-command parsers; dispatch with `run_figure`."""
    p = subparsers.add_parser(
        "figure",
        help="the papers' analyses (Cooijmans Fig. 1, 3b, 5, 6): PNG + CSV + JSON",
        description=USAGE,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _fill(p)
    p.set_defaults(run_figure=run_figure)
    return p


def run_figure(args: argparse.Namespace, argv: list[str] | None = None) -> int:
    """Run the figure named by ``args.figure``; print the files written; return 0."""
    import torch

    if getattr(args, "threads", 0):
        torch.set_num_threads(args.threads)
    module, _ = FIGURES[args.figure]
    run: Callable[..., Any] = module.run
    if argv is not None and argv and argv[0] == "figure":
        argv = argv[1:]
    files = run(args, argv)
    print(f"| wrote {files}")
    return 0


def main_figure(argv: list[str] | None = None) -> int:
    """Parse ``argv`` (``[FIGURE, options...]``) and run it; the exit status."""
    parser = argparse.ArgumentParser(
        prog="bnrnn figure",
        description=USAGE,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _fill(parser)
    parser.add_argument("--debug", action="store_true", help=DEBUG_HELP)
    args = parser.parse_args(argv)
    raw = list(sys.argv[1:] if argv is None else argv)
    return run_command(f"figure {args.figure}", args.debug, lambda: run_figure(args, raw))
