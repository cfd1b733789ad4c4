"""What the two QA tasks share: the example record, entity placeholders and their per-example
shuffling, and the vocabulary.

A question-answering example (Hermann et al. 2015) is a document and a query, both token
sequences in which the named entities are replaced by placeholders ``@entity0``,
``@entity1``, ...; the query holds one ``@placeholder`` standing for the answer, which is one
of the example's candidate entities. Because the placeholder numbering carries no meaning,
it is re-drawn per example during training (Cooijmans Appendix C: "shuffle the order of the
placeholders in each text inside the minibatch"), so that the model must read the document
instead of learning entity priors.
"""

from __future__ import annotations

import random
import re
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace

from ..data import Vocabulary

__all__ = [
    "ENTITY_PREFIX",
    "PAD",
    "PLACEHOLDER",
    "UNK",
    "QAExample",
    "STOPWORDS",
    "build_qa_vocabulary",
    "entity_index",
    "entity_offset",
    "entity_token",
    "is_entity",
    "max_entity_index",
    "shuffle_entities",
]

PAD = "<pad>"
UNK = "<unk>"
PLACEHOLDER = "@placeholder"
ENTITY_PREFIX = "@entity"
_ENTITY_RE = re.compile(r"^@entity(\d+)$")

#: Function words, punctuation and the PTB specials: never cloze candidates (ptb-cloze) and
#: ignored when matching query words to sentences (the CNN 4-sentence reduction).
_STOPWORDS = """a about above after again against all also am an and any are as at be because been
    before being below between both but by can could did do does doing down during each few
    for from further had has have having he her here hers herself him himself his how i if in
    into is it its itself just last like many may me might more most much must my myself
    new no nor not now of off on once one only or other our ours ourselves out over own same
    says said say she should so some such than that the their theirs them themselves then
    there these they this those three through to too two under until up upon us very was we
    were what when where which while who whom why will with would yet you your yours
    yourself yourselves 's n't 're 've 'll 'd ' mr. mrs. ms. co. corp. inc. ltd. <unk> <eos>
    n $ & % . , ; : ! ? ` `` '' -- - ( ) @placeholder"""
STOPWORDS = frozenset(_STOPWORDS.split())


def entity_token(k: int) -> str:
    """``@entity{k}``."""
    return f"{ENTITY_PREFIX}{k}"


def is_entity(token: str) -> bool:
    return _ENTITY_RE.match(token) is not None


def entity_index(token: str) -> int:
    """k of ``@entity{k}``; ValueError for any other token."""
    m = _ENTITY_RE.match(token)
    if m is None:
        raise ValueError(f"not an entity placeholder: {token!r}")
    return int(m.group(1))


@dataclass(frozen=True)
class QAExample:
    """One question: ``document`` and ``query`` token tuples, the ``answer`` (an
    ``@entityK`` token), the ``candidates`` (``@entityK`` tokens, the answer among them),
    ``names`` (placeholder -> what it stands for, for reading examples) and ``source`` (the
    question file, or ``ptb-cloze/<split>/<index>``)."""

    document: tuple[str, ...]
    query: tuple[str, ...]
    answer: str
    candidates: tuple[str, ...]
    names: Mapping[str, str] = field(default_factory=dict, compare=False)
    source: str = ""

    def entity_indices(self) -> list[int]:
        return [entity_index(c) for c in self.candidates]


def max_entity_index(examples: Iterable[QAExample]) -> int:
    """The largest K of any ``@entityK`` in the examples (-1 if there is none)."""
    best = -1
    for ex in examples:
        for tok in (*ex.candidates, *ex.document, *ex.query):
            if tok.startswith(ENTITY_PREFIX) and is_entity(tok):
                best = max(best, entity_index(tok))
    return best


def shuffle_entities(example: QAExample, rng: random.Random, num_entities: int) -> QAExample:
    """Renumber the example's placeholders with distinct ids drawn at random from
    ``range(num_entities)`` (Cooijmans Appendix C, after Hermann et al. §3), consistently in
    document, query, answer, candidates and names."""
    present = sorted(
        {t for t in (*example.candidates, *example.document, *example.query) if is_entity(t)},
        key=entity_index,
    )
    if len(present) > num_entities:
        raise ValueError(
            f"{example.source or 'example'} has {len(present)} entities, more than "
            f"num_entities={num_entities}"
        )
    new_ids = rng.sample(range(num_entities), len(present))
    mapping = {old: entity_token(k) for old, k in zip(present, new_ids)}

    def sub(tokens: Sequence[str]) -> tuple[str, ...]:
        return tuple(mapping.get(t, t) for t in tokens)

    return replace(
        example,
        document=sub(example.document),
        query=sub(example.query),
        answer=mapping[example.answer],
        candidates=sub(example.candidates),
        names={mapping.get(k, k): v for k, v in example.names.items()},
    )


def build_qa_vocabulary(
    examples: Iterable[QAExample], num_entities: int, max_size: int = 0, min_count: int = 1
) -> Vocabulary:
    """Vocabulary of the training documents and queries.

    Ids: ``<pad>`` = 0, ``<unk>`` = 1, ``@placeholder`` = 2, then ``@entity0`` ..
    ``@entity{num_entities-1}`` (contiguous, so entity k has id ``3 + k``), then the other
    words by decreasing count (ties by word), at most ``max_size`` entries in all (0: no
    limit; Cooijmans Appendix C uses 65,829 words on CNN), each seen ``min_count`` times.
    """
    counts: Counter[str] = Counter()
    for ex in examples:
        counts.update(t for t in ex.document if not is_entity(t))
        counts.update(t for t in ex.query if not is_entity(t))
    head = [PAD, UNK, PLACEHOLDER] + [entity_token(k) for k in range(num_entities)]
    rest = sorted(
        (t for t, c in counts.items() if c >= min_count and t not in head),
        key=lambda t: (-counts[t], t),
    )
    if max_size > 0:
        if max_size < len(head):
            raise ValueError(
                f"max_size={max_size} cannot hold the {len(head)} special and entity tokens"
            )
        rest = rest[: max_size - len(head)]
    return Vocabulary(head + rest, unk=UNK)


def entity_offset(vocab: Vocabulary) -> int:
    """Vocabulary id of ``@entity0`` (entity k has id ``entity_offset + k``)."""
    return vocab.token_to_id(entity_token(0))
