"""Dry runs of every task with every model, on real data (text8: a small fake file), and
checks of the run directory, the configuration layers, the batches and the schedules."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from harness_helpers import REAL_DATA, needs

import bnrnn
from bnrnn_experiments import rundir as rd
from bnrnn_experiments.checkpoint import load_checkpoint, seed_everything
from bnrnn_experiments.config import MODELS, PRESETS, SEQUENCE_MODELS, TASKS, make_config
from bnrnn_experiments.data import Vocabulary
from bnrnn_experiments.models import BaselineLSTM
from bnrnn_experiments.tasks import char_vocabulary, make_task
from bnrnn_experiments.train import lr_at, total_steps, train


def dry_config(task: str, model: str, text8_dir: Path | None = None, **kw):
    if task == "text8":
        kw = {"data_dir": str(text8_dir), "verify_data": False, **kw}
    else:
        kw = {"data_dir": str(REAL_DATA), **kw}
    return make_config(task, model, "quick", dry_run=True, **kw)


SEQUENCE_TASKS = [t for t, spec in TASKS.items() if spec.models == SEQUENCE_MODELS]


@pytest.mark.parametrize("model", SEQUENCE_MODELS)
@pytest.mark.parametrize("task", [pytest.param(t, marks=needs(t)) for t in SEQUENCE_TASKS])
def test_dry_run(task: str, model: str, tmp_path: Path, fake_text8_dir: Path) -> None:
    cfg = dry_config(task, model, fake_text8_dir)
    run_dir = tmp_path / "run"
    results = train(cfg, run_dir, quiet=True, argv=["train", task, "--model", model])

    # the run directory holds everything
    for name in (rd.COMMAND, rd.CONFIG, rd.METRICS, rd.LOG, rd.LAST, rd.BEST, rd.RESULTS):
        assert (run_dir / name).is_file(), name
    assert f"bnrnn train {task} --model {model}" in (run_dir / rd.COMMAND).read_text()
    assert rd.read_config(run_dir) == cfg
    metrics = rd.read_metrics(run_dir)
    kinds = [r["kind"] for r in metrics]
    assert kinds.count("train") == cfg.max_steps and "valid" in kinds
    assert [r["step"] for r in metrics if r["kind"] == "train"] == list(range(1, cfg.max_steps + 1))

    metric = {"smnist": "acc", "pmnist": "acc", "ptb-word": "ppl"}.get(task, "bpc")
    assert results["metric"] == metric and results["steps"] == cfg.max_steps
    _check_scores(task, cfg, results["running"])
    if MODELS[model].norm in (None, "layer"):  # no population statistics
        assert results["reestimated"] is None
    else:  # BN: the report has the re-estimated population statistics too
        assert results["pop_batches"] == cfg.pop_batches
        _check_scores(task, cfg, results["reestimated"])
    assert json.loads((run_dir / rd.RESULTS).read_text())["steps"] == cfg.max_steps
    if task == "pmnist":
        perm = np.load(run_dir / "permutation.npy")
        assert sorted(perm.tolist()) == list(range(784))


def _check_scores(task: str, cfg, scores: dict) -> None:
    """Each split's score is its loss's (bits per character, perplexity) or an accuracy
    (a whole number of the images evaluated: all of the subset); the loss is per symbol or
    image: a model a few steps from its initialisation does no worse than about the
    uniform guess (log V nats)."""
    mnist = task in ("smnist", "pmnist")
    classes = 10 if mnist else make_task(cfg).vocab_size
    for split in ("valid", "test"):
        s = scores[split]
        assert 0 < s["loss"] < math.log(classes) + 0.5, (split, classes, s)
        if mnist:
            assert s["count"] == getattr(cfg, f"{split}_subset")
            correct = s["acc"] * s["count"] / 100
            assert 0 <= correct == pytest.approx(round(correct)), s
        elif task == "ptb-word":
            assert s["ppl"] == pytest.approx(math.exp(s["loss"]))
        else:
            assert s["bpc"] == pytest.approx(s["loss"] / math.log(2))


@needs("ptb-char")
@pytest.mark.parametrize("model", ["lstm", "bnlstm"])
def test_models_are_what_they_claim(model: str, tmp_path: Path) -> None:
    cfg = dry_config("ptb-char", model, gamma_init=0.3, max_length=50, momentum=0.2)
    net = make_task(cfg).build_model()
    if model == "lstm":  # the honest baseline is torch.nn.LSTM itself
        assert isinstance(net.rnn, torch.nn.LSTM) and isinstance(net.rnn, BaselineLSTM)
    else:
        assert isinstance(net.rnn, bnrnn.BNLSTM) and net.rnn.norm == "cooijmans"
        assert net.rnn.max_length == 50 and net.rnn.momentum == 0.2
        gammas = [m.weight for m in net.rnn.norm_modules()]
        assert gammas and all(torch.allclose(g, torch.full_like(g, 0.3)) for g in gammas)


def test_identity_init_of_the_baseline() -> None:
    # Cooijmans §5.1: orthogonal W_ih, identity W_hh, for the baseline as for the BN-LSTM
    lstm = BaselineLSTM(3, 5, weight_init="identity", forget_bias=1.0)
    for block in lstm.weight_hh_l0.detach().split(5):
        assert torch.equal(block, torch.eye(5))
    assert torch.all(lstm.bias_ih_l0[5:10] == 1.0) and torch.all(lstm.bias_hh_l0 == 0)


def test_baseline_learn_init_and_noise() -> None:
    torch.manual_seed(0)
    lstm = BaselineLSTM(2, 4, learn_init=True, init_noise=0.5)
    x = torch.randn(3, 6, 2)
    lstm.eval()
    a, _ = lstm(x)
    b, _ = torch.nn.LSTM.forward(lstm, x)  # h0 = c0 = 0: the learned init starts at zero
    assert torch.allclose(a, b)
    lstm.train()
    c, _ = lstm(x)
    assert not torch.allclose(a, c)  # noise on the initial state in training
    c.sum().backward()
    assert lstm.h0.grad is not None


def test_presets_resolve() -> None:
    for task, spec in TASKS.items():
        for preset in PRESETS[task]:
            for model in spec.models:
                cfg = make_config(task, model, preset)
                assert total_steps(cfg, 1000) > 0
    # paper numbers (docs/design.md, Paper presets)
    cfg = make_config("pmnist", "bnlstm", "paper")
    assert (cfg.hidden_size, cfg.optimizer, cfg.lr, cfg.optim_momentum, cfg.clip) == (
        100, "rmsprop", 1e-3, 0.9, 1.0)  # fmt: skip
    assert cfg.weight_init == "identity" and cfg.init_noise > 0
    assert make_config("pmnist", "lstm", "paper").init_noise == 0
    cfg = make_config("ptb-char", "bnlstm", "paper")
    assert (cfg.hidden_size, cfg.optimizer, cfg.lr, cfg.batch_size, cfg.seq_len) == (
        1000, "adam", 2e-3, 64, 100)  # fmt: skip
    cfg = make_config("text8", "bnlstm", "paper")
    assert (cfg.hidden_size, cfg.lr, cfg.batch_size, cfg.seq_len) == (2000, 1e-3, 128, 180)
    for preset, (h, bptt, clip, drop) in {
        "small": (200, 20, 10.0, 0.0), "medium": (650, 35, 5.0, 0.5), "large": (1500, 35, 5.0, 0.65)
    }.items():  # fmt: skip
        cfg = make_config("ptb-word", "bnlstm-input", preset)
        assert (cfg.hidden_size, cfg.seq_len, cfg.clip, cfg.dropout) == (h, bptt, clip, drop)
        assert (cfg.num_layers, cfg.optimizer, cfg.lr, cfg.batch_size) == (2, "sgd", 1.0, 32)
    # explicit options win over every preset layer
    cfg = make_config("pmnist", "bnlstm", "quick", dry_run=True, hidden_size=7, init_noise=0.0)
    assert cfg.hidden_size == 7 and cfg.init_noise == 0.0 and cfg.bn_max_length == 784


def test_bad_configs() -> None:
    with pytest.raises(ValueError, match="task"):
        make_config("mnist")
    with pytest.raises(ValueError, match="model"):
        make_config("pmnist", "gru")
    with pytest.raises(ValueError, match="preset"):
        make_config("pmnist", "lstm", "medium")
    with pytest.raises(ValueError, match="weight_init"):
        make_config("pmnist", "lstm", weight_init="xavier")
    with pytest.raises(ValueError, match="seq_len"):
        make_config("smnist", "lstm", seq_len=100)
    with pytest.raises(ValueError, match="unknown"):
        make_config("smnist", "lstm", hiden_size=3)


def test_laurent_lr_schedule() -> None:
    # Laurent §5.2 small: 15 epochs, halve the learning rate every epoch after the 6th
    cfg = make_config("ptb-word", "lstm", "small")
    lrs = [lr_at(cfg, e) for e in range(15)]
    assert lrs[:6] == [1.0] * 6 and lrs[6:9] == [0.5, 0.25, 0.125]
    cfg = make_config("ptb-word", "lstm", "large")
    assert lr_at(cfg, 14) == 1.0 and lr_at(cfg, 15) == pytest.approx(1 / 1.15)


@needs("ptb-char")
def test_char_batches_random_crop(tmp_path: Path) -> None:
    task = make_task(dry_config("ptb-char", "lstm", seq_len=10))
    text = task.splits["train"].long()
    offsets = set()
    for epoch in range(4):
        x, y = task.train_batch(epoch, 0)  # (L, B)
        assert x.shape == (10, task.cfg.batch_size)
        assert torch.equal(x[1:], y[:-1])  # targets are the inputs shifted by one
        offsets.add(task._epoch[1])
        for b in range(x.shape[1]):  # every example is a contiguous piece of the text
            start = task._epoch[1] + int(task._epoch[2][b]) * 10
            assert torch.equal(x[:, b], text[start : start + 10])
    assert len(offsets) > 1  # Cooijmans §5.2: a new random crop every epoch
    again = make_task(dry_config("ptb-char", "lstm", seq_len=10))
    assert all(torch.equal(a, b) for a, b in zip(task.train_batch(2, 1), again.train_batch(2, 1)))


@needs("ptb-word")
def test_word_batches_are_contiguous_streams() -> None:
    task = make_task(dry_config("ptb-word", "lstm"))
    x0, y0 = task.train_batch(0, 0)
    x1, _ = task.train_batch(0, 1)
    assert torch.equal(y0[-1], x1[0])  # batch i+1 continues batch i: the state is carried
    stream = task.splits["train"]
    n = len(stream) // task.cfg.batch_size
    assert torch.equal(x0[:, 1], stream[n : n + task.cfg.seq_len])


@needs("ptb-word")
def test_word_lm_follows_the_loss_summed_over_the_bptt_steps(tmp_path: Path) -> None:
    """Zaremba et al. (2014) / Laurent §5.2: SGD at lr 1 on the loss summed over the BPTT
    steps and averaged over the batch, i.e. seq_len times the logged mean loss per word."""
    cfg = dry_config("ptb-word", "lstm", max_steps=1, clip=0.0, lr=0.5, optimizer="sgd",
                     optim_momentum=0.0, init_range=0.1)  # fmt: skip
    seed_everything(cfg.seed)
    task = make_task(cfg)
    model = task.build_model()
    loss, *_ = task.train_loss(model, task.train_batch(0, 0), None)
    (cfg.seq_len * loss).backward()
    expected = {k: p.detach() - cfg.lr * p.grad for k, p in model.named_parameters()}
    train(cfg, tmp_path / "run", quiet=True)
    trained = load_checkpoint(tmp_path / "run" / rd.LAST)["model"]
    for name, value in expected.items():
        torch.testing.assert_close(trained[name], value, msg=name)


@needs("pmnist")
def test_mnist_splits_and_permutation() -> None:
    task = make_task(make_config("pmnist", "lstm", "quick", data_dir=str(REAL_DATA)))
    assert task.splits["valid"][0].shape[0] == 1000  # quick: a subset of the 5,000 held out
    full = make_task(make_config("smnist", "lstm", "paper", data_dir=str(REAL_DATA)))
    assert [full.splits[s][0].shape[0] for s in ("train", "valid", "test")] == [55000, 5000, 10000]
    other = make_task(make_config("pmnist", "lstm", "quick", seed=5, data_dir=str(REAL_DATA)))
    assert np.array_equal(task.permutation, other.permutation)  # fixed across runs and seeds


def test_existing_run_is_not_overwritten(tmp_path: Path) -> None:
    (tmp_path / rd.CONFIG).write_text("{}")
    (tmp_path / rd.METRICS).write_text('{"kind": "train", "step": 1, "loss": 1.0}\n')
    with pytest.raises(FileExistsError, match="--resume"):
        train(make_config("ptb-char", "lstm", dry_run=True), tmp_path, quiet=True)


def test_char_vocabulary_matches_vocabulary_build() -> None:
    text = "the cat sat on the mat\nzebra_ 1999!"
    assert char_vocabulary(text).itos == Vocabulary.build(text).itos
    assert char_vocabulary("naïve €").itos == Vocabulary.build("naïve €").itos  # non-Latin-1
