"""The QA tasks in the harness: presets, dry runs of every model on ptb-cloze (real PTB)
and on cnn-qa (question files written here), the CLI, resume and compare."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from harness_helpers import HAVE_PTB, REAL_DATA, Crash, crash_after

from bnrnn_experiments import rundir as rd
from bnrnn_experiments.checkpoint import load_checkpoint
from bnrnn_experiments.cli import main
from bnrnn_experiments.compare import compare
from bnrnn_experiments.config import make_config
from bnrnn_experiments.qa.batching import make_batch
from bnrnn_experiments.qa.presets import READER_MODELS
from bnrnn_experiments.tasks import make_task
from bnrnn_experiments.train import train

needs_ptb = pytest.mark.skipif(not HAVE_PTB, reason=f"PTB not found in {REAL_DATA}")


pytestmark = pytest.mark.usefixtures("one_thread")


def _question(i: int) -> str:
    people = ["@entity1", "@entity2", "@entity3"]
    answer = people[i % 3]
    return (
        f"http://example.com/{i}\n\n"
        f"@entity0 -- {people[0]} met {people[1]} in the city . {answer} gave a speech about "
        f"item{i} . {people[2]} left early . the crowd cheered . it rained .\n\n"
        f"@placeholder gave a speech about item{i}\n\n"
        f"{answer}\n\n"
        "@entity0:CNN\n@entity1:Ann\n@entity2:Bob\n@entity3:Cy\n"
    )


@pytest.fixture(scope="module")
def cnn_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("cnndata")
    for folder, n in (("training", 40), ("validation", 12), ("test", 12)):
        d = root / "cnn" / "questions" / folder
        d.mkdir(parents=True)
        for i in range(n):
            (d / f"{i:04d}.question").write_text(_question(i), encoding="utf-8")
    return root


# ------------------------------------------------------------------------------ presets


def test_paper_presets() -> None:
    for task in ("cnn-qa", "ptb-cloze"):
        for model in ("lstm", "bnlstm", "bn-everywhere"):
            cfg = make_config(task, model, "paper")
            # Cooijmans Appendix C
            assert (cfg.hidden_size, cfg.optimizer, cfg.lr, cfg.batch_size, cfg.clip) == (
                240, "adam", 8e-5, 64, 10.0
            )  # fmt: skip
        for model in ("bn-e*", "bn-e**"):
            cfg = make_config(task, model, "paper")
            assert (cfg.lr, cfg.batch_size) == (8e-4, 40)
    assert make_config("cnn-qa", "lstm", "paper").relevant_sentences == 4
    # quick: one learning rate and batch size for all five models
    quick = {(make_config("ptb-cloze", m, "quick").lr, make_config("ptb-cloze", m).batch_size)
             for m in READER_MODELS}  # fmt: skip
    assert len(quick) == 1


@pytest.mark.parametrize(
    "task, model",
    [("smnist", "bn-e*"), ("ptb-char", "bn-everywhere"), ("ptb-cloze", "bnlstm-input")],
)
def test_models_belong_to_their_tasks(task: str, model: str) -> None:
    with pytest.raises(ValueError, match=f"model of {task}"):
        make_config(task, model, "quick")


# ---------------------------------------------------------------------------- dry runs


def _check_run(run_dir: Path, cfg, results: dict) -> None:
    for name in (rd.COMMAND, rd.CONFIG, rd.METRICS, rd.LOG, rd.LAST, rd.BEST, rd.RESULTS):
        assert (run_dir / name).is_file(), name
    assert results["metric"] == "acc" and results["steps"] == cfg.max_steps
    for split in ("valid", "test"):
        assert 0.0 <= results["running"][split]["acc"] <= 100.0
        assert math.isfinite(results["running"][split]["loss"])
    if cfg.model == "lstm":
        assert results["reestimated"] is None
    else:
        assert results["pop_batches"] == cfg.pop_batches
        assert math.isfinite(results["reestimated"]["valid"]["loss"])
    baselines = json.loads((run_dir / "baselines.json").read_text())
    assert 0 < baselines["valid"]["chance"] <= 100


@needs_ptb
@pytest.mark.parametrize("model", READER_MODELS)
def test_dry_run_ptb_cloze(model: str, tmp_path: Path) -> None:
    cfg = make_config("ptb-cloze", model, "quick", dry_run=True, data_dir=str(REAL_DATA))
    results = train(cfg, tmp_path / "run", quiet=True)
    _check_run(tmp_path / "run", cfg, results)


@pytest.mark.parametrize("model", ["lstm", "bn-e*"])
def test_dry_run_cnn_qa(model: str, cnn_dir: Path, tmp_path: Path) -> None:
    cfg = make_config("cnn-qa", model, "quick", dry_run=True, data_dir=str(cnn_dir))
    task = make_task(cfg)
    assert task.num_entities == 4 and len(task.splits["train"]) == 40
    ex = task.splits["train"][0]
    assert ex.document.count(".") == 4  # the 4 most relevant of 5 sentences
    results = train(cfg, tmp_path / "run", quiet=True)
    _check_run(tmp_path / "run", cfg, results)


def test_cnn_qa_without_the_corpus_says_where_to_put_it(tmp_path: Path, capsys) -> None:
    code = main(["train", "cnn-qa", "--model", "bnlstm", "--dry-run",
                 "--data-dir", str(tmp_path), "--run-dir", str(tmp_path / "run")])  # fmt: skip
    assert code == 2
    err = capsys.readouterr().err
    assert str(tmp_path / "cnn" / "questions" / "training") in err


@needs_ptb
def test_cli_run_dir_name_and_compare(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    monkeypatch.setenv("BNRNN_DATA_DIR", str(REAL_DATA))
    runs = tmp_path / "runs"
    for model in ("bn-e*", "bn-e**"):
        args = ["train", "ptb-cloze", "--model", model, "--dry-run", "--quiet"]
        assert main([*args, "--runs-dir", str(runs)]) == 0
    dirs = sorted(p.name for p in runs.iterdir())
    assert dirs == ["ptb-cloze-quick-bn-estar-dry-run", "ptb-cloze-quick-bn-estarstar-dry-run"]
    png, table = compare(sorted(runs.iterdir()), tmp_path / "compare.png")
    assert png is not None and png.is_file() and "bn-e**" in table


@needs_ptb
def test_resume_equals_uninterrupted(tmp_path: Path) -> None:
    """Batches, placeholder renumbering and BN statistics continue exactly on resume."""
    cfg = make_config("ptb-cloze", "bn-e*", "quick", dry_run=True, data_dir=str(REAL_DATA),
                      max_steps=6, eval_interval=3, save_interval=2, train_subset=20)  # fmt: skip
    train(cfg, tmp_path / "full", quiet=True)
    with crash_after(3), pytest.raises(Crash):
        train(cfg, tmp_path / "resumed", quiet=True)
    assert max(r["step"] for r in rd.read_metrics(tmp_path / "resumed")) == 3
    train(cfg, tmp_path / "resumed", quiet=True, resume=True)
    a = load_checkpoint(tmp_path / "full" / rd.LAST)["model"]
    b = load_checkpoint(tmp_path / "resumed" / rd.LAST)["model"]
    for k in a:
        assert torch.equal(a[k], b[k]), k

    def metrics(run: str) -> list[dict]:
        timing = {"ms_per_batch", "eval_seconds"}
        rows = rd.read_metrics(tmp_path / run)
        return [{k: v for k, v in r.items() if k not in timing} for r in rows]

    assert metrics("full") == metrics("resumed")


# ------------------------------------------------------------------------- diagnostics


@needs_ptb
def test_diagnostics_see_every_normalised_term(tmp_path: Path) -> None:
    """`python -m bnrnn_experiments.qa.diagnostics` on a tiny bn-e** and lstm: every BN of
    the reader is observed, its output has the std of its gamma (the batch statistics are
    those of the rows it normalises), the fast path's gradients equal the reference's, and
    a probe leaves the model's population statistics as they were."""
    from bnrnn_experiments.qa import diagnostics

    out = tmp_path / "diag.json"
    sizes = ["hidden_size=8", "embed_size=8", "batch_size=8", "train_subset=64",
             "valid_subset=16", "pop_batches=2", f"data_dir={REAL_DATA}"]  # fmt: skip
    common = ["ptb-cloze", "--models", "lstm,bn-e**", "--out", str(out)]
    common += [a for s in sizes for a in ("--set", s)]
    args = [*common, "--steps", "2", "--at", "1", "--probe", "16", "--grad-batches", "2"]
    assert diagnostics.main(args) == 0
    report = json.loads(out.read_text())
    assert report["command"].endswith(" ".join(args))
    lstm, bn = report["lstm"], report["bn-e**"]
    assert sorted(lstm["at"]) == sorted(bn["at"]) == ["0", "1", "2"]
    assert [r["lr"] for r in bn["train"]] == [3e-3, 3e-3]
    assert lstm["at"]["0"]["norms"] == {}
    # (every reader's LSTMs are bnrnn.BNLSTM: the plain one with norm=None)
    assert lstm["fast_vs_reference_grad"] < 1e-3 and bn["fast_vs_reference_grad"] < 1e-3
    cfg = make_config("ptb-cloze", "bn-e**", "quick", dry_run=True, hidden_size=8,
                      embed_size=8, batch_size=8, data_dir=str(REAL_DATA))  # fmt: skip
    task = make_task(cfg)
    model = task.build_model()
    names = {n for n, m in model.named_modules() if type(m).__name__ == "StepBatchNorm"}
    before = {k: v.clone() for k, v in model.state_dict().items()}
    probe = make_batch(task.splits["valid"][:8], task.vocab, task.num_entities)
    start = {n: p.detach().clone() for n, p in model.named_parameters()}
    diagnostics.measure(task, model, probe, [task.train_batch(0, 0)], start)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert model.training and all(p.grad is None for p in model.parameters())
    for step in ("0", "2"):
        seen = bn["at"][step]["norms"]
        assert set(seen) == names
        for name, rec in seen.items():
            gamma = bn["at"][step]["gammas"][name]
            # hh at step 0 sees h_0 = 0 (no variance): its min std is 0, the others not
            assert rec["output"]["std"] == pytest.approx(gamma["mean"], rel=0.1), name
        a = bn["at"][step]["attention"]
        assert 0 < a["entropy_normalised"] <= 1 and 0 <= a["answer_weight"] <= 1
        assert set(bn["at"][step]["grad_norms"]) >= {"doc_encoder", "attend_m", "total"}
    assert bn["at"]["0"]["relative_change"]["doc_encoder"] == 0
    assert bn["at"]["2"]["relative_change"]["doc_encoder"] > 0
    assert "probe_eval_reestimated" in bn and "probe_eval_reestimated" not in lstm
    assert all(r["cpu_ms"] > 0 and r["wall_ms"] > 0 for r in bn["train"])
    assert 0 < bn["few_rows"]["doc_steps_below_8"] < 1
    # --time-steps: only the step times
    assert diagnostics.main([*common, "--time-steps", "1"]) == 0
    times = json.loads(out.read_text())["lstm"]
    assert set(times) == {"wall_ms", "cpu_ms"} and times["cpu_ms"] > 0


