"""The CNN question-answering corpus of Hermann et al. (2015) (the DeepMind Q&A data set).

One ``.question`` file per example, in this layout (lines)::

    http://...                       the article's URL
                                     (blank)
    @entity0 ( @entity1 ) -- ...     the context (document), tokenised, one line
                                     (blank)
    ... @placeholder ...             the question (query), one line
                                     (blank)
    @entity4                         the answer
                                     (blank)
    @entity0:CNN                     one line per entity: placeholder:name
    @entity1:Atlanta

The corpus cannot be downloaded by this code (it is produced by DeepMind's scripts or
fetched as ``cnn.tgz``, about 0.5 GB); :func:`load_cnn` reads it from
``<data_dir>/cnn/questions/{training,validation,test}/`` (the layout of ``cnn.tgz``) or
``<data_dir>/cnn/{train,valid,test}/`` and raises :class:`DataUnavailableError` saying where
to put it when it is absent. A malformed file raises :class:`QuestionFileError` naming the
file and the line.

Candidates are the entities listed at the end of the file (they always include the
answer). Cooijmans Appendix C keeps only "the 4 most relevant sentences from the
description, as identified by a string matching procedure": :func:`reduce_document`.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from ..data import DataUnavailableError, resolve_data_dir
from .common import PLACEHOLDER, STOPWORDS, QAExample, entity_index, is_entity

__all__ = [
    "CNN_SOURCES",
    "CNN_SPLIT_FOLDERS",
    "QuestionFileError",
    "cnn_split_dir",
    "load_cnn",
    "load_cnn_split",
    "parse_question",
    "read_question_file",
    "reduce_document",
    "split_sentences",
]

#: split -> folder names accepted under ``<data_dir>/cnn/questions/`` or ``<data_dir>/cnn/``.
CNN_SPLIT_FOLDERS: dict[str, tuple[str, ...]] = {
    "train": ("training", "train"),
    "valid": ("validation", "valid", "dev"),
    "test": ("test",),
}
CNN_SOURCES = (
    "https://cs.nyu.edu/~kcho/DMQA/ (cnn_stories.tgz / questions: cnn.tgz)",
    "https://github.com/google-deepmind/rc-data (the scripts that generate the questions)",
)
_SENTENCE_END = frozenset({".", "!", "?"})


class QuestionFileError(ValueError):
    """A ``.question`` file does not follow the DeepMind layout."""


def parse_question(text: str, source: str = "<string>") -> QAExample:
    """Parse the text of one ``.question`` file; ``source`` names it in errors."""

    def fail(msg: str) -> QuestionFileError:
        return QuestionFileError(f"{source}: {msg}")

    lines = text.replace("\r\n", "\n").split("\n")
    while lines and not lines[-1].strip():
        lines.pop()
    if not lines:
        raise fail("the file is empty")
    if len(lines) < 9:
        raise fail(
            f"expected at least 9 lines (URL, blank, context, blank, question, blank, "
            f"answer, blank, entity lines), got {len(lines)}"
        )
    for i in (1, 3, 5, 7):
        if lines[i].strip():
            raise fail(f"line {i + 1} must be blank, got {lines[i][:60]!r}")
    for i, what in ((0, "URL"), (2, "context"), (4, "question"), (6, "answer")):
        if not lines[i].strip():
            raise fail(f"line {i + 1} (the {what}) is empty")
    document = tuple(lines[2].split())
    query = tuple(lines[4].split())
    answer = lines[6].strip()
    if query.count(PLACEHOLDER) != 1:
        raise fail(
            f"the question (line 5) must hold {PLACEHOLDER} exactly once, "
            f"found {query.count(PLACEHOLDER)}"
        )
    if not is_entity(answer):
        raise fail(f"the answer (line 7) must be an @entityN placeholder, got {answer!r}")
    names: dict[str, str] = {}
    for i, line in enumerate(lines[8:], start=9):
        key, sep, name = line.strip().partition(":")
        if not sep or not is_entity(key):
            raise fail(f"line {i} must be '@entityN:name', got {line[:60]!r}")
        if key in names:
            raise fail(f"line {i}: {key} is listed twice")
        names[key] = name
    if answer not in names:
        raise fail(f"the answer {answer} is not among the entities listed from line 9")
    candidates = tuple(sorted(names, key=entity_index))
    return QAExample(document, query, answer, candidates, names, source)


def read_question_file(path: str | os.PathLike[str]) -> QAExample:
    """Read and parse one ``.question`` file (:class:`QuestionFileError` if malformed)."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise QuestionFileError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from e
    return parse_question(text, str(path))


