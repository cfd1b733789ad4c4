"""Tests of the figure commands (``bnrnn figure ...``, `bnrnn_experiments.figures`).

Every command runs on tiny inputs (a fake MNIST folder, a fake text8, a tiny trained
BN-LSTM) and must write its PNG, CSV and JSON. The numbers are checked against independent
computations: the gradient-flow norms against a hand-written BN tanh RNN differentiated
by restarting autograd at every hidden state (and a plain RNN against backpropagation
through time written out by hand), the tanh statistics against closed forms and large
samples, the population statistics against the buffers they were read from, and the
length-generalisation scores against the harness's own evaluation.
"""

from __future__ import annotations

import argparse
import csv
import gzip
import json
import math
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import bnrnn
from bnrnn_experiments.figures import add_figure_parser, main_figure, run_figure
from bnrnn_experiments.figures import gradient_flow as gf
from bnrnn_experiments.figures import length_generalization as lg
from bnrnn_experiments.figures import population_stats as ps
from bnrnn_experiments.figures import tanh_derivative as td

# ---------------------------------------------------------------------------- helpers


def read_csv(path: Path) -> tuple[list[str], list[list[str]]]:
    with open(path, newline="", encoding="utf-8") as f:
        rows = list(csv.reader(f))
    return rows[0], rows[1:]


def assert_outputs(out: Path, name: str, csv_expected: bool = True) -> dict:
    png, csv_path, js = out / f"{name}.png", out / f"{name}.csv", out / f"{name}.json"
    assert png.is_file() and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert png.stat().st_size < 300_000
    assert csv_path.is_file() == csv_expected
    meta = json.loads(js.read_text())
    assert meta["figure"] == name and meta["settings"] and "summary" in meta
    assert meta["caption"].startswith("settings: ")
    return meta


