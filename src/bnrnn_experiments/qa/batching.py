"""Minibatches of QA examples: padded, time-major token tensors with their lengths, the
candidate masks and the answers.

Entities are the output classes: the answer of an example is the index K of its
``@entityK`` token, and ``candidates[n, K]`` says whether entity K is a candidate of example
n, so that the softmax runs over the example's candidates only (Hermann et al. §4).
"""

from __future__ import annotations

import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, fields

import torch
from torch import Tensor

from ..data import Vocabulary
from .common import QAExample, entity_index, shuffle_entities

__all__ = ["PAD_ID", "QABatch", "iterate_batches", "make_batch"]

PAD_ID = 0  # `build_qa_vocabulary` puts <pad> first


@dataclass
class QABatch:
    """document: (T_d, N) token ids, ``PAD_ID`` beyond each length; doc_lengths: (N,);
    query: (T_q, N); query_lengths: (N,); candidates: (N, E) bool; answer: (N,) entity
    indices. Lengths are int64 on the CPU (as `pack_padded_sequence` wants them)."""

    document: Tensor
    doc_lengths: Tensor
    query: Tensor
    query_lengths: Tensor
    candidates: Tensor
    answer: Tensor

    def __len__(self) -> int:
        return self.document.shape[1]

    def to(self, device: torch.device | str) -> QABatch:
        moved = {
            f.name: getattr(self, f.name)
            if f.name.endswith("lengths")
            else getattr(self, f.name).to(device)
            for f in fields(self)
        }
        return QABatch(**moved)

    def inputs(self) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
        """The model's arguments: document, doc_lengths, query, query_lengths, candidates."""
        return self.document, self.doc_lengths, self.query, self.query_lengths, self.candidates


def _pad(seqs: Sequence[Tensor]) -> tuple[Tensor, Tensor]:
    lengths = torch.tensor([len(s) for s in seqs], dtype=torch.long)
    if int(lengths.min()) < 1:
        raise ValueError("every document and query must hold at least one token")
    out = torch.full((int(lengths.max()), len(seqs)), PAD_ID, dtype=torch.long)
    for n, s in enumerate(seqs):
        out[: len(s), n] = s
    return out, lengths


def make_batch(examples: Sequence[QAExample], vocab: Vocabulary, num_entities: int) -> QABatch:
    """Encode and pad ``examples`` (in the given order)."""
    if not examples:
        raise ValueError("a batch needs at least one example")
    document, doc_lengths = _pad([vocab.encode(ex.document) for ex in examples])
    query, query_lengths = _pad([vocab.encode(ex.query) for ex in examples])
    candidates = torch.zeros(len(examples), num_entities, dtype=torch.bool)
    answer = torch.empty(len(examples), dtype=torch.long)
    for n, ex in enumerate(examples):
        idx = ex.entity_indices()
        if max(idx) >= num_entities:
            raise ValueError(
                f"{ex.source or 'example'} uses @entity{max(idx)}, beyond num_entities="
                f"{num_entities}"
            )
        candidates[n, idx] = True
        answer[n] = entity_index(ex.answer)
        if not candidates[n, answer[n]]:
            raise ValueError(f"{ex.source or 'example'}: the answer is not among the candidates")
    return QABatch(document, doc_lengths, query, query_lengths, candidates, answer)


def iterate_batches(
    examples: Sequence[QAExample],
    vocab: Vocabulary,
    num_entities: int,
    batch_size: int,
    *,
    rng: random.Random | None = None,
    shuffle_entity_ids: bool = False,
    drop_last: bool = False,
) -> Iterator[QABatch]:
    """One pass over ``examples`` in batches of ``batch_size``.

    With ``rng``: the order is shuffled, and with ``shuffle_entity_ids`` each example's
    placeholders are renumbered afresh (Cooijmans Appendix C; for training). Without
    ``rng``: the given order, placeholders untouched (for evaluation).
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size}")
    order = list(range(len(examples)))
    if rng is not None:
        rng.shuffle(order)
    stop = len(order) - len(order) % batch_size if drop_last else len(order)
    for start in range(0, stop, batch_size):
        chunk = [examples[i] for i in order[start : start + batch_size]]
        if shuffle_entity_ids:
            if rng is None:
                raise ValueError("shuffle_entity_ids needs an rng")
            chunk = [shuffle_entities(ex, rng, num_entities) for ex in chunk]
        yield make_batch(chunk, vocab, num_entities)
