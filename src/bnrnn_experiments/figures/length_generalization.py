"""``bnrnn figure length-generalization RUN_DIR...``: Cooijmans Fig. 3(b), bits per character
against the evaluation sequence length (100 to 1000) for trained character language models.

Each run's model (its best checkpoint, rebuilt by the harness) reads the validation (or
test) text cut into non-overlapping subsequences of length L, each from a zero state, and
predicts every next character. BN models are scored with population statistics: per-step
rows up to ``max_length`` (the training length), the last row beyond it (Cooijmans §3: "we
use the population statistic of time T_max for all time steps beyond it"); by default the
statistics are first re-estimated over training batches as the paper does ("averaging the
minibatch estimates over the training set"), ``--population running`` keeps the running
averages of the checkpoint. ``--batch-stats`` adds the same evaluation with each
evaluation batch's own statistics (what the paper's population statistics are compared
with); the buffers are restored afterwards.

Every length scores (almost) the same characters: the first ``--max-chars`` characters of
the split (100,000 by default; 0 for all of it), so that the curves differ by length only.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import bnrnn

from .common import DEFAULT_OUT, new_figure, parse_ints, write_figure

PAPER_LENGTHS = (100, 200, 300, 400, 500, 600, 700, 800, 900, 1000)


@contextlib.contextmanager
def batch_statistics(model: nn.Module) -> Iterator[None]:
    """Make every `bnrnn.StepBatchNorm` of ``model`` use batch statistics in eval mode,
    restoring the population buffers (which batch statistics would update) afterwards."""
    norms = [m for m in model.modules() if isinstance(m, bnrnn.StepBatchNorm)]
    saved = [{k: v.clone() for k, v in m.named_buffers()} for m in norms]
    flags = [m.collecting for m in norms]
    for m in norms:
        m.collecting = True
    try:
        with warnings.catch_warnings():
            # steps beyond max_length: batch statistics there, not tracked (expected here)
            warnings.filterwarnings("ignore", message="training on step")
            yield
    finally:
        with torch.no_grad():
            for m, buffers, flag in zip(norms, saved, flags):
                m.collecting = flag
                for name, value in buffers.items():
                    getattr(m, name).copy_(value)


@torch.no_grad()
def bpc_at_length(
    model: nn.Module, text: Tensor, length: int, batch_size: int, max_chars: int = 0
) -> tuple[float, int]:
    """Bits per character of ``model`` (tokens (L, N) -> (logits (L, N, V), state)) on
    ``text`` (1-D token ids) cut into non-overlapping subsequences of ``length``, each from a
    zero state. Batches are of nearly equal size (never a batch of one). Returns
    (bpc, number of predicted characters)."""
    if length < 1:
        raise ValueError(f"length must be a positive integer, got {length}")
    if max_chars > 0:
        text = text[: max_chars + 1]
    n = (len(text) - 1) // length
    if n < 1:
        raise ValueError(f"the text ({len(text)} characters) is shorter than {length + 1}")
    was_training = model.training
    model.eval()
    idx = torch.arange(n)[:, None] * length + torch.arange(length + 1)  # (n, L+1)
    total = 0.0
    for group in np.array_split(np.arange(n), math.ceil(n / batch_size)):
        tokens = text[idx[torch.from_numpy(group)]].t().long()  # (L+1, b)
        logits, _ = model(tokens[:-1])  # (L, b, V)
        total += float(
            F.cross_entropy(
                logits.reshape(-1, logits.shape[-1]), tokens[1:].reshape(-1), reduction="sum"
            )
        )
    model.train(was_training)
    return total / (n * length) / math.log(2), n * length


def evaluate_lengths(
    model: nn.Module,
    text: Tensor,
    lengths: list[int],
    batch_size: int,
    max_chars: int = 0,
    batch_stats: bool = False,
    log: Any = print,
    label: str = "",
) -> list[dict[str, Any]]:
    """Rows {"length", "stats", "bpc", "chars", "seconds"} for every length."""
    rows = []
    has_bn = any(isinstance(m, bnrnn.StepBatchNorm) for m in model.modules())
    modes = ["population"] + (["batch"] if batch_stats and has_bn else [])
    for mode in modes:
        for L in lengths:
            t0 = time.perf_counter()
            if mode == "batch":
                with batch_statistics(model):
                    bpc, chars = bpc_at_length(model, text, L, batch_size, max_chars)
            else:
                bpc, chars = bpc_at_length(model, text, L, batch_size, max_chars)
            seconds = time.perf_counter() - t0
            rows.append(
                {"length": L, "stats": mode, "bpc": bpc, "chars": chars, "seconds": seconds}
            )
            log(f"| {label} | {mode} statistics | length {L:5d} | bpc {bpc:.4f} | {seconds:.1f} s")
    return rows


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("runs", nargs="+", help="run directories of character language models")
    p.add_argument(
        "--lengths",
        default=",".join(map(str, PAPER_LENGTHS)),
        help="comma-separated evaluation lengths (default 100,200,...,1000)",
    )
    p.add_argument(
        "--split",
        default="valid",
        choices=("valid", "test"),
        help="text to evaluate on (default valid; the paper's Fig. 3b used test)",
    )
    p.add_argument(
        "--max-chars",
        type=int,
        default=100_000,
        help="evaluate on the first N characters of the split (default 100000, about a "
        "quarter of PTB valid, for minutes on a CPU; 0: all of it, as the paper)",
    )
    p.add_argument(
        "--population",
        default="reestimated",
        choices=("reestimated", "running"),
        help="re-estimate the population statistics over training batches (as the "
        "paper) or use the checkpoint's running averages",
    )
    p.add_argument(
        "--pop-batches",
        type=int,
        help="training batches for re-estimating (default: the run's pop_batches)",
    )
    p.add_argument(
        "--batch-stats",
        action="store_true",
        help="also evaluate BN models with each evaluation batch's statistics",
    )
    p.add_argument(
        "--batch-size",
        type=int,
        default=128,
        help="subsequences per evaluation batch (default 128)",
    )
    p.add_argument(
        "--checkpoint",
        default="best",
        choices=("best", "last"),
        help="which checkpoint of each run (default: best)",
    )
    p.add_argument("--data-dir", help="data directory (default: the run's, else $BNRNN_DATA_DIR)")
    p.add_argument("--out", default=DEFAULT_OUT, help="output directory (default: figures)")
    p.add_argument("--name", default="length_generalization", help="base name of the output files")


def _label(cfg: Any, path: Path) -> str:
    return f"{cfg.model} ({path.name})"


def run(args: argparse.Namespace, argv: list[str] | None = None) -> Any:
    from ..evaluate import has_bn, load_run_model, reestimate_population_stats

    t_start = time.perf_counter()
    lengths = parse_ints(args.lengths, "--lengths")
    if min(lengths) < 1:
        raise ValueError(f"--lengths must be positive, got {args.lengths}")
    if args.batch_size < 2:
        raise ValueError(f"--batch-size must be at least 2, got {args.batch_size}")
    overrides: dict[str, Any] = {"valid_subset": 0, "test_subset": 0}
    if args.data_dir:
        overrides["data_dir"] = args.data_dir
    results: list[dict[str, Any]] = []
    runs_info: dict[str, Any] = {}
    for run_dir in map(Path, args.runs):
        cfg, task, model, ckpt = load_run_model(run_dir, args.checkpoint, overrides)
        if task.metric != "bpc":
            raise ValueError(f"{run_dir} is a {cfg.task} run; this figure needs a character LM")
        label = _label(cfg, run_dir)
        pop = None
        if has_bn(model) and args.population == "reestimated":
            n = cfg.pop_batches if args.pop_batches is None else args.pop_batches
            pop = reestimate_population_stats(task, model, n)
            print(f"| {label}: population statistics re-estimated over {pop} training batches")
        text = task.splits[args.split]
        rows = evaluate_lengths(
            model, text, lengths, args.batch_size, args.max_chars, args.batch_stats, label=label
        )
        for r in rows:
            results.append({"run": str(run_dir), "label": label, **r})
        runs_info[label] = {
            "run": str(run_dir),
            "task": cfg.task,
            "model": cfg.model,
            "hidden_size": cfg.hidden_size,
            "train_length": cfg.seq_len,
            "max_length": cfg.bn_max_length if cfg.is_bn else None,
            "checkpoint_step": ckpt.get("step"),
            "population": (args.population if has_bn(model) else None),
            "pop_batches": pop,
        }

    fig, (ax, ax_rel) = new_figure(11, 4.6, 1, 2)
    for k, label in enumerate(runs_info):
        for mode, style in (("population", "-"), ("batch", "--")):
            pts = [r for r in results if r["label"] == label and r["stats"] == mode]
            if not pts:
                continue
            suffix = "" if runs_info[label]["max_length"] is None else f", {mode} statistics"
            x = [r["length"] for r in pts]
            y = [r["bpc"] for r in pts]
            kw = {"marker": "o", "ms": 3, "color": f"C{k}", "label": label + suffix}
            ax.plot(x, y, style, **kw)
            ax_rel.plot(x, [v - y[0] for v in y], style, **kw)
    train_lengths = {info["train_length"] for info in runs_info.values()}
    for a in (ax, ax_rel):
        for L in train_lengths:
            a.axvline(L, color="0.5", ls=":", lw=0.8)
        a.set_xlabel("evaluation sequence length")
        a.grid(alpha=0.3)
    ax.set_ylabel(f"bits per character ({args.split})")
    ax_rel.set_ylabel(f"bpc minus bpc at length {min(lengths)}")
    ax_rel.axhline(0, color="k", lw=0.6)
    ax.legend(fontsize=8)
    fig.suptitle("Generalisation to longer sequences (Cooijmans Fig. 3b)")

    summary: dict[str, Any] = {"runs": runs_info}
    for label in runs_info:
        for mode in ("population", "batch"):
            pts = {
                r["length"]: r["bpc"] for r in results if r["label"] == label and r["stats"] == mode
            }
            if pts:
                first, last = pts[min(pts)], pts[max(pts)]
                summary[f"{label} / {mode}"] = {
                    "bpc_by_length": pts,
                    "change_from_shortest_to_longest": last - first,
                    "worst_minus_best": max(pts.values()) - min(pts.values()),
                }
    summary["wall_seconds"] = round(time.perf_counter() - t_start, 1)
    info0 = next(iter(runs_info.values()))
    settings = {
        "split": args.split,
        "lengths": lengths,
        "max_chars": args.max_chars or "all",
        "population": args.population,
        "batch": args.batch_size,
        "train_length": sorted(train_lengths),
        "hidden": sorted({i["hidden_size"] for i in runs_info.values()}),
        "task": info0["task"],
    }
    note = (
        "Non-overlapping subsequences, each from a zero state; BN rows beyond max_length reuse "
        "the last row. Dotted: training length. Paper: 1000 units, test split."
    )
    header = ["run", "label", "stats", "length", "bpc", "chars", "seconds"]
    rows = [[r[h] for h in header] for r in results]
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
