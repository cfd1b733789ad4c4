"""Variable length: padding never leaks into statistics, outputs, states or gradients;
bidirectional layers reverse only each sequence's unpadded part (Cooijmans §5.4)."""

import copy

import pytest
import torch
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

import bnrnn


def _model(**kw):
    torch.manual_seed(0)
    m = bnrnn.BNLSTM(3, 4, num_layers=2, dtype=torch.float64, **kw)
    with torch.no_grad():
        for bn in m.norm_modules():
            bn.weight.uniform_(0.5, 1.5)
    return m


def _run(m, x, lengths):
    x = x.clone().requires_grad_()
    m.zero_grad()
    out, (h, c) = m(x, lengths=lengths)
    # A loss over the first three sequences only, so that extra sequences add no gradient.
    (out[:, :3].sin().sum() + h[:, :3].sum() + c[:, :3].square().sum()).backward()
    grads = {n: p.grad.clone() for n, p in m.named_parameters()}
    return out, h, c, x.grad, grads


CONFIGS = [
    {"norm": "cooijmans"},
    {"norm": "cooijmans", "bidirectional": True},
    {"norm": "input", "input_stats": "sequence", "bidirectional": True},
    {"norm": "preactivation"},
]


@pytest.mark.parametrize("kw", CONFIGS)
@pytest.mark.parametrize("train", [True, False])
def test_padding_values_change_nothing(kw, train):
    m = _model(**kw)
    m(torch.randn(6, 5, 3, dtype=torch.float64))  # non-trivial population statistics
    m.train(train)
    lengths = [6, 3, 4]
    x = torch.randn(6, 3, 3, dtype=torch.float64)
    y = x.clone()
    for i, L in enumerate(lengths):
        y[L:, i] = 1e6 * torch.randn_like(y[L:, i])
    a, b = _run(m, x, lengths), _run(m, y, lengths)
    for u, v in zip(a[:3], b[:3]):
        torch.testing.assert_close(u, v)
    for i, L in enumerate(lengths):
        torch.testing.assert_close(a[3][:L, i], b[3][:L, i])
        assert torch.all(b[3][L:, i] == 0) and torch.all(b[0][L:, i] == 0)
    for name in a[4]:
        torch.testing.assert_close(a[4][name], b[4][name], msg=name)


@pytest.mark.parametrize("kw", CONFIGS)
def test_adding_padded_positions_changes_nothing(kw):
    """Longer padding (more steps in the tensor) leaves every sequence and the population
    statistics as they were (both runs from the same statistics: the degenerate step 4
    reads a population row that the first run updates)."""
    m = _model(**kw)
    m2 = copy.deepcopy(m)
    lengths = [5, 3, 4]
    x = torch.randn(5, 3, 3, dtype=torch.float64)
    longer = torch.cat([x, torch.randn(3, 3, 3, dtype=torch.float64)])
    a, b = _run(m, x, lengths), _run(m2, longer, lengths)
    for (name, u), v in zip(m.named_buffers(), m2.buffers()):
        torch.testing.assert_close(u, v, msg=name)
    torch.testing.assert_close(b[0][:5], a[0])
    assert torch.all(b[0][5:] == 0)
    torch.testing.assert_close(b[1], a[1])
    torch.testing.assert_close(b[2], a[2])
    for name in a[4]:
        torch.testing.assert_close(a[4][name], b[4][name], msg=name)


@pytest.mark.parametrize("kw", CONFIGS)
def test_eval_sequences_are_independent_of_the_batch(kw):
    """In eval mode a packed batch of different lengths equals each sequence alone."""
    m = _model(**kw)
    for _ in range(2):
        m(torch.randn(6, 5, 3, dtype=torch.float64))
    m.eval()
    lengths = torch.tensor([4, 6, 2, 5])
    x = torch.randn(6, 4, 3, dtype=torch.float64)
    packed = pack_padded_sequence(x, lengths, enforce_sorted=False)
    out, (h, c) = m(packed)
    out, _ = pad_packed_sequence(out)
    for i, L in enumerate(lengths.tolist()):
        alone, (h1, c1) = m(x[:L, i : i + 1])
        torch.testing.assert_close(out[:L, i : i + 1], alone)
        torch.testing.assert_close(h[:, i], h1[:, 0])
        torch.testing.assert_close(c[:, i], c1[:, 0])


def test_extra_sequences_in_training_only_change_statistics_not_padding():
    """Training: the statistics at step t count only the sequences present at t. A batch
    where one sequence is cut short equals the same batch with that sequence's tail removed
    (the short sequence's padded steps do not enter the statistics of later steps)."""
    m = _model(norm="cooijmans")
    x = torch.randn(6, 4, 3, dtype=torch.float64)
    out_a, _ = m(x, lengths=[6, 6, 6, 2])
    # Steps 0-1: all four present; from step 2 on, only the first three.
    out_b, _ = m(x[:, :3])
    torch.testing.assert_close(out_a[2:, :3], _continue(m, x))
    assert not torch.allclose(out_a[:, :3], out_b)


