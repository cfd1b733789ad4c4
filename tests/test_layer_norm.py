"""norm="layer": the layer-normalised LSTM and RNN of Ba et al. (2016, §6.5 and the
supplementary) against the equations written out by hand, padding invariance, a batch of
one, evaluation equal to training, and the module API (gains, no statistics)."""

import warnings

import pytest
import torch
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

import bnrnn

F64 = torch.float64


def manual_ln(z, gain, shift, eps):
    """LN(z; a, b) by hand: each row over its features, biased variance."""
    F = z.shape[-1]
    mean = z.sum(-1, keepdim=True) / F
    var = ((z - mean) ** 2).sum(-1, keepdim=True) / F
    out = gain * (z - mean) / torch.sqrt(var + eps)
    return out if shift is None else out + shift


def manual_lnlstm_direction(x, w_ih, w_hh, b, ln_ih, ln_hh, ln_c, eps, h, c):
    """Ba et al. supplementary, gates in the library's (torch) order (i, f, g, o):
    (i, f, g, o) = LN(W_hh h; a_hh) + LN(W_ih x; a_ih) + b,
    c_t = sig(f) c_{t-1} + sig(i) tanh(g), h_t = sig(o) tanh(LN(c_t; a_c, b_c)).
    x (T, N, I) of full length; ln_*: (gain, shift)."""
    outs = []
    for t in range(x.shape[0]):
        a = manual_ln(h @ w_hh.T, *ln_hh, eps) + manual_ln(x[t] @ w_ih.T, *ln_ih, eps)
        if b is not None:
            a = a + b
        i, f, g, o = a.chunk(4, 1)
        c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
        h = torch.sigmoid(o) * torch.tanh(manual_ln(c, *ln_c, eps))
        outs.append(h)
    return torch.stack(outs), h, c


def manual_lnrnn_direction(x, w_ih, w_hh, b, ln_ih, ln_hh, eps, h):
    """h_t = tanh(LN(W_hh h; a_hh) + LN(W_ih x; a_ih) + b)."""
    outs = []
    for t in range(x.shape[0]):
        a = manual_ln(h @ w_hh.T, *ln_hh, eps) + manual_ln(x[t] @ w_ih.T, *ln_ih, eps)
        h = torch.tanh(a if b is None else a + b)
        outs.append(h)
    return torch.stack(outs), h


def _ln(m, key, tag):
    mod = getattr(m, f"ln_{key}_{tag}")
    return mod.weight, mod.bias


def manual_layers(m, x):
    """A whole BNLSTM / BNRNN (stacked, bidirectional) over a full-length batch, by hand."""
    D = 2 if m.bidirectional else 1
    lstm = isinstance(m, bnrnn.BNLSTM)
    N, H = x.shape[1], m.hidden_size
    hs, cs = [], []
    inp = x
    for layer in range(m.num_layers):
        outs = []
        for d in range(D):
            tag = f"l{layer}" + ("_reverse" if d else "")
            w_ih, w_hh = getattr(m, f"weight_ih_{tag}"), getattr(m, f"weight_hh_{tag}")
            b = None if not m.bias else getattr(m, f"bias_ih_{tag}") + getattr(m, f"bias_hh_{tag}")
            xin = inp.flip(0) if d else inp
            zero = x.new_zeros(N, H)
            if lstm:
                out, h, c = manual_lnlstm_direction(
                    xin, w_ih, w_hh, b, _ln(m, "ih", tag), _ln(m, "hh", tag),
                    _ln(m, "c", tag), m.eps, zero, zero,
                )  # fmt: skip
                cs.append(c)
            else:
                out, h = manual_lnrnn_direction(
                    xin, w_ih, w_hh, b, _ln(m, "ih", tag), _ln(m, "hh", tag), m.eps, zero
                )
            hs.append(h)
            outs.append(out.flip(0) if d else out)
        inp = torch.cat(outs, -1)
    return inp, torch.stack(hs), (torch.stack(cs) if lstm else None)


def _perturb(m):
    """Gains and shifts away from their initial values (1 and 0)."""
    with torch.no_grad():
        for ln in m.modules():
            if not isinstance(ln, bnrnn.StepLayerNorm):
                continue
            ln.weight.uniform_(0.5, 1.5)
            if ln.bias is not None:
                ln.bias.uniform_(-0.5, 0.5)
    return m


