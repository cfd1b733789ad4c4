"""Run directories: everything a run leaves behind, so that plots and evaluation need
nothing but the directory.

    runs/pmnist-quick-bnlstm/
        command.txt      every command line that trained this run (one per start/resume)
        config.json      the resolved configuration
        metrics.jsonl    one JSON record per line: {"kind": "train"|"valid", "step": ...}
        train.log        the log lines printed during training
        ckpt_last.pt     model, optimiser, RNG states, counters: what --resume needs
        ckpt_best.pt     the model at the best validation score (early stopping)
        results.json     final scores, running vs re-estimated population statistics
        eval.json        written by `bnrnn evaluate`
        permutation.npy  pMNIST only: the pixel order
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import shlex
import sys
from pathlib import Path
from typing import Any

from .checkpoint import atomic_write_text
from .config import Config, config_from_dict

CONFIG = "config.json"
COMMAND = "command.txt"
METRICS = "metrics.jsonl"
LOG = "train.log"
LAST = "ckpt_last.pt"
BEST = "ckpt_best.pt"
RESULTS = "results.json"
EVAL = "eval.json"

RUNS_DIR_ENV = "BNRNN_RUNS_DIR"


def default_runs_dir() -> Path:
    return Path(os.environ.get(RUNS_DIR_ENV) or "runs")


def run_name(cfg: Config) -> str:
    """``{task}-{preset}-{model}``, e.g. ``pmnist-quick-bnlstm``; ``-dry-run`` appended."""
    model = cfg.model.replace("*", "star")  # bn-e** -> bn-estarstar: no glob in a path
    name = f"{cfg.task}-{cfg.preset}-{model}"
    return name + "-dry-run" if cfg.dry_run else name


def command_line(argv: list[str] | None = None) -> str:
    argv = sys.argv if argv is None else ["bnrnn", *argv]
    return shlex.join(argv)


def write_command(run_dir: Path, argv: list[str] | None = None, note: str = "") -> None:
    """Append the command line (with time, cwd, data dir, python/torch versions)."""
    import torch

    stamp = datetime.datetime.now().isoformat(timespec="seconds")
    lines = [
        f"# {stamp}{'  ' + note if note else ''}",
        f"# cwd {os.getcwd()}; python {platform.python_version()}; torch {torch.__version__}; "
        f"BNRNN_DATA_DIR={os.environ.get('BNRNN_DATA_DIR', '')}",
        command_line(argv),
        "",
    ]
    with open(run_dir / COMMAND, "a", encoding="utf-8") as f:
        f.write("\n".join(lines))


def write_config(run_dir: Path, cfg: Config) -> None:
    atomic_write_text(run_dir / CONFIG, json.dumps(cfg.to_dict(), indent=2) + "\n")


def read_config(run_dir: str | os.PathLike[str]) -> Config:
    path = Path(run_dir) / CONFIG
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: {run_dir} is not a bnrnn run directory")
    saved = read_json(path)
    if not isinstance(saved, dict):
        raise ValueError(f"{path} is not a bnrnn configuration (a JSON object)")
    try:
        return config_from_dict(saved)
    except (ValueError, TypeError) as e:
        raise ValueError(f"{path}: {e}; fix or restore the file") from e


def append_metrics(run_dir: Path, record: dict[str, Any]) -> None:
    with open(run_dir / METRICS, "a", encoding="utf-8") as f:
        f.write(json.dumps(record) + "\n")
        f.flush()


def read_metrics(run_dir: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """All records of ``metrics.jsonl``; a torn last line (a killed writer) is skipped."""
    path = Path(run_dir) / METRICS
    if not path.is_file():
        return []
    records = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records


def truncate_metrics(run_dir: Path, step: int) -> None:
    """Keep the records up to ``step`` (those after the checkpoint a resume starts from)."""
    kept = [r for r in read_metrics(run_dir) if r.get("step", 0) <= step]
    atomic_write_text(run_dir / METRICS, "".join(json.dumps(r) + "\n" for r in kept))


def write_json(path: Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2) + "\n")


def read_json(path: Path) -> Any | None:
    """The JSON in ``path``, None if there is no such file; ValueError naming the file if
    it is not JSON."""
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path} is not valid JSON ({e}); fix or restore the file") from e
