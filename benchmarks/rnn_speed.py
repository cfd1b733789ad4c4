"""Speed and memory of BNLSTM against torch.nn.LSTM on the CPU, side by side in one run.

    python benchmarks/rnn_speed.py            # everything (a few minutes on 2 cores)
    python benchmarks/rnn_speed.py --quick    # fewer rounds, no reference path

For each configuration (batch N, hidden H, input I, length T) it prints, against nn.LSTM
with the same input form (packed where ours is packed):

- train: one training step (forward + backward of ``output.sum()``), ms and ratio;
- eval: one forward in eval mode under ``torch.no_grad()``, ms and ratio;
- saved: bytes autograd keeps for the backward after the forward (unique storages packed
  by ``torch.autograd.graph.saved_tensors_hooks``, parameters excluded), ratio;
- peak: peak resident memory of one training step above the resident memory before it,
  measured in a fresh subprocess per row (``/proc/self/clear_refs`` resets the high-water
  mark, glibc returns every block of 64 KiB or more to the system on free, bnrnn's buffer
  cache is emptied first), ratio. This counts everything the step allocates: saved
  activations, temporaries, gradients, library scratch.

for bnrnn's fast path (``impl="auto"``, norm="cooijmans", and norm="input" /
"preactivation" for speed), the layer-normalised LSTM on the fast path (``fast-layer``,
norm="layer", Ba et al. §6.5: its own rows, speed and peak memory), and the plain reference
loop (``impl="reference"``). ``--variants`` runs a subset (nn.LSTM always runs). Every
model runs once per round, side by side (interleaved), for ``--rounds`` rounds: times are
the best of the rounds; time ratios are the median over rounds of the model's time /
nn.LSTM's time in the same round, since the machine's speed drifts by 10-20% over seconds
("(best)": the ratio of the best times, for comparison).
Then the same ratios split by where the host had put the two vCPUs during each call (near:
sharing a cache, far: not; read by core_latency.py before and after every timed call): the
lock-step loops are slower in the far placement, nn.LSTM much less.
Then the growth with T (mid configuration at T = 100, 400, 1600): time per step and memory
per step stay flat when cost is linear in T.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence

import bnrnn
from bnrnn.fast import empty_cache

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from core_latency import CoreLatency, placement  # noqa: E402


@dataclass(frozen=True)
class Config:
    name: str
    N: int
    H: int
    I: int
    T: int
    packed: bool = False
    layers: int = 1
    bidirectional: bool = False


CONFIGS = {
    c.name: c
    for c in [
        Config("smnist", 64, 100, 1, 784),
        Config("charptb", 64, 1000, 50, 100),
        Config("mid", 32, 256, 64, 200),
        Config("mid-packed", 32, 256, 64, 200, packed=True),
        Config("mid-bidir2", 32, 256, 64, 200, layers=2, bidirectional=True),
        # padding (lengths in [T/2, T]): where reverse="padded" differs from the default
        Config("mid-bidir-packed", 32, 256, 64, 200, packed=True, bidirectional=True),
    ]
}
# Model variants: name -> (impl, norm[, reverse]); "lstm" is torch.nn.LSTM. "fast-padrev":
# the reverse direction reads the padded batch flipped (reverse="padded", Cooijmans §5.4),
# every row at every step; the same as "fast" on a batch without padding.
VARIANTS = {
    "lstm": None,
    "fast": ("auto", "cooijmans"),
    "fast-input": ("auto", "input"),
    "fast-preact": ("auto", "preactivation"),
    "fast-layer": ("auto", "layer"),
    "fast-padrev": ("auto", "cooijmans", "padded"),
    "reference": ("reference", "cooijmans"),
}


def make_model(cfg: Config, variant: str) -> nn.Module:
    torch.manual_seed(0)
    kw = {"num_layers": cfg.layers, "bidirectional": cfg.bidirectional}
    if VARIANTS[variant] is None:
        return nn.LSTM(cfg.I, cfg.H, **kw)
    impl, norm, *reverse = VARIANTS[variant]
    kw["reverse"] = reverse[0] if reverse else "unpadded"
    return bnrnn.BNLSTM(cfg.I, cfg.H, norm=norm, max_length=cfg.T, impl=impl, **kw)


def make_input(cfg: Config) -> torch.Tensor | PackedSequence:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(cfg.T, cfg.N, cfg.I, generator=g)
    if not cfg.packed:
        return x
    # lengths uniform in [T/2, T]
    lengths = torch.randint(cfg.T // 2, cfg.T + 1, (cfg.N,), generator=g)
    lengths[0] = cfg.T
    return pack_padded_sequence(x, lengths, enforce_sorted=False)


def _loss(out) -> torch.Tensor:
    return (out.data if isinstance(out, PackedSequence) else out).sum()


def train_step(model: nn.Module, x) -> None:
    model.train()
    out, _ = model(x)
    _loss(out).backward()


def eval_step(model: nn.Module, x) -> None:
    model.eval()
    with torch.no_grad():
        model(x)


def saved_bytes(model: nn.Module, x) -> int:
    """Bytes of the unique storages autograd saves for the backward (not parameters)."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in params:
            seen[storage.data_ptr()] = storage.nbytes()
        return t

    model.train()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out, _ = model(x)
    del out
    return sum(seen.values())


