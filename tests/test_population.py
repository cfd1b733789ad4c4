"""Population statistics: rows per step, reuse of the last row, no corruption beyond
max_length, and re-estimation by `update_population_stats`."""

import copy
import warnings

import pytest
import torch

import bnrnn
from helpers import with_rows_filled


def _wx_stats(m, x):
    """Per-step batch mean and unbiased variance of W_ih x, computed by hand: (T, 4H)."""
    wx = x @ m.weight_ih_l0.T
    n = x.shape[1]
    mean = wx.sum(1) / n
    var = ((wx - mean[:, None]) ** 2).sum(1) / (n - 1)
    return mean, var


def test_eval_beyond_max_length_uses_last_row():
    torch.manual_seed(0)
    m = bnrnn.BNLSTM(2, 3, norm="input", max_length=4, dtype=torch.float64)
    m(torch.randn(4, 5, 2, dtype=torch.float64))
    m.eval()
    x = torch.randn(7, 2, 2, dtype=torch.float64)
    out, _ = m(x)
    # Same result when rows 4..6 are explicitly filled with row 3.
    m2 = bnrnn.BNLSTM(2, 3, norm="input", max_length=7, dtype=torch.float64)
    sd = m.state_dict()
    for key in ("running_mean", "running_var"):
        rows = sd[f"bn_ih_l0.{key}"]
        sd[f"bn_ih_l0.{key}"] = torch.cat([rows, rows[-1:].expand(3, -1)])
    sd["bn_ih_l0.num_batches_tracked"] = torch.ones(7, dtype=torch.long)
    m2.load_state_dict(sd)
    m2.eval()
    torch.testing.assert_close(m2(x)[0], out)


def test_time_offset_continues_rows_and_clamps():
    torch.manual_seed(1)
    m = bnrnn.BNLSTM(2, 3, max_length=6, dtype=torch.float64)
    m(torch.randn(6, 4, 2, dtype=torch.float64))
    m.eval()
    x = torch.randn(8, 2, 2, dtype=torch.float64)
    full, (h, c) = m(x)
    first, state = m(x[:3])
    second, _ = m(x[3:], state, time_offset=3)
    torch.testing.assert_close(torch.cat([first, second]), full)


def test_training_beyond_max_length_leaves_last_row_untouched_and_warns_once():
    torch.manual_seed(2)
    m = bnrnn.BNLSTM(2, 3, max_length=3)
    m(torch.randn(3, 4, 2))
    before = {k: v.clone() for k, v in m.state_dict().items() if "running" in k}
    with pytest.warns(UserWarning, match="beyond max_length=3"):
        m(torch.randn(3, 4, 2), time_offset=3)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        m(torch.randn(5, 4, 2), time_offset=3)  # no second warning
    for k, v in before.items():
        assert torch.equal(m.state_dict()[k], v), k
    assert m.bn_hh_l0.num_batches_tracked.tolist() == [1, 1, 1]


def test_training_mixed_steps_tracks_inside_rows_only():
    torch.manual_seed(3)
    m = bnrnn.BNLSTM(2, 3, norm="input", max_length=3, momentum=None, dtype=torch.float64)
    x = torch.randn(5, 4, 2, dtype=torch.float64)
    with pytest.warns(UserWarning):
        m(x)
    mean, var = _wx_stats(m, x)
    torch.testing.assert_close(m.bn_ih_l0.running_mean, mean[:3])
    torch.testing.assert_close(m.bn_ih_l0.running_var, var[:3])


def test_cumulative_average_with_momentum_none():
    torch.manual_seed(4)
    m = bnrnn.BNLSTM(2, 3, norm="input", max_length=4, momentum=None, dtype=torch.float64)
    xs = [torch.randn(4, 5, 2, dtype=torch.float64) * (k + 1) for k in range(3)]
    for x in xs:
        m(x)
    stats = [_wx_stats(m, x) for x in xs]
    torch.testing.assert_close(m.bn_ih_l0.running_mean, sum(s[0] for s in stats) / 3)
    torch.testing.assert_close(m.bn_ih_l0.running_var, sum(s[1] for s in stats) / 3)
    assert m.bn_ih_l0.num_batches_tracked.tolist() == [3, 3, 3, 3]