def split_sentences(tokens: Sequence[str]) -> list[tuple[str, ...]]:
    """Split a tokenised text after each ``.``, ``!`` or ``?`` token."""
    out: list[tuple[str, ...]] = []
    start = 0
    for i, tok in enumerate(tokens):
        if tok in _SENTENCE_END:
            out.append(tuple(tokens[start : i + 1]))
            start = i + 1
    if start < len(tokens):
        out.append(tuple(tokens[start:]))
    return out


def reduce_document(example: QAExample, num_sentences: int = 4) -> QAExample:
    """Keep the ``num_sentences`` sentences of the document most relevant to the query
    (Cooijmans Appendix C), in their original order.

    (choice) The paper names "a string matching procedure" without details. Here a
    sentence's score is the number of distinct query tokens (entities and words other than
    stop words and punctuation) it contains; ties go to the earlier sentence. Like the
    paper's heuristic this sometimes drops the answer from the document; the answer stays
    among the candidates, so such an example is just harder.
    """
    if num_sentences <= 0:
        return example
    sentences = split_sentences(example.document)
    if len(sentences) <= num_sentences:
        return example
    keys = {t for t in example.query if t.lower() not in STOPWORDS}
    scores = [len(keys.intersection(s)) for s in sentences]
    best = sorted(range(len(sentences)), key=lambda i: (-scores[i], i))[:num_sentences]
    document = tuple(tok for i in sorted(best) for tok in sentences[i])
    return QAExample(
        document, example.query, example.answer, example.candidates, example.names, example.source
    )


def _missing_message(root: Path, split: str) -> str:
    folders = CNN_SPLIT_FOLDERS[split]
    lines = [
        f"The CNN question-answering corpus ({split} split) is not in {root}.",
        "It cannot be downloaded automatically. Get cnn.tgz (the questions) from",
        *[f"  {s}" for s in CNN_SOURCES],
        f"and extract it so that the .question files are in {root / 'cnn' / 'questions'}/"
        f"{{{','.join(f[0] for f in CNN_SPLIT_FOLDERS.values())}}}/ "
        f"(here: {root / 'cnn' / 'questions' / folders[0]}),",
        "or point --data-dir (or $BNRNN_DATA_DIR) at the folder that holds cnn/.",
    ]
    return "\n".join(lines)


def cnn_split_dir(data_dir: str | os.PathLike[str] | None, split: str) -> Path:
    """The folder of a split's ``.question`` files; DataUnavailableError if absent."""
    if split not in CNN_SPLIT_FOLDERS:
        raise ValueError(f"split must be one of {tuple(CNN_SPLIT_FOLDERS)}, got {split!r}")
    root = resolve_data_dir(data_dir)
    for base in (root / "cnn" / "questions", root / "cnn"):
        for name in CNN_SPLIT_FOLDERS[split]:
            folder = base / name
            if folder.is_dir() and any(folder.glob("*.question")):
                return folder
    raise DataUnavailableError(_missing_message(root, split))


def load_cnn_split(
    data_dir: str | os.PathLike[str] | None,
    split: str,
    *,
    limit: int = 0,
    relevant_sentences: int = 0,
) -> list[QAExample]:
    """The examples of one split, files in sorted name order; ``limit`` > 0 reads only the
    first ``limit`` files; ``relevant_sentences`` > 0 applies :func:`reduce_document`."""
    folder = cnn_split_dir(data_dir, split)
    paths = sorted(folder.glob("*.question"))
    if limit > 0:
        paths = paths[:limit]
    examples = [read_question_file(p) for p in paths]
    if relevant_sentences > 0:
        examples = [reduce_document(ex, relevant_sentences) for ex in examples]
    return examples


def load_cnn(
    data_dir: str | os.PathLike[str] | None = None,
    *,
    limits: dict[str, int] | None = None,
    relevant_sentences: int = 0,
) -> dict[str, list[QAExample]]:
    """``{"train"|"valid"|"test": examples}``; ``limits`` maps a split to a file limit."""
    limits = limits or {}
    return {
        split: load_cnn_split(
            data_dir, split, limit=limits.get(split, 0), relevant_sentences=relevant_sentences
        )
        for split in CNN_SPLIT_FOLDERS
    }
