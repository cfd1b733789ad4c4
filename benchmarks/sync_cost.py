"""What synchronising the BN statistics costs: training steps of a BN-LSTM in DDP on 2 local
gloo processes, with and without synchronised statistics, timed side by side (alternating
steps in the same run, so that both see the same machine load).

    .venv/bin/python benchmarks/sync_cost.py                 # batch 32 per rank, H 128, T 100
    .venv/bin/python benchmarks/sync_cost.py --rounds 20 --hidden 256

Variants (each a `bnrnn.BNLSTM` + linear head in DDP, forward + backward + SGD step):
  synced          convert_sync_batchnorm: the reference path (the fast path does not sync)
  unsynced        impl="auto": the fast path where it applies (reported)
  unsynced-ref    impl="reference": separates the collectives' cost from the path's
Prints median step times (ms) and the ratios synced / unsynced, synced / unsynced-ref, then
the all-reduces the layers issue per synced step, the time of one of each size on this
machine, and the floor they set: synced / unsynced can be no lower than
(unsynced + count x time) / unsynced, however the collectives are issued.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

import bnrnn


class Net(nn.Module):
    def __init__(self, args: argparse.Namespace, impl: str) -> None:
        super().__init__()
        self.rnn = bnrnn.BNLSTM(args.input, args.hidden, max_length=args.steps, impl=impl)
        self.head = nn.Linear(args.hidden, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, _ = self.rnn(x)
        return self.head(out[-1])


def _worker(rank: int, init: str, args: argparse.Namespace, out: str) -> None:
    torch.set_num_threads(args.threads)
    dist.init_process_group("gloo", init_method=f"file://{init}", rank=rank, world_size=2)
    try:
        import bnrnn.fast as fast

        calls = {"fast": 0}
        original = fast.fast_direction

        def counting(*a, **k):
            calls["fast"] += 1
            return original(*a, **k)

        fast.fast_direction = counting
        torch.manual_seed(0)
        variants = {}
        for name, impl, sync in (("synced", "auto", True), ("unsynced", "auto", False),
                                 ("unsynced-ref", "reference", False)):  # fmt: skip
            model = Net(args, impl)
            if sync:
                bnrnn.convert_sync_batchnorm(model, dist.new_group())
            ddp = nn.parallel.DistributedDataParallel(model)
            variants[name] = (ddp, torch.optim.SGD(model.parameters(), lr=1e-3))
        g = torch.Generator().manual_seed(rank)
        x = torch.randn(args.steps, args.batch, args.input, generator=g)
        y = torch.randint(0, 10, (args.batch,), generator=g)
        times: dict[str, list[float]] = {k: [] for k in variants}
        paths: dict[str, str] = {}
        for r in range(args.warmup + args.rounds):
            for name, (ddp, opt) in variants.items():
                calls["fast"] = 0
                dist.barrier()
                t0 = time.perf_counter()
                loss = nn.functional.cross_entropy(ddp(x), y)
                opt.zero_grad()
                loss.backward()
                opt.step()
                dt = time.perf_counter() - t0
                paths[name] = "fast" if calls["fast"] else "reference"
                if r >= args.warmup:
                    times[name].append(dt)
        collectives = _count_collectives(variants["synced"], x, y)
        floor = {n: _all_reduce_us(n, args.rounds * 50) for n in sorted(set(collectives))}
        if rank == 0:
            torch.save({"times": times, "paths": paths, "collectives": collectives,
                        "floor_us": floor}, out)  # fmt: skip
    finally:
        dist.destroy_process_group()


def _count_collectives(variant, x: torch.Tensor, y: torch.Tensor) -> list[int]:
    """The element counts of the all-reduces the layers issue in one synchronised training
    step (DDP's gradient buckets excluded: the unsynced variants pay those too)."""
    ddp, opt = variant
    sizes: list[int] = []
    original = dist.all_reduce

    def counting(tensor, *a, **k):
        sizes.append(tensor.numel())
        return original(tensor, *a, **k)

    dist.all_reduce = counting
    try:
        loss = nn.functional.cross_entropy(ddp(x), y)
        opt.zero_grad()
        loss.backward()
    finally:
        dist.all_reduce = original
    return sizes


def _all_reduce_us(numel: int, repeats: int) -> float:
    """Median microseconds of one gloo all-reduce of ``numel`` float32 on this machine: the
    floor of a synchronised step is the count per step times this."""
    t = torch.zeros(numel)
    samples = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        dist.all_reduce(t)
        samples.append(time.perf_counter() - t0)
    return 1e6 * statistics.median(samples)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch", type=int, default=32, help="sequences per rank")
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--input", type=int, default=32)
    p.add_argument("--steps", type=int, default=100, help="sequence length T")
    p.add_argument("--rounds", type=int, default=10, help="timed steps per variant")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--threads", type=int, default=1, help="torch threads per process")
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as d:
        out = os.path.join(d, "times.pt")
        mp.start_processes(_worker, args=(os.path.join(d, "init"), args, out), nprocs=2,
                           join=True, start_method="spawn")  # fmt: skip
        res = torch.load(out)
    med = {k: 1000 * statistics.median(v) for k, v in res["times"].items()}
    print(f"BN-LSTM in DDP, 2 gloo processes, batch {args.batch}/rank, hidden {args.hidden}, "
          f"input {args.input}, T {args.steps}, {args.threads} thread(s)/process, "
          f"median of {args.rounds} steps")  # fmt: skip
    for k, v in med.items():
        print(f"  {k:<13} {v:8.1f} ms/step   ({res['paths'][k]} path)")
    print(f"  synced / unsynced     = {med['synced'] / med['unsynced']:.2f}")
    print(f"  synced / unsynced-ref = {med['synced'] / med['unsynced-ref']:.2f}")
    sizes, floor = res["collectives"], res["floor_us"]
    total = sum(floor[n] for n in sizes) / 1000
    print(
        f"  collectives of the layers per synced training step: {len(sizes)} "
        f"({len(sizes) / args.steps:.1f} per time step)"
    )
    for n in sorted(set(sizes)):
        print(f"    {sizes.count(n):5d} x {n:6d} floats: {floor[n]:7.1f} us each (gloo, median)")
    print(
        f"  their floor: {total:.1f} ms/step, so synced / unsynced >= "
        f"{(med['unsynced'] + total) / med['unsynced']:.2f} on the fast path"
    )


if __name__ == "__main__":
    main()
