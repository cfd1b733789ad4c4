"""Shared plumbing of the figure commands: a headless Agg figure, the output files written
side by side (``NAME.png``, ``NAME.csv`` with the plotted numbers, ``NAME.json`` with the
settings, a summary and the caption) and the caption that states the settings used.

Figures are made with `matplotlib.figure.Figure` on an Agg canvas, never through
``pyplot``, so that no global backend state is touched and no display is needed.
"""

from __future__ import annotations

import csv
import datetime
import json
import math
import os
import platform
import shlex
import sys
import textwrap
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

DEFAULT_OUT = "figures"


@dataclass
class FigureFiles:
    """The files one figure command wrote."""

    png: Path
    csv: Path | None
    json: Path

    def __str__(self) -> str:
        files = [self.png, self.csv, self.json]
        return ", ".join(str(p) for p in files if p is not None)


def new_figure(width: float, height: float, nrows: int = 1, ncols: int = 1) -> tuple[Any, Any]:
    """An Agg `Figure` of ``width`` x ``height`` inches and its (squeezed) axes."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(nrows, ncols, squeeze=True)
    return fig, axes


def format_value(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, (list, tuple)):
        return ",".join(format_value(v) for v in value)
    return str(value)


def caption(settings: Mapping[str, Any], note: str = "", width: int = 120) -> str:
    """``"settings: a=1, b=2. note"``, wrapped to ``width`` characters."""
    text = "settings: " + ", ".join(f"{k}={format_value(v)}" for k, v in settings.items())
    if note:
        text += ". " + note
    return "\n".join(textwrap.wrap(text, width))


def add_caption(fig: Any, text: str) -> None:
    """Write ``text`` under the axes (the constrained layout keeps room for it)."""
    fig.supxlabel(text, fontsize=7, ha="left", x=0.01, color="0.25")


def _json_default(obj: Any) -> Any:
    if hasattr(obj, "tolist"):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"{type(obj).__name__} is not JSON serialisable")


def _clean(obj: Any) -> Any:
    """NaN and inf are not JSON: write them as null."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean(v) for v in obj]
    return obj


def command_line(argv: Sequence[str] | None) -> str:
    """The command as a user would type it again."""
    if argv is None:
        return shlex.join(sys.argv)
    return shlex.join(["bnrnn", "figure", *argv])


def write_csv(path: Path, header: Sequence[str], rows: Iterable[Sequence[Any]]) -> None:
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        for row in rows:
            writer.writerow(row)  # floats in full precision (repr)


def write_figure(
    fig: Any,
    out_dir: str | os.PathLike[str],
    name: str,
    *,
    settings: Mapping[str, Any],
    summary: Mapping[str, Any],
    header: Sequence[str] | None = None,
    rows: Iterable[Sequence[Any]] | None = None,
    note: str = "",
    argv: Sequence[str] | None = None,
    dpi: int = 100,
) -> FigureFiles:
    """Write ``NAME.png`` (with the settings caption), ``NAME.csv`` (``header`` + ``rows``,
    if given) and ``NAME.json`` (settings, summary, caption, command, versions) into
    ``out_dir``, creating it."""
    import torch

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    text = caption(settings, note)
    add_caption(fig, text)
    png = out / f"{name}.png"
    fig.savefig(png, dpi=dpi)
    csv_path = None
    if header is not None and rows is not None:
        csv_path = out / f"{name}.csv"
        write_csv(csv_path, header, rows)
    meta = {
        "figure": name,
        "command": command_line(argv),
        "created": datetime.datetime.now().isoformat(timespec="seconds"),
        "versions": {"python": platform.python_version(), "torch": torch.__version__},
        "settings": dict(settings),
        "summary": dict(summary),
        "caption": text,
        "files": {"png": png.name, "csv": None if csv_path is None else csv_path.name},
    }
    json_path = out / f"{name}.json"
    json_path.write_text(
        json.dumps(_clean(json.loads(json.dumps(meta, default=_json_default))), indent=2) + "\n",
        encoding="utf-8",
    )
    return FigureFiles(png, csv_path, json_path)


def parse_floats(text: str, name: str) -> list[float]:
    """``"0.1,0.3"`` -> [0.1, 0.3]; ValueError naming the option otherwise."""
    try:
        values = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ValueError(f"{name} must be comma-separated numbers, got {text!r}") from None
    if not values:
        raise ValueError(f"{name} must list at least one number, got {text!r}")
    return values


def parse_ints(text: str, name: str) -> list[int]:
    try:
        values = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ValueError(f"{name} must be comma-separated integers, got {text!r}") from None
    if not values:
        raise ValueError(f"{name} must list at least one integer, got {text!r}")
    return values
