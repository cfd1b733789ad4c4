"""ptb-cloze: a CNN-style question-answering task built from the Penn Treebank word files, so
that the Attentive Reader can be trained and compared where the CNN corpus is not available.

Construction (per split, deterministic for a seed; documented with its statistics in
``docs/qa.md``):

1. The split's tokens (``load_ptb_words``) are cut into sentences at ``<eos>``.
2. For every sentence i >= k (``doc_sentences`` = k), the *document* is sentences
   i-k .. i-1, each followed by ``<eos>``, and the *query* is sentence i.
3. The *candidates* are the distinct content words of the document: words that are not
   stop words, PTB specials (``<unk>``, ``N``, ``$``) or free of letters (`is_content_word`).
4. The *answer* is a word of the query that is a candidate and occurs exactly once in the
   query (so that the answer is not visible elsewhere in the query), drawn at random
   among those positions; a query without one gives no example (counted as skipped).
   Its position becomes ``@placeholder``.
5. Every candidate is renamed ``@entityK`` in document and query, with K drawn without
   replacement from ``range(num_entities)`` afresh for each example (as the CNN corpus
   anonymises its named entities), so that the identity of the word is hidden and the
   answer has to be found by reading.

Each example's randomness comes from its own generator, seeded by (seed, split, i), so
an example does not depend on the others, nor on how many are taken.
"""

from __future__ import annotations

import os
import random
import statistics
from collections import Counter
from collections.abc import Iterable, Sequence
from typing import Any

from ..data import load_ptb_words
from .common import PLACEHOLDER, STOPWORDS, QAExample, entity_token

__all__ = [
    "CLOZE_SPLITS",
    "build_cloze_examples",
    "cloze_statistics",
    "context_match_candidate",
    "format_statistics",
    "is_content_word",
    "load_ptb_cloze",
    "most_frequent_candidate",
]

CLOZE_SPLITS = ("train", "valid", "test")
EOS = "<eos>"


def is_content_word(word: str) -> bool:
    """A possible cloze answer: has a letter, is not a stop word or PTB special."""
    return word.lower() not in STOPWORDS and any(ch.isalpha() for ch in word)


def _sentences(tokens: Iterable[str]) -> list[list[str]]:
    out: list[list[str]] = []
    current: list[str] = []
    for tok in tokens:
        if tok == EOS:
            if current:
                out.append(current)
            current = []
        else:
            current.append(tok)
    if current:
        out.append(current)
    return out


def build_cloze_examples(
    tokens: Sequence[str],
    split: str = "train",
    *,
    doc_sentences: int = 3,
    num_entities: int = 100,
    seed: int = 0,
    limit: int = 0,
) -> tuple[list[QAExample], int]:
    """Build the examples of one split from its word tokens (with ``<eos>``).

    Returns ``(examples, skipped)``: ``skipped`` counts the queries with no possible
    answer, and the documents with more than ``num_entities`` candidates. ``limit`` > 0:
    stop after that many examples (the same as the first ``limit`` of all of them).
    """
    if doc_sentences < 1:
        raise ValueError(f"doc_sentences must be a positive integer, got {doc_sentences}")
    sentences = _sentences(tokens)
    examples: list[QAExample] = []
    skipped = 0
    for i in range(doc_sentences, len(sentences)):
        if 0 < limit <= len(examples):
            break
        doc_words = [w for s in sentences[i - doc_sentences : i] for w in (*s, EOS)]
        query = sentences[i]
        words = list(dict.fromkeys(w for w in doc_words if is_content_word(w)))
        in_doc = set(words)
        counts = Counter(query)
        options = [j for j, w in enumerate(query) if w in in_doc and counts[w] == 1]
        if not options or len(words) > num_entities:
            skipped += 1
            continue
        rng = random.Random(f"ptb-cloze/{seed}/{split}/{i}")
        j = rng.choice(options)
        ids = rng.sample(range(num_entities), len(words))
        entity = {w: entity_token(k) for w, k in zip(words, ids)}
        document = tuple(entity.get(w, w) for w in doc_words)
        q = [entity.get(w, w) for w in query]
        q[j] = PLACEHOLDER
        candidates = tuple(entity[w] for w in words)  # order of first occurrence
        examples.append(
            QAExample(
                document,
                tuple(q),
                entity[query[j]],
                candidates,
                {e: w for w, e in entity.items()},
                f"ptb-cloze/{split}/{i}",
            )
        )
    return examples, skipped


def load_ptb_cloze(
    data_dir: str | os.PathLike[str] | None = None,
    *,
    doc_sentences: int = 3,
    num_entities: int = 100,
    seed: int = 0,
    verify: bool = True,
    limits: dict[str, int] | None = None,
    words: dict[str, list[str]] | None = None,
) -> dict[str, list[QAExample]]:
    """``{"train"|"valid"|"test": examples}`` of ptb-cloze from the PTB word files (or
    from ``words``, as `load_ptb_words` returns them); ``limits`` maps a split to a
    maximum number of examples."""
    if words is None:
        words = load_ptb_words(data_dir, verify=verify)
    limits = limits or {}
    return {
        split: build_cloze_examples(
            words[split],
            split,
            doc_sentences=doc_sentences,
            num_entities=num_entities,
            seed=seed,
            limit=limits.get(split, 0),
        )[0]
        for split in CLOZE_SPLITS
    }