def _status() -> dict[str, int]:
    values = {}
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(("VmRSS", "VmHWM")):
                values[line.split(":")[0]] = int(line.split()[1]) * 1024
    return values


def peak_child(cfg_name: str, variant: str, T: int | None, threads: int) -> None:
    """In a fresh process: the peak RSS of one training step above the RSS before it."""
    torch.set_num_threads(threads)
    cfg = CONFIGS[cfg_name]
    if T is not None:
        cfg = Config(cfg.name, cfg.N, cfg.H, cfg.I, T, cfg.packed, cfg.layers, cfg.bidirectional)
    model = make_model(cfg, variant)
    x = make_input(cfg)
    train_step(model, x)  # warm-up: one-time allocations, the compiled loops loaded
    model.zero_grad(set_to_none=True)
    gc.collect()
    # the fast path's buffer cache starts empty, so that the step's peak counts every
    # buffer it uses (what the cache keeps between steps is at most that)
    empty_cache()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset the high-water mark VmHWM to the current RSS
    before = _status()["VmRSS"]
    train_step(model, x)
    print(json.dumps({"peak": _status()["VmHWM"] - before}))


def peak_bytes(cfg: Config, variant: str, threads: int, T: int | None = None) -> int | None:
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", MALLOC_TRIM_THRESHOLD_="0")
    cmd = [sys.executable, __file__, "--_peak", cfg.name, variant, str(T or 0), str(threads)]
    try:
        res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=1800)
        return int(json.loads(res.stdout.strip().splitlines()[-1])["peak"])
    except Exception as e:  # report, keep going
        print(f"  (peak memory of {cfg.name}/{variant} failed: {e})", file=sys.stderr)
        return None


Times = dict[tuple[str, str], list[float]]  # (model, mode) -> one entry per timed call
Places = dict[tuple[str, str], list[str]]  # the same calls' placements


def best_times(
    cfg: Config, variants: list[str], rounds: int, ref_rounds: int, lat: CoreLatency | None
):
    """Train and eval times, every model once per round (interleaved): the best time of
    each, and the median over rounds of each model's time / nn.LSTM's time in the same
    round (the machine's speed drifts by 10-20% over seconds here; a ratio of times taken
    side by side cancels most of it). With ``lat``, each timed call is also labelled with
    the placement of the two vCPUs read just before and just after it ("near", "far", or
    "mixed" when the two readings differ; see core_latency.py)."""
    x = make_input(cfg)
    models = {v: make_model(cfg, v) for v in variants}
    for m in models.values():  # warm-up
        train_step(m, x)
        eval_step(m, x)
    times: Times = {}
    places: Places = {}
    for r in range(rounds):
        for mode, fn in (("train", train_step), ("eval", eval_step)):
            for v, m in models.items():
                if v == "reference" and r >= ref_rounds:
                    continue
                m.zero_grad(set_to_none=True)
                before = placement(lat.probe()) if lat else "?"
                t0 = time.perf_counter()
                fn(m, x)
                times.setdefault((v, mode), []).append(time.perf_counter() - t0)
                after = placement(lat.probe()) if lat else "?"
                places.setdefault((v, mode), []).append(before if before == after else "mixed")
    best = {k: min(ts) for k, ts in times.items()}
    ratio = {
        (v, mode): statistics.median(
            t / base for t, base in zip(ts, times["lstm", mode], strict=False)
        )
        for (v, mode), ts in times.items()
    }
    saved = {v: saved_bytes(m, x) for v, m in models.items()}
    return best, ratio, saved, (times, places)