def test_diagnostic_interventions() -> None:
    """--min-rows K leaves at least K sequences at every step; --freeze and --zero act on
    the parameters their pattern names, and only on those."""
    from bnrnn_experiments.qa.batching import QABatch
    from bnrnn_experiments.qa.diagnostics import Interventions, few_rows
    from bnrnn_experiments.qa.model import AttentiveReader

    doc_len, q_len = torch.tensor([9, 4, 7, 2, 9, 3]), torch.tensor([3, 5, 1, 4, 2, 5])
    ones = torch.ones(9, 6, dtype=torch.long)
    batch = QABatch(ones, doc_len, ones[:5], q_len, ones[:6, :4].bool(), ones[0] * 0)
    cut = Interventions(min_rows=3).batch(batch, 3)
    assert cut.document.shape[0] == 7 and cut.doc_lengths.tolist() == [7, 4, 7, 2, 7, 3]
    assert cut.query.shape[0] == 4 and cut.query_lengths.tolist() == [3, 4, 1, 4, 2, 4]
    assert Interventions().batch(batch, 3) is batch
    # present per step: documents 6 6 5 4 3 3 3 2 2, queries 6 5 4 3 2
    expected = {"doc_steps_below_3": 2 / 9, "doc_steps_below_4": 5 / 9,
                "query_steps_below_3": 1 / 5, "query_steps_below_4": 2 / 5}  # fmt: skip
    assert few_rows([batch], k=3) == expected
    # the most frequent candidate (entity k has id 3 + k; padding is not counted; ties:
    # the first to occur): column 0 holds entities 2, 1, 1, 2 -> 2 (first of the tie),
    # column 1 entities 0, 3, 3 and padding 0s -> 3, column 2 only the non-candidate 1 -> 0
    document = torch.tensor([[5, 3, 4], [4, 6, 9], [4, 6, 9], [5, 3, 9]])
    doc = QABatch(document, torch.tensor([4, 3, 2]), ones[:2, :3], torch.tensor([2, 2, 2]),
                  torch.tensor([[1, 1, 1, 0], [1, 0, 0, 1], [1, 0, 1, 0]]).bool(),
                  torch.tensor([0, 0, 2]))  # fmt: skip
    assert Interventions(answer="most-frequent").relabel(doc, 3).answer.tolist() == [2, 3, 0]
    model = AttentiveReader(20, 4, "bn-e**", embed_size=6, hidden_size=5)
    Interventions(freeze=r"attend_g\.bn_.\.weight", zero=r"^output\.").apply(model)
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    assert frozen == {"attend_g.bn_a.weight", "attend_g.bn_b.weight"}
    assert (model.output.weight == 0).all() and (model.attend_g.proj_a.weight != 0).any()
