"""The fast path as operators: the compiled loops' typed schemas (a missing or misnamed
argument fails at the call), ``bnrnn::direction`` under torch.compile (no graph break,
the same outputs, gradients and population statistics as eager) and torch.export, and
second derivatives (a gradient penalty) equal to the reference path's."""

from __future__ import annotations

import copy

import pytest
import torch

import bnrnn
from bnrnn import fast


def _model(cls=bnrnn.BNLSTM, dtype=torch.float32, **kw):
    torch.manual_seed(0)
    m = cls(3, 6, dtype=dtype, **kw)
    with torch.no_grad():
        for bn in m.norm_modules():
            bn.weight.uniform_(0.5, 1.5)
            bn.running_mean.normal_()
            bn.running_var.uniform_(0.5, 2.0)
    return m


def test_loop_operators_reject_missing_misnamed_and_mistyped_arguments(monkeypatch):
    """The compiled loops' arguments are named and typed: a call without one of them,
    with one misnamed, or with an option of the wrong type raises at the call."""
    from bnrnn.fast import compiled

    compiled.load()
    previous = fast.get_backend()
    fast.set_backend("compiled")
    calls = []
    op = torch.ops.bnrnn_fast.forward_loop

    def spy(**kwargs):
        calls.append(kwargs)
        return op(**kwargs)

    monkeypatch.setattr(torch.ops.bnrnn_fast, "forward_loop", spy)
    try:
        with torch.no_grad():
            _model().eval()(torch.randn(4, 3, 3))
    finally:
        fast.set_backend(previous)
    assert calls
    kwargs = calls[0]
    op(**kwargs)  # as the fast path passed them
    missing = {k: v for k, v in kwargs.items() if k != "eps_hh"}
    with pytest.raises(RuntimeError, match="eps_hh"):
        op(**missing)
    with pytest.raises(RuntimeError, match="eps_hh"):  # misnamed: eps_hh is missing
        op(**missing, epsilon_hh=kwargs["eps_hh"])
    with pytest.raises(RuntimeError, match="at most"):  # an argument it does not take
        op(**kwargs, epsilon_hh=kwargs["eps_hh"])
    with pytest.raises(RuntimeError, match="t0"):
        op(**{**kwargs, "t0": 0.5})
    with pytest.raises(RuntimeError):  # options are keyword-only
        op(*[kwargs[k] for k in ("wx", "wh", "gates", "out")], **kwargs)


def test_direction_operator_rejects_a_missing_option():
    m = _model()
    x = torch.randn(4, 3, 3)
    seen = []
    original = fast.ops._direction_impl

    def spy(a):
        seen.append(a)
        return original(a)

    fast.ops._direction_impl = spy
    try:
        with torch.no_grad():
            m(x)
    finally:
        fast.ops._direction_impl = original
    a = seen[0]
    options = a.options()
    del options["time_offset"]
    with pytest.raises((RuntimeError, TypeError), match="time_offset"):
        torch.ops.bnrnn.direction(*a.tensors(), **options)


def _compare(a, b, what, tol=1e-6):
    assert a.shape == b.shape, what
    a, b = a.detach().double(), b.detach().double()
    err = float((a - b).abs().max()) if a.numel() else 0.0
    assert err <= tol * (1 + float(a.abs().max())), f"{what}: {err}"


def test_compile_fullgraph_training_and_evaluation():
    """torch.compile(fullgraph=True) on a bidirectional 2-layer BNLSTM, a padded batch
    without lengths: no graph break; outputs, states, every gradient and the population
    statistics equal eager, in training and in evaluation."""
    eager = _model(num_layers=2, bidirectional=True, batch_first=True, max_length=10)
    compiled_model = copy.deepcopy(eager)
    run = torch.compile(compiled_model, fullgraph=True, dynamic=False, backend="aot_eager")
    x = torch.randn(4, 6, 3)
    for train in (True, False):
        eager.train(train)
        compiled_model.train(train)
        (o1, (h1, c1)), (o2, (h2, c2)) = eager(x), run(x)
        for what, a, b in (("output", o1, o2), ("h", h1, h2), ("c", c1, c2)):
            _compare(a.detach(), b.detach(), f"{what} train={train}")
        if train:
            (o1.square().sum() + h1.sum()).backward()
            (o2.square().sum() + h2.sum()).backward()
            for (name, p1), p2 in zip(eager.named_parameters(), compiled_model.parameters()):
                _compare(p1.grad, p2.grad, f"grad {name}")
        for (name, b1), b2 in zip(eager.named_buffers(), compiled_model.buffers()):
            _compare(b1, b2, f"buffer {name} train={train}")