def by_placement(times: Times, places: Places, v: str, mode: str):
    """For "near" and "far": (calls of v, calls of nn.LSTM, median time of v / median time
    of nn.LSTM over the calls in that placement), or None without calls of both."""

    def calls(model: str, where: str) -> list[float]:
        key = (model, mode)
        return [t for t, p in zip(times[key], places[key], strict=True) if p == where]

    out = {}
    for where in ("near", "far"):
        mine, base = calls(v, where), calls("lstm", where)
        ratio = statistics.median(mine) / statistics.median(base) if mine and base else None
        out[where] = (len(mine), len(base), ratio)
    return out


def print_placement(split: dict[str, tuple[Times, Places]], variants: list[str]) -> None:
    """The fast path's ratios split by where the host had put the two vCPUs during the
    calls (near: sharing a cache; far: not), each the median time of the model's calls in
    that placement over nn.LSTM's."""
    print()
    print(
        "by placement of the two vCPUs (cache-line round trip read before and after each "
        "call; far: > 200 ns).\nratio: median time of the model's calls in that placement / "
        "nn.LSTM's; n: calls of the model / of nn.LSTM"
    )
    cols = [f"{mode} {where}" for mode in ("train", "eval") for where in ("near", "far")]
    header = f"{'config':<12} {'model':<12}" + "".join(f" {c:>10} {'n':>5}" for c in cols)
    print(header)
    print("-" * len(header))
    for name, (times, places) in split.items():
        for v in (v for v in variants if v.startswith("fast")):
            line = f"{name:<12} {v:<12}"
            for mode in ("train", "eval"):
                for n, nb, r in by_placement(times, places, v, mode).values():
                    line += f" {'-' if r is None else f'{r:.2f}':>10} {f'{n}/{nb}':>5}"
            print(line, flush=True)


