"""The fast path (`bnrnn.fast`) against the reference loop (`impl="reference"`): outputs,
final states, population statistics and every gradient, for both loop backends (the
compiled C++ loops and the Python loops), every placement, input statistics, packed and
padded input, bidirectional multi-layer stacks, float32 and float64, BNLSTM and BNRNN,
training and evaluation, ``time_offset``, steps beyond ``max_length`` and degenerate steps
(one sequence present); plus gradcheck of the fast path itself.

The compiled loops are built on first use; if the build fails, the compiled tests fail
(``bnrnn.fast.set_backend("compiled")`` raises instead of falling back).
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch.nn.utils.rnn import pack_padded_sequence

import bnrnn
from bnrnn import fast
from helpers import forward_backward as _run
from helpers import with_rows_filled

# "compiled-blocks": the compiled loops with every step split by hidden units over two
# threads (blocks of 16 units, the last one partial), as large layers run, and evaluation
# split by batch rows, as small layers run; "compiled-mkl": the same with MKL's packed GEMM
# for the per-step products instead of oneDNN's brgemm, and evaluation split by units.
BACKENDS = ["compiled", "compiled-blocks", "compiled-mkl", "python"]
# Tolerances relative to the largest magnitude of each compared tensor: float32 BN through
# steps with two or three sequences amplifies rounding (both paths are equally affected).
TOL = {torch.float64: (1e-9, 1e-7), torch.float32: (1e-5, 2e-3)}

PLACEMENTS = [
    ("cooijmans", "frame"),
    ("cooijmans", "sequence"),
    ("input", "frame"),
    ("input", "sequence"),
    ("preactivation", "frame"),
    (None, "frame"),
]


@pytest.fixture(params=BACKENDS)
def backend(request, monkeypatch):
    """Each loop backend; the backward in chunks of 2 steps and the Python loops' no-grad
    input GEMM in chunks of 3 steps (several chunks per call)."""
    monkeypatch.setattr(fast.run, "MIN_CHUNK", 1)
    monkeypatch.setattr(fast.plan, "EVAL_CHUNK", 3)
    previous = fast.get_backend()
    threads = torch.get_num_threads()
    fast.set_backend("python" if request.param == "python" else "compiled")
    blocks = request.param in ("compiled-blocks", "compiled-mkl")
    if blocks:
        from bnrnn.fast import compiled

        compiled.load()
        if request.param == "compiled-mkl" and not compiled.set_gemm("packed"):
            compiled.set_gemm("brgemm")
            fast.set_backend(previous)
            pytest.skip("this torch build does not export MKL's packed GEMM")
        torch.set_num_threads(2)
        macs = compiled.set_block_macs(1)
        # evaluation: rows split over threads with brgemm, hidden units split with MKL
        split = compiled.set_row_split_bytes(0 if request.param == "compiled-mkl" else 1 << 30)
    yield request.param
    if blocks:
        compiled.set_gemm("brgemm")
        compiled.set_block_macs(macs)
        compiled.set_row_split_bytes(split)
        torch.set_num_threads(threads)
    fast.set_backend(previous)


def _randomise(model: torch.nn.Module) -> None:
    """Non-trivial BN scales, shifts and population statistics."""
    with torch.no_grad():
        for bn in model.norm_modules():
            bn.weight.uniform_(0.5, 1.5)
            bn.running_mean.normal_()
            bn.running_var.uniform_(0.5, 2.0)
            if bn.bias is not None:
                bn.bias.normal_()


def _pair(cls, dtype, **kw):
    torch.manual_seed(0)
    # 20 hidden units: two blocks of the compiled loops (16 + 4 units)
    ref = cls(3, 20, impl="reference", dtype=dtype, **kw)
    _randomise(ref)
    fast_model = copy.deepcopy(ref)
    fast_model.impl = "fast"
    return ref, fast_model


def _assert_close(a, b, dtype, what):
    atol, rtol = TOL[dtype]
    assert a.shape == b.shape, what
    if a.dtype == torch.long:
        assert torch.equal(a, b), what
        return
    scale = float(a.abs().max()) if a.numel() else 0.0
    err = float((a - b).abs().max()) if a.numel() else 0.0
    assert err <= atol + rtol * scale, f"{what}: max error {err:.3g} (scale {scale:.3g})"


def _compare(r1, r2, dtype):
    out1, st1, g1, b1 = r1
    out2, st2, g2, b2 = r2
    _assert_close(out1, out2, dtype, "output")
    for k, (s1, s2) in enumerate(zip(st1, st2)):
        _assert_close(s1, s2, dtype, f"state {k}")
    assert set(g1) == set(g2)
    for name in g1:
        _assert_close(g1[name], g2[name], dtype, f"grad {name}")
    assert set(b1) == set(b2)
    for name in b1:
        _assert_close(b1[name], b2[name], dtype, f"buffer {name}")


@pytest.mark.filterwarnings("ignore:training on step")
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("norm,input_stats", PLACEMENTS)
@pytest.mark.parametrize("cls", [bnrnn.BNLSTM, bnrnn.BNRNN])
def test_matches_reference(backend, cls, norm, input_stats, dtype):
    """Bidirectional, two layers, packed (unsorted) input with a length-1 sequence (the
    last steps have one sequence: population fallback), more steps than max_length (not
    tracked in training, last row in evaluation), time_offset; training then evaluation.
    Layer 0 has a small input (W_ih x inside the step), layer 1 a large one (one GEMM)."""
    ref, fast_model = _pair(
        cls,
        dtype,
        norm=norm,
        input_stats=input_stats,
        num_layers=2,
        bidirectional=True,
        max_length=5,
        momentum=0.3,
    )
    if dtype == torch.float64:
        lengths = torch.tensor([4, 7, 1, 7, 5, 3])  # sorted sizes 6 5 5 4 3 2 2
    else:
        # A BN over two rows has a zero gradient in exact arithmetic, so in float32 it is
        # amplified rounding noise (different in each path): no step with two sequences.
        lengths = torch.tensor([7, 4, 1, 7, 5, 7])  # sorted sizes 6 5 5 5 4 3 3
    x = torch.randn(7, 6, 3, dtype=dtype)
    for train, offset in ((True, 0), (True, 2), (False, 2)):
        r1 = _run(ref, x, train, lengths, packed=True, time_offset=offset)
        r2 = _run(fast_model, x, train, lengths, packed=True, time_offset=offset)
        _compare(r1, r2, dtype)


@pytest.mark.filterwarnings("ignore:training on step")
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("norm,input_stats", PLACEMENTS)
@pytest.mark.parametrize("cls", [bnrnn.BNLSTM, bnrnn.BNRNN])
@pytest.mark.parametrize("num_layers,packed", [(1, False), (2, True)])
def test_padded_reversal_matches_reference(
    backend, num_layers, packed, cls, norm, input_stats, dtype
):
    """reverse="padded" (Cooijmans §5.4: the reverse direction reads the padded batch
    flipped, the rows in their leading padding held at a non-zero initial state and counted
    in every step's statistics): output, final states, population statistics and every
    gradient, the initial state's included; training (more steps than max_length, with and
    without time_offset), evaluation with gradients, and evaluation under no_grad."""
    ref, fast_model = _pair(
        cls,
        dtype,
        norm=norm,
        input_stats=input_stats,
        num_layers=num_layers,
        bidirectional=True,
        max_length=5,
        momentum=0.3,
        reverse="padded",
    )
    # float32: no forward step with two sequences only (see test_matches_reference)
    lengths = torch.tensor([4, 7, 1, 7, 5, 3] if dtype == torch.float64 else [7, 4, 1, 7, 5, 7])
    x = torch.randn(7, 6, 3, dtype=dtype)
    g = torch.Generator().manual_seed(3)
    shape = (2 * num_layers, 6, 20)
    h0 = torch.randn(shape, generator=g, dtype=dtype)
    c0 = torch.randn(shape, generator=g, dtype=dtype)
    for train, offset in ((True, 0), (True, 2), (False, 2)):
        results = []
        for m in (ref, fast_model):
            hx = [h0.clone().requires_grad_(), c0.clone().requires_grad_()]
            hx = hx if cls is bnrnn.BNLSTM else hx[:1]
            r = _run(m, x, train, lengths, packed, offset, tuple(hx) if len(hx) == 2 else hx[0])
            for k, s in enumerate(hx):
                r[2][f"hx{k}"] = s.grad
            results.append(r)
        _compare(*results, dtype)
    evaluated = []
    for m in (ref, fast_model):
        with torch.no_grad():
            out, _ = m.eval()(x, lengths=lengths)
        evaluated.append(out)
    _assert_close(*evaluated, dtype, "no_grad output")


@pytest.mark.parametrize("norm", ["cooijmans", "preactivation"])
def test_without_onednn(backend, norm):
    """With oneDNN disabled (torch.backends.mkldnn), the input GEMMs and the compiled
    loops' brgemm fall back to torch's GEMM, with the same results."""
    ref, fast_model = _pair(
        bnrnn.BNLSTM, torch.float32, norm=norm, num_layers=2, bidirectional=True
    )
    x = torch.randn(6, 5, 3)
    lengths = torch.tensor([6, 4, 6, 5, 3])
    torch.backends.mkldnn.enabled = False
    try:
        for train in (True, False):
            r1 = _run(ref, x, train, lengths, packed=True)
            r2 = _run(fast_model, x, train, lengths, packed=True)
            _compare(r1, r2, torch.float32)
    finally:
        torch.backends.mkldnn.enabled = True


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("norm,input_stats", PLACEMENTS)
@pytest.mark.parametrize("cls", [bnrnn.BNLSTM, bnrnn.BNRNN])
def test_no_grad_evaluation(backend, cls, norm, input_stats, dtype):
    """Evaluation under no_grad, where every BN is an affine map and the compiled LSTM step
    is one fast_model pass: packed input (steps beyond max_length read the last population row),
    and a batch with no padding (the reverse direction walks time backwards instead of
    flipping), an initial state, two bidirectional layers (a small and a large input)."""
    ref, fast_model = _pair(
        cls,
        dtype,
        norm=norm,
        input_stats=input_stats,
        num_layers=2,
        bidirectional=True,
        max_length=5,
    )
    lengths = torch.tensor([7, 4, 1, 7, 5, 7])
    x = torch.randn(7, 6, 3, dtype=dtype)
    h0 = torch.randn(4, 6, 20, dtype=dtype)
    hx = (h0, torch.randn(4, 6, 20, dtype=dtype)) if cls is bnrnn.BNLSTM else h0
    for inp in (pack_padded_sequence(x, lengths, enforce_sorted=False), x):
        results = []
        for m in (ref, fast_model):
            m.eval()
            with torch.no_grad():
                out, state = m(inp, hx)
            out = out.data if isinstance(out, torch.nn.utils.rnn.PackedSequence) else out
            results.append((out, state if isinstance(state, tuple) else (state,)))
        (o1, s1), (o2, s2) = results
        _assert_close(o1, o2, dtype, "output")
        for k, (a, b) in enumerate(zip(s1, s2)):
            _assert_close(a, b, dtype, f"state {k}")


def _spy_reads_in_place(monkeypatch) -> list[bool]:
    """The answers of `fast.run._reads_in_place` for per-step statistics, in call order
    (sequence-wise statistics, one row for all steps, are always filled)."""
    seen: list[bool] = []
    original = fast.run._reads_in_place

    def spy(plan, nm, *args):
        result = original(plan, nm, *args)
        if not nm.sequence:
            seen.append(result)
        return result

    monkeypatch.setattr(fast.run, "_reads_in_place", spy)
    return seen


@pytest.mark.parametrize("norm,input_stats", PLACEMENTS)
def test_evaluation_reads_population_rows_in_place(backend, norm, input_stats, monkeypatch):
    """Without a backward and within max_length, the loops read the module's population
    rows themselves (no copy); beyond max_length (the last row reused), with gradients
    (kept for the backward) or in training (batch statistics) they get filled buffers. The
    results match the reference either way."""
    ref, fast_model = _pair(
        bnrnn.BNLSTM, torch.float32, norm=norm, input_stats=input_stats, max_length=5
    )
    seen = _spy_reads_in_place(monkeypatch)
    for m in (ref, fast_model):
        m.eval()
    for T, grad, in_place in ((5, False, True), (7, False, False), (5, True, False)):
        x = torch.randn(T, 6, 3, requires_grad=grad)
        seen.clear()
        with torch.set_grad_enabled(grad):
            (o1, (h1, c1)), (o2, (h2, c2)) = ref(x), fast_model(x)
        assert all(s == in_place for s in seen), (T, grad, seen)
        # (no per-step BN: none at all, or input-only with sequence-wise statistics)
        assert seen or norm is None or (norm, input_stats) == ("input", "sequence")
        for what, a, b in (("output", o1, o2), ("h", h1, h2), ("c", c1, c2)):
            _assert_close(a.detach(), b.detach(), torch.float32, f"{what} at T={T}")
    fast_model.train()
    seen.clear()
    fast_model(torch.randn(5, 6, 3))
    assert not any(seen)


@pytest.mark.parametrize("norm,input_stats", PLACEMENTS)
def test_rows_past_the_last_tracked_row_are_never_read(backend, norm, input_stats, monkeypatch):
    """Trained on 4 steps of max_length=10 (rows 4..9 hold other values, never tracked):
    evaluation (no grad: in place up to step 3, copied past it; with grad), a degenerate
    training step and collecting by update_population_stats read the last tracked row for
    every step past it, per module, like a model whose rows are filled with it."""
    ref, fast_model = _pair(
        bnrnn.BNLSTM,
        torch.float64,
        norm=norm,
        input_stats=input_stats,
        bidirectional=True,
        max_length=10,
        momentum=0.5,
    )
    first = torch.randn(4, 6, 3, dtype=torch.float64)
    for m in (ref, fast_model):
        m.train()
        m(first)
    seen = _spy_reads_in_place(monkeypatch)
    x = torch.randn(8, 6, 3, dtype=torch.float64)
    for T, offset, grad, in_place in (
        (4, 0, False, True),
        (8, 0, False, False),
        (3, 2, True, False),
    ):
        filled = with_rows_filled(ref)
        results = []
        for m in (ref, fast_model, filled):
            m.eval()
            with torch.set_grad_enabled(grad):
                out, (h, c) = m(x[:T], time_offset=offset)
            results.append([t.detach() for t in (out, h, c)])
        if norm is not None and (norm, input_stats) != ("input", "sequence"):
            assert any(seen) == in_place, (T, offset, seen)
        seen.clear()
        for got, what in ((results[1], "fast"), (results[2], "filled")):
            for a, b, name in zip(results[0], got, ("output", "h", "c")):
                _assert_close(a, b, torch.float64, f"{what} {name} T={T} offset={offset}")
    # Degenerate steps (one sequence present) in training: steps 4 and 5 read row 3.
    filled = with_rows_filled(ref)
    lengths = [6, 2, 2, 2]
    r = [_run(m, x[:6, :4], True, lengths) for m in (ref, fast_model, filled)]
    _compare(r[0], r[1], torch.float64)
    _assert_close(r[0][0], r[2][0], torch.float64, "training output against filled rows")
    # Collecting over batches of 5 steps, the last two degenerate: rows 3.. never collected.
    batches = [(x[:5, :4].clone() * (k + 1), [5, 3, 3, 3]) for k in range(2)]
    for m in (ref, fast_model):
        bnrnn.update_population_stats(m, batches, lambda m, b: m(b[0], lengths=b[1]))
    for (name, a), b in zip(ref.named_buffers(), fast_model.buffers()):
        _assert_close(a, b, torch.float64, name)
    filled = with_rows_filled(ref)
    with torch.no_grad():
        want = filled.eval()(x)[0]
        for m in (ref, fast_model):
            _assert_close(want, m.eval()(x)[0], torch.float64, f"after collecting, {m.impl}")


@pytest.mark.parametrize("norm,input_stats", PLACEMENTS)
def test_padded_full_length_and_initial_state(backend, norm, input_stats):
    """A padded batch_first tensor without lengths, an explicit initial state (gradients
    flow into it), both directions (the reverse one of a batch with no padding), float32
    at a training-sized batch."""
    torch.manual_seed(1)
    ref = bnrnn.BNLSTM(
        12,
        24,
        norm=norm,
        input_stats=input_stats,
        batch_first=True,
        bidirectional=True,
        impl="reference",
    )
    _randomise(ref)
    fast_model = copy.deepcopy(ref)
    fast_model.impl = "fast"
    x = torch.randn(8, 9, 12)
    h0 = torch.randn(2, 8, 24, requires_grad=True)
    c0 = torch.randn(2, 8, 24, requires_grad=True)
    for train in (True, False):
        r1 = _run(ref, x, train, hx=(h0, c0))
        g1 = (h0.grad.clone(), c0.grad.clone())
        h0.grad = c0.grad = None
        r2 = _run(fast_model, x, train, hx=(h0, c0))
        g2 = (h0.grad.clone(), c0.grad.clone())
        h0.grad = c0.grad = None
        _compare(r1, r2, torch.float32)
        _assert_close(g1[0], g2[0], torch.float32, "grad h0")
        _assert_close(g1[1], g2[1], torch.float32, "grad c0")


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("I", [3, 12])
@pytest.mark.parametrize("norm,input_stats", PLACEMENTS)
def test_input_without_gradient(backend, norm, input_stats, I, dtype):
    """x that needs no gradient (a first layer on data), padded steps included: a small
    input (W_ih x inside the step, dW_ih accumulated inside the loop) and a larger one (W_ih
    x recomputed at each step, dW_ih one GEMM per chunk)."""
    torch.manual_seed(5)
    ref = bnrnn.BNLSTM(I, 20, norm=norm, input_stats=input_stats, impl="reference", dtype=dtype)
    _randomise(ref)
    fast_model = copy.deepcopy(ref)
    fast_model.impl = "fast"
    x = torch.randn(7, 5, I, dtype=dtype)
    for lengths in (None, [7, 3, 6, 7, 2]):
        r1 = _run(ref, x, True, lengths, input_grad=False)
        r2 = _run(fast_model, x, True, lengths, input_grad=False)
        assert r1[2].pop("input") is None and r2[2].pop("input") is None
        _compare(r1, r2, dtype)


@pytest.mark.parametrize("norm", ["cooijmans", "preactivation"])
def test_large_layer_gemm_in_panels(backend, norm):
    """A layer whose per-gate weight blocks exceed the L2 budget of the compiled loops'
    GEMMs (hidden 400: (400, 200) and (200, 400) blocks on two threads, (400, 400) on one),
    which they multiply in panels of 64 columns with a partial last panel: float32 training
    and no-grad evaluation against the reference."""
    torch.manual_seed(6)
    ref = bnrnn.BNLSTM(40, 400, norm=norm, impl="reference", max_length=4)
    _randomise(ref)
    fast_model = copy.deepcopy(ref)
    fast_model.impl = "fast"
    x = torch.randn(4, 3, 40)
    _compare(_run(ref, x, True), _run(fast_model, x, True), torch.float32)
    for m in (ref, fast_model):
        m.eval()
    with torch.no_grad():
        (o1, s1), (o2, s2) = ref(x), fast_model(x)
    _assert_close(o1, o2, torch.float32, "eval output")
    for k, (a, b) in enumerate(zip(s1, s2)):
        _assert_close(a, b, torch.float32, f"eval state {k}")


@pytest.mark.parametrize("nonlinearity", ["tanh", "relu"])
def test_bnrnn_nonlinearity_and_lengths(backend, nonlinearity):
    torch.manual_seed(2)
    ref = bnrnn.BNRNN(3, 5, nonlinearity=nonlinearity, impl="reference", dtype=torch.float64)
    _randomise(ref)
    fast_model = copy.deepcopy(ref)
    fast_model.impl = "fast"
    x = torch.randn(6, 4, 3, dtype=torch.float64)
    lengths = [6, 2, 5, 6]
    _compare(_run(ref, x, True, lengths), _run(fast_model, x, True, lengths), torch.float64)


@pytest.mark.parametrize("norm", ["cooijmans", "input", "preactivation", None])
def test_update_population_stats_and_no_grad(backend, norm):
    """The `collecting` flag (batch statistics in eval mode), and the no-grad forward."""
    torch.manual_seed(3)
    ref = bnrnn.BNLSTM(3, 5, norm=norm, max_length=6, impl="reference", dtype=torch.float64)
    fast_model = copy.deepcopy(ref)
    fast_model.impl = "fast"
    batches = [torch.randn(6, 4, 3, dtype=torch.float64) for _ in range(3)]
    for m in (ref, fast_model):
        bnrnn.update_population_stats(m, batches)
    for (n, a), b in zip(ref.named_buffers(), fast_model.buffers()):
        _assert_close(a, b, torch.float64, n)
    ref.eval()
    fast_model.eval()
    with torch.no_grad():
        o1, (h1, c1) = ref(batches[0])
        o2, (h2, c2) = fast_model(batches[0])
    for a, b, what in ((o1, o2, "output"), (h1, h2, "h_n"), (c1, c2, "c_n")):
        _assert_close(a, b, torch.float64, what)


def test_backward_twice_with_retain_graph(backend):
    """The saved buffers are not consumed by the backward."""
    torch.manual_seed(4)
    m = bnrnn.BNLSTM(3, 5, impl="fast", dtype=torch.float64)
    x = torch.randn(5, 4, 3, dtype=torch.float64)
    out, _ = m(x, lengths=[5, 3, 4, 1])
    g1 = torch.autograd.grad(out.sum(), list(m.parameters()), retain_graph=True)
    g2 = torch.autograd.grad(out.sum(), list(m.parameters()))
    for a, b in zip(g1, g2):
        assert torch.equal(a, b)


@pytest.mark.parametrize("norm", ["cooijmans", "preactivation"])
# W_ih x inside the step; one GEMM with xhat_ih recomputed by the backward (input no wider
# than hidden); one GEMM with xhat_ih kept (wider input)
@pytest.mark.parametrize("input_size,hidden", [(2, 3), (10, 9), (10, 3)])
def test_gradcheck_fast_path(backend, norm, input_size, hidden):
    """gradcheck in float64 through the fast path itself (batch statistics not detached)."""
    torch.manual_seed(5)
    m = bnrnn.BNLSTM(input_size, hidden, norm=norm, impl="fast", dtype=torch.float64)
    _randomise(m)
    m.train()
    names = [n for n, _ in m.named_parameters()]
    lengths = [3, 2, 3, 1]

    def fn(x, h0, c0, *ps):
        out, (h, c) = torch.func.functional_call(
            m, dict(zip(names, ps)), (x, (h0, c0)), {"lengths": lengths}
        )
        return out, h, c

    x = torch.randn(3, 4, input_size, dtype=torch.float64, requires_grad=True)
    h0 = torch.randn(1, 4, hidden, dtype=torch.float64, requires_grad=True)
    c0 = torch.randn(1, 4, hidden, dtype=torch.float64, requires_grad=True)
    params = tuple(p.detach().clone().requires_grad_() for p in m.parameters())
    assert torch.autograd.gradcheck(fn, (x, h0, c0) + params, eps=1e-6, atol=1e-5, rtol=1e-4)


def test_compiled_loops_build():
    """The compiled loops must build here (CI fails loudly rather than falling back)."""
    from bnrnn.fast import compiled

    assert compiled.load() is not None


def test_buffer_cache_reuses_and_releases(monkeypatch):
    """The compiled loops' internal buffers come back from the cache at the next step
    instead of growing it; what the caller receives (output, gradients) is ordinary;
    empty_cache releases; with limit 0 nothing is kept; results do not depend on it."""
    from bnrnn.fast import compiled

    compiled.load()
    monkeypatch.setattr(fast.run, "MIN_CHUNK", 1)
    previous = compiled.set_cache_limit(1 << 30)
    try:
        fast.empty_cache()
        torch.manual_seed(3)
        model = bnrnn.BNLSTM(8, 64, max_length=30)
        x = torch.randn(30, 16, 8)
        h0 = torch.zeros(1, 16, 64, requires_grad=True)
        results = []
        for _ in range(3):
            model.zero_grad(set_to_none=True)
            h0.grad = None
            out, _ = model(x, (h0, torch.zeros(1, 16, 64)))
            out.sum().backward()
            info = fast.cache_info()
            results.append((out.detach().clone(), model.weight_hh_l0.grad.clone(), info))
        assert results[0][2]["free_bytes"] > 0
        assert results[2][2]["free_blocks"] == results[1][2]["free_blocks"]
        assert results[2][2]["free_bytes"] == results[1][2]["free_bytes"]
        for t in (out, h0.grad, model.weight_hh_l0.grad):
            assert t.untyped_storage().resizable()
        fast.empty_cache()
        assert fast.cache_info()["free_bytes"] == 0
        compiled.set_cache_limit(0)
        model.zero_grad(set_to_none=True)
        out, _ = model(x, (h0, torch.zeros(1, 16, 64)))
        out.sum().backward()
        assert fast.cache_info() == {"free_bytes": 0, "free_blocks": 0, "limit": 0}
        for o, g, _ in results:
            assert torch.equal(o, out.detach()) and torch.equal(g, model.weight_hh_l0.grad)
    finally:
        compiled.set_cache_limit(previous)


def test_dispatch():
    """impl="auto" and "fast" take the fast path on the CPU; "reference" does not. "fused",
    a former name of "fast", is "fast" with a FutureWarning."""
    assert bnrnn.rnn.IMPLS == ("auto", "fast", "reference")
    calls = []
    original = fast.fast_direction

    def spy(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    fast.fast_direction = spy
    try:
        for impl, expected in (("auto", True), ("fast", True), ("reference", False)):
            calls.clear()
            bnrnn.BNLSTM(3, 5, impl=impl)(torch.randn(4, 2, 3))
            assert bool(calls) == expected, impl
        calls.clear()
        with pytest.warns(FutureWarning, match=r"impl='fused' is deprecated.*use impl='fast'"):
            m = bnrnn.BNLSTM(3, 5, impl="fused")
        assert m.impl == "fast"
        m(torch.randn(4, 2, 3))
        assert calls
    finally:
        fast.fast_direction = original


def test_placer_offset_is_the_exhaustive_scans():
    """The placer's next offset, from the midpoints of the gaps between the offsets taken,
    is the one a scan of all 64 multiples of 64 picks (the first farthest)."""
    import random

    from bnrnn.fast.placer import Placer

    def scan(offsets):
        def gap(o):
            return min(min((o - u) % 4096, (u - o) % 4096) for u in offsets)

        return max(range(0, 4096, 64), key=gap) if offsets else 0

    rng = random.Random(3)
    place = Placer(torch.empty(1))
    for _ in range(3000):
        k = rng.randint(0, 12)
        place.offsets = [
            rng.choice((rng.randrange(4096), rng.randrange(64) * 64)) for _ in range(k)
        ]
        assert place._free_offset() == scan(place.offsets), place.offsets


def test_weight_gradient_accumulation_matches_addmm():
    """add_weight_grad: out^T += a^T @ d through oneDNN (float32) and torch.mm (float64,
    or oneDNN disabled), against addmm."""
    from bnrnn.fast.onednn import add_weight_grad

    torch.manual_seed(4)
    for dtype, onednn in ((torch.float32, True), (torch.float32, False), (torch.float64, True)):
        a, d = torch.randn(70, 9, dtype=dtype), torch.randn(70, 36, dtype=dtype)
        start = torch.randn(9, 36, dtype=dtype)
        out = start.clone()
        torch.backends.mkldnn.enabled = onednn
        try:
            add_weight_grad(out, a, d)
            add_weight_grad(out, a[:5], d[:5])
        finally:
            torch.backends.mkldnn.enabled = True
        expected = start.addmm(a.t(), d).addmm(a[:5].t(), d[:5])
        _assert_close(out, expected, dtype, f"{dtype} oneDNN={onednn}")


def test_placer_spreads_buffers_modulo_4k():
    """Buffers the steps read together start far apart modulo 4 KiB, from each other and
    from the tensors made elsewhere (greedy farthest offsets: 8 of them are 512 B apart)."""
    from bnrnn.fast.placer import Placer

    x = torch.empty(1000)
    place = Placer(x, x)
    bufs = [place.new(3, 50) for _ in range(7)]
    assert all(b.shape == (3, 50) and b.is_contiguous() for b in bufs)
    offsets = [t.data_ptr() % 4096 for t in [x, *bufs]]
    gaps = [min((a - b) % 4096, (b - a) % 4096) for i, a in enumerate(offsets) for b in offsets[:i]]
    assert min(gaps) >= 512
