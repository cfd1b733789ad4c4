"""What synchronising the BN statistics costs: training steps of a BN-LSTM in DDP on 2 local
gloo processes, with and without synchronised statistics, timed side by side (alternating
steps in the same run, so that every variant sees the same machine load).

    .venv/bin/python benchmarks/sync_cost.py                  # T 100 and T 784 (sMNIST)
    .venv/bin/python benchmarks/sync_cost.py --steps 100 --rounds 20 --hidden 256
    .venv/bin/python benchmarks/sync_cost.py --no-reference   # the fast path only (quicker)

Defaults: batch 32 per rank, hidden 128, input 32, one thread per process, each sequence
length of ``--steps`` in its own pair of processes. Variants (each a `bnrnn.BNLSTM` + linear
head in DDP, forward + backward + SGD step):
  synced-fast      convert_sync_batchnorm, impl="fast": the fast path's PyTorch loops with
                   the all-reduces (design.md, Synchronised statistics)
  unsynced-fast    impl="fast": the fast path (its compiled loops where they build)
  unsynced-python  impl="fast" on the PyTorch loops (set_backend("python")): what the
                   synced path would cost without its collectives
  synced-ref       convert_sync_batchnorm, impl="reference" (the oracle)
  unsynced-ref     impl="reference"
For each length it prints the median step times (ms) and the ratios, then the all-reduces
the layers issue per synced training step (DDP's gradient buckets excluded: every variant
pays those), the time of one gloo all-reduce of each size on this machine, and the floor
they set: synced-fast / unsynced-fast can be no lower than (unsynced-fast + count x time) /
unsynced-fast however the collectives are issued. A summary table ends the output.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

import bnrnn

# name: (impl, synchronised, fast-path backend)
VARIANTS = {
    "synced-fast": ("fast", True, "auto"),
    "unsynced-fast": ("fast", False, "auto"),
    "unsynced-python": ("fast", False, "python"),
    "synced-ref": ("reference", True, "auto"),
    "unsynced-ref": ("reference", False, "auto"),
}
TARGET = 1.5  # issue #21: synced-fast / unsynced-fast at T 100


class Net(nn.Module):
    def __init__(self, args: argparse.Namespace, T: int, impl: str) -> None:
        super().__init__()
        self.rnn = bnrnn.BNLSTM(args.input, args.hidden, max_length=T, impl=impl)
        self.head = nn.Linear(args.hidden, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, _ = self.rnn(x)
        return self.head(out[-1])


def _worker(rank: int, init: str, args: argparse.Namespace, T: int, out: str) -> None:
    torch.set_num_threads(args.threads)
    dist.init_process_group("gloo", init_method=f"file://{init}", rank=rank, world_size=2)
    try:
        import bnrnn.fast as fast
        from bnrnn.fast import loops

        calls = {"python": 0}
        original = loops.forward_loop

        def counting(*a, **k):
            calls["python"] += 1
            return original(*a, **k)

        loops.forward_loop = counting
        torch.manual_seed(0)
        variants = {}
        for name, (impl, sync, backend) in VARIANTS.items():
            if impl == "reference" and not args.reference:
                continue
            model = Net(args, T, impl)
            if sync:
                bnrnn.convert_sync_batchnorm(model, dist.new_group())
            ddp = nn.parallel.DistributedDataParallel(model)
            variants[name] = (ddp, torch.optim.SGD(model.parameters(), lr=1e-3), backend)
        g = torch.Generator().manual_seed(rank)
        x = torch.randn(T, args.batch, args.input, generator=g)
        y = torch.randint(0, 10, (args.batch,), generator=g)
        times: dict[str, list[float]] = {k: [] for k in variants}
        paths: dict[str, str] = {}
        for r in range(args.warmup + args.rounds):
            for name, (ddp, opt, backend) in variants.items():
                fast.set_backend(backend)
                calls["python"] = 0
                dist.barrier()
                t0 = time.perf_counter()
                loss = nn.functional.cross_entropy(ddp(x), y)
                opt.zero_grad()
                loss.backward()
                opt.step()
                dt = time.perf_counter() - t0
                if VARIANTS[name][0] == "reference":
                    paths[name] = "reference path"
                else:
                    loops_ran = "PyTorch" if calls["python"] else "compiled"
                    paths[name] = f"fast path, {loops_ran} loops"
                if r >= args.warmup:
                    times[name].append(dt)
        fast.set_backend("auto")
        collectives = {
            name: _count_collectives(variants[name], x, y)
            for name in ("synced-fast", "synced-ref")
            if name in variants
        }
        sizes = sorted({n for found in collectives.values() for n in found["sizes"]})
        floor = {n: _all_reduce_us(n, max(20, args.rounds * 50)) for n in sizes}
        if rank == 0:
            torch.save({"times": times, "paths": paths, "collectives": collectives,
                        "floor_us": floor}, out)  # fmt: skip
    finally:
        dist.destroy_process_group()


def _count_collectives(variant: Any, x: torch.Tensor, y: torch.Tensor) -> dict[str, Any]:
    """The element counts of the all-reduces the layers issue in one synchronised training
    step, forward and backward (DDP's gradient buckets excluded: the unsynced variants pay
    those too), and the seconds spent inside them and in the whole step, median of 5 steps
    (inside the loop a blocking all-reduce also waits for the other process to reach it)."""
    ddp, opt, _ = variant
    sizes: list[int] = []
    inside = [0.0]
    original = dist.all_reduce

    def counting(tensor, *a, **k):
        sizes.append(tensor.numel())
        t0 = time.perf_counter()
        work = original(tensor, *a, **k)
        inside[0] += time.perf_counter() - t0
        return work

    dist.all_reduce = counting
    steps, waits = [], []
    try:
        for _ in range(5):
            sizes.clear()
            inside[0] = 0.0
            dist.barrier()
            t0 = time.perf_counter()
            loss = nn.functional.cross_entropy(ddp(x), y)
            opt.zero_grad()
            loss.backward()
            steps.append(time.perf_counter() - t0)
            waits.append(inside[0])
    finally:
        dist.all_reduce = original
    return {"sizes": sizes, "step": statistics.median(steps), "inside": statistics.median(waits)}


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


def measure(args: argparse.Namespace, T: int) -> dict[str, Any]:
    """Run the variants at sequence length T on 2 gloo processes; rank 0's results."""
    with tempfile.TemporaryDirectory() as d:
        out = os.path.join(d, "times.pt")
        mp.start_processes(_worker, args=(os.path.join(d, "init"), args, T, out), nprocs=2,
                           join=True, start_method="spawn")  # fmt: skip
        return torch.load(out)


