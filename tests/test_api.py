"""The torch.nn.LSTM contract: construction, input forms, state, serialisation, errors."""

import copy
import io
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.nn.utils.rnn import pack_padded_sequence

import bnrnn
from helpers import eval_outputs


def test_constructor_argument_order_matches_nn_lstm():
    m = bnrnn.BNLSTM(
        3, 4, 2, True, True, 0.2, True, "input", "sequence", 50, None, 1e-3, 0.2, 1.0, True, 0.1
    )
    assert (m.num_layers, m.bias, m.batch_first, m.dropout, m.bidirectional) == (
        2,
        True,
        True,
        0.2,
        True,
    )
    assert (m.norm, m.input_stats, m.max_length, m.momentum, m.eps, m.gamma_init) == (
        "input",
        "sequence",
        50,
        None,
        1e-3,
        0.2,
    )
    assert (m.forget_bias, m.learn_init, m.init_noise) == (1.0, True, 0.1)
    assert torch.all(m.bias_ih_l0[4:8] == 1.0) and torch.all(m.bias_hh_l0[4:8] == 0.0)
    assert m.h0.shape == (4, 4) and m.c0.shape == (4, 4)
    assert "norm='input'" in repr(m) and "input_stats='sequence'" in repr(m)


def test_batch_first_and_time_major_agree():
    torch.manual_seed(0)
    a = bnrnn.BNLSTM(3, 4, bidirectional=True)
    b = bnrnn.BNLSTM(3, 4, bidirectional=True, batch_first=True)
    b.load_state_dict(a.state_dict())
    x = torch.randn(5, 6, 3)
    lengths = [5, 3, 5, 2, 4, 1]
    oa, (ha, _) = a(x, lengths=lengths)
    ob, (hb, _) = b(x.transpose(0, 1), lengths=lengths)
    torch.testing.assert_close(ob.transpose(0, 1), oa)
    torch.testing.assert_close(hb, ha)


def test_packed_unsorted_and_padded_with_lengths_agree():
    torch.manual_seed(1)
    m = bnrnn.BNLSTM(3, 4, num_layers=2)
    x = torch.randn(5, 4, 3)
    lengths = torch.tensor([2, 5, 3, 5])
    packed = pack_padded_sequence(x, lengths, enforce_sorted=False)
    po, (ph, pc) = m(packed)
    assert torch.equal(po.sorted_indices, packed.sorted_indices)
    assert torch.equal(po.unsorted_indices, packed.unsorted_indices)
    assert torch.equal(po.batch_sizes, packed.batch_sizes)
    o, (h, c) = m(x, lengths=lengths)
    torch.testing.assert_close(po.data, pack_padded_sequence(o, lengths, enforce_sorted=False).data)
    torch.testing.assert_close(ph, h)
    torch.testing.assert_close(pc, c)


def test_hx_is_used_and_learned_init_state_trains():
    torch.manual_seed(2)
    m = bnrnn.BNLSTM(3, 4, learn_init=True)
    x = torch.randn(5, 3, 3)
    out, _ = m(x)
    out.sum().backward()
    assert m.h0.grad is not None and m.c0.grad is not None
    hx = (torch.randn(1, 3, 4), torch.randn(1, 3, 4))
    assert not torch.allclose(m(x, hx)[0], out)


def test_init_noise_only_in_training():
    torch.manual_seed(3)
    m = bnrnn.BNLSTM(3, 4, init_noise=0.5)
    x = torch.randn(4, 3, 3)
    m(x)
    m.eval()
    assert torch.equal(m(x)[0], m(x)[0])
    m.train()
    torch.manual_seed(0)
    a = m(x)[0]
    torch.manual_seed(1)
    assert not torch.allclose(a, m(x)[0])


