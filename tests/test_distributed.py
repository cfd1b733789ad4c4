"""Synchronised statistics over 2 processes (gloo, localhost) equal one process on the
concatenated batch: outputs, input gradients, parameter gradients, population statistics.

Each synchronised case runs twice on every rank: on the fast path (``impl="fast"``, which
refuses what it does not run, so the fast path is asserted) and on the reference path
(``impl="reference"``), both against one process running the reference on the whole batch.
"""

import os
import tempfile

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.nn.utils.rnn import pack_padded_sequence

import bnrnn

LENGTHS = [6, 3, 5, 2, 4]
SPLIT = [[0, 1], [2, 3, 4]]  # rank 0 runs 6 steps, rank 1 runs 5; step 5 has 1 vs 0 present
# "padded": LENGTHS as a padded tensor with lengths (rank 1 has fewer steps than rank 0, and
# at steps 3 to 5 rank 0 has one sequence: statistics over the group, degenerate only at
# step 5); "packed": the same as a PackedSequence; "full": every sequence of length 6 (no
# padding: the reverse direction walks time backwards); "long": the first sequence of
# length 40, alone from step 5 on (the backward's later chunks of 16 steps have no batch
# statistics).
CASES = [
    ({"norm": "cooijmans"}, "padded"),
    ({"norm": "cooijmans"}, "packed"),
    ({"norm": "cooijmans"}, "full"),
    ({"norm": "cooijmans", "bidirectional": True, "num_layers": 2}, "padded"),
    ({"norm": "cooijmans", "bidirectional": True, "num_layers": 2}, "full"),
    ({"norm": "input", "input_stats": "sequence", "bidirectional": True}, "padded"),
    ({"norm": "input", "bidirectional": True}, "packed"),
    ({"norm": "preactivation"}, "padded"),
    ({"norm": "preactivation", "bidirectional": True, "num_layers": 2}, "full"),
    ({"norm": "cooijmans", "model": "rnn", "num_layers": 2}, "padded"),
    ({"norm": "cooijmans", "bidirectional": True}, "long"),
]
IMPLS = ("fast", "reference")


def _model(cfg, sync, impl="reference"):
    cfg = dict(cfg)
    cls = bnrnn.BNRNN if cfg.pop("model", "lstm") == "rnn" else bnrnn.BNLSTM
    torch.manual_seed(0)
    m = cls(3, 4, max_length=8, dtype=torch.float64, sync_stats=sync, impl=impl, **cfg)
    with torch.no_grad():
        for bn in m.norm_modules():
            bn.weight.uniform_(0.5, 1.5)
    return m


def _data():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(40, 5, 3, dtype=torch.float64, generator=g)
    w = torch.randn(40, 5, 1, dtype=torch.float64, generator=g)  # loss weights
    batches = [torch.randn(40, 5, 3, dtype=torch.float64, generator=g) for _ in range(2)]
    return x, w, batches


def _lengths(form):
    if form == "long":
        return [40] + LENGTHS[1:]
    return [6] * len(LENGTHS) if form == "full" else LENGTHS


def _call(model, x, lengths, form):
    """The model on x (T, N, I) with lengths, in the case's form; output (T, N, H), h_n."""
    if form == "packed":
        out, state = model(pack_padded_sequence(x, torch.tensor(lengths), enforce_sorted=False))
        out = torch.nn.utils.rnn.pad_packed_sequence(out, total_length=x.shape[0])[0]
    else:
        out, state = model(x, lengths=None if form == "full" else lengths)
    return out, (state[0] if isinstance(state, tuple) else state)


def _run(model, x, w, lengths, batches, form):
    """One training forward/backward and a population re-estimation; returns the results."""
    x = x.clone().requires_grad_()
    out, h = _call(model, x, lengths, form)
    (out * w[: out.shape[0]]).sum().add(h.sum()).backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    after_step = {k: v.clone() for k, v in model.state_dict().items() if "running" in k}
    bnrnn.update_population_stats(
        model, [(b, lengths) for b in batches], forward_fn=lambda m, b: _call(m, *b, form)
    )
    stats = {
        k: v.clone() for k, v in model.state_dict().items() if "running" in k or "tracked" in k
    }
    return {
        "out": out.detach(),
        "h": h.detach(),
        "xgrad": x.grad,
        "grads": grads,
        "after_step": after_step,
        "stats": stats,
    }


def _penalty_grads(impl, x, lengths):
    """The parameter gradients of a gradient penalty (create_graph: the fast path replays
    the direction through the reference loop, with all-reduced statistics), summed over
    the processes."""
    m = _model({"norm": "cooijmans", "bidirectional": True}, True, impl)
    x = x.clone().requires_grad_()
    out, _ = m(x, lengths=lengths)
    (gx,) = torch.autograd.grad(out.square().sum(), x, create_graph=True)
    gx.square().sum().backward()
    grads = {n: p.grad.clone() for n, p in m.named_parameters()}
    for g in grads.values():
        dist.all_reduce(g)
    return grads


