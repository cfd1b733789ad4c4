"""``bnrnn figure population-stats RUN_DIR``: Cooijmans Fig. 5, the per-step population mean
and variance of the recurrent term W_hh h and of the cell c for a sample of units, read from
a trained run's `bnrnn.StepBatchNorm` buffers, to show how fast they converge to a
stationary distribution (Cooijmans §3 and Appendix A).

The buffers are found by key suffix in the checkpoint's state dict
(``...bn_hh_l0.running_mean`` of shape (max_length, 4H), ``...bn_c_l0.running_var`` of
shape (max_length, H), whatever prefix the model wrapper adds), so any checkpoint holding a
`bnrnn.BNLSTM` works. Only rows that were updated (``num_batches_tracked > 0``) are drawn.

Convergence is summarised per term and statistic over *all* units, not only the drawn ones:
the stationary value s_inf[u] of unit u is the average of its last quarter of rows, and the
deviation at step t is ``d_t = mean_u |s_t[u] - s_inf[u]| / std_u(s_inf)``, the distance to
the stationary value measured in units of the spread of the stationary values across units.
The running estimates are noisy (a momentum average over a few batches), so d does not go
to zero: its floor is the median of d over the second half of the rows. The settling step
is the first t after which d stays below floor + ``--tolerance`` (default 0.25).
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .common import DEFAULT_OUT, new_figure, write_figure

CHECKPOINTS = {"best": "ckpt_best.pt", "last": "ckpt_last.pt"}
TERM_LABELS = {"hh": "recurrent term W_hh h", "c": "cell state c", "ih": "input term W_ih x"}
REPORT_STEPS = (0, 1, 2, 5, 10, 20, 50, 99)


def checkpoint_path(path: str | os.PathLike[str], which: str = "best") -> Path:
    """A checkpoint file: ``path`` itself, or the run directory's best (else last) one."""
    p = Path(path)
    if p.is_file():
        return p
    if not p.is_dir():
        raise FileNotFoundError(f"{p} is neither a run directory nor a checkpoint file")
    order = [which] + [k for k in CHECKPOINTS if k != which]
    for key in order:
        if (p / CHECKPOINTS[key]).is_file():
            return p / CHECKPOINTS[key]
    raise FileNotFoundError(f"no checkpoint in {p} (expected {' or '.join(CHECKPOINTS.values())})")


def load_state_dict(path: str | os.PathLike[str], which: str = "best") -> dict[str, torch.Tensor]:
    """The model state dict of a run directory or checkpoint file (``{"model": sd, ...}``,
    ``{"state_dict": sd}`` or a bare state dict)."""
    ckpt = torch.load(checkpoint_path(path, which), map_location="cpu", weights_only=False)
    if isinstance(ckpt, dict):
        for key in ("model", "state_dict", "model_state_dict"):
            if isinstance(ckpt.get(key), dict):
                return ckpt[key]
        if all(isinstance(v, torch.Tensor) for v in ckpt.values()):
            return ckpt
    raise ValueError(f"{path}: no model state dict found in the checkpoint")


def find_stats(
    state_dict: dict[str, torch.Tensor], term: str, layer: int = 0
) -> dict[str, torch.Tensor] | None:
    """``{"mean", "var", "tracked"}`` of the BN ``bn_{term}_l{layer}`` (forward direction),
    found by key suffix, or None if the model has no such BN."""
    module = f"bn_{term}_l{layer}"
    found: dict[str, torch.Tensor] = {}
    for key, value in state_dict.items():
        prefix, _, name = key.rpartition(".")
        if prefix != module and not prefix.endswith("." + module):
            continue
        if name == "running_mean":
            found["mean"] = value
        elif name == "running_var":
            found["var"] = value
        elif name == "num_batches_tracked":
            found["tracked"] = value
    if "mean" not in found or "var" not in found:
        return None
    if found["mean"].dim() != 2:
        raise ValueError(
            f"bn_{term}_l{layer}.running_mean has shape {list(found['mean'].shape)}; expected "
            "(max_length, F) per-step statistics of bnrnn.StepBatchNorm"
        )
    found.setdefault("tracked", torch.ones(found["mean"].shape[0], dtype=torch.long))
    return found


