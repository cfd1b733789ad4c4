"""norm="layer" on the fast path (`bnrnn.fast`) against the reference loop: outputs, final
states and every gradient, float32 and float64, padded and packed input, one and two
layers, bidirectional, training and evaluation, no-grad evaluation in chunks, inputs wider
than the hidden size, second derivatives, and gradcheck of the fast path itself.

Both loop backends: the compiled loops (``csrc/layer.h``: each thread runs every step for
its own batch rows) on one thread and on two ("compiled-rows", with few rows per thread),
and the Python loops.
"""

from __future__ import annotations

import copy

import pytest
import torch

import bnrnn
from bnrnn import fast
from helpers import forward_backward

TOL = {torch.float64: (1e-9, 1e-7), torch.float32: (1e-5, 2e-3)}


@pytest.fixture(params=["compiled", "compiled-rows", "python"])
def backend(request, monkeypatch):
    """Each loop backend; the backward in chunks of 2 steps and the no-grad input GEMM
    in chunks of 3 steps (several chunks per call)."""
    monkeypatch.setattr(fast.run, "MIN_CHUNK", 1)
    monkeypatch.setattr(fast.plan, "EVAL_CHUNK", 3)
    previous = fast.get_backend()
    threads = torch.get_num_threads()
    fast.set_backend("python" if request.param == "python" else "compiled")
    rows = request.param == "compiled-rows"
    if rows:  # the batch rows split over two threads however small the step
        from bnrnn.fast import compiled

        compiled.load()
        torch.set_num_threads(2)
        macs = compiled.set_block_macs(1)
    yield request.param
    if rows:
        compiled.set_block_macs(macs)
        torch.set_num_threads(threads)
    fast.set_backend(previous)


def _pair(cls, dtype, input_size=3, hidden=5, **kw):
    torch.manual_seed(0)
    ref = cls(input_size, hidden, norm="layer", impl="reference", dtype=dtype, **kw)
    with torch.no_grad():  # gains and shifts away from 1 and 0
        for ln in ref.norm_modules():
            ln.weight.uniform_(0.5, 1.5)
            if ln.bias is not None:
                ln.bias.normal_()
    fused = copy.deepcopy(ref)
    fused.impl = "fast"
    return ref, fused


def _run(model, x, train, lengths=None, packed=False, time_offset=0, hx=None):
    """One forward and backward: outputs, states and gradients (LN has no buffers)."""
    return forward_backward(model, x, train, lengths, packed, time_offset, hx)[:3]


def _close(a, b, dtype, what):
    atol, rtol = TOL[dtype]
    assert a.shape == b.shape, what
    scale = float(a.abs().max()) if a.numel() else 0.0
    err = float((a - b).abs().max()) if a.numel() else 0.0
    assert err <= atol + rtol * scale, f"{what}: max error {err:.3g} (scale {scale:.3g})"


def _compare(r1, r2, dtype):
    (o1, s1, g1), (o2, s2, g2) = r1, r2
    _close(o1, o2, dtype, "output")
    for k, (a, b) in enumerate(zip(s1, s2)):
        _close(a, b, dtype, f"state {k}")
    assert set(g1) == set(g2) and len(g1) > 1
    for name in g1:
        _close(g1[name], g2[name], dtype, f"grad {name}")


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("layers,bidirectional", [(1, False), (2, True)])
@pytest.mark.parametrize("cls", [bnrnn.BNLSTM, bnrnn.BNRNN])
def test_matches_reference(backend, cls, layers, bidirectional, dtype):
    ref, fused = _pair(cls, dtype, num_layers=layers, bidirectional=bidirectional)
    torch.manual_seed(1)
    x = torch.randn(7, 4, 3, dtype=dtype)
    lengths = [7, 5, 5, 1]
    cases = [
        {"train": True},
        {"train": False},
        {"train": True, "lengths": lengths},
        {"train": True, "lengths": lengths, "packed": True},
        {"train": False, "lengths": lengths, "time_offset": 40},
    ]
    for case in cases:
        _compare(_run(ref, x, **case), _run(fused, x, **case), dtype)
    D = 2 if bidirectional else 1
    hx = torch.randn(layers * D, 4, 5, dtype=dtype)
    hx = (hx, torch.randn_like(hx)) if cls is bnrnn.BNLSTM else hx
    _compare(_run(ref, x, True, hx=hx), _run(fused, x, True, hx=hx), dtype)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("cls", [bnrnn.BNLSTM, bnrnn.BNRNN])
