"""The layers against the papers' equations written out by hand in the test."""

import pytest
import torch

import bnrnn
from helpers import manual_bn, manual_bnlstm

NORMS = ["cooijmans", "input", "preactivation", None]


def _model(norm, **kw):
    torch.manual_seed(0)
    m = bnrnn.BNLSTM(3, 4, norm=norm, max_length=5, dtype=torch.float64, **kw)
    with torch.no_grad():  # gammas and betas away from their initial values
        for bn in m.norm_modules():
            bn.weight.uniform_(0.5, 1.5)
            if bn.bias is not None:
                bn.bias.uniform_(-0.5, 0.5)
    return m


@pytest.mark.filterwarnings("ignore:training on step")  # T=6 > max_length=5 on purpose
@pytest.mark.parametrize("norm", NORMS)
def test_training_mode_matches_equations(norm):
    m = _model(norm)
    x = torch.randn(6, 5, 3, dtype=torch.float64)
    out, (h, c) = m(x)
    want, h_want, c_want = manual_bnlstm(m, x, train=True)
    torch.testing.assert_close(out, want)
    torch.testing.assert_close(h[0], h_want)
    torch.testing.assert_close(c[0], c_want)


@pytest.mark.parametrize("norm", NORMS)
def test_eval_mode_uses_population_rows(norm):
    m = _model(norm)
    for _ in range(3):  # give the population statistics non-trivial values
        m(torch.randn(4, 5, 3, dtype=torch.float64) * 2 + 1)
    m.eval()
    # trained on 4 steps: steps 4..7 (row 4 never trained, 5..7 beyond max_length=5) reuse
    # row 3, the last one trained
    x = torch.randn(8, 5, 3, dtype=torch.float64)
    out, (h, c) = m(x)
    want, h_want, c_want = manual_bnlstm(m, x, train=False)
    torch.testing.assert_close(out, want)
    torch.testing.assert_close(c[0], c_want)


def test_population_statistics_are_unbiased_running_averages():
    m = _model("input", momentum=0.5)
    x = torch.randn(2, 6, 3, dtype=torch.float64)
    m(x)
    wx = x[0] @ m.weight_ih_l0.T
    n = wx.shape[0]
    mean = wx.sum(0) / n
    var_unbiased = ((wx - mean) ** 2).sum(0) / (n - 1)
    bn = m.bn_ih_l0
    torch.testing.assert_close(bn.running_mean[0], 0.5 * mean)
    torch.testing.assert_close(bn.running_var[0], 0.5 + 0.5 * var_unbiased)
    assert bn.num_batches_tracked.tolist() == [1, 1, 0, 0, 0]


def test_sequence_wise_input_statistics_are_over_unpadded_frames():
    torch.manual_seed(1)
    m = bnrnn.BNLSTM(3, 4, norm="input", input_stats="sequence", dtype=torch.float64)
    x = torch.randn(5, 3, 3, dtype=torch.float64)
    lengths = [5, 2, 3]
    out, _ = m(x, lengths=lengths)
    frames = torch.cat([x[:L, i] for i, L in enumerate(lengths)])  # (10, I) unpadded
    wx_all = x @ m.weight_ih_l0.T
    bn = m.bn_ih_l0
    normed = manual_bn(wx_all, bn.weight, None, bn.eps, *_moments(frames @ m.weight_ih_l0.T))
    b = m.bias_ih_l0 + m.bias_hh_l0
    for i, L in enumerate(lengths):  # each sequence is then a plain LSTM on normed inputs
        h = c = torch.zeros(4, dtype=torch.float64)
        for t in range(L):
            a = normed[t, i] + h @ m.weight_hh_l0.T + b
            ig, fg, gg, og = a.chunk(4)
            c = torch.sigmoid(fg) * c + torch.sigmoid(ig) * torch.tanh(gg)
            h = torch.sigmoid(og) * torch.tanh(c)
            torch.testing.assert_close(out[t, i], h)
        assert torch.all(out[L:, i] == 0)


def _moments(z):
    mean = z.mean(0)
    return mean, ((z - mean) ** 2).mean(0)


def test_bnrnn_matches_equations():
    torch.manual_seed(2)
    m = bnrnn.BNRNN(3, 4, dtype=torch.float64)
    x = torch.randn(5, 6, 3, dtype=torch.float64)
    out, h_n = m(x)
    h = torch.zeros(6, 4, dtype=torch.float64)
    b = m.bias_ih_l0 + m.bias_hh_l0
    for t in range(5):
        a = (
            manual_bn(h @ m.weight_hh_l0.T, m.bn_hh_l0.weight, None, m.eps)
            + manual_bn(x[t] @ m.weight_ih_l0.T, m.bn_ih_l0.weight, None, m.eps)
            + b
        )
        h = torch.tanh(a)
        torch.testing.assert_close(out[t], h)
    torch.testing.assert_close(h_n[0], h)


@pytest.mark.filterwarnings("ignore:training on step")  # T=7 > max_length=5 on purpose
@pytest.mark.parametrize("norm", NORMS)
def test_cell_matches_layer_step_by_step(norm):
    torch.manual_seed(3)
    layer = _model(norm)
    cell = bnrnn.BNLSTMCell(3, 4, norm=norm, max_length=5, dtype=torch.float64)
    cell.load_state_dict({k.replace("_l0", ""): v for k, v in layer.state_dict().items()})
    x = torch.randn(7, 5, 3, dtype=torch.float64)
    for mode in ("train", "eval"):
        layer.train(mode == "train")
        cell.train(mode == "train")
        out, _ = layer(x)
        h = c = torch.zeros(5, 4, dtype=torch.float64)
        for t in range(7):
            h, c = cell(x[t], (h, c), t=t)
            torch.testing.assert_close(h, out[t])


def test_gamma_initialised_to_0_1_and_shift_to_zero():
    m = bnrnn.BNLSTM(3, 4)
    for bn in m.norm_modules():
        assert torch.all(bn.weight == 0.1)
        if bn.bias is not None:
            assert torch.all(bn.bias == 0)
    assert m.bn_c_l0.bias is not None and m.bn_ih_l0.bias is None and m.bn_hh_l0.bias is None
