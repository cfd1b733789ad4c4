"""norm=None is torch.nn.LSTM: same outputs, final states and gradients given its weights."""

import pytest
import torch
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

import bnrnn


def _pair(num_layers, bidirectional, batch_first, bias=True):
    torch.manual_seed(0)
    ref = torch.nn.LSTM(
        3,
        5,
        num_layers,
        bias=bias,
        batch_first=batch_first,
        bidirectional=bidirectional,
        dtype=torch.float64,
    )
    ours = bnrnn.BNLSTM(
        3,
        5,
        num_layers,
        bias=bias,
        batch_first=batch_first,
        bidirectional=bidirectional,
        norm=None,
        dtype=torch.float64,
    )
    result = ours.load_state_dict(ref.state_dict(), strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    return ref, ours


def _grads(module):
    return {n: p.grad for n, p in module.named_parameters()}


@pytest.mark.parametrize("num_layers", [1, 2])
@pytest.mark.parametrize("bidirectional", [False, True])
@pytest.mark.parametrize("batch_first", [False, True])
@pytest.mark.parametrize("packed", [False, True])
def test_equals_nn_lstm(num_layers, bidirectional, batch_first, packed):
    ref, ours = _pair(num_layers, bidirectional, batch_first)
    D = 2 if bidirectional else 1
    x = torch.randn(4, 6, 3, dtype=torch.float64)  # (N, T, I) if batch_first
    if not batch_first:
        x = x.transpose(0, 1).contiguous()
    lengths = torch.tensor([6, 2, 5, 6])
    h0 = torch.randn(num_layers * D, 4, 5, dtype=torch.float64)
    c0 = torch.randn(num_layers * D, 4, 5, dtype=torch.float64)
    results = []
    for model in (ref, ours):
        xi = x.clone().requires_grad_()
        h = h0.clone().requires_grad_()
        c = c0.clone().requires_grad_()
        inp = (
            pack_padded_sequence(xi, lengths, batch_first=batch_first, enforce_sorted=False)
            if packed
            else xi
        )
        out, (hn, cn) = model(inp, (h, c))
        if packed:
            assert isinstance(out, torch.nn.utils.rnn.PackedSequence)
            assert torch.equal(out.sorted_indices, inp.sorted_indices)
            out, _ = pad_packed_sequence(out, batch_first=batch_first)
        loss = (out**2).sum() + (hn * 1.5).sum() + (cn**3).sum()
        loss.backward()
        results.append((out, hn, cn, xi.grad, h.grad, c.grad, _grads(model)))
    (o1, h1, c1, gx1, gh1, gc1, gp1), (o2, h2, c2, gx2, gh2, gc2, gp2) = results
    torch.testing.assert_close(o2, o1)
    torch.testing.assert_close(h2, h1)
    torch.testing.assert_close(c2, c1)
    torch.testing.assert_close(gx2, gx1)
    torch.testing.assert_close(gh2, gh1)
    torch.testing.assert_close(gc2, gc1)
    assert gp1.keys() == gp2.keys()
    for name in gp1:
        torch.testing.assert_close(gp2[name], gp1[name], msg=name)


def test_unbatched_and_no_bias_equal_nn_lstm():
    ref, ours = _pair(2, True, False, bias=False)
    x = torch.randn(7, 3, dtype=torch.float64)
    o1, (h1, c1) = ref(x)
    o2, (h2, c2) = ours(x)
    assert o2.shape == (7, 10) and h2.shape == (4, 5)
    torch.testing.assert_close(o2, o1)
    torch.testing.assert_close(h2, h1)
    torch.testing.assert_close(c2, c1)


def test_bn_state_dict_loads_with_only_bn_entries_missing():
    ref = torch.nn.LSTM(3, 5, 2, bidirectional=True)
    ours = bnrnn.BNLSTM(3, 5, 2, bidirectional=True, max_length=10)
    result = ours.load_state_dict(ref.state_dict(), strict=False)
    assert not result.unexpected_keys
    assert result.missing_keys and all(k.startswith("bn_") for k in result.missing_keys)
    assert [n for n, _ in ours.named_parameters() if not n.startswith("bn_")] == [
        n for n, _ in ref.named_parameters()
    ]


def test_bnrnn_without_norm_equals_nn_rnn():
    torch.manual_seed(0)
    ref = torch.nn.RNN(3, 5, 2, bidirectional=True, dtype=torch.float64)
    ours = bnrnn.BNRNN(3, 5, 2, bidirectional=True, norm=None, dtype=torch.float64)
    ours.load_state_dict(ref.state_dict())
    x = torch.randn(6, 4, 3, dtype=torch.float64)
    o1, h1 = ref(x)
    o2, h2 = ours(x)
    torch.testing.assert_close(o2, o1)
    torch.testing.assert_close(h2, h1)
