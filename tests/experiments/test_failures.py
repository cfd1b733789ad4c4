"""What the ``bnrnn`` command does when things go wrong: nonsense options, a diverging run,
non-finite gradients, a resume with other options, a start that fails, damaged checkpoints,
damaged data, folders that cannot be written. Every case ends with one line on stderr
naming the option or file, a non-zero exit status, and a run directory that is either
untouched or holds only what is true.
"""

from __future__ import annotations

import builtins
import errno
import json
import math
import os
import shutil
import tempfile
from pathlib import Path

import pytest
import torch
from harness_helpers import REAL_DATA, needs

import bnrnn_experiments.cli as cli
from bnrnn_experiments import checkpoint, tasks
from bnrnn_experiments import rundir as rd
from bnrnn_experiments.checkpoint import load_checkpoint, save_checkpoint
from bnrnn_experiments.cli import main

pytestmark = pytest.mark.usefixtures("one_thread")

DRY = ["--dry-run", "--quiet", "--data-dir", str(REAL_DATA)]


def char_run(run: Path, *extra: str, model: str = "lstm") -> list[str]:
    return ["train", "ptb-char", "--model", model, "--run-dir", str(run), *DRY, *extra]


def one_line_error(capsys: pytest.CaptureFixture[str], *words: str) -> str:
    """The captured stderr, checked to be one line without a traceback naming ``words``."""
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err and "\n" not in err, err
    for word in words:
        assert word in err, (word, err)
    return err