def test_export_evaluation():
    """An evaluation-mode BNLSTM exports with torch.export: the recurrent layers are
    bnrnn::direction calls, and the exported program's outputs equal eager."""
    m = _model(num_layers=2, bidirectional=True, max_length=5).eval()
    x = torch.randn(7, 4, 3)  # beyond max_length: the last population row
    program = torch.export.export(m, (x,))
    targets = [str(n.target) for n in program.graph.nodes if n.op == "call_function"]
    assert sum("bnrnn.direction" in t for t in targets) == 4
    (o1, (h1, c1)), (o2, (h2, c2)) = m(x), program.module()(x)
    for what, a, b in (("output", o1, o2), ("h", h1, h2), ("c", c1, c2)):
        _compare(a, b, what)


def _penalty_grads(m, x):
    """A gradient penalty: d/dW of mean(o^2) + 10 |do.sum()/dx|^2."""
    m.zero_grad()
    x = x.clone().requires_grad_()
    o, _ = m(x)
    (g,) = torch.autograd.grad(o.sum(), x, create_graph=True)
    (o.pow(2).mean() + 10 * g.pow(2).sum()).backward()
    return {n: p.grad.clone() for n, p in m.named_parameters()}


@pytest.mark.parametrize("norm", ["cooijmans", "input", "preactivation"])
def test_gradient_penalty_equals_reference(norm):
    """Double backward through the fast path (a gradient penalty) gives the reference
    path's gradients, not the task loss's alone."""
    torch.manual_seed(0)
    fast_m = bnrnn.BNLSTM(3, 5, norm=norm, max_length=10, dtype=torch.float64)
    ref = copy.deepcopy(fast_m)
    ref.impl = "reference"
    x = torch.randn(6, 4, 3, dtype=torch.float64)
    g1, g2 = _penalty_grads(fast_m, x), _penalty_grads(ref, x)
    for name in g1:
        _compare(g1[name], g2[name], name, tol=1e-9)
    # (the penalty's share: far from the task loss's gradient alone)
    task = _task_grads(fast_m, x)["weight_hh_l0"]
    assert float((task - g1["weight_hh_l0"]).norm()) > 0.1 * float(g1["weight_hh_l0"].norm())


def _task_grads(m, x):
    m.zero_grad()
    o, _ = m(x)
    o.pow(2).mean().backward()
    return {n: p.grad.clone() for n, p in m.named_parameters()}


def test_create_graph_gradients_equal_the_fast_backward():
    """With create_graph the first derivatives come from the replay: equal to the fast
    backward's, padded steps and a step with one sequence included."""
    m = _model(max_length=10, dtype=torch.float64, num_layers=2)
    x = torch.randn(5, 4, 3, dtype=torch.float64)
    lengths = [5, 3, 4, 1]
    grads = []
    for create_graph in (False, True):
        # A copy each time: the first call's tracking moves the last tracked row, and so
        # the population row the one-sequence step reads.
        fresh = copy.deepcopy(m)
        out, (h, c) = fresh(x, lengths=lengths)
        loss = (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum() + c.sum()
        params = list(fresh.parameters())
        grads.append(torch.autograd.grad(loss, params, create_graph=create_graph))
    for (name, _), a, b in zip(m.named_parameters(), *grads):
        _compare(a, b.detach(), name, tol=1e-9)


@pytest.mark.parametrize(
    "cls,norm",
    [
        (bnrnn.BNLSTM, "cooijmans"),
        (bnrnn.BNLSTM, "input"),
        (bnrnn.BNLSTM, "preactivation"),
        (bnrnn.BNRNN, "cooijmans"),
    ],
)
def test_gradgradcheck(cls, norm):
    """Second derivatives through the fast path in float64, training mode, padded."""
    torch.manual_seed(3)
    m = cls(2, 3, norm=norm, dtype=torch.float64)
    m.train()
    names = [n for n, _ in m.named_parameters()]
    lengths = [3, 2, 3]

    def fn(x, *ps):
        out, state = torch.func.functional_call(m, dict(zip(names, ps)), (x,), {"lengths": lengths})
        h = state[0] if isinstance(state, tuple) else state
        return out, h

    x = torch.randn(3, 3, 2, dtype=torch.float64, requires_grad=True)
    params = tuple(p.detach().clone().requires_grad_() for p in m.parameters())
    assert torch.autograd.gradgradcheck(fn, (x, *params), eps=1e-6, atol=1e-4, rtol=1e-3)