def fmt_ratio(a: float | None, b: float | None) -> str:
    return "-" if a is None or b is None or b == 0 else f"{a / b:.2f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--configs", default=",".join(CONFIGS), help="comma-separated names")
    ap.add_argument("--rounds", type=int, default=5, help="interleaved timing rounds")
    ap.add_argument("--ref-rounds", type=int, default=2, help="rounds for the reference loop")
    ap.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    ap.add_argument("--no-reference", action="store_true", help="skip the reference loop")
    ap.add_argument(
        "--variants", default=",".join(VARIANTS), help="comma-separated models (lstm always)"
    )
    ap.add_argument("--no-peak", action="store_true", help="skip the peak-RSS subprocesses")
    ap.add_argument("--no-growth", action="store_true", help="skip the growth with T")
    ap.add_argument("--quick", action="store_true", help="2 rounds, no reference path")
    ap.add_argument("--no-placement", action="store_true", help="skip reading the vCPUs' placement")
    ap.add_argument("--_peak", nargs=4, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args._peak:
        name, variant, T, threads = args._peak
        peak_child(name, variant, int(T) or None, int(threads))
        return
    if args.quick:
        args.rounds, args.no_reference = 2, True
    torch.set_num_threads(args.threads)
    chosen = {"lstm", *args.variants.split(",")}
    unknown = chosen - set(VARIANTS)
    if unknown:
        raise SystemExit(
            f"--variants: unknown {', '.join(sorted(unknown))}; one of {list(VARIANTS)}"
        )
    variants = [v for v in VARIANTS if v in chosen and not (args.no_reference and v == "reference")]
    print(
        f"torch {torch.__version__}, {args.threads} threads, float32; times: best of "
        f"{args.rounds} interleaved rounds"
        + ("" if args.no_reference else f" (reference: {args.ref_rounds})")
        + "; time ratios to nn.LSTM: median of the rounds' paired ratios"
    )
    from bnrnn.fast import compiled

    compiled.load()  # build once before timing

    lat = None if args.no_placement else CoreLatency()
    split: dict[str, tuple[Times, Places]] = {}
    header = (
        f"{'config':<12} {'model':<12} {'train ms':>9} {'ratio':>6} {'(best)':>6} "
        f"{'eval ms':>9} {'ratio':>6} {'(best)':>6} {'saved MB':>9} {'ratio':>6} "
        f"{'peak MB':>8} {'ratio':>6}"
    )
    print(header)
    print("-" * len(header))
    for name in args.configs.split(","):
        cfg = CONFIGS[name]
        best, ratio, saved, split[name] = best_times(
            cfg, variants, args.rounds, args.ref_rounds, lat
        )
        peaks = {}
        for v in variants:
            # (the fast path's other placements share the cooijmans row's buffers; the
            # layer norm's statistics and loops are its own, and the padded reversal runs
            # every row at every step: measured too)
            own = v in ("fast-layer", "fast-padrev")
            if not args.no_peak and (not v.startswith("fast-") or own):
                peaks[v] = peak_bytes(cfg, v, args.threads)
        for v in variants:
            tr, ev = best[v, "train"], best[v, "eval"]
            pk = peaks.get(v)
            print(
                f"{name:<12} {v:<12} {tr * 1e3:9.1f} {ratio[v, 'train']:6.2f} "
                f"{fmt_ratio(tr, best['lstm', 'train']):>6} "
                f"{ev * 1e3:9.1f} {ratio[v, 'eval']:6.2f} "
                f"{fmt_ratio(ev, best['lstm', 'eval']):>6} "
                f"{saved[v] / 2**20:9.1f} {fmt_ratio(saved[v], saved['lstm']):>6} "
                f"{'-' if pk is None else f'{pk / 2**20:8.1f}':>8} "
                f"{fmt_ratio(pk, peaks.get('lstm')):>6}",
                flush=True,
            )

    if lat is not None and lat.exe is not None:
        print_placement(split, variants)
    if args.no_growth:
        return
    print()
    print("growth with T (mid: N=32, H=256, I=64), fast path vs nn.LSTM, training step")
    header = (
        f"{'T':>5} {'lstm ms/step':>13} {'fast ms/step':>13} {'ratio':>6} "
        f"{'saved KB/step':>14} {'ratio':>6} {'peak KB/step':>13} {'ratio':>6}"
    )
    print(header)
    print("-" * len(header))
    base = CONFIGS["mid"]
    for T in (100, 400, 1600):
        cfg = Config("mid", base.N, base.H, base.I, T)
        best, ratio, saved, _ = best_times(cfg, ["lstm", "fast"], max(2, args.rounds - 2), 0, None)
        peaks = {}
        if not args.no_peak:
            peaks = {v: peak_bytes(cfg, v, args.threads, T) for v in ("lstm", "fast")}
        lt, ft = best["lstm", "train"], best["fast", "train"]
        fp = peaks.get("fast")
        print(
            f"{T:5d} {lt / T * 1e3:13.3f} {ft / T * 1e3:13.3f} {ratio['fast', 'train']:6.2f} "
            f"{saved['fast'] / T / 1024:14.1f} {fmt_ratio(saved['fast'], saved['lstm']):>6} "
            f"{'-' if fp is None else f'{fp / T / 1024:13.1f}':>13} "
            f"{fmt_ratio(fp, peaks.get('lstm')):>6}",
            flush=True,
        )


if __name__ == "__main__":
    main()
