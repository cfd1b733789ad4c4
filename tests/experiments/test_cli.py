"""The ``bnrnn`` command line: train (options, run directory, --resume, --force),
evaluate (--lengths), reproduce, and the help texts."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
from harness_helpers import needs

from bnrnn_experiments import rundir as rd
from bnrnn_experiments.cli import build_parser, main
from bnrnn_experiments.config import FIELDS


def test_every_option_has_help(capsys: pytest.CaptureFixture[str]) -> None:
    parser = build_parser()
    for action in parser._actions:
        assert action.help, action.dest
    sub = next(a for a in parser._actions if a.dest == "command")
    for name in ("train", "reproduce", "compare", "evaluate"):
        for action in sub.choices[name]._actions:
            assert action.help, f"{name} {action.dest}"  # (figure: its own tests)
    with pytest.raises(SystemExit) as e:
        main(["train", "--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    for name in FIELDS:
        if name not in ("task", "model", "preset", "dry_run"):
            assert "--" + name.replace("_", "-") in text, name


def test_module_entry_point() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "bnrnn_experiments", "--help"], capture_output=True, text=True
    )
    assert out.returncode == 0
    for command in ("train", "compare", "evaluate", "reproduce"):
        assert command in out.stdout


@needs("ptb-char")
def test_train_resume_force(runs_env: Path, capsys: pytest.CaptureFixture[str]) -> None:
    args = ["train", "ptb-char", "--model", "bnlstm", "--dry-run", "--hidden-size", "6",
            "--gamma-init", "0.5", "--input-stats", "sequence", "--no-learn-init"]  # fmt: skip
    assert main(args) == 0
    run = runs_env / "ptb-char-quick-bnlstm-dry-run"  # the default run directory
    cfg = rd.read_config(run)
    assert (cfg.hidden_size, cfg.gamma_init, cfg.input_stats, cfg.max_steps) == (
        6, 0.5, "sequence", 3)  # fmt: skip
    assert "--gamma-init 0.5" in (run / rd.COMMAND).read_text()
    out = capsys.readouterr().out
    assert "| epoch   1 |     1/" in out and "| valid | step" in out and "re-estimated" in out

    # an existing run is not silently overwritten
    assert main(args) == 2
    assert "--resume" in capsys.readouterr().err
    # --resume with a larger budget continues the same run
    assert main([*args, "--resume", "--max-steps", "5"]) == 0
    steps = [r["step"] for r in rd.read_metrics(run) if r["kind"] == "train"]
    assert steps == [1, 2, 3, 4, 5]
    assert json.loads((run / rd.RESULTS).read_text())["steps"] == 5
    # --force starts over
    assert main([*args, "--force"]) == 0
    assert [r["step"] for r in rd.read_metrics(run) if r["kind"] == "train"] == [1, 2, 3]


@needs("ptb-char")
def test_print_config(runs_env: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["train", "ptb-char", "--preset", "paper", "--lr", "0.01", "--print-config"]) == 0
    cfg = json.loads(capsys.readouterr().out)
    assert cfg["hidden_size"] == 1000 and cfg["lr"] == 0.01 and cfg["preset"] == "paper"


def test_cli_errors(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["train", "pmnist", "--preset", "medium", "--print-config"]) == 2
    assert "preset" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["train", "pmnist", "--model", "gru"])
    assert main(["evaluate", "/nonexistent/run"]) == 2


@needs("ptb-char")
def test_evaluate_lengths(runs_env: Path, tmp_path: Path) -> None:
    run = tmp_path / "lm"
    assert main(["train", "ptb-char", "--model", "bnlstm", "--dry-run", "--run-dir", str(run),
                 "--max-length", "50", "--seq-len", "50", "--quiet"]) == 0  # fmt: skip
    assert main(["evaluate", str(run), "--lengths", "50,200", "--splits", "valid,test"]) == 0
    ev = json.loads((run / rd.EVAL).read_text())
    assert ev["max_length"] == 50 and ev["train_length"] == 50
    for which in ("running", "reestimated"):
        assert set(ev[which]) == {"valid@50", "valid@200", "test@50", "test@200"}
        for scores in ev[which].values():
            assert scores["length"] in (50, 200)
            # bits per character of a per-character loss no worse than about the uniform
            # guess over ptb-char's 50 symbols (a model three steps from its initialisation)
            assert scores["bpc"] == pytest.approx(scores["loss"] / math.log(2))
            assert 0 < scores["loss"] < math.log(50) + 0.5, scores
    # the re-estimated statistics at the training length are the final report's
    results = json.loads((run / rd.RESULTS).read_text())
    assert ev["reestimated"]["test@50"]["bpc"] == pytest.approx(
        results["reestimated"]["test"]["bpc"], rel=1e-6
    )


@needs("pmnist")
def test_evaluate_classifier_rejects_lengths(runs_env: Path, tmp_path: Path, capsys) -> None:
    run = tmp_path / "clf"
    assert main(["train", "pmnist", "--dry-run", "--run-dir", str(run), "--quiet"]) == 0
    assert main(["evaluate", str(run), "--lengths", "100"]) == 2
    assert "language models" in capsys.readouterr().err
    assert main(["evaluate", str(run)]) == 0
    assert "acc" in json.loads((run / rd.EVAL).read_text())["running"]["test"]


@needs("ptb-char")
def test_reproduce(runs_env: Path, capsys: pytest.CaptureFixture[str]) -> None:
    runs = runs_env
    args = ["reproduce", "ptb-char", "--dry-run", "--models", "lstm,bnlstm-preact", "--quiet"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert (runs / "ptb-char-quick-dry-run.png").is_file()
    for model in ("lstm", "bnlstm-preact"):
        assert (runs / f"ptb-char-quick-{model}-dry-run" / rd.RESULTS).is_file()
        assert f"ptb-char-quick-{model}-dry-run" in out
    assert main(args) == 0  # finished runs are not trained again
    assert capsys.readouterr().out.count("is finished") == 2
    assert main([*args, "--hidden-size", "5"]) == 2  # other settings: not silently mixed
    assert "--force" in capsys.readouterr().err
