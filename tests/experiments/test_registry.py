"""The registry of tasks and models (`config.TASKS`, `config.MODELS`): every task, the QA
tasks included, is described the same way; the harness's modules import each other
without a cycle; configurations written before the registry still load."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

import bnrnn_experiments
from bnrnn_experiments.cli import main
from bnrnn_experiments.config import (
    FIELDS,
    MODELS,
    TASKS,
    config_from_dict,
    make_config,
    models_help,
)
from bnrnn_experiments.qa.presets import READER_MODELS
from bnrnn_experiments.rundir import read_config
from bnrnn_experiments.tasks import ClassifierTask, Task

PACKAGE = Path(bnrnn_experiments.__file__).parent
#: config.json files written by the configuration code before the registry (commit d4eb43c)
OLD_CONFIGS = Path(__file__).parent / "old_configs"


def _module_name(path: Path, root: Path) -> str:
    parts = path.relative_to(root.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph(root: Path) -> dict[str, set[str]]:
    """Module -> the modules of the same package it imports, anywhere in its code
    (function bodies too): the static graph, which an import done late hides at run time."""
    modules = {_module_name(p, root): p for p in root.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        edges = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = package
                for _ in range(node.level - 1):
                    base = base.rpartition(".")[0]
                mod = node.module or ""
                base = (f"{base}.{mod}" if base else mod) if node.level else mod
                # `from . import x` names a module or an attribute: take both candidates
                targets = [base] + [f"{base}.{a.name}" for a in node.names]
            else:
                continue
            edges.update(t for t in targets if t in modules and t != name)
        graph[name] = edges
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """A cycle of ``graph`` as a list of modules (first = last), or None."""
    state: dict[str, int] = {}  # 1: on the stack, 2: done
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt) :] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_the_cycle_finder_finds_a_late_import(tmp_path: Path) -> None:
    """The check below can fail: a cycle closed by an import inside a function (as
    tasks.py's `make_task` once imported qa/task.py, which imports tasks.py) is found."""
    pkg = tmp_path / "pkg"
    (pkg / "qa").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "qa" / "__init__.py").write_text("")
    (pkg / "tasks.py").write_text("def make_task():\n    from .qa.task import QATask\n")
    (pkg / "qa" / "task.py").write_text("from ..tasks import Task\n")
    graph = import_graph(pkg)
    assert find_cycle(graph) == ["pkg.qa.task", "pkg.tasks", "pkg.qa.task"]
    (pkg / "tasks.py").write_text("import importlib\n")
    assert find_cycle(import_graph(pkg)) is None


def test_no_import_cycle_in_the_harness() -> None:
    graph = import_graph(PACKAGE)
    # relative imports resolved: qa/task.py reads tasks.py, config.py the QA presets
    assert "bnrnn_experiments.tasks" in graph["bnrnn_experiments.qa.task"]
    assert "bnrnn_experiments.qa.presets" in graph["bnrnn_experiments.config"]
    assert find_cycle(graph) is None, find_cycle(graph)