def test_dropout_between_layers_applies_in_training_only():
    torch.manual_seed(4)
    m = bnrnn.BNLSTM(3, 4, num_layers=2, dropout=0.5, norm=None)
    x = torch.randn(5, 3, 3)
    torch.manual_seed(0)
    a = m(x)[0]
    torch.manual_seed(1)
    b = m(x)[0]
    assert not torch.allclose(a, b)
    nodrop = bnrnn.BNLSTM(3, 4, num_layers=2, dropout=0.0, norm=None)
    nodrop.load_state_dict(m.state_dict())
    assert not torch.allclose(a, nodrop(x)[0])
    m.eval()
    nodrop.eval()
    torch.testing.assert_close(m(x)[0], nodrop(x)[0])
    with pytest.warns(UserWarning, match="no effect"):
        bnrnn.BNLSTM(3, 4, num_layers=1, dropout=0.5)


@pytest.mark.parametrize("scheme", ["orthogonal", "identity"])
def test_weight_init_schemes(scheme):
    m = bnrnn.BNLSTM(4, 4, weight_init=scheme, forget_bias=1.0)
    for block in m.weight_ih_l0.split(4):
        torch.testing.assert_close(block @ block.T, torch.eye(4), atol=1e-5, rtol=0)
    for block in m.weight_hh_l0.split(4):
        if scheme == "identity":
            assert torch.equal(block, torch.eye(4))
        else:
            torch.testing.assert_close(block @ block.T, torch.eye(4), atol=1e-5, rtol=0)
    assert torch.all(m.bias_ih_l0 == torch.tensor([0.0] * 4 + [1.0] * 4 + [0.0] * 8))


def test_reset_parameters_restores_initial_values():
    m = bnrnn.BNLSTM(3, 4, weight_init="identity")
    with torch.no_grad():
        for p in m.parameters():
            p.add_(1.0)
    m.reset_parameters()
    assert torch.equal(m.weight_hh_l0[:4], torch.eye(4))
    assert torch.all(m.bn_ih_l0.weight == 0.1)


def test_deepcopy_save_load_and_flatten_parameters():
    torch.manual_seed(5)
    m = bnrnn.BNLSTM(3, 4, num_layers=2, bidirectional=True)
    m(torch.randn(4, 3, 3))
    m.flatten_parameters()
    m.eval()
    x = torch.randn(6, 2, 3)
    want = m(x)[0]
    clone = copy.deepcopy(m)
    torch.testing.assert_close(clone(x)[0], want)
    buf = io.BytesIO()
    torch.save(m, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)
    torch.testing.assert_close(loaded(x)[0], want)
    buf = io.BytesIO()
    torch.save(m.state_dict(), buf)
    buf.seek(0)
    fresh = bnrnn.BNLSTM(3, 4, num_layers=2, bidirectional=True)
    fresh.load_state_dict(torch.load(buf))
    fresh.eval()
    torch.testing.assert_close(fresh(x)[0], want)


def test_device_and_dtype_are_honoured():
    m = bnrnn.BNLSTM(3, 4, device="cpu", dtype=torch.float64)
    assert all(p.dtype == torch.float64 for p in m.parameters())
    assert all(b.dtype in (torch.float64, torch.long) for b in m.buffers())
    out, (h, c) = m(torch.randn(3, 2, 3, dtype=torch.float64))
    assert out.dtype == torch.float64
    m.float()
    assert m(torch.randn(3, 2, 3))[0].dtype == torch.float32


def test_bnrnn_and_cells_shapes():
    rnn = bnrnn.BNRNN(3, 4, num_layers=2, bidirectional=True, batch_first=True)
    out, h = rnn(torch.randn(5, 6, 3), lengths=[6, 2, 3, 4, 5])
    assert out.shape == (5, 6, 8) and h.shape == (4, 5, 4)
    cell = bnrnn.BNRNNCell(3, 4)
    assert cell(torch.randn(5, 3), t=2).shape == (5, 4)
    lcell = bnrnn.BNLSTMCell(3, 4)
    lcell.eval()
    h, c = lcell(torch.randn(3))
    assert h.shape == (4,) and c.shape == (4,)


# -- errors: what was expected and what was received ---------------------------------------