def most_frequent_candidate(example: QAExample) -> str:
    """The candidate occurring most often in the document (ties: the first to occur)."""
    counts = Counter(example.document)
    return max(example.candidates, key=lambda c: counts[c])  # max keeps the first maximum


def context_match_candidate(example: QAExample) -> str:
    """The candidate whose occurrences in the document share the most neighbours with the
    placeholder in the query (the word just before, the word just after); ties: the more
    frequent, then the first to occur. A reading heuristic, stronger than frequency."""
    q = example.query
    j = q.index(PLACEHOLDER)
    left = q[j - 1] if j > 0 else None
    right = q[j + 1] if j + 1 < len(q) else None
    doc = example.document
    counts = Counter(doc)
    shared: Counter[str] = Counter()
    for i, tok in enumerate(doc):
        if left is not None and i > 0 and doc[i - 1] == left:
            shared[tok] += 1
        if right is not None and i + 1 < len(doc) and doc[i + 1] == right:
            shared[tok] += 1
    return max(example.candidates, key=lambda c: (shared[c], counts[c]))


def cloze_statistics(examples: Sequence[QAExample]) -> dict[str, Any]:
    """Size, lengths, candidates per question and the accuracies of three baselines.

    ``chance``: the expected accuracy of a uniform guess among the candidates (the mean of
    1/|candidates|). ``most_frequent``: answering the candidate most frequent in the
    document (`most_frequent_candidate`). ``context_match``: `context_match_candidate`.
    """
    if not examples:
        raise ValueError("no examples")
    doc = [len(ex.document) for ex in examples]
    query = [len(ex.query) for ex in examples]
    cands = [len(ex.candidates) for ex in examples]
    in_doc = sum(ex.answer in ex.document for ex in examples)
    return {
        "examples": len(examples),
        "doc_len_mean": statistics.fmean(doc),
        "doc_len_median": statistics.median(doc),
        "doc_len_max": max(doc),
        "query_len_mean": statistics.fmean(query),
        "query_len_max": max(query),
        "candidates_mean": statistics.fmean(cands),
        "candidates_min": min(cands),
        "candidates_max": max(cands),
        "answer_in_document": in_doc / len(examples),
        "chance": statistics.fmean(1.0 / c for c in cands),
        "most_frequent": sum(most_frequent_candidate(ex) == ex.answer for ex in examples)
        / len(examples),
        "context_match": sum(context_match_candidate(ex) == ex.answer for ex in examples)
        / len(examples),
    }


def format_statistics(stats: dict[str, dict[str, Any]]) -> str:
    """A Markdown table of `cloze_statistics` per split (rows: statistics, columns: splits)."""
    splits = list(stats)
    rows = [
        ("examples", "examples", "{:,d}"),
        ("document length (tokens), mean", "doc_len_mean", "{:.1f}"),
        ("document length, median", "doc_len_median", "{:g}"),
        ("document length, max", "doc_len_max", "{:d}"),
        ("query length, mean", "query_len_mean", "{:.1f}"),
        ("query length, max", "query_len_max", "{:d}"),
        ("candidates per question, mean", "candidates_mean", "{:.1f}"),
        ("candidates per question, min", "candidates_min", "{:d}"),
        ("candidates per question, max", "candidates_max", "{:d}"),
        ("chance accuracy (mean 1/candidates)", "chance", "{:.1%}"),
        ("most-frequent-candidate accuracy", "most_frequent", "{:.1%}"),
        ("context-match accuracy (neighbours of the blank)", "context_match", "{:.1%}"),
    ]
    lines = ["| statistic | " + " | ".join(splits) + " |", "|---|" + "---:|" * len(splits)]
    for label, key, fmt in rows:
        cells = [fmt.format(stats[s][key]).replace("%", "\\%") for s in splits]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines).replace("\\%", "%")


def main(argv: Sequence[str] | None = None) -> None:
    """``python -m bnrnn_experiments.qa.cloze [DATA_DIR]``: print the statistics table."""
    import argparse

    parser = argparse.ArgumentParser(description="ptb-cloze statistics (Markdown)")
    parser.add_argument("data_dir", nargs="?", default=None, help="data directory (holds ptb/)")
    parser.add_argument("--doc-sentences", type=int, default=3, help="sentences per document")
    parser.add_argument("--num-entities", type=int, default=100, help="entity placeholder pool")
    parser.add_argument("--seed", type=int, default=0, help="construction seed")
    args = parser.parse_args(argv)
    words = load_ptb_words(args.data_dir)
    stats: dict[str, dict[str, Any]] = {}
    for split in CLOZE_SPLITS:
        examples, skipped = build_cloze_examples(
            words[split],
            split,
            doc_sentences=args.doc_sentences,
            num_entities=args.num_entities,
            seed=args.seed,
        )
        stats[split] = {**cloze_statistics(examples), "skipped": skipped}
    print(format_statistics(stats))
    print()
    print(
        "skipped (no possible answer): " + ", ".join(f"{s} {stats[s]['skipped']:,d}" for s in stats)
    )


if __name__ == "__main__":
    main()