@pytest.mark.parametrize("input_size", [3, 12])
def test_no_grad_evaluation_and_batch_of_one(backend, cls, dtype, input_size):
    """Without a backward (the Python loops: the input GEMM in chunks; the compiled loops:
    W_ih x_t in the step, in the step's row loop for a small input (3) or by a GEMM of the
    thread's rows (12), the reverse direction walking time backwards) and for a single
    sequence in training."""
    ref, fused = _pair(cls, dtype, input_size=input_size, num_layers=2, bidirectional=True)
    x = torch.randn(8, 3, input_size, dtype=dtype)
    for train in (False, True):
        ref.train(train), fused.train(train)
        for lengths in (None, [8, 6, 2]):
            with torch.no_grad():
                o1, s1 = ref(x, lengths=lengths)
                o2, s2 = fused(x, lengths=lengths)
            _close(o1, o2, dtype, "output")
            _close(s1[0] if isinstance(s1, tuple) else s1, s2[0] if isinstance(s2, tuple) else s2,
                   dtype, "h_n")  # fmt: skip
    _compare(_run(ref, x[:, :1], True), _run(fused, x[:, :1], True), dtype)


@pytest.mark.parametrize("cls", [bnrnn.BNLSTM, bnrnn.BNRNN])
@pytest.mark.parametrize("input_size", [1, 10, 12])
def test_input_narrower_and_wider_than_hidden(backend, cls, input_size):
    """The compiled loops compute a small input's W_ih x_t in the step (1), W_ih x of all
    steps as one GEMM and recompute xhat_ih in the backward (10), or keep it for an input
    wider than the hidden layer (12)."""
    ref, fused = _pair(cls, torch.float64, input_size=input_size, hidden=11)
    x = torch.randn(6, 3, input_size, dtype=torch.float64)
    for lengths in (None, [6, 4, 3]):
        _compare(_run(ref, x, True, lengths), _run(fused, x, True, lengths), torch.float64)


