"""Tests of the QA data: the CNN question-file reader, entity shuffling, the 4-sentence
reduction, the vocabulary, the ptb-cloze construction and the batching.

The CNN corpus is not available here: the reader is tested on question files written by
the tests. ptb-cloze is tested on a small synthetic text and on the real PTB validation
split (skipped if ``../shared/data`` is absent; override with ``BNRNN_TEST_DATA_DIR``).
"""

from __future__ import annotations

import os
import random
from collections import Counter
from pathlib import Path

import pytest
import torch

from bnrnn_experiments.data import DataUnavailableError, load_ptb_words
from bnrnn_experiments.qa.batching import PAD_ID, iterate_batches, make_batch
from bnrnn_experiments.qa.cloze import (
    build_cloze_examples,
    cloze_statistics,
    context_match_candidate,
    format_statistics,
    is_content_word,
    most_frequent_candidate,
)
from bnrnn_experiments.qa.cnn import (
    QuestionFileError,
    load_cnn,
    load_cnn_split,
    parse_question,
    read_question_file,
    reduce_document,
    split_sentences,
)
from bnrnn_experiments.qa.common import (
    PLACEHOLDER,
    QAExample,
    build_qa_vocabulary,
    entity_offset,
    is_entity,
    shuffle_entities,
)


def _real_data() -> Path:
    override = os.environ.get("BNRNN_TEST_DATA_DIR")
    if override:
        return Path(override)
    return Path(__file__).resolve().parents[2].parent / "shared" / "data"


QUESTION = """http://www.cnn.com/2015/03/01/world/example/index.html

@entity0 ( @entity1 ) -- the mayor of @entity2 met @entity3 on monday . they talked about \
the bridge . @entity3 said the bridge would open in may . the weather was fine .

@placeholder said the bridge in @entity2 would open in may

@entity3

@entity0:CNN
@entity1:Springfield
@entity2:Springfield
@entity3:Jane Doe
"""