BAD_INPUTS = [
    (lambda m: m(torch.randn(5, 3, 7)), RuntimeError, r"input_size. Expected 3, got 7"),
    (lambda m: m(torch.randn(5, 3, 3, 1)), ValueError, r"Expected input to be 2D or 3D, got 4D"),
    (
        lambda m: m(torch.ones(5, 3, 3, dtype=torch.long)),
        TypeError,
        r"floating point tensor, got dtype torch.int64",
    ),
    (
        lambda m: m(torch.randn(5, 3, 3), lengths=[5, 2]),
        RuntimeError,
        r"Expected shape \(3,\), got \(2,\)",
    ),
    (
        lambda m: m(torch.randn(5, 3, 3), lengths=[5, 6, 2]),
        RuntimeError,
        r"Expected at most 5, got 6",
    ),
    (
        lambda m: m(torch.randn(5, 3, 3), lengths=[5, 0, 2]),
        RuntimeError,
        r"lengths must be at least 1",
    ),
    (
        lambda m: m(torch.randn(5, 3, 3), (torch.zeros(1, 2, 4), torch.zeros(1, 3, 4))),
        RuntimeError,
        r"Expected hidden\[0\] size \(1, 3, 4\), got \[1, 2, 4\]",
    ),
    (
        lambda m: m(torch.randn(5, 1, 3)),
        ValueError,
        r"Expected more than 1 sequence per batch when training.*got a batch of 1",
    ),
    (lambda m: m(torch.randn(5, 3)), ValueError, r"Expected more than 1 sequence"),
    (
        lambda m: m(torch.randn(5, 3, 3, dtype=torch.float64)),
        RuntimeError,
        r"input must have the type torch.float32, got type torch.float64",
    ),
    (lambda m: m(torch.randn(5, 3, 3), time_offset=-1), ValueError, r"time_offset"),
]


@pytest.mark.parametrize("call,error,pattern", BAD_INPUTS)
def test_bad_input_raises_clear_error(call, error, pattern):
    m = bnrnn.BNLSTM(3, 4)
    with pytest.raises(error, match=pattern):
        call(m)


BAD_CONFIGS = [
    ({"norm": "group"}, r"norm must be one of .* got 'group'"),
    ({"input_stats": "batch"}, r"input_stats must be one of .* got 'batch'"),
    ({"norm": "preactivation", "input_stats": "sequence"}, r"got norm='preactivation'"),
    ({"max_length": 0}, r"max_length must be a positive integer, got 0"),
    ({"dropout": 1.5}, r"dropout must be a number in \[0, 1\], got 1.5"),
    ({"weight_init": "xavier"}, r"weight_init must be one of"),
    ({"init_noise": -1.0}, r"init_noise must be non-negative"),
]


@pytest.mark.parametrize("kwargs,pattern", BAD_CONFIGS)
def test_bad_configuration_raises_value_error(kwargs, pattern):
    with pytest.raises(ValueError, match=pattern):
        bnrnn.BNLSTM(3, 4, **kwargs)


def test_single_sequence_allowed_in_eval_and_without_frame_wise_statistics():
    """A batch of one sequence is refused only in training with frame-wise statistics
    (a step of one row has no batch variance). Elsewhere it runs and gives what that
    sequence gets in a larger batch: in evaluation and without BN, its row of a batch of
    three (rows are independent there); with sequence-wise statistics, its row of a batch
    of itself twice (the same frames twice: the same mean and variance)."""
    torch.manual_seed(0)
    x = torch.randn(5, 3, 3)
    one = x[:, :1]

    def same(a, b):
        (out_a, (h_a, c_a)), (out_b, (h_b, c_b)) = a, b
        torch.testing.assert_close(out_a, out_b[:, :1])
        torch.testing.assert_close(h_a, h_b[:, :1])
        torch.testing.assert_close(c_a, c_b[:, :1])

    m = bnrnn.BNLSTM(3, 4)
    with pytest.raises(ValueError, match="Expected more than 1 sequence"):
        m(one)
    m(x)  # some population statistics
    m.eval()
    same(m(one), m(x))

    plain = bnrnn.BNLSTM(3, 4, norm=None)  # training
    same(plain(one), plain(x))

    seq = bnrnn.BNLSTM(3, 4, norm="input", input_stats="sequence")  # training
    same(seq(one), seq(one.expand(5, 2, 3)))
    (bn,) = seq.norm_modules()  # its batch statistics, once per call: the frames' mean
    assert bn.num_batches_tracked.tolist() == [2] + [0] * (bn.max_length - 1)
    wx = one[:, 0] @ seq.weight_ih_l0.detach().t()  # (5, 16)
    torch.testing.assert_close(bn.running_mean[0], (0.1 + 0.9 * 0.1) * wx.mean(0))


