"""The question-answering tasks in the harness: cnn-qa (Hermann et al. 2015, Cooijmans §5.4)
and ptb-cloze (`bnrnn_experiments.qa.cloze`), scored by accuracy, with the Attentive Reader
variants of `bnrnn_experiments.qa.model`.

Training batches are a pure function of (seed, epoch, index), as for the other tasks: the
order of an epoch comes from a generator seeded with (seed, epoch), and the placeholder
renumbering of a batch (Cooijmans Appendix C) from one seeded with (seed, epoch, index).
The paper samples examples with replacement; here every epoch is a permutation (choice:
the harness's epochs and exact resume).
"""

from __future__ import annotations

import functools
import json
import random
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from torch import Tensor, nn

from ..config import Config
from ..tasks import ClassifierTask, load_data, split_limits, subset
from .batching import QABatch, make_batch
from .cloze import cloze_statistics, load_ptb_cloze
from .cnn import load_cnn
from .common import (
    QAExample,
    build_qa_vocabulary,
    entity_offset,
    max_entity_index,
    shuffle_entities,
)
from .model import AttentiveReader

__all__ = ["CLOZE_ENTITIES", "CLOZE_SEED", "QATask"]

#: ptb-cloze is one fixed data set: its construction seed is not the run's seed.
CLOZE_SEED = 0
#: Placeholder pool of ptb-cloze (the most candidates of a document of 4 sentences is 96).
CLOZE_ENTITIES = 100


class QATask(ClassifierTask):
    """cnn-qa and ptb-cloze: accuracy (percent) of the answer among the candidates."""

    def __init__(self, cfg: Config) -> None:
        super().__init__(cfg)
        self.name = cfg.task
        limits = split_limits(cfg)
        if cfg.task == "cnn-qa":
            splits = load_cnn(
                cfg.data_dir, limits=limits, relevant_sentences=cfg.relevant_sentences
            )
            # valid/test keep the corpus's numbering: the pool must cover it
            self.num_entities = max_entity_index(e for s in splits.values() for e in s) + 1
        elif cfg.task == "ptb-cloze":
            splits = load_ptb_cloze(
                doc_sentences=cfg.doc_sentences,
                num_entities=CLOZE_ENTITIES,
                seed=CLOZE_SEED,
                limits=limits,
                words=load_data("ptb-word", cfg),
            )
            self.num_entities = CLOZE_ENTITIES
        else:
            raise ValueError(f"QATask runs cnn-qa and ptb-cloze, not {cfg.task!r}")
        self.splits: dict[str, list[QAExample]] = {
            k: subset(v, limits[k]) for k, v in splits.items()
        }
        for k, v in self.splits.items():
            if not v:
                raise ValueError(f"the {k} split of {cfg.task} is empty")
        self.vocab = build_qa_vocabulary(
            self.splits["train"], self.num_entities, max_size=cfg.max_vocab
        )
        self.vocab_size = len(self.vocab)
        self._set_train_size(len(self.splits["train"]))

    def build_model(self) -> nn.Module:
        cfg = self.cfg
        return AttentiveReader(
            self.vocab_size,
            self.num_entities,
            cfg.model,
            input_stats=cfg.input_stats,
            embed_size=cfg.embed_size or cfg.hidden_size,
            hidden_size=cfg.hidden_size,
            max_length=cfg.bn_max_length,
            momentum=cfg.momentum,
            eps=cfg.eps,
            gamma_init=cfg.gamma_init,
            weight_init=cfg.weight_init,
            forget_bias=cfg.forget_bias,
            dropout=cfg.dropout,
            tie_entities=cfg.tie_entities,
            entity_offset=entity_offset(self.vocab),
        )

    def train_batch(self, epoch: int, index: int) -> QABatch:
        rng = random.Random(f"{self.cfg.seed}/{epoch}/{index}")
        chunk = [
            shuffle_entities(self.splits["train"][int(i)], rng, self.num_entities)
            for i in self._batch_rows(epoch, index)
        ]
        return make_batch(chunk, self.vocab, self.num_entities)

    def logits(self, model: nn.Module, batch: QABatch) -> Tensor:
        return model(*batch.inputs())  # (N, E), -inf outside the candidates

    def targets(self, batch: QABatch) -> Tensor:
        return batch.answer

    def eval_batches(self, split: str) -> Iterator[QABatch]:
        examples, B = self.splits[split], self.cfg.eval_batch_size
        for i in range(0, len(examples), B):
            yield make_batch(examples[i : i + B], self.vocab, self.num_entities)

    @functools.cached_property
    def _baselines(self) -> dict[str, dict[str, Any]]:
        return self.baselines()

    def baselines(self) -> dict[str, dict[str, Any]]:
        """Per split: statistics and the chance, most-frequent-candidate and context-match
        accuracies (percent)."""
        out = {}
        for split, examples in self.splits.items():
            s = cloze_statistics(examples)
            for key in ("chance", "most_frequent", "context_match", "answer_in_document"):
                s[key] *= 100.0
            out[split] = s
        return out

    def save_artifacts(self, run_dir: Path) -> None:
        """``baselines.json``: the trivial baselines on the run's splits, for the report."""
        (run_dir / "baselines.json").write_text(
            json.dumps(self._baselines, indent=2) + "\n", encoding="utf-8"
        )

    def describe(self) -> str:
        sizes = ", ".join(f"{k} {len(v):,}" for k, v in self.splits.items())
        b = self._baselines["valid"]
        how = (
            f"documents of {self.cfg.doc_sentences} sentences"
            if self.name == "ptb-cloze"
            else f"{self.cfg.relevant_sentences or 'all'} sentences per document"
        )
        return (
            f"{self.name}: {sizes} questions; {how} ({b['doc_len_mean']:.0f} tokens on "
            f"average); {self.vocab_size:,} tokens, {self.num_entities} entities; valid "
            f"baselines: chance {b['chance']:.1f}%, most frequent candidate "
            f"{b['most_frequent']:.1f}%"
        )