def test_configuration_loads_without_torch() -> None:
    """`config` (and through it every task's presets, QA's included) is plain data: the
    command line resolves a configuration without loading torch or a task's code."""
    code = (
        "import sys, bnrnn_experiments.config as c; c.make_config('ptb-cloze', 'bn-e**'); "
        "print(sorted(m for m in sys.modules if m.split('.')[0] == 'torch' "
        "or m.startswith('bnrnn_experiments.qa.task')))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


# --------------------------------------------------------------------- the registry


@pytest.mark.parametrize("task", list(TASKS))
def test_every_task_is_described_alike(task: str) -> None:
    spec = TASKS[task]
    cls = spec.load_class()
    assert issubclass(cls, Task)
    assert "paper" in spec.presets
    assert spec.models and all(m in MODELS for m in spec.models)
    assert all(o in FIELDS for o in spec.options)
    for preset in spec.presets:
        for model in spec.models:
            cfg = make_config(task, model, preset)
            assert (cfg.task, cfg.model, cfg.preset) == (task, model, preset)


def test_every_model_belongs_to_a_task() -> None:
    trained = {m for spec in TASKS.values() for m in spec.models}
    assert trained == set(MODELS)
    qa = [t for t, spec in TASKS.items() if spec.task_class.endswith(":QATask")]
    assert qa == ["cnn-qa", "ptb-cloze"]
    assert all(TASKS[t].models == READER_MODELS for t in qa)
    assert issubclass(TASKS["ptb-cloze"].load_class(), ClassifierTask)
    assert issubclass(TASKS["smnist"].load_class(), ClassifierTask)
    for m in MODELS:
        assert m in models_help()


@pytest.mark.parametrize(
    "task, field, value",
    [("smnist", "doc_sentences", 2), ("ptb-char", "tie_entities", True),
     ("cnn-qa", "doc_sentences", 4), ("ptb-cloze", "relevant_sentences", 4),
     ("smnist", "permutation_seed", 3)],
)  # fmt: skip
def test_an_option_of_other_tasks_is_an_error(task: str, field: str, value) -> None:
    with pytest.raises(ValueError, match=f"{field} applies to .*not to {task}"):
        make_config(task, "lstm", "quick", **{field: value})


def test_options_of_the_task_are_accepted() -> None:
    assert make_config("ptb-cloze", "bn-e**", doc_sentences=4).doc_sentences == 4
    assert make_config("cnn-qa", "lstm", relevant_sentences=2).relevant_sentences == 2
    assert make_config("pmnist", "lstm", permutation_seed=3).permutation_seed == 3


# ----------------------------------------------------------- earlier run directories


@pytest.mark.parametrize("path", sorted(OLD_CONFIGS.glob("*.json")), ids=lambda p: p.stem)
def test_config_json_of_earlier_runs_loads(path: Path, tmp_path: Path) -> None:
    saved = json.loads(path.read_text(encoding="utf-8"))
    (tmp_path / "config.json").write_text(json.dumps(saved), encoding="utf-8")
    cfg = read_config(tmp_path)
    # fields added since the run was made take their defaults; the saved ones are kept
    assert {k: v for k, v in cfg.to_dict().items() if k in saved} == saved
    assert cfg == make_config(saved["task"], saved["model"], saved["preset"])


def test_config_json_older_than_the_qa_fields_loads() -> None:
    saved = json.loads((OLD_CONFIGS / "pmnist-quick-bnlstm.json").read_text(encoding="utf-8"))
    for name in ("doc_sentences", "relevant_sentences", "max_vocab", "tie_entities"):
        del saved[name]
    assert config_from_dict(saved) == make_config("pmnist", "bnlstm", "quick")


def test_config_json_of_an_unknown_model_is_a_clear_error(tmp_path: Path, capsys) -> None:
    saved = json.loads((OLD_CONFIGS / "pmnist-quick-bnlstm.json").read_text(encoding="utf-8"))
    (tmp_path / "config.json").write_text(json.dumps({**saved, "model": "bn-e**"}))
    assert main(["evaluate", str(tmp_path)]) == 2
    assert "model of pmnist must be one of lstm, bnlstm" in capsys.readouterr().err


def test_lnlstm_is_the_layer_normalised_lstm() -> None:
    """``--model lnlstm``: bnrnn.BNLSTM(norm="layer") with gains at 1 (Ba et al.), in every
    sequence task; ``--gamma-init`` still overrides."""
    import bnrnn

    for task, spec in TASKS.items():
        if spec.models != READER_MODELS:  # the sequence tasks
            assert "lnlstm" in spec.models, task
    cfg = make_config("ptb-char", "lnlstm", "quick")
    assert cfg.norm == "layer" and cfg.gamma_init == 1.0
    assert make_config("pmnist", "lnlstm", "quick", gamma_init=0.5).gamma_init == 0.5
    assert make_config("pmnist", "bnlstm", "quick").gamma_init == 0.1
    # Cooijmans' initial-state noise (§5.1): LN of a zero hidden state needs it as well
    assert make_config("pmnist", "lnlstm", "quick").init_noise == 0.1
    task = TASKS["pmnist"].load_class()(make_config("pmnist", "lnlstm", "quick", dry_run=True))
    rnn = task.build_model().rnn
    assert isinstance(rnn, bnrnn.BNLSTM) and rnn.norm == "layer"
    assert all(bool((m.weight == 1).all()) for m in rnn.norm_modules())
