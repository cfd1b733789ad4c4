"""``bnrnn compare``: learning curves of several runs side by side (PNG) and a table.

Needs nothing but the run directories (config.json, metrics.jsonl, results.json): the
left panel is the training loss, the right one the validation score (accuracy, bits per
character or perplexity) against training steps, one line per run, as Cooijmans Fig. 2-3a.
Runs with different scores get a row of panels each.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .errors import naming
from .rundir import CONFIG, EVAL, RESULTS, read_json, read_metrics

if TYPE_CHECKING:
    from matplotlib.figure import Figure

METRIC_LABELS = {
    "acc": "validation accuracy (%)",
    "bpc": "validation bits per character",
    "ppl": "validation perplexity",
}


@dataclass
class Run:
    name: str
    path: Path
    config: dict[str, Any]
    metrics: list[dict[str, Any]]
    results: dict[str, Any] | None
    # eval.json of the best checkpoint (`bnrnn evaluate`), when the run was evaluated again
    evaluated: dict[str, Any] | None = None

    @property
    def final(self) -> dict[str, Any] | None:
        """The final scores of the early-stopped model: those of ``bnrnn evaluate`` when
        it was run again on the best checkpoint (e.g. after a fix of the evaluation), else
        results.json's."""
        return self.evaluated if self.evaluated is not None else self.results

    def final_score(self, split: str, which: str) -> float | None:
        """The final score on ``split`` with the ``which`` ("running" or "reestimated")
        population statistics; None if absent."""
        scores = None if self.final is None else self.final.get(which)
        if not scores or split not in scores:
            return None
        return scores[split][self.metric]

    @property
    def metric(self) -> str:
        if self.results is not None:
            return self.results["metric"]
        for r in self.metrics:
            for key in METRIC_LABELS:
                if key in r:
                    return key
        return {"smnist": "acc", "pmnist": "acc", "ptb-word": "ppl"}.get(
            self.config.get("task", ""), "bpc"
        )

    def curve(self, kind: str, key: str) -> tuple[list[int], list[float]]:
        rows = [r for r in self.metrics if r.get("kind") == kind and key in r]
        return [r["step"] for r in rows], [r[key] for r in rows]


def load_run(path: str | os.PathLike[str]) -> Run:
    path = Path(path)
    config_path = path / CONFIG
    if not config_path.is_file():
        raise FileNotFoundError(f"{path} is not a run directory (no {CONFIG})")
    config = read_json(config_path)
    evaluated = read_json(path / EVAL)
    if evaluated is not None and evaluated.get("checkpoint") != "best":
        evaluated = None
    return Run(path.name, path, config, read_metrics(path), read_json(path / RESULTS), evaluated)


def _best_valid(run: Run) -> tuple[float | None, int | None]:
    steps, values = run.curve("valid", run.metric)
    if not values:
        return None, None
    higher = run.metric == "acc"
    i = max(range(len(values)), key=lambda k: values[k] if higher else -values[k])
    return values[i], steps[i]


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    return f"{seconds:.0f} s" if seconds < 120 else f"{seconds / 60:.1f} min"


def format_table(runs: Sequence[Run]) -> str:
    """One row per run: best validation score and the final test scores with the running
    and the re-estimated population statistics."""

    def num(x: float | None) -> str:
        return "-" if x is None else f"{x:.3f}" if abs(x) < 1000 else f"{x:.0f}"

    header = ["run", "task", "model", "steps", "metric", "best valid (step)",
              "test (running)", "test (re-est.)", "train time"]  # fmt: skip
    rows = []
    for run in runs:
        best, best_step = _best_valid(run)
        steps = (
            run.results["steps"]
            if run.results
            else max((r["step"] for r in run.metrics), default=0)
        )
        seconds = run.results.get("train_seconds") if run.results else None
        rows.append(
            [
                run.name,
                str(run.config.get("task", "?")),
                str(run.config.get("model", "?")),
                str(steps),
                run.metric,
                "-" if best is None else f"{num(best)} ({best_step})",
                num(run.final_score("test", "running")),
                num(run.final_score("test", "reestimated")),
                _duration(seconds),
            ]
        )
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(header)]
    line = "| " + " | ".join(h.ljust(w) for h, w in zip(header, widths)) + " |"
    rule = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    body = ["| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |" for r in rows]
    return "\n".join([line, rule, *body])


def make_figure(runs: Sequence[Run], title: str | None = None) -> Figure:
    """The learning curves of ``runs``: a row of (training loss, validation score) panels
    per score. Uses matplotlib's object API with the Agg canvas (no global backend)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    groups: dict[str, list[Run]] = {}
    for run in runs:
        groups.setdefault(run.metric, []).append(run)
    fig = Figure(figsize=(11, 4.2 * len(groups)), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(len(groups), 2, squeeze=False)
    for (metric, members), (ax_loss, ax_valid) in zip(groups.items(), axes):
        for run in members:
            steps, loss = run.curve("train", "loss")
            (line,) = ax_loss.plot(steps, loss, label=run.name, lw=1.2, alpha=0.9)
            steps, values = run.curve("valid", metric)
            ax_valid.plot(steps, values, marker="o", ms=3, color=line.get_color(), label=run.name)
            final = run.final_score("test", "reestimated") or run.final_score("test", "running")
            if final is not None and steps:
                ax_valid.axhline(final, color=line.get_color(), ls=":", lw=1)
        ax_loss.set_xlabel("training steps")
        ax_loss.set_ylabel("training loss (nats)")
        ax_loss.grid(alpha=0.3)
        ax_valid.set_xlabel("training steps")
        ax_valid.set_ylabel(METRIC_LABELS.get(metric, metric))
        ax_valid.grid(alpha=0.3)
        ax_valid.legend(fontsize=8)
        if metric == "ppl":
            ax_valid.set_yscale("log")
    fig.suptitle(title or "validation curves (dotted: final test score)")
    return fig


def plot_runs(runs: Sequence[Run], out: str | os.PathLike[str], title: str | None = None) -> Path:
    """Write the learning curves of ``runs`` to the PNG ``out``."""
    fig = make_figure(runs, title)
    out = Path(out)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(out, dpi=110)
    except OSError as e:  # a write error names no file
        raise naming(e, out) from e
    return out


def compare(
    run_dirs: Sequence[str | os.PathLike[str]],
    out: str | os.PathLike[str] | None = "compare.png",
    title: str | None = None,
) -> tuple[Path | None, str]:
    """Load ``run_dirs`` (directories that are not runs are skipped, with a note), plot
    them to ``out`` (None: no plot) and return (png path, table)."""
    runs = []
    for d in run_dirs:
        try:
            runs.append(load_run(d))
        except FileNotFoundError:
            continue
    if not runs:
        raise FileNotFoundError(f"no run directories among {list(map(str, run_dirs))}")
    png = plot_runs(runs, out, title) if out is not None else None
    return png, format_table(runs)