def report(args: argparse.Namespace, T: int, res: dict[str, Any]) -> dict[str, float]:
    """Print one length's results; return its summary row."""
    med = {k: 1000 * statistics.median(v) for k, v in res["times"].items()}
    print(f"BN-LSTM in DDP, 2 gloo processes, batch {args.batch}/rank, hidden {args.hidden}, "
          f"input {args.input}, T {T}, {args.threads} thread(s)/process, "
          f"median of {args.rounds} steps")  # fmt: skip
    for k, v in med.items():
        print(f"  {k:<16} {v:8.1f} ms/step   ({res['paths'][k]})")
    fast = med["unsynced-fast"]
    ratio = med["synced-fast"] / fast
    print(f"  synced-fast / unsynced-fast     = {ratio:.2f}   (target {TARGET})")
    print(f"  unsynced-python / unsynced-fast = {med['unsynced-python'] / fast:.2f}   "
          "(the PyTorch loops alone)")  # fmt: skip
    if "synced-ref" in med:
        print(f"  synced-ref / unsynced-fast      = {med['synced-ref'] / fast:.2f}")
        print(f"  synced-ref / unsynced-ref       = {med['synced-ref'] / med['unsynced-ref']:.2f}")
    floor_us = res["floor_us"]
    row = {"T": T, "synced": med["synced-fast"], "unsynced": fast, "ratio": ratio}
    for name, found in res["collectives"].items():
        sizes = found["sizes"]
        total = sum(floor_us[n] for n in sizes) / 1000
        print(
            f"  {name}: all-reduces of the layers per training step: {len(sizes)} "
            f"({len(sizes) / T:.2f} per time step), {total:.1f} ms at the times below"
        )
        for n in sorted(set(sizes)):
            print(f"    {sizes.count(n):5d} x {n:7d} floats: {floor_us[n]:7.1f} us each "
                  "(gloo, median)")  # fmt: skip
        print(f"  {name}, in the step: {1000 * found['inside']:.1f} ms of "
              f"{1000 * found['step']:.1f} ms inside those all-reduces (the rest: "
              f"{1000 * (found['step'] - found['inside']):.1f} ms)")  # fmt: skip
        if name == "synced-fast":
            floor = (fast + total) / fast
            print(f"  their floor: synced-fast / unsynced-fast >= {floor:.2f}")
            per_step = len(sizes) / T
            mean_us = 1000 * total / len(sizes) if sizes else 0.0
            row.update(per_step=per_step, us=mean_us, floor=floor)
    print()
    return row


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch", type=int, default=32, help="sequences per rank")
    p.add_argument("--hidden", type=int, default=128, help="hidden units")
    p.add_argument("--input", type=int, default=32, help="input features")
    p.add_argument("--steps", type=int, nargs="+", default=[100, 784],
                   help="sequence lengths T, each measured in its own processes")  # fmt: skip
    p.add_argument("--rounds", type=int, default=10, help="timed steps per variant")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps per variant first")
    p.add_argument("--threads", type=int, default=1, help="torch threads per process")
    p.add_argument("--no-reference", dest="reference", action="store_false",
                   help="skip the reference-path variants (slow at T 784)")  # fmt: skip
    args = p.parse_args()
    rows = [report(args, T, measure(args, T)) for T in args.steps]
    print("summary: synced-fast / unsynced-fast (median ms per training step)")
    print("      T  synced-fast  unsynced-fast  ratio  target  all-reduces/step  us each  floor")
    for r in rows:
        print(
            f"  {r['T']:5d}  {r['synced']:11.1f}  {r['unsynced']:13.1f}  {r['ratio']:5.2f}  "
            f"{TARGET:6.1f}  {r['per_step']:16.2f}  {r['us']:7.1f}  {r['floor']:5.2f}"
        )


if __name__ == "__main__":
    main()
