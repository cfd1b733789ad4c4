"""``reverse="padded"`` (Cooijmans §5.4, the common practice BN-e** corrects): the reverse
direction reads the padded batch flipped in time, each sequence's state held at its initial
value through its leading padding, every row in the frame-wise statistics of every step,
population rows indexed by the padded step. Held to a written-out construction
(`helpers.manual_padded_reverse`), to `torch.nn.LSTM` without normalisation, to the default
where the two readings must agree, and checked with gradcheck. The fast path against the
reference loop: ``tests/test_fast_path.py::test_padded_reversal_matches_reference``.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence

import bnrnn
from helpers import manual_padded_reverse

T, N, I, H = 7, 5, 3, 4
LENGTHS = torch.tensor([4, 7, 2, 7, 1])


def _model(reverse: str = "padded", **kw) -> bnrnn.BNLSTM:
    torch.manual_seed(0)
    kw = {"max_length": 10, "weight_init": "orthogonal", **kw}
    m = bnrnn.BNLSTM(I, H, bidirectional=True, reverse=reverse, dtype=torch.float64, **kw)
    with torch.no_grad():  # non-trivial scales and shifts
        for bn in m.norm_modules():
            bn.weight.uniform_(0.5, 1.5)
            if bn.bias is not None:
                bn.bias.normal_()
    return m


def _input(seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(T, N, I, generator=g, dtype=torch.float64)


@pytest.mark.parametrize("impl", ["reference", "fast"])
@pytest.mark.parametrize("input_stats", ["frame", "sequence"])
def test_matches_the_written_out_construction(input_stats: str, impl: str) -> None:
    """The reverse half of the output, h_n[1], c_n[1], the gradients of the input and of
    the reverse direction's parameters, and the tracked population rows (every one of the
    T padded steps over N rows) in training; then evaluation with those rows."""
    model = _model(input_stats=input_stats, impl=impl)
    manual = copy.deepcopy(model)
    x = _input().requires_grad_()
    w = torch.linspace(-1, 1, T * N * H, dtype=torch.float64).view(T, N, H)
    y, (h, c) = model(x, lengths=LENGTHS)
    y_m, h_m, c_m, stats = manual_padded_reverse(manual, x, LENGTHS, train=True)
    torch.testing.assert_close(y[..., H:], y_m)
    torch.testing.assert_close(h[1], h_m)
    torch.testing.assert_close(c[1], c_m)
    params = [p for n, p in model.named_parameters() if n.endswith("_reverse") or "reverse." in n]
    params_m = [
        p for n, p in manual.named_parameters() if n.endswith("_reverse") or "reverse." in n
    ]
    loss = (y[..., H:] * w).sum() + h[1].sum() + 2 * c[1].sum()
    loss_m = (y_m * w).sum() + h_m.sum() + 2 * c_m.sum()
    grads = torch.autograd.grad(loss, [x, *params])
    grads_m = torch.autograd.grad(loss_m, [x, *params_m])
    for g, g_m in zip(grads, grads_m):
        torch.testing.assert_close(g, g_m)
    for key, steps in stats.items():
        bn = getattr(model, f"bn_{key}_l0_reverse")
        n = int(LENGTHS.sum()) if (key == "ih" and input_stats == "sequence") else N
        mean = torch.stack([m for m, _ in steps])  # fresh rows: mean 0, var 1, momentum 0.1
        var = torch.stack([v for _, v in steps]) * n / (n - 1)
        torch.testing.assert_close(bn.running_mean[: len(steps)], 0.1 * mean)
        torch.testing.assert_close(bn.running_var[: len(steps)], 0.9 + 0.1 * var)
        assert bn.num_batches_tracked[: len(steps)].eq(1).all()
    manual.load_state_dict(model.state_dict())  # the rows the model tracked
    model.eval()
    manual.eval()
    with torch.no_grad():
        y, (h, c) = model(x, lengths=LENGTHS)
        y_m, h_m, c_m, _ = manual_padded_reverse(manual, x, LENGTHS, train=False)
    torch.testing.assert_close(y[..., H:], y_m)
    torch.testing.assert_close(h[1], h_m)
    torch.testing.assert_close(c[1], c_m)


@pytest.mark.parametrize("impl", ["reference", "fast"])
def test_forward_direction_is_unchanged(impl: str) -> None:
    """Only the reverse direction reads the batch differently."""
    padded, unpadded = _model(impl=impl), _model("unpadded", impl=impl)
    x = _input()
    y_p, (h_p, c_p) = padded(x, lengths=LENGTHS)
    y_u, (h_u, c_u) = unpadded(x, lengths=LENGTHS)
    torch.testing.assert_close(y_p[..., :H], y_u[..., :H])
    torch.testing.assert_close(h_p[0], h_u[0])
    assert not torch.allclose(y_p[..., H:], y_u[..., H:])


@pytest.mark.parametrize("packed", [False, True])
@pytest.mark.parametrize("reverse", ["unpadded", "padded"])
def test_without_normalisation_equals_nn_lstm(reverse: str, packed: bool) -> None:
    """norm=None: both readings are `torch.nn.LSTM` (bidirectional, two layers; packed or
    padded with lengths): outputs, final states and gradients with copied weights."""
    torch.manual_seed(0)
    ours = bnrnn.BNLSTM(I, H, 2, bidirectional=True, norm=None, reverse=reverse).double()
    ref = nn.LSTM(I, H, 2, bidirectional=True).double()
    ref.load_state_dict(ours.state_dict())
    x = _input()
    results = []
    for m in (ours, ref):
        xi = x.clone().requires_grad_()
        if packed or m is ref:
            out, (h, c) = m(pack_padded_sequence(xi, LENGTHS, enforce_sorted=False))
            y = out.data
        else:
            out, (h, c) = m(xi, lengths=LENGTHS)
            y = pack_padded_sequence(out, LENGTHS, enforce_sorted=False).data
        loss = (y * torch.linspace(-1, 1, y.numel(), dtype=y.dtype).view_as(y)).sum()
        loss = loss + h.sum() + 2 * c.sum()
        grads = torch.autograd.grad(loss, [xi, *m.parameters()])
        results.append((y, h, c, grads))
    for a, b in zip(results[0][:3], results[1][:3]):
        torch.testing.assert_close(a, b)
    for a, b in zip(results[0][3], results[1][3]):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize(
    "norm,input_stats,lengths",
    [
        ("cooijmans", "frame", torch.full((N,), T)),  # no padding
        ("layer", "frame", LENGTHS),  # no batch statistic
        ("input", "sequence", LENGTHS),  # no frame-wise statistic
    ],
)
def test_equals_unpadded_where_the_reading_cannot_matter(norm, input_stats, lengths) -> None:
    """Without padding, or without a frame-wise batch statistic, the two readings give the
    same outputs, states and population statistics, in training and evaluation."""
    models = [_model(r, norm=norm, input_stats=input_stats) for r in ("padded", "unpadded")]
    x = _input()
    for train in (True, False):
        (y1, s1), (y2, s2) = (m.train(train)(x, lengths=lengths) for m in models)
        torch.testing.assert_close(y1, y2)
        for a, b in zip(s1, s2):
            torch.testing.assert_close(a, b)
    for (k, a), (_, b) in zip(models[0].named_buffers(), models[1].named_buffers()):
        torch.testing.assert_close(a, b, msg=k)


def test_depends_on_the_amount_of_padding() -> None:
    """Cooijmans §5.4: more padding at the end of the batch moves every reverse statistic to
    later population rows (the bias BN-e** removes); "unpadded" does not care."""
    x = _input()
    more = torch.cat([x, torch.zeros(3, N, I, dtype=x.dtype)])
    for reverse, differs in (("padded", True), ("unpadded", False)):
        a, b = _model(reverse), _model(reverse)
        a(x, lengths=LENGTHS)
        b(more, lengths=LENGTHS)
        with torch.no_grad():
            y_a, _ = a.eval()(x, lengths=LENGTHS)
            y_b, _ = b.eval()(x, lengths=LENGTHS)
        assert (not torch.allclose(y_a, y_b)) == differs, reverse


@pytest.mark.parametrize("cls", [bnrnn.BNLSTM, bnrnn.BNRNN])
def test_gradcheck(cls) -> None:
    """gradcheck in float64 through the fast path, input, initial state and parameters:
    the batch statistics (over the held rows too) are differentiated."""
    torch.manual_seed(2)
    m = cls(2, 3, bidirectional=True, reverse="padded", impl="fast", dtype=torch.float64)
    names = [n for n, _ in m.named_parameters()]
    lengths = [3, 1, 2, 3]

    def fn(x, h0, *ps):
        hx = (h0, h0.flip(-1)) if cls is bnrnn.BNLSTM else h0
        out, state = torch.func.functional_call(
            m, dict(zip(names, ps)), (x, hx), {"lengths": lengths}
        )
        return out, *(state if isinstance(state, tuple) else (state,))

    x = torch.randn(3, 4, 2, dtype=torch.float64, requires_grad=True)
    h0 = torch.randn(2, 4, 3, dtype=torch.float64, requires_grad=True)
    params = tuple(p.detach().clone().requires_grad_() for p in m.parameters())
    assert torch.autograd.gradcheck(fn, (x, h0) + params, eps=1e-6, atol=1e-5, rtol=1e-4)


def test_invalid_reverse() -> None:
    with pytest.raises(ValueError, match="^reverse must be one of .*got 'flipped'$"):
        bnrnn.BNLSTM(I, H, bidirectional=True, reverse="flipped")
    with pytest.raises(ValueError, match="^reverse must be one of"):
        bnrnn.BNRNN(I, H, reverse=None)


def test_repr_and_bnrnn() -> None:
    m = bnrnn.BNRNN(I, H, bidirectional=True, reverse="padded")
    assert "reverse='padded'" in repr(m)
    assert "reverse" not in repr(bnrnn.BNLSTM(I, H))
    out, h = m(_input().float(), lengths=LENGTHS)
    assert out.shape == (T, N, 2 * H) and h.shape == (2, N, H)