def _lstm(**kw):
    torch.manual_seed(0)
    return _perturb(bnrnn.BNLSTM(3, 4, norm="layer", dtype=F64, impl="reference", **kw))


def _rnn(**kw):
    torch.manual_seed(0)
    return _perturb(bnrnn.BNRNN(3, 4, norm="layer", dtype=F64, impl="reference", **kw))


@pytest.mark.parametrize("layers,bidirectional", [(1, False), (2, True)])
@pytest.mark.parametrize("bias", [True, False])
def test_lstm_matches_equations(layers, bidirectional, bias):
    m = _lstm(num_layers=layers, bidirectional=bidirectional, bias=bias)
    x = torch.randn(6, 5, 3, dtype=F64)
    for mode in (m.train, m.eval):  # no statistics: both compute the equations
        mode()
        out, (h, c) = m(x)
        want, h_want, c_want = manual_layers(m, x)
        torch.testing.assert_close(out, want)
        torch.testing.assert_close(h, h_want)
        torch.testing.assert_close(c, c_want)


@pytest.mark.parametrize("layers,bidirectional", [(1, False), (2, True)])
def test_rnn_matches_equations(layers, bidirectional):
    m = _rnn(num_layers=layers, bidirectional=bidirectional)
    x = torch.randn(6, 5, 3, dtype=F64)
    out, h = m(x)
    want, h_want, _ = manual_layers(m, x)
    torch.testing.assert_close(out, want)
    torch.testing.assert_close(h, h_want)


def test_cells_match_equations():
    torch.manual_seed(0)
    cell = _perturb(bnrnn.BNLSTMCell(3, 4, norm="layer", dtype=F64))
    x = torch.randn(5, 3, dtype=F64)
    h0, c0 = torch.randn(5, 4, dtype=F64), torch.randn(5, 4, dtype=F64)
    h, c = cell(x, (h0, c0), t=7)
    lns = [(m.weight, m.bias) for m in (cell.ln_ih, cell.ln_hh, cell.ln_c)]
    _, h_want, c_want = manual_lnlstm_direction(
        x[None], cell.weight_ih, cell.weight_hh, cell.bias_ih + cell.bias_hh, *lns,
        cell.ln_c.eps, h0, c0,
    )  # fmt: skip
    torch.testing.assert_close(h, h_want)
    torch.testing.assert_close(c, c_want)
    rcell = _perturb(bnrnn.BNRNNCell(3, 4, norm="layer", dtype=F64))
    h = rcell(x[:1], h0[:1])  # a batch of one, in training
    lns = [(m.weight, m.bias) for m in (rcell.ln_ih, rcell.ln_hh)]
    _, h_want = manual_lnrnn_direction(
        x[None, :1], rcell.weight_ih, rcell.weight_hh, rcell.bias_ih + rcell.bias_hh, *lns,
        rcell.ln_ih.eps, h0[:1],
    )  # fmt: skip
    torch.testing.assert_close(h, h_want)
    torch.testing.assert_close(rcell(x[0], h0[0]), h_want[0])  # unbatched


def test_layers_match_cells():
    """The layer's loop and a loop of cells holding the same parameters."""
    m = _lstm()
    cell = bnrnn.BNLSTMCell(3, 4, norm="layer", dtype=F64)
    cell.load_state_dict({k.replace("_l0", ""): v for k, v in m.state_dict().items()}, strict=True)
    x = torch.randn(5, 2, 3, dtype=F64)
    out, _ = m(x)
    state = None
    for t in range(5):
        state = cell(x[t], state, t=t)
        torch.testing.assert_close(state[0], out[t])


