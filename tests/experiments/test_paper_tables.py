"""``bnrnn tables``: the papers' tables rebuilt from run directories, and the committed
docs/reproduction.md section checked against the committed docs/results/."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from bnrnn_experiments import paper_tables as pt
from bnrnn_experiments.cli import main as cli_main
from bnrnn_experiments.compare import load_run

ROOT = Path(__file__).resolve().parents[2]


def write_run(root: Path, name: str, train_losses: list[tuple[int, int, float]], **results):
    """A finished word-LM run: train windows (step, epoch, loss), one validation per epoch."""
    run = root / name
    run.mkdir(parents=True)
    (run / "config.json").write_text(json.dumps({"task": "ptb-word", "max_epochs": 2}))
    records = [{"kind": "train", "step": s, "epoch": e, "loss": x} for s, e, x in train_losses]
    records += [{"kind": "valid", "step": 4, "ppl": 150.0, "eval_seconds": 30.0}]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    base = {"metric": "ppl", "steps": 8, "best_valid": 150.0, "best_step": 4,
            "train_seconds": 3570.0, "eval_seconds": 0.0, "early_stopped": False,
            "running": {"test": {"ppl": 140.0}},
            "reestimated": {"test": {"ppl": 139.5}}}  # fmt: skip
    (run / "results.json").write_text(json.dumps({**base, **results}))
    return run


def test_epoch_train_perplexity_is_the_mean_loss_of_each_epoch(tmp_path: Path) -> None:
    # 8 steps, 2 epochs of 4; windows of 2 steps
    run = load_run(write_run(tmp_path, "r", [(2, 1, 5.0), (4, 1, 4.0), (6, 2, 3.0), (8, 2, 2.0)]))
    assert pt.epoch_train_perplexities(run) == pytest.approx([math.exp(4.5), math.exp(2.5)])
    assert pt.wall_hours(run) == pytest.approx(1.0)  # 3570 s training + 30 s validation


def test_a_window_across_an_epoch_is_refused(tmp_path: Path) -> None:
    run = load_run(write_run(tmp_path, "r", [(3, 1, 5.0), (6, 2, 4.0), (8, 2, 3.0)]))
    with pytest.raises(ValueError, match="straddles an epoch of 4 steps"):
        pt.epoch_train_perplexities(run)


def test_render_reads_the_runs_and_marks_the_missing(tmp_path: Path) -> None:
    write_run(tmp_path, "ptb-word-small-lstm", [(2, 1, 5.0), (4, 1, 4.0), (6, 2, 3.0), (8, 2, 2.0)])
    text = pt.render(tmp_path)
    lstm = next(line for line in text.splitlines() if "ptb-word-small-lstm" in line)
    cells = [c.strip() for c in lstm.split("|")[1:-1]]
    assert cells[1:3] == ["78.5", "119.2"]  # the paper's
    assert cells[3] == f"{math.exp(2.5):.1f} (epoch 2)"
    assert cells[4] == "150.0 (step 4)"
    assert cells[5] == "140.0 / 139.5"
    assert cells[6].startswith("8 / 21,780")
    bn = next(line for line in text.splitlines() if line.startswith("| BN-LSTM (input"))
    assert "not run" in bn


def test_splice_and_check(tmp_path: Path) -> None:
    doc = tmp_path / "doc.md"
    doc.write_text(f"# title\n\n{pt.BEGIN}\nold\n{pt.END}\n\nafter\n")
    args = ["--results", str(tmp_path / "none"), "--doc", str(doc), "--no-plot"]
    assert pt.main([*args, "--check"]) == 1
    assert pt.main(args) == 0
    assert doc.read_text().endswith(f"{pt.END}\n\nafter\n") and "old" not in doc.read_text()
    assert pt.main([*args, "--check"]) == 0
    with pytest.raises(ValueError, match="markers"):
        pt.splice("no markers", "x")


def test_committed_tables_match_committed_runs(capsys: pytest.CaptureFixture[str]) -> None:
    """docs/reproduction.md's tables are what docs/results/ gives (`bnrnn tables --check`)."""
    results, doc = ROOT / pt.RESULTS_DIR, ROOT / pt.DOC
    command = ["tables", "--results", str(results), "--doc", str(doc), "--check"]
    assert cli_main(command) == 0, capsys.readouterr().out


def test_an_evaluation_made_again_replaces_the_final_scores(tmp_path: Path) -> None:
    """A run evaluated again by `bnrnn evaluate` (eval.json, best checkpoint) shows those
    test scores, linked; one of another checkpoint does not count."""
    run_dir = write_run(tmp_path, "ptb-word-small-lstm", [(4, 1, 4.0), (8, 2, 2.0)])
    again = {"metric": "ppl", "checkpoint": "best", "running": {"test": {"ppl": 140.0}},
             "reestimated": {"test": {"ppl": 120.0}}}  # fmt: skip
    (run_dir / "eval.json").write_text(json.dumps(again))
    cell = pt._test(1)(load_run(run_dir))
    assert cell == "140.0 / 120.0 ([eval.json](results/ptb-word-small-lstm/eval.json))"
    (run_dir / "eval.json").write_text(json.dumps({**again, "checkpoint": "last"}))
    assert pt._test(1)(load_run(run_dir)) == "140.0 / 139.5"
