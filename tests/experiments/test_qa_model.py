"""Tests of the Attentive Reader and its five variants: candidate masking, what padding may
and may not change (Cooijmans §5.4), the readers' padded-reverse backward LSTM
(``bnrnn.BNLSTM(reverse="padded")``) against the rule written out, and a tiny training run
per variant."""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch
import torch.nn.functional as F

from bnrnn_experiments.config import MODELS
from bnrnn_experiments.qa.model import AttentiveReader, reader_lstm
from bnrnn_experiments.qa.presets import READER_MODELS
from helpers import manual_padded_reverse

pytestmark = pytest.mark.usefixtures("one_thread")


V, E = 40, 10  # vocabulary (ids 3..12 are the entities), entities
ALL = list(READER_MODELS)
PROPER = ["lstm", "bn-e**"]  # read padded batches exactly like unpadded ones
PADDED_REVERSE = ["bnlstm", "bn-everywhere", "bn-e*"]  # the §5.4 common practice
BN_ATTENTION = [m for m in ALL if MODELS[m].bn_attention]


def _model(name: str, seed: int = 0, **kw) -> AttentiveReader:
    torch.manual_seed(seed)
    kw = {"embed_size": 6, "hidden_size": 5, "attention_size": 4, "max_length": 40, **kw}
    return AttentiveReader(V, E, name, **kw).double()


def _batch(seed: int = 0, N: int = 5, doc=(9, 4, 7, 2, 9), query=(3, 5, 1, 4, 2)):
    g = torch.Generator().manual_seed(seed)
    doc_len, q_len = torch.tensor(doc[:N]), torch.tensor(query[:N])
    document = torch.randint(1, V, (int(doc_len.max()), N), generator=g)
    q = torch.randint(1, V, (int(q_len.max()), N), generator=g)
    for t, (tokens, lengths) in enumerate(((document, doc_len), (q, q_len))):
        pad = torch.arange(tokens.shape[0])[:, None] >= lengths[None]
        tokens[pad] = 0
        del t
    candidates = torch.rand(N, E, generator=g) < 0.5
    answer = torch.randint(0, E, (N,), generator=g)
    candidates[torch.arange(N), answer] = True
    return document, doc_len, q, q_len, candidates, answer


def _pad_more(tokens: torch.Tensor, extra: int, fill: int = 0) -> torch.Tensor:
    return torch.cat([tokens, torch.full((extra, tokens.shape[1]), fill)])


def _garbage_at_padding(tokens: torch.Tensor, lengths: torch.Tensor, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    pad = torch.arange(tokens.shape[0])[:, None] >= lengths[None]
    return torch.where(pad, torch.randint(1, V, tokens.shape, generator=g), tokens)


def _buffers(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.named_buffers()}


def _run(model, mode: str, document, doc_len, q, q_len, candidates):
    """Eval mode runs after one training forward, so the population statistics are not
    their initial values."""
    model = copy.deepcopy(model)
    if mode == "eval":
        model.train()
        b = _batch(seed=7)
        model(*b[:5])
        model.eval()
    else:
        model.train()
    out = model(document, doc_len, q, q_len, candidates)
    return out, model


# ------------------------------------------------------------------- candidate masking


@pytest.mark.parametrize("name", ALL)
def test_softmax_over_candidates_only(name: str) -> None:
    document, doc_len, q, q_len, candidates, answer = _batch()
    logits = _model(name)(document, doc_len, q, q_len, candidates)
    assert logits.shape == (5, E)
    assert torch.isinf(logits[~candidates]).all() and torch.isfinite(logits[candidates]).all()
    assert candidates[torch.arange(5), logits.argmax(-1)].all()
    p = torch.softmax(logits, -1)
    assert torch.allclose(p.sum(-1), torch.ones(5, dtype=p.dtype))
    loss = F.cross_entropy(logits, answer)
    loss.backward()
    assert torch.isfinite(loss)


# ------------------------------------------------------------------------------ padding


@pytest.mark.parametrize("mode", ["train", "eval"])
@pytest.mark.parametrize("name", ALL)
def test_values_at_padded_positions_change_nothing(name: str, mode: str) -> None:
    document, doc_len, q, q_len, candidates, _ = _batch()
    model = _model(name)
    ref, m_ref = _run(model, mode, document, doc_len, q, q_len, candidates)
    doc2 = _garbage_at_padding(document, doc_len, 1)
    q2 = _garbage_at_padding(q, q_len, 2)
    assert not torch.equal(doc2, document)
    out, m_out = _run(model, mode, doc2, doc_len, q2, q_len, candidates)
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)
    for k, v in _buffers(m_ref).items():
        torch.testing.assert_close(_buffers(m_out)[k], v, rtol=1e-10, atol=1e-10, msg=k)