@pytest.mark.parametrize("cls", [bnrnn.BNLSTM, bnrnn.BNRNN])
@pytest.mark.parametrize("impl", ["reference", "auto"])
def test_padding_invariance(cls, impl):
    """Each sequence of a padded or packed batch computes what it computes alone, whatever
    the padding holds; gradients reach no padded position."""
    torch.manual_seed(0)
    m = _perturb(cls(3, 4, norm="layer", num_layers=2, bidirectional=True, dtype=F64, impl=impl))
    lengths = [6, 4, 1]
    x = torch.randn(6, 3, 3, dtype=F64)
    for k, n in enumerate(lengths):
        x[n:, k] = 1e3 * torch.randn(6 - n, 3, dtype=F64)  # garbage in the padding
    x.requires_grad_(True)
    out, state = m(x, lengths=lengths)
    h = state[0] if isinstance(state, tuple) else state
    packed, pstate = m(pack_padded_sequence(x, lengths, enforce_sorted=False))
    pout, _ = pad_packed_sequence(packed, total_length=6)
    torch.testing.assert_close(pout, out)
    torch.testing.assert_close(pstate[0] if isinstance(pstate, tuple) else pstate, h)
    (out.sum() + h.sum()).backward()
    for k, n in enumerate(lengths):
        alone, s_alone = m(x[:n, k : k + 1].detach())
        h_alone = s_alone[0] if isinstance(s_alone, tuple) else s_alone
        torch.testing.assert_close(out[:n, k : k + 1], alone)
        assert out[n:, k].abs().max() == 0 if n < 6 else True
        torch.testing.assert_close(h[:, k : k + 1], h_alone)
        assert x.grad[n:, k].abs().max() == 0 if n < 6 else True


def test_batch_of_one_eval_equals_train_any_length():
    m = _lstm(num_layers=2, max_length=3)
    x = torch.randn(20, 1, 3, dtype=F64)  # longer than max_length, one sequence
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no warning about max_length: nothing is tracked
        out_train, (h_train, _) = m(x)
        m.eval()
        out_eval, (h_eval, _) = m(x)
    torch.testing.assert_close(out_train, out_eval)
    torch.testing.assert_close(h_train, h_eval)
    out_off, _ = m(x, time_offset=50)  # no statistics per step: the offset changes nothing
    torch.testing.assert_close(out_off, out_eval)


def test_gamma_init_follows_placement():
    ln = bnrnn.BNLSTM(3, 4, norm="layer")
    assert ln.gamma_init == 1.0
    assert all(bool((m.weight == 1).all()) for m in ln.norm_modules())
    assert all(m.bias is None or bool((m.bias == 0).all()) for m in ln.norm_modules())
    bn = bnrnn.BNLSTM(3, 4, norm="cooijmans")
    assert bn.gamma_init == 0.1
    assert all(bool((m.weight == 0.1).all()) for m in bn.norm_modules())
    assert bnrnn.BNLSTM(3, 4, norm="layer", gamma_init=0.3).ln_hh_l0.weight[0] == 0.3
    assert bnrnn.BNRNNCell(3, 4, norm="layer").ln_ih.weight[0] == 1.0
    assert bnrnn.BNLSTMCell(3, 4).bn_ih.weight[0] == 0.1
    with pytest.raises(ValueError, match="gamma_init"):
        bnrnn.BNLSTM(3, 4, norm="layer", gamma_init=float("nan"))


def test_modules_and_population_api():
    m = bnrnn.BNLSTM(3, 4, norm="layer", sync_stats=True)  # sync_stats: a no-op for LN
    kinds = {type(x) for x in m.norm_modules()}
    assert kinds == {bnrnn.StepLayerNorm}
    assert len(m.norm_modules()) == 3
    assert not list(m.buffers())  # no statistics
    assert m.ln_c_l0.bias is not None and m.ln_ih_l0.bias is None and m.ln_hh_l0.bias is None
    assert m.ln_ih_l0.weight.shape == (16,) and m.ln_c_l0.weight.shape == (4,)
    x = torch.randn(4, 2, 3)
    m.reset_running_stats()  # nothing to reset
    assert bnrnn.update_population_stats(m, [x]) == 0  # nothing to collect, nothing run
    with torch.no_grad():
        m.ln_ih_l0.weight.fill_(2.0)
    m.reset_parameters()
    assert bool((m.ln_ih_l0.weight == 1).all())
    with pytest.raises(ValueError, match="input_stats"):
        bnrnn.BNLSTM(3, 4, norm="layer", input_stats="sequence")


def test_learn_init_and_dropout():
    torch.manual_seed(0)
    m = bnrnn.BNLSTM(3, 4, norm="layer", num_layers=2, dropout=0.5, learn_init=True)
    out, _ = m(torch.randn(5, 2, 3))
    out.sum().backward()
    assert m.h0.grad is not None and m.c0.grad is not None
    assert all(p.grad is not None for p in m.parameters())
    m.eval()  # no dropout in evaluation: deterministic
    x = torch.randn(5, 2, 3)
    torch.testing.assert_close(m(x)[0], m(x)[0])