@pytest.mark.parametrize("cls", [bnrnn.BNLSTM, bnrnn.BNRNN])
def test_fast_path_and_its_loops_are_taken(backend, cls, monkeypatch):
    """impl="fast" takes norm="layer" (no ValueError), through `fast_direction`, with the
    compiled loops when they are chosen (the Python loops are then never called)."""
    calls = []
    original = fast.fast_direction

    def spy(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    def python_loops(*args, **kwargs):
        raise AssertionError("the Python loops ran")

    monkeypatch.setattr(fast, "fast_direction", spy)
    if backend != "python":
        monkeypatch.setattr(fast.loops, "forward_loop", python_loops)
        monkeypatch.setattr(fast.loops, "backward_loop", python_loops)
    _, fused = _pair(cls, torch.float32)
    out, _ = fused(torch.randn(4, 2, 3))
    out.sum().backward()
    fused.eval()
    with torch.no_grad():
        fused(torch.randn(9, 2, 3))
    assert calls


def test_second_derivatives(backend):
    """create_graph=True: a gradient penalty through the replay, as the reference."""
    ref, fused = _pair(bnrnn.BNLSTM, torch.float64)
    x = torch.randn(5, 3, 3, dtype=torch.float64)
    results = []
    for m in (ref, fused):
        m.zero_grad(set_to_none=True)
        xx = x.clone().requires_grad_(True)
        out, _ = m(xx, lengths=[5, 4, 2])
        (gx,) = torch.autograd.grad(out.square().sum(), xx, create_graph=True)
        gx.square().sum().backward()
        results.append([p.grad.clone() for p in m.parameters()])
    for a, b in zip(*results):
        _close(a, b, torch.float64, "second derivative")


@pytest.mark.parametrize("cls", [bnrnn.BNLSTM, bnrnn.BNRNN])
# xhat_ih recomputed by the backward (input no wider than hidden), or kept (wider input)
@pytest.mark.parametrize("input_size,hidden", [(2, 3), (10, 3)])
def test_gradcheck_fast_path(backend, cls, input_size, hidden):
    """gradcheck in float64 through the fast path itself, initial states included."""
    _, m = _pair(cls, torch.float64, input_size=input_size, hidden=hidden)
    m.train()
    names = [n for n, _ in m.named_parameters()]
    lengths = [3, 2, 3, 1]
    lstm = cls is bnrnn.BNLSTM

    def fn(x, h0, c0, *ps):
        hx = (h0, c0) if lstm else h0
        out, state = torch.func.functional_call(
            m, dict(zip(names, ps)), (x, hx), {"lengths": lengths}
        )
        return (out, *state) if lstm else (out, state)

    x = torch.randn(3, 4, input_size, dtype=torch.float64, requires_grad=True)
    h0 = torch.randn(1, 4, hidden, dtype=torch.float64, requires_grad=True)
    c0 = torch.randn(1, 4, hidden, dtype=torch.float64, requires_grad=lstm)
    params = tuple(p.detach().clone().requires_grad_() for p in m.parameters())
    assert torch.autograd.gradcheck(fn, (x, h0, c0) + params, eps=1e-6, atol=1e-5, rtol=1e-4)


def test_compile_fullgraph_and_export():
    """torch.compile(fullgraph=True) takes norm="layer" through ``bnrnn::direction`` (its
    fake implementation gives the per-row statistics' shapes): equal to eager, gradients
    too; an evaluation-mode model exports."""
    eager, _ = _pair(bnrnn.BNLSTM, torch.float32, num_layers=2, bidirectional=True)
    eager.impl = "fast"
    compiled_model = copy.deepcopy(eager)
    run = torch.compile(compiled_model, fullgraph=True, dynamic=False, backend="aot_eager")
    x = torch.randn(6, 4, 3)
    (o1, (h1, _)), (o2, (h2, _)) = eager(x), run(x)
    _close(o1.detach(), o2.detach(), torch.float32, "output")
    (o1.square().sum() + h1.sum()).backward()
    (o2.square().sum() + h2.sum()).backward()
    for (name, p1), p2 in zip(eager.named_parameters(), compiled_model.parameters()):
        _close(p1.grad, p2.grad, torch.float32, f"grad {name}")
    eager.eval()
    program = torch.export.export(eager, (x,))
    targets = [str(n.target) for n in program.graph.nodes if n.op == "call_function"]
    assert sum("bnrnn.direction" in t for t in targets) == 4
    _close(eager(x)[0].detach(), program.module()(x)[0].detach(), torch.float32, "exported")


@pytest.mark.parametrize("cls", [bnrnn.BNLSTM, bnrnn.BNRNN])
def test_gradgradcheck(cls):
    """Second derivatives through the fast path (the replay) in float64, padded."""
    _, m = _pair(cls, torch.float64, input_size=2, hidden=3)
    m.train()
    names = [n for n, _ in m.named_parameters()]

    def fn(x, *ps):
        out, state = torch.func.functional_call(
            m, dict(zip(names, ps)), (x,), {"lengths": [3, 2, 3]}
        )
        return out, (state[0] if isinstance(state, tuple) else state)

    x = torch.randn(3, 3, 2, dtype=torch.float64, requires_grad=True)
    params = tuple(p.detach().clone().requires_grad_() for p in m.parameters())
    assert torch.autograd.gradgradcheck(fn, (x, *params), eps=1e-6, atol=1e-4, rtol=1e-3)


def test_plan_computes_the_input_term_in_the_step_only_without_a_backward():
    """The compiled layer loops keep xhat_ih for their backward (W_ih x of all steps before
    the loop); without one they compute W_ih x_t in the step, as the BN placements do. The
    Python loops take W_ih x a chunk of steps at a time."""
    norms = {key: (1e-5, True) for key in ("ih", "hh", "c")}
    T = fast.plan.EVAL_CHUNK + 8

    def plan(save, compiled=True, I=12):
        sizes = (5,) * T
        return fast.plan.make_plan(
            fast.plan.LSTM, sizes, (T, 5, I), 6, 24, norms, False, save, compiled, False,
            layer=True,
        )  # fmt: skip

    assert plan(save=False).step_ih and not plan(save=False).eval_chunks
    assert not plan(save=True).step_ih
    python = plan(save=False, compiled=False)
    assert not python.step_ih and python.eval_chunks
    assert plan(save=False, I=3).inline_ih and not plan(save=False, I=3).step_ih