def used_rows(tracked: torch.Tensor) -> int:
    """Number of leading rows that hold statistics (all rows if none was ever tracked)."""
    t = tracked.reshape(-1)
    if t.numel() == 0 or int(t[0]) == 0:
        return t.numel()
    zero = (t == 0).nonzero()
    return int(zero[0]) if zero.numel() else t.numel()


def convergence(values: np.ndarray, tolerance: float) -> dict[str, Any]:
    """Deviation from the stationary value per step (see the module docstring).

    values: (T, F). Returns {"deviation": (T,), "settle_step": int | None, "spread": float,
    "floor": float}.
    """
    T = values.shape[0]
    tail = values[T - max(1, T // 4) :]
    stationary = tail.mean(0)  # (F,)
    spread = float(stationary.std())
    if spread == 0.0:
        spread = float(np.abs(stationary).mean()) or 1.0
    dev = np.abs(values - stationary[None]).mean(1) / spread  # (T,)
    floor = float(np.median(dev[T // 2 :]))  # the estimates' noise level
    above = np.nonzero(dev >= floor + tolerance)[0]
    if above.size == 0:
        settle: int | None = 0
    elif above[-1] + 1 < T:
        settle = int(above[-1] + 1)
    else:
        settle = None
    return {"deviation": dev, "settle_step": settle, "spread": spread, "floor": floor}


def compute(
    state_dict: dict[str, torch.Tensor],
    terms: list[str],
    layer: int = 0,
    units: int = 8,
    seed: int = 1,
    tolerance: float = 0.25,
) -> dict[str, Any]:
    """Statistics, sampled units and convergence of each available term."""
    out: dict[str, Any] = {}
    rng = np.random.default_rng(seed)
    for term in terms:
        stats = find_stats(state_dict, term, layer)
        if stats is None:
            continue
        T = used_rows(stats["tracked"])
        mean = stats["mean"][:T].double().numpy()
        var = stats["var"][:T].double().numpy()
        F = mean.shape[1]
        pick = np.sort(rng.choice(F, size=min(units, F), replace=False))
        out[term] = {
            "rows": T,
            "features": F,
            "units": pick.tolist(),
            "mean": mean,
            "var": var,
            "conv_mean": convergence(mean, tolerance),
            "conv_var": convergence(var, tolerance),
            "tracked_batches": int(stats["tracked"][0]) if stats["tracked"].numel() else 0,
        }
    if not out:
        keys = sorted({k.rpartition(".")[0] for k in state_dict if "running_mean" in k})
        raise ValueError(
            f"no per-step BN statistics for terms {terms} in layer {layer}; "
            f"BN modules present: {keys or 'none'}"
        )
    return out


def _read_run_config(path: Path) -> dict[str, Any]:
    cfg = (path if path.is_dir() else path.parent) / "config.json"
    if cfg.is_file():
        return json.loads(cfg.read_text(encoding="utf-8"))
    return {}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("run", help="run directory (or a checkpoint file) of a trained BN-LSTM")
    p.add_argument(
        "--checkpoint",
        default="best",
        choices=tuple(CHECKPOINTS),
        help="which checkpoint of the run (default: best)",
    )
    p.add_argument(
        "--terms",
        default="hh,c",
        help="BN terms to show: hh (recurrent), c (cell), ih (input); default hh,c",
    )
    p.add_argument("--layer", type=int, default=0, help="layer index (default 0)")
    p.add_argument("--units", type=int, default=8, help="randomly chosen units drawn per term")
    p.add_argument("--seed", type=int, default=1, help="seed of the unit sample")
    p.add_argument(
        "--tolerance",
        type=float,
        default=0.25,
        help="settled when the deviation stays below this (see the docstring)",
    )
    p.add_argument("--out", default=DEFAULT_OUT, help="output directory (default: figures)")
    p.add_argument("--name", default="population_stats", help="base name of the output files")


def run(args: argparse.Namespace, argv: list[str] | None = None) -> Any:
    t0 = time.perf_counter()
    terms = [t.strip() for t in args.terms.split(",") if t.strip()]
    for t in terms:
        if t not in TERM_LABELS:
            raise ValueError(f"--terms: {t!r} is not one of {', '.join(TERM_LABELS)}")
    if args.units <= 0:
        raise ValueError(f"--units must be a positive integer, got {args.units}")
    ckpt = checkpoint_path(args.run, args.checkpoint)
    sd = load_state_dict(ckpt)
    res = compute(sd, terms, args.layer, args.units, args.seed, args.tolerance)
    shown = list(res)
    fig, axes = new_figure(10, 3.1 * len(shown), len(shown), 2)
    axes = np.asarray(axes).reshape(len(shown), 2)
    header = ["step"]
    columns: list[np.ndarray] = []
    summary: dict[str, Any] = {}
    for row, term in enumerate(shown):
        r = res[term]
        steps = np.arange(r["rows"])
        for col, stat in enumerate(("mean", "var")):
            ax = axes[row, col]
            values = r[stat]
            for u in r["units"]:
                ax.plot(steps, values[:, u], lw=1.0)
                header.append(f"{term}.{stat}[{u}]")
                columns.append(values[:, u])
            conv = r[f"conv_{stat}"]
            header.append(f"{term}.{stat}.deviation")
            columns.append(conv["deviation"])
            if conv["settle_step"] is not None:
                ax.axvline(conv["settle_step"], color="k", ls=":", lw=0.8)
            ax.set_title(
                f"{'mean' if stat == 'mean' else 'variance'} of {TERM_LABELS[term]}", fontsize=10
            )
            ax.set_xlabel("time step")
            ax.grid(alpha=0.3)
            dev = conv["deviation"]
            summary[f"{term}.{stat}"] = {
                "settle_step": conv["settle_step"],
                "spread_across_units": conv["spread"],
                "deviation_floor": conv["floor"],
                "deviation_at": {str(t): float(dev[t]) for t in REPORT_STEPS if t < len(dev)},
                "range_across_units_at_last_step": [
                    float(values[-1].min()),
                    float(values[-1].max()),
                ],
            }
        summary[f"{term}.rows"] = r["rows"]
        summary[f"{term}.features"] = r["features"]
        summary[f"{term}.units_drawn"] = r["units"]
        summary[f"{term}.num_batches_tracked_row0"] = r["tracked_batches"]
    cfg = _read_run_config(Path(args.run))
    fig.suptitle(
        "Population statistics per time step (Cooijmans Fig. 5)"
        + (f": {cfg.get('task')} {cfg.get('model')}" if cfg else "")
    )
    rows = [[int(t), *(float(c[t]) for c in columns)] for t in range(len(columns[0]))]
    settings = {
        "run": str(args.run),
        "checkpoint": ckpt.name,
        "layer": args.layer,
        "units_per_term": args.units,
        "seed": args.seed,
    }
    for key in ("task", "model", "hidden_size", "seq_len", "max_steps", "gamma_init"):
        if key in cfg:
            settings[key] = cfg[key]
    note = (
        "Dotted line: step after which the mean distance to the stationary value (average "
        "of the last quarter of rows), in units of its spread across units, stays within "
        f"{args.tolerance:g} of its noise floor. Paper: 1000-unit BN-LSTM on PTB chars."
    )
    summary["wall_seconds"] = round(time.perf_counter() - t0, 1)
    return write_figure(
        fig,
        args.out,
        args.name,
        settings=settings,
        summary=summary,
        header=header,
        rows=rows,
        note=note,
        argv=argv,
        dpi=90,  # many noisy lines: keeps the PNG small
    )