def test_update_population_stats_is_plain_average_of_batch_stats():
    torch.manual_seed(5)
    # dropout and init noise would change the statistics: re-estimation runs without them.
    net = torch.nn.Sequential()
    net.rnn = bnrnn.BNLSTM(
        2,
        3,
        num_layers=2,
        dropout=0.5,
        norm="input",
        max_length=4,
        init_noise=1.0,
        dtype=torch.float64,
    )
    m = net.rnn
    m(torch.randn(4, 5, 2, dtype=torch.float64))  # stale statistics, to be replaced
    m.train()
    batches = [(torch.randn(4, 6, 2, dtype=torch.float64) + k, None) for k in range(3)]
    weights = {
        k: v.clone() for k, v in m.state_dict().items() if "running" not in k and "tracked" not in k
    }
    seen = bnrnn.update_population_stats(m, batches)
    assert seen == 3 and m.training and m.bn_ih_l0.momentum == 0.1
    stats = [_wx_stats(m, x) for x, _ in batches]
    torch.testing.assert_close(m.bn_ih_l0.running_mean, sum(s[0] for s in stats) / 3)
    torch.testing.assert_close(m.bn_ih_l0.running_var, sum(s[1] for s in stats) / 3)
    for k, v in weights.items():
        assert torch.equal(m.state_dict()[k], v), k


def test_update_population_stats_counts_rows_where_steps_were_present():
    torch.manual_seed(6)
    m = bnrnn.BNLSTM(2, 3, norm="input", max_length=4, dtype=torch.float64)
    x1 = torch.randn(4, 3, 2, dtype=torch.float64)
    x2 = torch.randn(2, 3, 2, dtype=torch.float64)

    def run(model, batch):
        model(batch)

    bnrnn.update_population_stats(m, [x1, x2], forward_fn=run)
    assert m.bn_ih_l0.num_batches_tracked.tolist() == [2, 2, 1, 1]
    mean1, _ = _wx_stats(m, x1)
    mean2, _ = _wx_stats(m, x2)
    torch.testing.assert_close(m.bn_ih_l0.running_mean[2:], mean1[2:])
    torch.testing.assert_close(m.bn_ih_l0.running_mean[:2], (mean1[:2] + mean2) / 2)


def test_reset_running_stats():
    m = bnrnn.BNLSTM(2, 3)
    m(torch.randn(3, 4, 2))
    m.reset_running_stats()
    for bn in m.norm_modules():
        assert torch.all(bn.running_mean == 0) and torch.all(bn.running_var == 1)
        assert torch.all(bn.num_batches_tracked == 0)


# -- rows never trained are never read ------------------------------------------------------


def _bn_by_hand(bn, z, rows):
    """Eval-mode BN of z (T, N, F) with the population statistics of the given rows."""
    mean, var = bn.running_mean[rows][:, None], bn.running_var[rows][:, None]
    return bn.weight * (z - mean) / torch.sqrt(var + bn.eps)


def test_step_and_frames_reuse_the_last_tracked_row():
    torch.manual_seed(7)
    bn = bnrnn.StepBatchNorm(4, max_length=10, dtype=torch.float64)
    bn.frames(torch.randn(3, 5, 4, dtype=torch.float64), [5, 5, 5])  # tracks rows 0..2
    with torch.no_grad():  # rows never tracked hold values that must not be read
        bn.running_mean[3:].fill_(100.0)
        bn.running_var[3:].fill_(50.0)
    bn.eval()
    z = torch.randn(7, 2, 4, dtype=torch.float64)
    want = _bn_by_hand(bn, z, [0, 1, 2, 2, 2, 2, 2])
    torch.testing.assert_close(bn.frames(z, [2] * 7), want)
    torch.testing.assert_close(torch.stack([bn.step(z[t], t) for t in range(7)]), want)
    torch.testing.assert_close(bn.frames(z[1:4], [2] * 3, time_offset=1), want[1:4])
    # No row tracked at all: the rows are used as they are, each step its own row.
    bn.num_batches_tracked.zero_()
    torch.testing.assert_close(bn.frames(z, [2] * 7), _bn_by_hand(bn, z, list(range(7))))
    # Training: a step with one sequence reads the last row tracked so far, that of the
    # same call's earlier steps included (frames as step for each t).
    bn.reset_running_stats()
    bn.train()
    z = torch.randn(4, 3, 4, dtype=torch.float64)
    sizes = [3, 3, 1, 1]
    by_frames = bn.frames(z, sizes)
    rows = bn.running_mean.clone(), bn.running_var.clone()
    bn.reset_running_stats()
    by_step = [bn.step(z[t, :n], t) for t, n in enumerate(sizes)]
    for t, n in enumerate(sizes):
        torch.testing.assert_close(by_frames[t, :n], by_step[t])
    torch.testing.assert_close((bn.running_mean, bn.running_var), rows)
    assert bn.num_batches_tracked.tolist() == [1, 1] + [0] * 8
    with torch.no_grad():
        want = _bn_by_hand(bn, z[2:], [1, 1])[:, :1]
    torch.testing.assert_close(by_frames[2:, :1], want)