def _write(folder: Path, name: str, text: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    path.write_text(text, encoding="utf-8")
    return path


# ------------------------------------------------------------------------ question files


def test_read_question_file(tmp_path: Path) -> None:
    path = _write(tmp_path, "a.question", QUESTION)
    ex = read_question_file(path)
    assert ex.document[:4] == ("@entity0", "(", "@entity1", ")")
    assert ex.query.count(PLACEHOLDER) == 1 and ex.query[0] == PLACEHOLDER
    assert ex.answer == "@entity3"
    assert ex.candidates == ("@entity0", "@entity1", "@entity2", "@entity3")
    assert ex.names["@entity3"] == "Jane Doe"
    assert ex.source == str(path)


def test_question_file_windows_line_ends_and_trailing_blank_lines(tmp_path: Path) -> None:
    path = _write(tmp_path, "a.question", QUESTION.replace("\n", "\r\n") + "\r\n\r\n")
    assert read_question_file(path).answer == "@entity3"


def _break(text: str, old: str, new: str) -> str:
    assert old in text
    return text.replace(old, new, 1)


MALFORMED = {
    "empty": ("", "empty"),
    "truncated": ("\n".join(QUESTION.split("\n")[:6]), "at least 9 lines"),
    "no blank after URL": (_break(QUESTION, "index.html\n\n", "index.html\nextra\n"), "line 2"),
    "no placeholder": (_break(QUESTION, "@placeholder said", "she said"), "@placeholder"),
    "answer not an entity": (_break(QUESTION, "\n@entity3\n\n", "\nJane\n\n"), "answer"),
    "answer not listed": (_break(QUESTION, "@entity3:Jane Doe\n", ""), "not among the entities"),
    "bad entity line": (_break(QUESTION, "@entity1:Springfield", "Springfield"), "line 10"),
    "entity twice": (_break(QUESTION, "@entity1:Springfield", "@entity0:Again"), "twice"),
}


@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_malformed_question_file_names_the_file(tmp_path: Path, case: str) -> None:
    text, expected = MALFORMED[case]
    path = _write(tmp_path, "broken.question", text)
    with pytest.raises(QuestionFileError) as info:
        read_question_file(path)
    message = str(info.value)
    assert str(path) in message
    assert expected in message


def test_malformed_file_in_a_split_is_reported_with_its_path(tmp_path: Path) -> None:
    folder = tmp_path / "cnn" / "questions" / "training"
    _write(folder, "a.question", QUESTION)
    bad = _write(folder, "b.question", QUESTION.replace("@placeholder", "x"))
    with pytest.raises(QuestionFileError, match=str(bad)):
        load_cnn_split(tmp_path, "train")


def test_non_utf8_file(tmp_path: Path) -> None:
    path = tmp_path / "bin.question"
    path.write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(QuestionFileError, match="not UTF-8"):
        read_question_file(path)


def test_missing_corpus_says_where_to_put_it(tmp_path: Path) -> None:
    with pytest.raises(DataUnavailableError) as info:
        load_cnn(tmp_path)
    message = str(info.value)
    assert str(tmp_path / "cnn" / "questions" / "training") in message
    assert "cannot be downloaded" in message and "--data-dir" in message


@pytest.mark.parametrize("layout", [("cnn", "questions", "training"), ("cnn", "train")])
def test_load_cnn_layouts_limit_and_order(tmp_path: Path, layout: tuple[str, ...]) -> None:
    for split_dirs in (layout, ("cnn", "questions", "validation"), ("cnn", "questions", "test")):
        for i in range(3):
            text = QUESTION.replace("monday", f"day{i}")
            _write(tmp_path.joinpath(*split_dirs), f"{i:03d}.question", text)
    data = load_cnn(tmp_path, limits={"train": 2})
    assert [len(data[s]) for s in ("train", "valid", "test")] == [2, 3, 3]
    assert [ex.document[12] for ex in data["valid"]] == ["day0", "day1", "day2"]


# ------------------------------------------------------------- shuffling and reduction


def test_shuffle_entities_is_consistent() -> None:
    ex = parse_question(QUESTION)
    rng = random.Random(0)
    seen = set()
    for _ in range(20):
        sh = shuffle_entities(ex, rng, num_entities=50)
        mapping: dict[str, str] = {}
        for old_seq, new_seq in ((ex.document, sh.document), (ex.query, sh.query)):
            for old, new in zip(old_seq, new_seq):
                if is_entity(old):
                    assert mapping.setdefault(old, new) == new  # one new name per entity
                else:
                    assert old == new
        assert len(set(mapping.values())) == len(mapping)  # distinct
        assert sh.answer == mapping[ex.answer]
        assert sh.candidates == tuple(mapping[c] for c in ex.candidates)
        assert sh.names[sh.answer] == "Jane Doe"
        seen.add(sh.answer)
    assert len(seen) > 5  # the numbering really changes


def test_shuffle_entities_pool_too_small() -> None:
    with pytest.raises(ValueError, match="num_entities=3"):
        shuffle_entities(parse_question(QUESTION, "x.question"), random.Random(0), 3)


def test_split_sentences() -> None:
    assert split_sentences(["a", "b", ".", "c", "!", "d", "?", "e"]) == [
        ("a", "b", "."),
        ("c", "!"),
        ("d", "?"),
        ("e",),
    ]


def test_reduce_document_keeps_most_relevant_sentences_in_order() -> None:
    ex = parse_question(QUESTION)
    reduced = reduce_document(ex, 2)
    sentences = split_sentences(reduced.document)
    # "@entity3 said the bridge would open in may ." shares the most query words, then the
    # first sentence (@entity2); the others share at most "bridge".
    assert sentences[0][-3:] == ("on", "monday", ".")
    assert sentences[1][:3] == ("@entity3", "said", "the")
    assert len(sentences) == 2
    assert reduced.answer == ex.answer and reduced.candidates == ex.candidates
    assert reduce_document(ex, 10) == ex
    assert reduce_document(ex, 0) == ex


def test_vocabulary_layout() -> None:
    ex = parse_question(QUESTION)
    vocab = build_qa_vocabulary([ex], num_entities=5, max_size=12)
    assert vocab.itos[:3] == ["<pad>", "<unk>", PLACEHOLDER]
    assert entity_offset(vocab) == 3 and vocab.itos[7] == "@entity4"
    assert len(vocab) == 12
    assert vocab.itos[8] == "the"  # the most frequent word
    assert vocab.token_to_id("never-seen") == 1
    with pytest.raises(ValueError, match="max_size"):
        build_qa_vocabulary([ex], num_entities=5, max_size=4)


# ------------------------------------------------------------------------ ptb-cloze


_TEXT = (
    "the bank sold bonds to the fund <eos> the fund paid cash for the bonds <eos> "
    "prices rose as traders bought bonds <eos> the bank said the fund bought more bonds <eos> "
    "it was a quiet day <eos> traders said prices rose again <eos>"
)
TEXT = _TEXT.split()


def _check_cloze(ex: QAExample) -> None:
    assert ex.answer in ex.candidates
    assert ex.query.count(PLACEHOLDER) == 1
    assert ex.answer not in ex.query  # the answer occurs once in the sentence
    assert ex.answer in ex.document
    assert len(set(ex.candidates)) == len(ex.candidates)
    # anonymisation is consistent: one word per entity, one entity per word
    word_of = dict(ex.names)
    assert set(word_of) == set(ex.candidates)
    assert len(set(word_of.values())) == len(word_of)
    for tok in (*ex.document, *ex.query):
        if tok.startswith("@entity"):
            assert tok in word_of
        elif tok != PLACEHOLDER:
            assert tok not in word_of.values()  # a candidate word never stays in clear


def test_cloze_small_text() -> None:
    examples, skipped = build_cloze_examples(TEXT, "valid", doc_sentences=2, num_entities=20)
    assert len(examples) + skipped == 4  # sentences 2..5 are queries
    # skipped: "it was a quiet day" and "traders said prices rose again" hold no content
    # word of the two sentences before them
    assert skipped == 2
    for ex in examples:
        _check_cloze(ex)
        assert all(is_content_word(w) for w in ex.names.values())
        assert all(0 <= int(c[len("@entity") :]) < 20 for c in ex.candidates)
    first = examples[0]  # document: sentences 0-1, query: sentence 2
    assert first.source == "ptb-cloze/valid/2"
    assert {first.names[c] for c in first.candidates} == {"bank", "sold", "bonds", "fund",
                                                          "paid", "cash"}  # fmt: skip
    assert first.names[first.answer] == "bonds"  # the only document word in sentence 2
    assert first.document.count("<eos>") == 2


def test_cloze_is_deterministic_and_fresh_per_example() -> None:
    a, _ = build_cloze_examples(TEXT, "train", doc_sentences=2, seed=3)
    b, _ = build_cloze_examples(TEXT, "train", doc_sentences=2, seed=3)
    c, _ = build_cloze_examples(TEXT, "train", doc_sentences=2, seed=4)
    assert a == b
    assert a != c
    # the same word gets unrelated placeholders in different examples
    bonds = [next(e for e, w in ex.names.items() if w == "bonds") for ex in a]
    assert len(set(bonds)) > 1


def test_cloze_statistics_and_baseline() -> None:
    examples, _ = build_cloze_examples(TEXT, "train", doc_sentences=2)
    stats = cloze_statistics(examples)
    assert stats["examples"] == len(examples)
    expected_chance = sum(1 / len(ex.candidates) for ex in examples) / len(examples)
    assert stats["chance"] == pytest.approx(expected_chance)
    for ex in examples:
        counts = Counter(ex.document)
        best = most_frequent_candidate(ex)
        assert counts[best] == max(counts[c] for c in ex.candidates)
    doc = "@entity1 rose . @entity2 fell . @entity2 fell . @entity3 rose"
    ex = QAExample(
        document=tuple(doc.split()),
        query=("@placeholder", "rose"),
        answer="@entity1",
        candidates=("@entity1", "@entity2", "@entity3"),
    )
    assert most_frequent_candidate(ex) == "@entity2"
    assert context_match_candidate(ex) == "@entity1"  # "rose" follows @entity1 and @entity3
    table = format_statistics({"train": stats})
    assert "most-frequent-candidate accuracy" in table and "%" in table


def test_cloze_on_real_ptb_valid() -> None:
    root = _real_data()
    if not (root / "ptb" / "ptb.valid.txt").is_file():
        pytest.skip(f"real data not found at {root} (set BNRNN_TEST_DATA_DIR)")
    words = load_ptb_words(root)["valid"]
    examples, skipped = build_cloze_examples(words, "valid", doc_sentences=3, seed=0)
    assert len(examples) > 2000 and skipped > 0
    for ex in examples:
        _check_cloze(ex)
    again, _ = build_cloze_examples(words, "valid", doc_sentences=3, seed=0)
    assert again == examples
    stats = cloze_statistics(examples)
    assert stats["most_frequent"] > stats["chance"]


# ------------------------------------------------------------------------- batching


def test_make_batch() -> None:
    examples, _ = build_cloze_examples(TEXT, "train", doc_sentences=2, num_entities=20)
    vocab = build_qa_vocabulary(examples, num_entities=20)
    batch = make_batch(examples, vocab, 20)
    N = len(examples)
    assert batch.document.shape == (int(batch.doc_lengths.max()), N)
    assert batch.candidates.shape == (N, 20) and batch.candidates.dtype == torch.bool
    off = entity_offset(vocab)
    for n, ex in enumerate(examples):
        L = int(batch.doc_lengths[n])
        assert vocab.decode(batch.document[:L, n]) == list(ex.document)
        assert (batch.document[L:, n] == PAD_ID).all()
        assert batch.candidates[n].sum() == len(ex.candidates)
        assert batch.candidates[n, batch.answer[n]]
        assert vocab.itos[off + int(batch.answer[n])] == ex.answer


def test_iterate_batches_shuffles_entities_in_training_only() -> None:
    examples, _ = build_cloze_examples(TEXT, "train", doc_sentences=2, num_entities=20)
    vocab = build_qa_vocabulary(examples, num_entities=20)
    plain = list(iterate_batches(examples, vocab, 20, 2))
    assert sum(len(b) for b in plain) == len(examples)
    assert torch.equal(plain[0].answer, make_batch(examples[:2], vocab, 20).answer)
    shuffled = list(
        iterate_batches(examples, vocab, 20, 2, rng=random.Random(1), shuffle_entity_ids=True)
    )
    assert sum(len(b) for b in shuffled) == len(examples)
    for b in shuffled:
        assert b.candidates[torch.arange(len(b)), b.answer].all()
    with pytest.raises(ValueError, match="rng"):
        next(iterate_batches(examples, vocab, 20, 2, shuffle_entity_ids=True))