def _worker(rank, init_file, out_dir, sync):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    torch.set_num_threads(1)
    try:
        x, w, batches = _data()
        rows = SPLIT[rank]
        results = {}
        for k, (cfg, form) in enumerate(CASES):
            lengths = [_lengths(form)[i] for i in rows]
            T = max(lengths)
            for impl in IMPLS if sync else ("reference",):
                m = _model(cfg, sync, impl)
                r = _run(m, x[:T, rows], w[:T, rows], lengths, [b[:T, rows] for b in batches], form)
                for g in r["grads"].values():
                    dist.all_reduce(g)  # the gradient of the summed loss: what DDP averages
                results[k, impl] = r
        if sync:
            m = bnrnn.BNLSTM(3, 4, bidirectional=True, reverse="padded", sync_stats=True)
            try:
                m(torch.randn(5, 3, 3), lengths=[5, 4, 2])
                results["padded"] = ""
            except ValueError as e:
                results["padded"] = str(e)
            lengths = [LENGTHS[i] for i in rows]
            for impl in IMPLS:
                results["penalty", impl] = _penalty_grads(impl, x[: max(lengths), rows], lengths)
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def _spawn(sync):
    with tempfile.TemporaryDirectory() as d:
        mp.start_processes(
            _worker,
            args=(os.path.join(d, "init"), d, sync),
            nprocs=2,
            join=True,
            start_method="spawn",
        )
        return [torch.load(os.path.join(d, f"rank{r}.pt")) for r in range(2)]


@pytest.fixture(scope="module")
def single():
    x, w, batches = _data()
    results = []
    for cfg, form in CASES:
        lengths = _lengths(form)
        T = max(lengths)
        batches_T = [b[:T] for b in batches]
        results.append(_run(_model(cfg, False), x[:T], w[:T], lengths, batches_T, form))
    return results


@pytest.fixture(scope="module")
def synced():
    return _spawn(sync=True)


@pytest.mark.parametrize("impl", IMPLS)
def test_synchronised_statistics_equal_single_process(single, synced, impl):
    for k, (cfg, form) in enumerate(CASES):
        want = single[k]
        what = f"{impl} {cfg} {form}"
        for rank, rows in enumerate(SPLIT):
            got = synced[rank][k, impl]
            T = got["out"].shape[0]
            torch.testing.assert_close(got["out"], want["out"][:T, rows], msg=what)
            torch.testing.assert_close(got["h"], want["h"][:, rows], msg=what)
            torch.testing.assert_close(got["xgrad"], want["xgrad"][:T, rows], msg=what)
            for name, g in want["grads"].items():
                torch.testing.assert_close(got["grads"][name], g, msg=f"{what} {name}")
            for name, v in want["after_step"].items():
                torch.testing.assert_close(got["after_step"][name], v, msg=f"{what} {name}")
            for name, v in want["stats"].items():
                torch.testing.assert_close(got["stats"][name], v, msg=f"{what} {name}")


def test_synchronised_second_derivatives_fast_equal_reference(synced):
    """A gradient penalty's parameter gradients, fast path against reference path."""
    for rank in range(2):
        fast, reference = synced[rank]["penalty", "fast"], synced[rank]["penalty", "reference"]
        for name, g in reference.items():
            torch.testing.assert_close(fast[name], g, msg=name)


def test_unsynchronised_statistics_differ(single):
    """Documented behaviour: without sync each process normalises over its own slice."""
    ranks = _spawn(sync=False)
    got, want = ranks[1][0, "reference"], single[0]
    assert not torch.allclose(got["out"], want["out"][:5, SPLIT[1]])


def test_convert_sync_batchnorm_marks_every_norm_module():
    net = torch.nn.ModuleDict({"a": bnrnn.BNLSTM(3, 4), "b": bnrnn.BNRNN(3, 4)})
    assert bnrnn.convert_sync_batchnorm(net) is net
    assert all(m.sync for m in net.modules() if isinstance(m, bnrnn.StepBatchNorm))
    # Not initialised: training works unsynchronised, as torch.nn.SyncBatchNorm does.
    net["a"](torch.randn(4, 3, 3))


def test_padded_reversal_with_synchronised_statistics_is_an_error(synced):
    """Not supported (the group's statistics of a padded batch read flipped are not
    implemented): a one-line error on every process, not a silently different number."""
    for rank in synced:
        assert rank["padded"].startswith("reverse='padded' with synchronised statistics")