def _idx(path: Path, array: np.ndarray) -> None:
    header = struct.pack(">HBB", 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


@pytest.fixture(scope="module")
def fake_mnist(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A data directory with 8 random 28x28 'MNIST' images per split."""
    root = tmp_path_factory.mktemp("mnistdata")
    (root / "mnist").mkdir()
    rng = np.random.default_rng(0)
    for prefix in ("train", "t10k"):
        _idx(root / "mnist" / f"{prefix}-images-idx3-ubyte.gz", rng.integers(0, 256, (8, 28, 28)))
        _idx(root / "mnist" / f"{prefix}-labels-idx1-ubyte.gz", rng.integers(0, 10, (8,)))
    return root


# ----------------------------------------------------------------- gradient flow (Fig. 1a)


def manual_bn(z: Tensor, gamma: Tensor, eps: float) -> Tensor:
    """gamma * (z - mean) / sqrt(var + eps), batch mean and biased variance, written out."""
    n = z.shape[0]
    mean = z.sum(0) / n
    var = ((z - mean) ** 2).sum(0) / n
    return gamma * (z - mean) / torch.sqrt(var + eps)


def manual_step(cell: bnrnn.BNRNNCell, x: Tensor, h: Tensor) -> Tensor:
    """h' = tanh(BN(W_hh h) + BN(W_ih x) + b) (Cooijmans §4), independent of bnrnn's code."""
    b = cell.bias_ih + cell.bias_hh
    wh = h @ cell.weight_hh.T
    wx = x @ cell.weight_ih.T
    return torch.tanh(
        manual_bn(wh, cell.bn_hh.weight, cell.bn_hh.eps)
        + manual_bn(wx, cell.bn_ih.weight, cell.bn_ih.eps)
        + b
    )


def grads_by_restart(cell, head, x: Tensor, y: Tensor, h0: Tensor) -> list[Tensor]:
    """dL/dh_t for t = 1..T: run to h_t, make it a fresh leaf, run to the end, differentiate.
    O(T^2) but needs nothing but autograd on a leaf."""
    T = x.shape[0]
    with torch.no_grad():
        prefix = [h0]
        for t in range(T):
            prefix.append(manual_step(cell, x[t], prefix[-1]))
    grads = []
    for t in range(1, T + 1):
        leaf = prefix[t].clone().requires_grad_(True)
        h = leaf
        for s in range(t, T):
            h = manual_step(cell, x[s], h)
        loss = F.cross_entropy(head(h), y)
        (g,) = torch.autograd.grad(loss, leaf)
        grads.append(g)
    return grads


def test_gradient_flow_plain_rnn_matches_hand_written_bptt() -> None:
    """norm=None: the tanh RNN's gradients by backpropagation through time, by hand."""
    torch.manual_seed(0)
    T, N, H = 7, 5, 3
    cell = bnrnn.BNRNNCell(2, H, norm=None, dtype=torch.float64)
    head = nn.Linear(H, 4, dtype=torch.float64)
    x = torch.randn(T, N, 2, dtype=torch.float64)
    y = torch.randint(0, 4, (N,))
    h0 = torch.randn(N, H, dtype=torch.float64)
    flow = gf.hidden_state_grads(cell, head, x, y, h0)

    with torch.no_grad():
        W_ih, W_hh, b = cell.weight_ih, cell.weight_hh, cell.bias_ih + cell.bias_hh
        hs = [h0]
        for t in range(T):
            hs.append(torch.tanh(x[t] @ W_ih.T + hs[-1] @ W_hh.T + b))
        # dL/dh_T = (softmax - onehot) W_out / N; dL/dh_{t-1} = ((dL/dh_t) * (1 - h_t^2)) W_hh
        p = torch.softmax(head(hs[-1]), -1)
        delta = (p - F.one_hot(y, 4).double()) @ head.weight / N
        expected = [delta]
        for t in range(T, 1, -1):
            delta = (delta * (1 - hs[t] ** 2)) @ W_hh
            expected.append(delta)
        expected = torch.stack(expected[::-1])  # (T, N, H), t = 1..T
    torch.testing.assert_close(flow.grads, expected, rtol=1e-10, atol=1e-14)
    torch.testing.assert_close(flow.norms, expected.flatten(1).norm(dim=1))


@pytest.mark.parametrize("gamma", [0.1, 1.0])
def test_gradient_flow_bn_rnn_matches_restarted_autograd(gamma: float) -> None:
    torch.manual_seed(1)
    T, N, H = 9, 6, 4
    cell = bnrnn.BNRNNCell(
        1, H, max_length=T, gamma_init=gamma, weight_init="identity", dtype=torch.float64
    )
    head = nn.Linear(H, 10, dtype=torch.float64)
    x = torch.rand(T, N, 1, dtype=torch.float64)
    y = torch.randint(0, 10, (N,))
    h0 = 0.1 * torch.randn(N, H, dtype=torch.float64)
    flow = gf.hidden_state_grads(cell, head, x, y, h0)
    expected = torch.stack(grads_by_restart(cell, head, x, y, h0))
    torch.testing.assert_close(flow.grads, expected, rtol=1e-9, atol=1e-15)


def test_gradient_flow_command_reports_the_hand_computed_norms(
    fake_mnist: Path, tmp_path: Path
) -> None:
    """The CSV the command writes equals the norms of the hand-written BN RNN's gradients,
    rebuilt with the same weights, batch and initial noise."""
    out = tmp_path / "figs"
    gammas, H, N, T, seed = (0.5, 1.0), 3, 4, 12, 3
    argv = [
        "gradient-flow",
        "--data-dir",
        str(fake_mnist),
        "--no-verify-data",
        "--gammas",
        "0.5,1",
        "--hidden-size",
        str(H),
        "--batch-size",
        str(N),
        "--seq-len",
        str(T),
        "--seed",
        str(seed),
        "--out",
        str(out),
    ]
    assert main_figure(argv) == 0
    meta = assert_outputs(out, "gradient_flow")
    assert meta["settings"]["pixels"] == T and meta["command"].startswith("bnrnn figure")
    header, rows = read_csv(out / "gradient_flow.csv")
    assert header == ["t", "gamma=0.5@step0", "gamma=1@step0"]
    assert [int(r[0]) for r in rows] == list(range(1, T + 1))

    from bnrnn_experiments.data import load_mnist

    images, labels = load_mnist(fake_mnist, "train", verify=False)
    g = torch.Generator().manual_seed(seed)  # the command's draws: batch, then h0 noise
    pick = torch.randperm(images.shape[0], generator=g)[:N]
    x = (images[pick].reshape(N, -1).float() / 255.0).double().t()[:T].unsqueeze(-1)
    h0 = (0.1 * torch.randn(N, H, generator=g)).double()
    for k, gamma in enumerate(gammas):
        torch.manual_seed(seed)
        cell, head = gf.make_model(gamma, H, T, "identity", "cooijmans", torch.float64)
        grads = grads_by_restart(cell, head, x, labels[pick], h0)
        expected = [float(gr.norm()) for gr in grads]
        reported = [float(r[1 + k]) for r in rows]
        np.testing.assert_allclose(reported, expected, rtol=1e-9)
    s = meta["summary"]["gamma=1@step0"]
    assert s["norm_at_T"] == pytest.approx(float(rows[-1][2]))


def test_gradient_flow_training_steps_and_errors(fake_mnist: Path, tmp_path: Path) -> None:
    images = torch.randint(0, 256, (10, 28, 28), dtype=torch.uint8)
    labels = torch.randint(0, 10, (10,))
    res = gf.compute(
        images,
        labels,
        [0.1],
        hidden_size=3,
        batch_size=4,
        seq_len=6,
        train_steps_n=2,
        log=lambda s: None,
    )
    assert set(res["curves"]) == {(0.1, 0), (0.1, 2)}
    assert res["summary"]["gamma=0.1@step2"]["train_loss_last"] > 0
    with pytest.raises(ValueError, match="seq_len"):
        gf.compute(images, labels, [0.1], seq_len=1000)
    with pytest.raises(ValueError, match="batch_size"):
        gf.compute(images, labels, [0.1], batch_size=1)
    assert main_figure(["gradient-flow", "--gammas", "a,b", "--out", str(tmp_path)]) == 2


# ---------------------------------------------------------------- tanh derivative (Fig. 1b)


def test_tanh_quartiles_closed_form_vs_large_sample() -> None:
    z = torch.randn(2_000_000, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    for std in (0.3, 1.0, 2.5):
        d = 1 - torch.tanh(std * z) ** 2
        for q in (0.25, 0.5, 0.75):
            exact = float(td.exact_quantile(np.array([std]), q)[0])
            assert float(torch.quantile(d[:1_000_000], q)) == pytest.approx(exact, abs=2e-3)
        # mean: quadrature vs sample, within 5 standard errors
        se = float(d.std()) / math.sqrt(d.numel())
        assert abs(float(d.mean()) - float(td.exact_mean(np.array([std]))[0])) < 5 * se


def test_tanh_exact_mean_series_and_limits() -> None:
    # E[sech^2(sZ)] = 1 - s^2 + 2 s^4 - 17/3 s^6 + O(s^8) (E[Z^2k] = 1, 3, 15)
    s = 0.05
    series = 1 - s**2 + 2 * s**4 - 17 / 3 * s**6
    assert float(td.exact_mean(np.array([s]))[0]) == pytest.approx(series, abs=1e-9)
    assert float(td.exact_mean(np.array([0.0]))[0]) == pytest.approx(1.0, abs=1e-12)
    for q in (0.25, 0.75):
        assert float(td.exact_quantile(np.array([0.0]), q)[0]) == 1.0
    # large std: E[sech^2(sZ)] -> (integral of sech^2 = 2) * pdf(0) / s
    big = 200.0
    limit = 2 / math.sqrt(2 * math.pi) / big
    assert float(td.exact_mean(np.array([big]), points=400_001)[0]) == pytest.approx(
        limit, rel=1e-3
    )


def test_tanh_derivative_command(tmp_path: Path) -> None:
    argv = ["tanh-derivative", "--points", "11", "--samples", "20000", "--out", str(tmp_path)]
    assert main_figure(argv) == 0
    meta = assert_outputs(tmp_path, "tanh_derivative")
    header, rows = read_csv(tmp_path / "tanh_derivative.csv")
    col = {h: i for i, h in enumerate(header)}
    assert len(rows) == 11 and float(rows[-1][col["std"]]) == 1.0
    for r in rows:
        assert float(r[col["q25"]]) <= float(r[col["median"]]) <= float(r[col["q75"]]) <= 1.0
        assert float(r[col["mean"]]) == pytest.approx(float(r[col["exact_mean"]]), abs=5e-3)
        assert float(r[col["q25"]]) == pytest.approx(float(r[col["exact_q25"]]), abs=1e-2)
    assert meta["summary"]["std=1"]["mean"] == pytest.approx(0.6057, abs=1e-3)
    assert meta["summary"]["max_abs_error_mean"] < 5e-3


# ------------------------------------------------------------- population stats (Fig. 5)


class _Wrapper(nn.Module):
    """A model wrapper like the harness's: the BN-LSTM under ``rnn.``."""

    def __init__(self) -> None:
        super().__init__()
        self.rnn = bnrnn.BNLSTM(3, 4, max_length=10, momentum=None)
        self.head = nn.Linear(4, 2)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.rnn(x)[0])


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    """A run directory holding a tiny BN-LSTM trained a few steps on random data; the
    training sequences have 8 steps, so rows 8 and 9 are never tracked."""
    torch.manual_seed(0)
    model = _Wrapper()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for _ in range(4):
        x = torch.randn(8, 6, 3)
        loss = model(x).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    run = tmp_path_factory.mktemp("runs") / "tiny-bnlstm"
    run.mkdir()
    sd = model.state_dict()
    torch.save({"model": sd, "step": 4}, run / "ckpt_best.pt")
    (run / "config.json").write_text(json.dumps({"task": "ptb-char", "model": "bnlstm"}))
    return run, sd


def test_find_stats_by_suffix(tiny_run: tuple[Path, dict]) -> None:
    run, sd = tiny_run
    loaded = ps.load_state_dict(run)
    hh = ps.find_stats(loaded, "hh")
    assert hh is not None and hh["mean"].shape == (10, 16)
    torch.testing.assert_close(hh["var"], sd["rnn.bn_hh_l0.running_var"])
    assert ps.find_stats(loaded, "pre") is None and ps.find_stats(loaded, "hh", layer=1) is None
    assert ps.used_rows(hh["tracked"]) == 8
    # no confusion with the reverse direction or another layer
    fake = {
        "x.bn_hh_l0_reverse.running_mean": torch.ones(3, 2),
        "x.bn_hh_l0_reverse.running_var": torch.ones(3, 2),
    }
    assert ps.find_stats(fake, "hh") is None
    # a bare state dict file works too
    torch.save(sd, run.parent / "bare.pt")
    assert ps.find_stats(ps.load_state_dict(run.parent / "bare.pt"), "c") is not None


def test_convergence_of_a_known_transient() -> None:
    T, F_ = 60, 50
    rng = np.random.default_rng(0)
    stationary = rng.normal(size=F_)
    t = np.arange(T)[:, None]
    values = stationary[None] + 3.0 * np.exp(-t / 4.0) * np.ones((1, F_))
    conv = ps.convergence(values, tolerance=0.25)
    spread = stationary.std()
    # |transient| / spread < 0.25  <=>  3 exp(-t/4) < 0.25 spread
    expected = int(np.ceil(-4.0 * np.log(0.25 * spread / 3.0)))
    assert abs(conv["settle_step"] - expected) <= 1
    assert conv["deviation"][0] == pytest.approx(3.0 / spread, rel=0.05)


def test_population_stats_command(tiny_run: tuple[Path, dict], tmp_path: Path) -> None:
    run, sd = tiny_run
    argv = ["population-stats", str(run), "--units", "3", "--out", str(tmp_path)]
    assert main_figure(argv) == 0
    meta = assert_outputs(tmp_path, "population_stats")
    header, rows = read_csv(tmp_path / "population_stats.csv")
    assert len(rows) == 8  # the tracked rows only
    units = meta["summary"]["hh.units_drawn"]
    assert len(units) == 3 and meta["summary"]["c.rows"] == 8
    for u in units:
        col = header.index(f"hh.mean[{u}]")
        reported = [float(r[col]) for r in rows]
        np.testing.assert_allclose(
            reported, sd["rnn.bn_hh_l0.running_mean"][:8, u].numpy(), rtol=1e-6
        )
    assert "c.var.deviation" in header and meta["settings"]["model"] == "bnlstm"
    assert main_figure(["population-stats", str(tmp_path / "nowhere"), "--out", str(tmp_path)]) == 2


# ---------------------------------------------------------- the harness's runs (Fig. 3b, 6)


@pytest.fixture(scope="module")
def text8_runs(fake_text8_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Dry runs of a BN-LSTM and an LSTM character model on the fake text8."""
    from bnrnn_experiments.config import make_config
    from bnrnn_experiments.train import train

    runs = tmp_path_factory.mktemp("runs")
    out = {}
    for model in ("bnlstm", "lstm"):
        cfg = make_config(
            "text8",
            model,
            "quick",
            dry_run=True,
            data_dir=str(fake_text8_dir),
            verify_data=False,
            seq_len=10,
        )
        train(cfg, runs / model, quiet=True)
        out[model] = runs / model
    return out


def test_length_generalization_matches_the_harness_evaluation(
    text8_runs: dict[str, Path], fake_text8_dir: Path
) -> None:
    from bnrnn_experiments.evaluate import load_run_model

    cfg, task, model, _ = load_run_model(
        text8_runs["bnlstm"], "best", {"data_dir": str(fake_text8_dir)}
    )
    for L in (10, 25):
        ours, chars = lg.bpc_at_length(model, task.splits["valid"], L, cfg.eval_batch_size)
        theirs = task.evaluate(model, "valid", L)
        assert chars == theirs["count"]
        assert ours == pytest.approx(theirs["bpc"], rel=1e-6)
    # batch statistics differ from population ones, and leave the buffers untouched
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with lg.batch_statistics(model):
        batch_bpc, _ = lg.bpc_at_length(model, task.splits["valid"], 25, 16)
    pop_bpc, _ = lg.bpc_at_length(model, task.splits["valid"], 25, 16)
    assert batch_bpc != pytest.approx(pop_bpc, rel=1e-9)
    for k, v in model.state_dict().items():
        torch.testing.assert_close(v, before[k], rtol=0, atol=0)
    assert not any(m.collecting for m in model.modules() if isinstance(m, bnrnn.StepBatchNorm))


def test_length_generalization_command(
    text8_runs: dict[str, Path], fake_text8_dir: Path, tmp_path: Path
) -> None:
    argv = [
        "length-generalization",
        str(text8_runs["bnlstm"]),
        str(text8_runs["lstm"]),
        "--lengths",
        "10,20,40",
        "--max-chars",
        "400",
        "--batch-stats",
        "--data-dir",
        str(fake_text8_dir),
        "--out",
        str(tmp_path),
    ]
    assert main_figure(argv) == 0
    meta = assert_outputs(tmp_path, "length_generalization")
    header, rows = read_csv(tmp_path / "length_generalization.csv")
    by = {(Path(r[0]).name, r[2], int(r[3])): float(r[4]) for r in rows}
    # population + batch statistics for the BN model, population only for the LSTM
    assert len(rows) == 3 * 2 + 3
    assert all(math.isfinite(v) and v > 0 for v in by.values())
    assert ("lstm", "batch", 10) not in by and ("bnlstm", "batch", 40) in by
    assert all(int(r[5]) <= 400 for r in rows)
    runs = meta["summary"]["runs"]
    assert {v["model"] for v in runs.values()} == {"bnlstm", "lstm"}
    assert all(v["train_length"] == 10 for v in runs.values())


def test_gamma_sensitivity_launches_and_reuses_runs(fake_text8_dir: Path, tmp_path: Path) -> None:
    runs_dir, out = tmp_path / "runs", tmp_path / "figs"
    argv = [
        "gamma-sensitivity",
        "--task",
        "text8",
        "--gammas",
        "0.1,1",
        "--dry-run",
        "--set",
        "seq_len=10",
        "--set",
        "verify-data=false",
        "--data-dir",
        str(fake_text8_dir),
        "--runs-dir",
        str(runs_dir),
        "--out",
        str(out),
    ]
    assert main_figure(argv) == 0
    meta = assert_outputs(out, "gamma_sensitivity")
    dirs = sorted((runs_dir / "gamma-sensitivity").iterdir())
    assert [d.name for d in dirs] == [
        "text8-quick-bnlstm-gamma0.1-dry-run",
        "text8-quick-bnlstm-gamma1-dry-run",
    ]
    assert [json.loads((d / "config.json").read_text())["gamma_init"] for d in dirs] == [0.1, 1.0]
    assert meta["settings"]["gammas"] == [0.1, 1.0] and meta["summary"]["launched"]
    header, rows = read_csv(out / "gamma_sensitivity.csv")
    kinds = {r[2] for r in rows}
    assert kinds == {"train_loss", "valid_bpc"}

    # given run directories: nothing is trained, the same curves come out
    stamp = [(d / "metrics.jsonl").stat().st_mtime_ns for d in dirs]
    argv2 = ["gamma-sensitivity", "--runs", *map(str, dirs), "--out", str(out), "--name", "g2"]
    assert main_figure(argv2) == 0
    assert [(d / "metrics.jsonl").stat().st_mtime_ns for d in dirs] == stamp
    assert read_csv(out / "g2.csv")[1] == rows


def test_gamma_sensitivity_rejects_mixed_tasks(
    text8_runs: dict[str, Path], tiny_run: tuple[Path, dict], tmp_path: Path
) -> None:
    with pytest.raises(ValueError, match="--set expects"):
        from bnrnn_experiments.figures.gamma_sensitivity import parse_sets

        parse_sets(["hidden_size"])
    bad = tmp_path / "other"
    bad.mkdir()
    (bad / "config.json").write_text(json.dumps({"task": "pmnist", "gamma_init": 0.5}))
    (bad / "metrics.jsonl").write_text(json.dumps({"kind": "valid", "step": 1, "acc": 10}) + "\n")
    argv = [
        "gamma-sensitivity",
        "--runs",
        str(text8_runs["bnlstm"]),
        str(bad),
        "--out",
        str(tmp_path),
    ]
    assert main_figure(argv) == 2


# --------------------------------------------------------------------------- the CLI


def test_add_figure_parser_mounts_on_a_parent_parser(tmp_path: Path) -> None:
    parser = argparse.ArgumentParser(prog="bnrnn")
    sub = parser.add_subparsers(dest="command", required=True)
    add_figure_parser(sub)
    argv = [
        "figure",
        "tanh-derivative",
        "--points",
        "3",
        "--samples",
        "100",
        "--out",
        str(tmp_path),
        "--threads",
        "1",
    ]
    args = parser.parse_args(argv)
    assert args.command == "figure" and args.figure == "tanh-derivative"
    assert args.run_figure(args, argv) == 0
    meta = json.loads((tmp_path / "tanh_derivative.json").read_text())
    assert meta["command"].startswith("bnrnn figure tanh-derivative --points 3")
    assert run_figure is args.run_figure


def test_bnrnn_cli_has_the_figure_command(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from bnrnn_experiments.cli import main

    argv = [
        "figure",
        "tanh-derivative",
        "--points",
        "3",
        "--samples",
        "100",
        "--out",
        str(tmp_path),
    ]
    assert main(argv) == 0
    assert "tanh_derivative.png" in capsys.readouterr().out
    meta = json.loads((tmp_path / "tanh_derivative.json").read_text())
    assert meta["command"] == "bnrnn figure " + " ".join(argv[1:])
    # errors are reported like the other commands' (exit status 2)
    assert main(["figure", "population-stats", str(tmp_path / "missing")]) == 2