def snapshot(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


@pytest.fixture
def fail_writes(monkeypatch: pytest.MonkeyPatch):
    """``fail_writes(folder, code, prefix="")``: creating, writing or deleting files under
    ``folder`` (whose names start with ``prefix``) raises OSError ``code``, as a read-only
    folder (EACCES) or a full disk (ENOSPC) would."""

    def install(folder: Path, code: int, prefix: str = "") -> None:
        folder = folder.absolute()

        def refused(path: object, name: str | None = None) -> bool:
            p = Path(os.fspath(path)).absolute()  # type: ignore[arg-type]
            inside = p == folder or folder in p.parents
            return inside and (name if name is not None else p.name).startswith(prefix)

        def error(path: object) -> OSError:
            return OSError(code, os.strerror(code), os.fspath(path))  # type: ignore[arg-type]

        real_open, real_mkstemp = builtins.open, tempfile.mkstemp
        real_mkdir, real_unlink = os.mkdir, os.unlink

        def open_(file, mode="r", *args, **kwargs):
            if isinstance(file, (str, os.PathLike)) and set(mode) & set("wax+") and refused(file):
                raise error(file)
            return real_open(file, mode, *args, **kwargs)

        def mkstemp(suffix=None, prefix=None, dir=None, text=False):
            if dir is not None and refused(dir, (prefix or "").removeprefix(".tmp-")):
                raise error(Path(dir) / (prefix or "tmp"))
            return real_mkstemp(suffix, prefix, dir, text)

        def mkdir(path, *args, **kwargs):
            if not os.path.exists(path) and refused(Path(os.fspath(path)).parent, ""):
                raise error(path)
            return real_mkdir(path, *args, **kwargs)

        def unlink(path, *args, **kwargs):  # a full disk still deletes
            if code != errno.ENOSPC and refused(path):
                raise error(path)
            return real_unlink(path, *args, **kwargs)

        monkeypatch.setattr(builtins, "open", open_)
        monkeypatch.setattr(tempfile, "mkstemp", mkstemp)
        monkeypatch.setattr(os, "mkdir", mkdir)
        monkeypatch.setattr(os, "unlink", unlink)

    return install


# ------------------------------------------------------------------ non-finite numbers


@pytest.mark.parametrize(
    "option, value, word",
    [("--lr", "inf", "lr"), ("--lr", "nan", "lr"), ("--eps", "-1", "eps"), ("--eps", "0", "eps"),
     ("--clip", "-1", "clip"), ("--optim-momentum", "1.5", "optim_momentum"),
     ("--momentum", "-0.1", "momentum"), ("--gamma-init", "nan", "gamma_init"),
     ("--lr-decay", "2", "lr_decay"), ("--max-skipped-steps", "0", "max_skipped_steps")],
)  # fmt: skip
def test_nonsense_values_are_refused(option, value, word, tmp_path: Path, capsys) -> None:
    run = tmp_path / "run"
    assert main(char_run(run, option, value)) == 2
    one_line_error(capsys, word, value)
    assert not run.exists()


@needs("ptb-char")
def test_diverging_run_stops_and_keeps_the_last_good_checkpoint(tmp_path: Path, capsys) -> None:
    # Adam at lr 1e37: step 1 leaves finite (huge) weights, step 2's loss is infinite
    run = tmp_path / "run"
    args = char_run(run, "--optimizer", "adam", "--lr", "1e37", "--clip", "0",
                    "--save-interval", "1", "--max-steps", "6")  # fmt: skip
    assert main(args) == 3
    one_line_error(capsys, "step 2", "ckpt_last.pt (step 1) is kept")
    assert not (run / rd.RESULTS).exists()
    ckpt = load_checkpoint(run / rd.LAST)
    assert ckpt["step"] == 1
    assert all(torch.isfinite(t).all() for t in ckpt["model"].values() if t.is_floating_point())
    for record in rd.read_metrics(run):
        assert record["step"] <= 1 and math.isfinite(record["loss"])


class _InfiniteGradient(torch.autograd.Function):
    """The identity whose backward returns an infinite gradient (an overflow in backward)."""

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        return grad * math.inf


def _infinite_gradient_at(monkeypatch: pytest.MonkeyPatch, calls: set[int]) -> None:
    """Make the char LM's loss give an infinite gradient at the given training calls."""
    real = tasks.CharLM.train_loss
    count = [0]

    def train_loss(self, model, batch, carry):
        count[0] += 1
        loss, correct, n, carry = real(self, model, batch, carry)
        return (_InfiniteGradient.apply(loss) if count[0] in calls else loss), correct, n, carry

    monkeypatch.setattr(tasks.CharLM, "train_loss", train_loss)


@needs("ptb-char")
def test_non_finite_gradient_skips_the_step(tmp_path: Path, monkeypatch, capsys) -> None:
    # steps 2 and 3 have an infinite gradient norm: skipped, counted, logged
    _infinite_gradient_at(monkeypatch, {2, 3})
    run = tmp_path / "run"
    assert main(char_run(run, "--max-steps", "5", "--max-skipped-steps", "3")) == 0
    train = [r for r in rd.read_metrics(run) if r["kind"] == "train"]
    assert [r["skipped"] for r in train] == [0, 1, 1, 0, 0]
    assert json.loads((run / rd.RESULTS).read_text())["skipped_steps"] == 2
    assert "| skipped 1 (non-finite gradient)" in (run / rd.LOG).read_text()

    # a skipped step leaves the weights as they were (nn.LSTM: no BN statistics either)
    _infinite_gradient_at(monkeypatch, {2})
    assert main(char_run(tmp_path / "skip2", "--max-steps", "2")) == 0
    monkeypatch.setattr(tasks.CharLM, "train_loss", tasks.CharLM.train_loss)
    assert main(char_run(tmp_path / "one", "--max-steps", "1")) == 0
    a = load_checkpoint(tmp_path / "skip2" / rd.LAST)["model"]
    b = load_checkpoint(tmp_path / "one" / rd.LAST)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)

    # as many in a row as --max-skipped-steps: the run stops
    _infinite_gradient_at(monkeypatch, {2, 3})
    capsys.readouterr()
    assert main(char_run(tmp_path / "stop", "--max-steps", "5", "--max-skipped-steps", "2")) == 3
    one_line_error(capsys, "step 3", "2 steps in a row", "--max-skipped-steps")
    assert not (tmp_path / "stop" / rd.RESULTS).exists()


# --------------------------------------------------------------------------- resume


@needs("ptb-char")
def test_resume_refuses_other_architecture_before_writing(tmp_path: Path, capsys) -> None:
    run = tmp_path / "run"
    assert main(char_run(run)) == 0  # hidden size 8 (dry run)
    before = snapshot(run)
    assert main(char_run(run, "--resume", "--hidden-size", "16", "--lr", "0.01")) == 2
    one_line_error(capsys, "--hidden-size (run: 8, asked: 16)", "--lr", "--resume")
    assert snapshot(run) == before  # byte for byte
    # the options that may change do; the run goes on and evaluates
    assert main(char_run(run, "--resume", "--max-steps", "4", "--log-interval", "2")) == 0
    assert json.loads((run / rd.RESULTS).read_text())["steps"] == 4
    assert main(["evaluate", str(run)]) == 0