def test_cell_errors():
    cell = bnrnn.BNLSTMCell(3, 4)
    with pytest.raises(RuntimeError, match="Expected 3, got 5"):
        cell(torch.randn(2, 5))
    with pytest.raises(RuntimeError, match=r"Expected hidden\[0\] size \(2, 4\)"):
        cell(torch.randn(2, 3), (torch.zeros(3, 4), torch.zeros(2, 4)))
    with pytest.raises(ValueError, match="Expected more than 1 sequence"):
        cell(torch.randn(1, 3))


# -- sizes and numbers checked by every module ----------------------------------------------

MODULES = {
    "BNLSTM": lambda **kw: bnrnn.BNLSTM(**{"input_size": 3, "hidden_size": 4, **kw}),
    "BNRNN": lambda **kw: bnrnn.BNRNN(**{"input_size": 3, "hidden_size": 4, **kw}),
    "BNLSTMCell": lambda **kw: bnrnn.BNLSTMCell(**{"input_size": 3, "hidden_size": 4, **kw}),
    "BNRNNCell": lambda **kw: bnrnn.BNRNNCell(**{"input_size": 3, "hidden_size": 4, **kw}),
    "StepBatchNorm": lambda **kw: bnrnn.StepBatchNorm(**{"num_features": 3, "max_length": 5, **kw}),
}
SIZES = {
    "BNLSTM": ["input_size", "hidden_size", "num_layers", "max_length"],
    "BNRNN": ["input_size", "hidden_size", "num_layers", "max_length"],
    "BNLSTMCell": ["input_size", "hidden_size", "max_length"],
    "BNRNNCell": ["input_size", "hidden_size", "max_length"],
    "StepBatchNorm": ["num_features", "max_length"],
}
BAD_NUMBERS = [
    ("eps", 0.0, "eps must be a positive number, got 0.0"),
    ("eps", -1e-5, "eps must be a positive number"),
    ("eps", float("inf"), "eps must be a finite number, got inf"),
    ("eps", float("nan"), "eps must be a finite number, got nan"),
    ("momentum", 1.5, r"momentum must be a number in \[0, 1\] or None, got 1.5"),
    ("momentum", float("nan"), "momentum must be a number in"),
    ("momentum", True, "momentum must be a number in"),
    ("gamma_init", float("nan"), "gamma_init must be a finite number, got nan"),
    ("gamma_init", float("-inf"), "gamma_init must be a finite number"),
]


@pytest.mark.parametrize("name", MODULES)
def test_sizes_must_be_positive_integers(name):
    make = MODULES[name]
    for arg in SIZES[name]:
        for bad in (0, -1, 3.5, True, "3", None):
            with pytest.raises(ValueError, match=rf"{arg} must be a positive integer, got "):
                make(**{arg: bad})


@pytest.mark.parametrize("arg,value,pattern", BAD_NUMBERS)
@pytest.mark.parametrize("name", MODULES)
def test_eps_momentum_and_gamma_init_are_checked(name, arg, value, pattern):
    with pytest.raises(ValueError, match=pattern):
        MODULES[name](**{arg: value})


# -- whole-model pickles --------------------------------------------------------------------