def _continue(m, x):
    """Steps 2.. of sequences 0-2, computed with cells (same weights, explicit step index)
    on four sequences at steps 0-1 and only the three present ones afterwards."""
    layers = []
    for layer in range(2):
        cell = bnrnn.BNLSTMCell(3 if layer == 0 else 4, 4, dtype=torch.float64)
        tag = f"_l{layer}"
        cell.load_state_dict(
            {
                k.replace(tag, ""): v
                for k, v in m.state_dict().items()
                if k.endswith(tag) or f"{tag}." in k
            }
        )
        layers.append(cell)
    states = [None, None]
    outs = []
    for t in range(6):
        n = 4 if t < 2 else 3
        inp = x[t, :n]
        for layer, cell in enumerate(layers):
            st = None if states[layer] is None else tuple(s[:n] for s in states[layer])
            states[layer] = cell(inp, st, t=t)
            inp = states[layer][0]
        if t >= 2:
            outs.append(inp)
    return torch.stack(outs)


def test_one_sequence_present_falls_back_without_nan():
    m = _model(norm="cooijmans")
    x = torch.randn(5, 3, 3, dtype=torch.float64, requires_grad=True)
    out, (h, c) = m(x, lengths=[5, 1, 2])  # steps 2-4: one sequence present
    (out.sum() + c.sum()).backward()
    assert torch.isfinite(out).all() and torch.isfinite(x.grad).all()
    assert m.bn_hh_l0.num_batches_tracked.tolist()[:5] == [1, 1, 0, 0, 0]


def test_constant_activations_give_finite_gradients():
    """Zero batch variance (the first ~100 pixels of sequential MNIST, Cooijmans §5.1)."""
    m = bnrnn.BNLSTM(1, 8)
    x = torch.zeros(20, 6, 1, requires_grad=True)
    out, _ = m(x)
    out[-1].sum().backward()
    assert torch.isfinite(out).all()
    assert all(torch.isfinite(p.grad).all() for p in m.parameters())
    noisy = bnrnn.BNLSTM(1, 8, init_noise=0.1)
    noisy(x)[0].sum().backward()


@pytest.mark.parametrize("input_stats", ["frame", "sequence"])
def test_reverse_direction_is_forward_over_reversed_unpadded_part(input_stats):
    torch.manual_seed(4)
    bi = bnrnn.BNLSTM(
        3, 4, bidirectional=True, norm="cooijmans", input_stats=input_stats, dtype=torch.float64
    )
    fwd = bnrnn.BNLSTM(3, 4, norm="cooijmans", input_stats=input_stats, dtype=torch.float64)
    fwd.load_state_dict(
        {k.replace("_reverse", ""): v for k, v in bi.state_dict().items() if "_reverse" in k}
    )
    for _ in range(2):
        bi(torch.randn(6, 5, 3, dtype=torch.float64))
    fwd.load_state_dict(
        {k.replace("_reverse", ""): v for k, v in bi.state_dict().items() if "_reverse" in k}
    )
    bi.eval()
    fwd.eval()
    lengths = [6, 2, 4]
    x = torch.randn(6, 3, 3, dtype=torch.float64)
    out, (h, _) = bi(x, lengths=lengths)
    for i, L in enumerate(lengths):
        rev = x[:L, i : i + 1].flip(0)
        o, (h1, _) = fwd(rev)
        torch.testing.assert_close(out[:L, i, 4:], o[:, 0].flip(0))
        torch.testing.assert_close(h[1, i], h1[0, 0])
        assert torch.all(out[L:, i] == 0)


@pytest.mark.parametrize("lengths", [[5, 5, 5], [5, 3, 1]])
def test_reverse_padded(lengths):
    """Each sequence's unpadded part reversed, padding in place, the same with no padding
    (a flip) as with padding (an index per sequence); twice gives the input back, and the
    gradient is the reversal of the output gradient."""
    from bnrnn.packing import reverse_padded

    x = torch.randn(5, 3, 2, dtype=torch.float64, requires_grad=True)
    lens = torch.tensor(lengths)
    y = reverse_padded(x, lens)
    for n, length in enumerate(lengths):
        assert torch.equal(y[:length, n], x[:length, n].flip(0))
        assert torch.equal(y[length:, n], x[length:, n])
    assert torch.equal(reverse_padded(y, lens), x)
    w = torch.randn_like(y)
    (y * w).sum().backward()
    assert torch.equal(x.grad, reverse_padded(w, lens))