# ----------------------------------------------------------------- a failed start


@needs("ptb-char")
def test_failed_start_can_be_run_again(tmp_path: Path, monkeypatch, capsys) -> None:
    def offline(url, timeout):
        raise OSError("offline (test)")

    monkeypatch.setattr("bnrnn_experiments.data.download._urlopen", offline)
    run = tmp_path / "run"
    args = char_run(run)
    assert main([*args, "--data-dir", str(tmp_path / "no-data")]) == 2  # the later one wins
    assert "Could not download" in capsys.readouterr().err
    assert not run.exists()  # nothing written before training could start
    assert main(args) == 0

    # a start that fails at its first step (one sequence per batch, BN) is not a run
    run = tmp_path / "bn"
    assert main(char_run(run, "--batch-size", "1", model="bnlstm")) == 2
    capsys.readouterr()
    assert main(char_run(run, model="bnlstm")) == 0


# ------------------------------------------------------------------- checkpoints


def test_checkpoint_checksum_round_trip(tmp_path: Path) -> None:
    path = tmp_path / "ckpt.pt"
    save_checkpoint(path, {"x": torch.arange(5.0), "step": 3})
    ckpt, verified = checkpoint.read_checkpoint(path)
    assert verified and ckpt["step"] == 3
    plain = torch.load(path, weights_only=False)  # still a torch file
    assert torch.equal(plain["x"], torch.arange(5.0))


def _flip_byte(path: Path, where: float = 0.5) -> None:
    data = bytearray(path.read_bytes())
    data[int(len(data) * where)] ^= 0x01
    path.write_bytes(bytes(data))