_LOAD_IN_A_FRESH_PROCESS = """
import sys
import torch
import bnrnn  # what a script using the model imports anyway; no class is listed by hand
sys.path.insert(0, sys.argv[2])
from helpers import eval_outputs
saved = torch.load(sys.argv[1], weights_only=True)
got = eval_outputs(saved["modules"], saved["x"])
for name, want in saved["want"].items():
    torch.testing.assert_close(got[name], want, msg=name)
print("equal:", *sorted(got))
"""


@pytest.mark.skipif(
    not hasattr(torch.serialization, "add_safe_globals"),
    reason="torch < 2.4 has no weights-only allowlist (whole models need weights_only=False)",
)
def test_whole_model_pickle_loads_with_weights_only_in_a_fresh_process(tmp_path):
    """Every public module class, trained (statistics, a beyond-max_length warning given),
    saved whole with torch.save and loaded by torch.load's default weights_only=True."""
    torch.manual_seed(11)
    modules = {
        "BNLSTM": bnrnn.BNLSTM(
            3, 4, num_layers=2, bidirectional=True, learn_init=True, input_stats="sequence"
        ),
        "BNRNN": bnrnn.BNRNN(
            3, 4, nonlinearity="relu", norm="preactivation", max_length=4, sync_stats=True
        ),
        "BNLSTMCell": bnrnn.BNLSTMCell(3, 4, weight_init="orthogonal"),
        "BNRNNCell": bnrnn.BNRNNCell(3, 4, norm="input", momentum=None),
        "StepBatchNorm": bnrnn.StepBatchNorm(3, max_length=5, shift=True),
    }
    x = torch.randn(6, 5, 3)
    with pytest.warns(UserWarning, match="beyond max_length=4"):
        modules["BNRNN"](x)
    modules["BNLSTM"](x)
    modules["BNLSTMCell"](x[0], t=1)
    modules["BNRNNCell"](x[0], t=2)
    modules["StepBatchNorm"].frames(x[:3], [5] * 3)
    want = eval_outputs(modules, x)
    path = tmp_path / "model.pt"
    torch.save({"modules": modules, "x": x, "want": want}, path)
    tests = str(Path(__file__).parent)
    done = subprocess.run(
        [sys.executable, "-c", _LOAD_IN_A_FRESH_PROCESS, str(path), tests],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["equal:", *sorted(modules)]


# -- warnings name the caller's line ---------------------------------------------------------


class _Net(torch.nn.Module):
    """A user's model: the warnings of the layer inside must name this file."""

    def __init__(self, impl):
        super().__init__()
        self.rnn = bnrnn.BNLSTM(2, 3, max_length=3, impl=impl)

    def forward(self, x):
        return self.rnn(x)[0]


@pytest.mark.parametrize("cls", [bnrnn.BNLSTM, bnrnn.BNRNN])
def test_dropout_warning_names_the_callers_line(cls):
    with pytest.warns(UserWarning, match="no effect") as record:
        cls(3, 4, dropout=0.5)
    assert [w.filename for w in record] == [__file__]


@pytest.mark.parametrize("impl", ["auto", "reference"])
def test_beyond_max_length_warning_names_the_callers_line_and_first_step(impl):
    x = torch.randn(7, 4, 2)
    calls = {  # what: (the call, the first step past max_length, which is not the last)
        "layer": (lambda: bnrnn.BNLSTM(2, 3, max_length=3, impl=impl)(x), 3),
        "user's model": (lambda: _Net(impl)(x), 3),
        "time_offset": (
            lambda: bnrnn.BNLSTM(2, 3, max_length=4, impl=impl)(x[:4], time_offset=2),
            4,
        ),
        "cell": (lambda: bnrnn.BNLSTMCell(2, 3, max_length=3)(x[0], t=3), 3),
        "update_population_stats": (
            lambda: bnrnn.update_population_stats(bnrnn.BNRNN(2, 3, max_length=3, impl=impl), [x]),
            3,
        ),
    }
    for what, (call, first) in calls.items():
        with pytest.warns(UserWarning, match="beyond max_length") as record:
            call()
        assert {w.filename for w in record} == {__file__}, what
        assert all(f"training on step {first} " in str(w.message) for w in record), what
