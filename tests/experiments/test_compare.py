"""``bnrnn compare`` from fixture run directories (no training): the figure's curves are the
runs' metrics, the PNG is written, the table holds the scores."""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib.image as mpimg
import pytest

from bnrnn_experiments.cli import main
from bnrnn_experiments.compare import compare, format_table, load_run, make_figure


def make_run(root: Path, name: str, task: str, model: str, metric: str, curve, test=None):
    run = root / name
    run.mkdir(parents=True)
    (run / "config.json").write_text(json.dumps({"task": task, "model": model, "seed": 1}))
    lines = []
    for step, value in curve:
        lines.append({"kind": "train", "step": step, "loss": 2.0 / step, metric: value})
        lines.append({"kind": "valid", "step": step, "loss": 2.5 / step, metric: value})
    text = "".join(json.dumps(r) + "\n" for r in lines)
    (run / "metrics.jsonl").write_text(text + '{"kind": "valid", "st')  # torn last line
    if test is not None:
        results = {
            "metric": metric,
            "steps": curve[-1][0],
            "train_seconds": 90.0,
            "running": {"valid": {metric: test[0]}, "test": {metric: test[0]}},
            "reestimated": None if test[1] is None else {"test": {metric: test[1]}},
        }
        (run / "results.json").write_text(json.dumps(results))
    return run


@pytest.fixture
def runs(tmp_path: Path) -> list[Path]:
    return [
        make_run(tmp_path, "pmnist-quick-lstm", "pmnist", "lstm", "acc",
                 [(50, 20.0), (100, 41.5), (150, 55.25)], test=(54.0, None)),
        make_run(tmp_path, "pmnist-quick-bnlstm", "pmnist", "bnlstm", "acc",
                 [(50, 30.0), (100, 61.0), (150, 58.0)], test=(60.5, 62.125)),
        make_run(tmp_path, "ptb-char-quick-bnlstm", "ptb-char", "bnlstm", "bpc",
                 [(100, 3.1), (200, 2.4)]),  # unfinished: no results.json
    ]  # fmt: skip


def test_figure_curves_are_the_metrics(runs: list[Path]) -> None:
    loaded = [load_run(r) for r in runs]
    fig = make_figure(loaded)
    axes = fig.get_axes()
    assert len(axes) == 4  # one row (loss, valid) per score: acc and bpc
    valid_acc = axes[1]
    assert valid_acc.get_ylabel() == "validation accuracy (%)"
    lines = {
        ln.get_label(): ln for ln in valid_acc.get_lines() if not ln.get_label().startswith("_")
    }
    assert list(lines["pmnist-quick-bnlstm"].get_xdata()) == [50, 100, 150]
    assert list(lines["pmnist-quick-bnlstm"].get_ydata()) == [30.0, 61.0, 58.0]
    assert list(lines["pmnist-quick-lstm"].get_ydata()) == [20.0, 41.5, 55.25]
    assert axes[3].get_ylabel() == "validation bits per character"
    assert [ln.get_label() for ln in axes[3].get_lines()] == ["ptb-char-quick-bnlstm"]


def test_compare_writes_png_and_table(runs: list[Path], tmp_path: Path) -> None:
    png, table = compare(runs, tmp_path / "out" / "curves.png", title="fixture")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    height, width, _ = mpimg.imread(png).shape
    assert width > 800 and height > 600  # two rows of panels
    rows = table.splitlines()
    assert len(rows) == 2 + 3
    bn = next(r for r in rows if "pmnist-quick-bnlstm" in r)
    assert "61.000 (100)" in bn  # best validation score and its step
    assert "60.500" in bn and "62.125" in bn  # test: running and re-estimated statistics
    assert "90 s" in bn
    lstm = next(r for r in rows if "pmnist-quick-lstm" in r)
    assert "55.250 (150)" in lstm and "54.000" in lstm
    lm = next(r for r in rows if "ptb-char" in r)
    assert "2.400 (200)" in lm  # lower is better for bpc


def test_compare_cli(runs: list[Path], capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["compare", *map(str, runs)]) == 0
    out = capsys.readouterr().out
    assert "pmnist-quick-lstm" in out and "best valid (step)" in out
    default_png = runs[0].parent / "compare.png"
    assert default_png.is_file() and str(default_png) in out


def test_compare_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["compare", str(tmp_path / "nothing")]) == 2
    assert "no run directories" in capsys.readouterr().err


def test_table_without_plot(runs: list[Path]) -> None:
    png, table = compare(runs, None)
    assert png is None and table == format_table([load_run(r) for r in runs])