@pytest.mark.parametrize("mode", ["train", "eval"])
@pytest.mark.parametrize("name", PROPER)
def test_extra_padding_changes_nothing(name: str, mode: str) -> None:
    """lstm and bn-e**: more padding (and garbage in it) gives the same outputs and the
    same population statistics."""
    document, doc_len, q, q_len, candidates, _ = _batch()
    model = _model(name)
    ref, m_ref = _run(model, mode, document, doc_len, q, q_len, candidates)
    doc2 = _garbage_at_padding(_pad_more(document, 6), doc_len, 3)
    q2 = _garbage_at_padding(_pad_more(q, 4), q_len, 4)
    out, m_out = _run(model, mode, doc2, doc_len, q2, q_len, candidates)
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)
    for k, v in _buffers(m_ref).items():
        torch.testing.assert_close(_buffers(m_out)[k], v, rtol=1e-10, atol=1e-10, msg=k)


@pytest.mark.parametrize("name", PROPER)
def test_a_sequence_does_not_depend_on_the_others_padding_in_eval(name: str) -> None:
    """Evaluation with population statistics: each example alone gives its batch row."""
    document, doc_len, q, q_len, candidates, _ = _batch()
    out, model = _run(_model(name), "eval", document, doc_len, q, q_len, candidates)
    for n in range(5):
        Ld, Lq = int(doc_len[n]), int(q_len[n])
        alone = model(
            document[:Ld, n : n + 1],
            doc_len[n : n + 1],
            q[:Lq, n : n + 1],
            q_len[n : n + 1],
            candidates[n : n + 1],
        )
        torch.testing.assert_close(alone[0], out[n], rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("name", PADDED_REVERSE)
def test_padded_reverse_depends_on_the_amount_of_padding(name: str) -> None:
    """bnlstm, bn-everywhere, bn-e*: the backward LSTM reads the padding first, so step t
    of its statistics is padded step t, not the sequence's own step (Cooijmans §5.4, the
    flaw bn-e** removes). Padding the whole batch by 6 more steps leaves the training
    outputs as they are (the state is held at zero through the padding and batch
    statistics do not depend on t) but moves every backward statistic 6 population rows
    down, which changes the evaluation outputs."""
    document, doc_len, q, q_len, candidates, _ = _batch()
    model = _model(name)
    more = _pad_more(document, 6)
    ref, m_ref = _run(model, "train", document, doc_len, q, q_len, candidates)
    out, m_out = _run(model, "train", more, doc_len, q, q_len, candidates)
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)
    hh = "doc_encoder.lstm.bn_hh_l0_reverse.running_mean"
    assert not torch.allclose(_buffers(m_out)[hh], _buffers(m_ref)[hh])
    ref, _ = _run(model, "eval", document, doc_len, q, q_len, candidates)
    out, _ = _run(model, "eval", more, doc_len, q, q_len, candidates)
    assert not torch.allclose(out, ref, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("mode", ["train", "eval"])
@pytest.mark.parametrize("name", BN_ATTENTION)
def test_attention_and_its_statistics_ignore_padded_positions(name: str, mode: str) -> None:
    """The attention softmax and the BN of W_ym y_d(t): document states at padded
    positions (here: random values, and 5 more padded steps) change nothing."""
    model = _model(name)
    torch.manual_seed(5)
    lengths = torch.tensor([6, 2, 4, 6, 1])
    T, N = 6, 5
    pad = torch.arange(T)[:, None] >= lengths[None]
    y = torch.randn(T, N, 10, dtype=torch.double).masked_fill(pad[..., None], 0)
    u = torch.randn(N, 10, dtype=torch.double)
    y2 = torch.cat([y, torch.zeros(5, N, 10, dtype=torch.double)])
    pad2 = torch.arange(T + 5)[:, None] >= lengths[None]
    y2 = torch.where(pad2[..., None], torch.randn_like(y2) * 100, y2)
    a, b = copy.deepcopy(model), copy.deepcopy(model)
    if mode == "eval":
        a(*_batch(seed=7)[:5])
        b(*_batch(seed=7)[:5])
        a.eval()
        b.eval()
    g1, s1 = a.attend(y, lengths, u)
    g2, s2 = b.attend(y2, lengths, u)
    torch.testing.assert_close(g2, g1, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(s2[:T], s1, rtol=1e-10, atol=1e-10)
    assert (s1[pad] == 0).all() and (s2[pad2] == 0).all()
    torch.testing.assert_close(s1.sum(0), torch.ones(N, dtype=s1.dtype))
    for k, v in _buffers(a).items():
        torch.testing.assert_close(_buffers(b)[k], v, rtol=1e-10, atol=1e-10, msg=k)
    if mode == "train":
        bn = a.attend_m.bn_a
        assert bn is not None and int(bn.num_batches_tracked[0]) == 1
        # the tracked mean is that of the unpadded frames only
        z = a.attend_m.proj_a(y)[~pad]  # (sum of lengths, A)
        expected = 0.9 * 0 + 0.1 * z.mean(0)
        torch.testing.assert_close(bn.running_mean[0], expected.detach())


# ------------------------------------ the readers' LSTMs: reverse="padded" written out


@pytest.mark.parametrize("name", PADDED_REVERSE)
def test_padded_reverse_reader_lstm_is_the_written_out_construction(name: str) -> None:
    """The backward LSTM of bnlstm, bn-everywhere, bn-e* (``bnrnn.BNLSTM(reverse="padded")``)
    against Cooijmans §5.4 written out independently of the library's loops
    (`helpers.manual_padded_reverse`: the padded batch flipped, the state held at zero
    through the leading padding, statistics over all rows): outputs, final state,
    gradients and population statistics in training, then outputs in evaluation."""
    spec = MODELS[name]
    torch.manual_seed(0)
    kw = {"max_length": 12, "momentum": 0.1, "eps": 1e-5, "gamma_init": 0.1}
    lstm = reader_lstm(spec, 3, 4, weight_init="orthogonal", forget_bias=0.0, **kw).double()
    assert lstm.reverse == "padded"
    manual = copy.deepcopy(lstm)
    x = torch.randn(9, 5, 3, dtype=torch.double, requires_grad=True)
    lengths = torch.tensor([9, 4, 7, 2, 9])
    y, (h, c) = lstm(x, lengths=lengths)
    y_m, h_m, c_m, stats = manual_padded_reverse(manual, x, lengths, train=True)
    torch.testing.assert_close(y[..., 4:], y_m)
    torch.testing.assert_close(h[1], h_m)
    torch.testing.assert_close(c[1], c_m)
    (g,) = torch.autograd.grad(y[..., 4:].square().sum() + c[1].sum(), x)
    (g_m,) = torch.autograd.grad(y_m.square().sum() + c_m.sum(), x)
    torch.testing.assert_close(g, g_m)
    for key, steps in stats.items():
        mean = torch.stack([m for m, _ in steps])
        torch.testing.assert_close(
            getattr(lstm, f"bn_{key}_l0_reverse").running_mean[: len(steps)], 0.1 * mean
        )
    manual.load_state_dict(lstm.state_dict())
    with torch.no_grad():
        y, _ = lstm.eval()(x, lengths=lengths)
        y_m, _, _, _ = manual_padded_reverse(manual.eval(), x, lengths, train=False)
    torch.testing.assert_close(y[..., 4:], y_m)


@pytest.mark.parametrize("input_stats", ["frame", "sequence"])
def test_padded_reverse_equals_unpadded_reverse_without_padding(input_stats: str) -> None:
    """Without padding, reversing the padded batch is reversing each sequence: a reader's
    BN-LSTM with reverse="padded" and the same with "unpadded" (bn-e**'s reading) give the
    same outputs, final states, gradients and population statistics."""
    torch.manual_seed(0)
    T, N, I, H = 7, 4, 3, 5
    kw = {"max_length": T, "weight_init": "orthogonal", "forget_bias": 0.0}
    padded = reader_lstm(MODELS["bnlstm"], I, H, input_stats=input_stats, **kw).double()
    spec = dataclasses.replace(MODELS["bnlstm"], reverse="unpadded")
    unpadded = reader_lstm(spec, I, H, input_stats=input_stats, **kw).double()
    unpadded.load_state_dict(padded.state_dict())
    x = torch.randn(T, N, I, dtype=torch.double, requires_grad=True)
    lengths = torch.full((N,), T)
    for mode in ("train", "eval"):
        results = []
        for m in (padded, unpadded):
            y, (h, c) = m.train(mode == "train")(x, lengths=lengths)
            (g,) = torch.autograd.grad(y.square().sum(), x)
            results.append((y, h, c, g))
        for a, b in zip(*results):
            torch.testing.assert_close(a, b)
    for (k, a), (_, b) in zip(padded.named_buffers(), unpadded.named_buffers()):
        torch.testing.assert_close(a, b, msg=k)


def test_padded_reverse_holds_the_state_through_the_padding() -> None:
    """In eval mode with fresh population statistics (mean 0, var 1 in every row), a
    sequence read after its front padding is the sequence read alone."""
    torch.manual_seed(0)
    lstm = reader_lstm(MODELS["bnlstm"], 3, 4, max_length=10, weight_init="orthogonal")
    lstm = lstm.double().eval()
    x = torch.randn(6, 2, 3, dtype=torch.double)
    y, (h, _) = lstm(x, lengths=torch.tensor([6, 3]))
    y_alone, (h_alone, _) = lstm(x[:3, 1:], lengths=torch.tensor([3]))
    # same population row for every step: only the holding of the state is tested here
    torch.testing.assert_close(y[:3, 1], y_alone[:, 0])
    torch.testing.assert_close(h[:, 1], h_alone[:, 0])
    assert (y[3:, 1] == 0).all()


def test_padded_reverse_reads_the_last_tracked_row_beyond_it() -> None:
    """Trained on 4 steps of max_length=10, evaluation on 7 steps reads row 3 for steps
    3..6 (Cooijmans §3), not the untracked rows 4..6: the same as rows 4..9 filled with
    row 3."""
    torch.manual_seed(0)
    lstm = reader_lstm(MODELS["bnlstm"], 3, 4, max_length=10, weight_init="orthogonal")
    lstm = lstm.double()
    lstm(torch.randn(4, 5, 3, dtype=torch.double), lengths=torch.tensor([4, 4, 3, 2, 4]))
    lstm.eval()
    filled = copy.deepcopy(lstm)
    for bn in filled.norm_modules():
        if bn.running_mean.shape[0] > 1:
            bn.running_mean[4:] = bn.running_mean[3]
            bn.running_var[4:] = bn.running_var[3]
    x, lengths = torch.randn(7, 2, 3, dtype=torch.double), torch.tensor([7, 5])
    torch.testing.assert_close(lstm(x, lengths=lengths)[0], filled(x, lengths=lengths)[0])


# ------------------------------------------------------------------------- training


@pytest.mark.parametrize("name", ALL)
def test_tiny_training_run_decreases_the_loss(name: str) -> None:
    """Every variant fits a fixed batch: the loss falls well below its start."""
    torch.manual_seed(0)
    model = _model(name, embed_size=8, hidden_size=8, attention_size=8).float()
    document, doc_len, q, q_len, candidates, answer = _batch(seed=3, N=5)
    opt = torch.optim.Adam(model.parameters(), lr=3e-2)
    losses = []
    for _ in range(30):
        loss = F.cross_entropy(model(document, doc_len, q, q_len, candidates), answer)
        opt.zero_grad()
        loss.backward()
        for n, p in model.named_parameters():
            if n != "embed.weight":
                assert p.grad is not None and torch.isfinite(p.grad).all(), n
        opt.step()
        losses.append(loss.item())
    assert min(losses[-5:]) < 0.5 * losses[0], losses


def test_tied_entity_output() -> None:
    document, doc_len, q, q_len, candidates, answer = _batch()
    model = _model("bn-e**", tie_entities=True, entity_offset=3)
    logits = model(document, doc_len, q, q_len, candidates)
    assert model.output.out_features == 6  # g -> embedding space
    F.cross_entropy(logits, answer).backward()
    assert model.embed.weight.grad[3 : 3 + E].abs().sum() > 0
    with pytest.raises(ValueError, match="exceeds"):
        AttentiveReader(V, E, "lstm", tie_entities=True, entity_offset=V - 2)


def test_unknown_model() -> None:
    with pytest.raises(ValueError, match="bn-e\\*\\*"):
        AttentiveReader(V, E, "bn-e***")