@pytest.mark.parametrize("impl", ["auto", "reference"])
def test_evaluation_longer_than_training_reuses_the_last_trained_row(impl):
    """max_length=100, trained on 20 steps, evaluated on 60: steps 20..59 use row 19."""
    torch.manual_seed(8)
    m = bnrnn.BNLSTM(3, 8, max_length=100, impl=impl, dtype=torch.float64)
    for _ in range(3):
        m(torch.randn(20, 4, 3, dtype=torch.float64) * 2 + 1)
    m.eval()
    x = torch.randn(60, 2, 3, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(m(x)[0], with_rows_filled(m).eval()(x)[0])


@pytest.mark.parametrize("impl", ["auto", "reference"])
def test_update_population_stats_rows_it_never_saw_are_not_read(impl):
    """Trained on 8 steps, re-estimated over batches of 4: rows 4..7 are reset and never
    collected, so evaluation reuses row 3 past step 3 (not mean 0, variance 1)."""
    torch.manual_seed(9)
    m = bnrnn.BNLSTM(3, 8, max_length=10, impl=impl, dtype=torch.float64)
    m(torch.randn(8, 4, 3, dtype=torch.float64))
    batches = [torch.randn(4, 5, 3, dtype=torch.float64) * 2 + 1 for _ in range(2)]
    bnrnn.update_population_stats(m, batches)
    assert m.bn_hh_l0.num_batches_tracked.tolist() == [2] * 4 + [0] * 6
    m.eval()
    x = torch.randn(8, 2, 3, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(m(x)[0], with_rows_filled(m).eval()(x)[0])


# -- update_population_stats: all or nothing -------------------------------------------------


def _snapshot(model):
    return (
        {k: v.clone() for k, v in model.state_dict().items()},
        [(n, m.training) for n, m in model.named_modules()],
        [(m.momentum, m.collecting) for m in model.modules() if isinstance(m, bnrnn.StepBatchNorm)],
    )


def _assert_unchanged(model, snapshot):
    state, modes, norms = _snapshot(model)
    assert state.keys() == snapshot[0].keys()
    for k, v in snapshot[0].items():
        assert torch.equal(state[k], v), k
    assert modes == snapshot[1] and norms == snapshot[2]


def _trained_net():
    """A trained two-layer net, training mode, with one submodule left in eval mode."""
    torch.manual_seed(10)
    net = torch.nn.Sequential()
    net.rnn = bnrnn.BNLSTM(3, 4, num_layers=2, max_length=6, momentum=0.3)
    net.rnn(torch.randn(6, 4, 3))
    net.rnn.bn_c_l1.eval()
    return net


@pytest.mark.parametrize("source", ["list", "generator"])
def test_update_population_stats_refuses_an_empty_source(source):
    net = _trained_net()
    before = _snapshot(net)
    if source == "list":
        batches = []
    else:
        batches = (x for x in [torch.randn(6, 4, 3)])
        bnrnn.update_population_stats(net, batches)  # consumes it
        before = _snapshot(net)
    with pytest.raises(ValueError, match="batches yielded no batch"):
        bnrnn.update_population_stats(net, batches)
    _assert_unchanged(net, before)


@pytest.mark.parametrize("failure", [ValueError, KeyboardInterrupt])
def test_update_population_stats_leaves_the_model_as_it_was_if_a_batch_raises(failure):
    """A batch of one sequence (the layer's ValueError) or Ctrl-C after one batch."""
    net = _trained_net()
    before = _snapshot(net)

    def forward(model, batch):
        if batch is None:
            raise KeyboardInterrupt
        model(batch)

    bad = torch.randn(6, 1, 3) if failure is ValueError else None
    with pytest.raises(failure):
        bnrnn.update_population_stats(net, [torch.randn(6, 4, 3), bad], forward)
    _assert_unchanged(net, before)


def test_update_population_stats_sees_the_initial_state_noise_of_training():
    """With ``init_noise`` (Cooijmans §5.1) and an input that is the same for every
    sequence, the recurrent term varies only through the noise: the re-estimated statistics
    must be the ones training measures (there, the noise), not the noise-free ones (zero)."""
    torch.manual_seed(0)
    m = bnrnn.BNLSTM(2, 8, max_length=4, init_noise=1.0)
    x = torch.zeros(4, 64, 2)
    assert bnrnn.update_population_stats(m, [x, x, x]) == 3
    collected = m.bn_hh_l0.running_var[0].clone()
    assert m.training and m.bn_hh_l0.momentum == 0.1  # mode and momenta restored

    trained = copy.deepcopy(m).train()
    trained.bn_hh_l0.reset_running_stats()
    trained.bn_hh_l0.momentum = None  # cumulative average, as update_population_stats
    for _ in range(3):
        trained(x)
    measured = trained.bn_hh_l0.running_var[0]
    assert float(measured.min()) > 1e-3  # the noise, amplified by W_hh
    ratio = collected / measured
    assert float(ratio.min()) > 0.5 and float(ratio.max()) < 2.0, ratio
