"""torch.autograd.gradcheck in float64, training mode, on the input and every parameter:
a BN that detached its batch statistics would pass output comparisons and fail here."""

import pytest
import torch

import bnrnn


def _check(model, x, lengths=None):
    model.train()
    # Every row tracked once first: a step with one sequence then reads its own row, which
    # the call does not update. (Otherwise it reads the last row tracked, which the call's
    # earlier steps update from the batch: a dependence through the detached population
    # statistics that the numerical gradient sees and autograd, by design, does not.)
    with torch.no_grad():
        model(torch.randn(x.shape[0], 4, x.shape[2], dtype=x.dtype))
    params = [p for p in model.parameters()]
    names = [n for n, _ in model.named_parameters()]

    def fn(x, *ps):
        # Swap the parameters in functionally so gradcheck perturbs them.
        state = dict(zip(names, ps))
        out, state_out = torch.func.functional_call(model, state, (x,), {"lengths": lengths})
        h = state_out[0] if isinstance(state_out, tuple) else state_out
        return out, h

    inputs = (x.requires_grad_(),) + tuple(p.detach().clone().requires_grad_() for p in params)
    assert torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("norm", ["cooijmans", "input", "preactivation"])
def test_gradcheck_placements(norm):
    torch.manual_seed(0)
    m = bnrnn.BNLSTM(2, 3, norm=norm, dtype=torch.float64)
    with torch.no_grad():
        for bn in m.norm_modules():
            bn.weight.uniform_(0.5, 1.5)
    _check(m, torch.randn(3, 4, 2, dtype=torch.float64), lengths=[3, 2, 3, 1])


@pytest.mark.parametrize("norm", ["cooijmans", "input"])
def test_gradcheck_sequence_wise(norm):
    torch.manual_seed(1)
    m = bnrnn.BNLSTM(
        2, 3, norm=norm, input_stats="sequence", bidirectional=True, dtype=torch.float64
    )
    _check(m, torch.randn(3, 3, 2, dtype=torch.float64), lengths=[3, 1, 2])


def test_gradcheck_bnrnn_two_layers():
    torch.manual_seed(2)
    m = bnrnn.BNRNN(2, 3, num_layers=2, dtype=torch.float64)
    _check(m, torch.randn(3, 3, 2, dtype=torch.float64))