@needs("ptb-char")
def test_damaged_checkpoints_are_refused(tmp_path: Path, capsys) -> None:
    run = tmp_path / "run"
    assert main(char_run(run, model="bnlstm")) == 0
    last, best = run / rd.LAST, run / rd.BEST
    good_last, good_best = last.read_bytes(), best.read_bytes()
    resume = char_run(run, "--resume", "--max-steps", "4", model="bnlstm")
    for damage in ("flip", "truncate", "empty"):
        if damage == "flip":  # a byte in the middle: inside a tensor or the zip records
            _flip_byte(last)
        else:
            last.write_bytes(good_last[: len(good_last) // 2] if damage == "truncate" else b"")
        before = snapshot(run)
        assert main(resume) == 2
        one_line_error(capsys, str(last), "--force")
        assert snapshot(run) == before
    last.write_bytes(good_last)

    best.write_bytes(good_best[:-200])
    assert main(["evaluate", str(run)]) == 2
    one_line_error(capsys, str(best), "--checkpoint last")
    assert main(["evaluate", str(run), "--checkpoint", "last"]) == 0
    best.write_bytes(good_best)

    # a checkpoint from before the checksums: loaded, with a note in the log
    torch.save(load_checkpoint(last), last)
    assert main(resume) == 0
    assert "ckpt_last.pt has no checksum" in (run / rd.LOG).read_text()


# ----------------------------------------------------------- errors, one line each


def _data_copy(tmp_path: Path, dataset: str) -> Path:
    """A data directory whose ``dataset`` folder links to the real files."""
    folder = tmp_path / "data" / dataset
    folder.mkdir(parents=True)
    for f in (REAL_DATA / dataset).iterdir():
        (folder / f.name).symlink_to(f)
    return tmp_path / "data"


@needs("pmnist")
def test_corrupt_mnist_file(tmp_path: Path, capsys) -> None:
    data = _data_copy(tmp_path, "mnist")
    labels = data / "mnist" / "train-labels-idx1-ubyte.gz"
    raw = bytearray((REAL_DATA / "mnist" / labels.name).read_bytes())
    raw[100] ^= 0xFF
    labels.unlink()
    labels.write_bytes(bytes(raw))
    args = ["train", "pmnist", "--dry-run", "--quiet", "--data-dir", str(data)]
    assert main([*args, "--run-dir", str(tmp_path / "a")]) == 2  # ChecksumError
    one_line_error(capsys, str(labels), "Checksum mismatch", "re-download")
    assert main([*args, "--run-dir", str(tmp_path / "b"), "--no-verify-data"]) == 2
    one_line_error(capsys, str(labels), "re-download")


@needs("ptb-char")
def test_empty_ptb_split(tmp_path: Path, capsys) -> None:
    data = _data_copy(tmp_path, "ptb")
    valid = data / "ptb" / "ptb.char.valid.txt"
    valid.unlink()
    valid.write_text("")
    args = ["train", "ptb-char", "--dry-run", "--quiet", "--no-verify-data", "--data-dir",
            str(data), "--run-dir", str(tmp_path / "run")]  # fmt: skip
    assert main(args) == 2
    one_line_error(capsys, str(valid), "no text")


@needs("ptb-char")
def test_malformed_config_json(tmp_path: Path, capsys) -> None:
    run = tmp_path / "run"
    assert main(char_run(run)) == 0
    (run / rd.CONFIG).write_text('{"task": "ptb-char",')
    for argv in (["evaluate", str(run)], char_run(run, "--resume"), ["compare", str(run)]):
        assert main(argv) == 2, argv
        one_line_error(capsys, str(run / rd.CONFIG))


@needs("ptb-char")
def test_unwritable_folders(tmp_path: Path, fail_writes, capsys) -> None:
    done = tmp_path / "done"
    assert main(char_run(done)) == 0
    capsys.readouterr()
    shutil.copytree(done, tmp_path / "ro" / "done")
    fail_writes(tmp_path / "ro", errno.EACCES)  # a read-only folder (tests may run as root)
    assert main(char_run(tmp_path / "ro" / "run")) == 2
    one_line_error(capsys, str(tmp_path / "ro" / "run"), "Permission denied")
    assert main(["compare", str(done), "--out", str(tmp_path / "ro" / "c.png")]) == 2
    one_line_error(capsys, str(tmp_path / "ro" / "c.png"), "Permission denied")

    assert main(char_run(tmp_path / "ro" / "done", "--force")) == 2
    one_line_error(capsys, str(tmp_path / "ro" / "done"), "Permission denied")
    assert main(["evaluate", str(tmp_path / "ro" / "done")]) == 2
    out = capsys.readouterr()
    assert "test" in out.out  # the scores were printed, then eval.json could not be written
    assert rd.EVAL in out.err and out.err.count("\n") == 1 and "Traceback" not in out.err


@needs("ptb-char")
def test_disk_full(tmp_path: Path, fail_writes, capsys) -> None:
    fail_writes(tmp_path / "full", errno.ENOSPC, prefix="ckpt_")  # first write: step 2
    run = tmp_path / "full" / "run"
    assert main(char_run(run)) == 2
    one_line_error(capsys, str(run / rd.BEST), "no space left", "--resume")
    png = tmp_path / "curves.png"
    png.symlink_to("/dev/full")  # writes fail with a real ENOSPC, which names no file
    assert main(["compare", str(run), "--out", str(png)]) == 2
    one_line_error(capsys, str(png), "no space left")


def test_debug_shows_the_traceback(tmp_path: Path, monkeypatch, capsys) -> None:
    args = ["evaluate", str(tmp_path / "nowhere")]
    assert main(args) == 2
    one_line_error(capsys, str(tmp_path / "nowhere"))
    for argv, env in ((["--debug", *args], "0"), ([*args, "--debug"], "0"), (args, "1")):
        monkeypatch.setenv("BNRNN_DEBUG", env)
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert "Traceback" in err and err.strip().endswith("is not a bnrnn run directory")

    # an unexpected error (a bug) is one line too, and says how to see the traceback
    def bug(args):
        raise TypeError("a bug")

    monkeypatch.setenv("BNRNN_DEBUG", "0")
    monkeypatch.setattr(cli, "cmd_compare", bug)
    assert main(["compare", "x"]) == 1
    one_line_error(capsys, "TypeError: a bug", "--debug")
