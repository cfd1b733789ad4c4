"""``bnrnn figure tanh-derivative``: Cooijmans Fig. 1(b), the expected derivative of tanh and
its interquartile range as a function of the standard deviation of a centred Gaussian input.

As in the paper, x ~ N(0, sigma^2) is sampled for each sigma and tanh'(x) = 1 - tanh(x)^2
is summarised by its mean and quartiles. The exact values are drawn next to the estimate:

- quartiles in closed form: tanh' decreases in |x| and |x| = sigma |Z| is half-normal, so
  the q-quantile of tanh'(x) is ``sech^2(sigma * Phi^-1(1 - q/2))`` (Phi^-1 the standard
  normal quantile);
- the mean E[sech^2(sigma Z)] by quadrature (trapezoid rule on a fine grid over
  z in [-12, 12], exact to ~1e-12 for this smooth, fast-decaying integrand).
"""

from __future__ import annotations

import argparse
import math
import time
from statistics import NormalDist
from typing import Any

import numpy as np
import torch

from .common import DEFAULT_OUT, new_figure, write_figure

QUANTILES = (0.25, 0.5, 0.75)


def sech2(x: np.ndarray) -> np.ndarray:
    """tanh'(x) = 1 - tanh(x)^2 = sech(x)^2, computed without overflow."""
    return 1.0 / np.cosh(np.clip(x, -350.0, 350.0)) ** 2


def exact_quantile(stds: np.ndarray, q: float) -> np.ndarray:
    """The ``q``-quantile of tanh'(x), x ~ N(0, std^2), in closed form (see module doc)."""
    z = NormalDist().inv_cdf(1.0 - q / 2.0)  # |x|'s (1-q)-quantile is std * z
    return sech2(np.asarray(stds, dtype=np.float64) * z)


def exact_mean(stds: np.ndarray, points: int = 24001, bound: float = 12.0) -> np.ndarray:
    """E[tanh'(std Z)], Z ~ N(0, 1), by the trapezoid rule on [-bound, bound]."""
    z = np.linspace(-bound, bound, points)
    pdf = np.exp(-0.5 * z * z) / math.sqrt(2.0 * math.pi)
    stds = np.asarray(stds, dtype=np.float64)
    vals = sech2(stds[:, None] * z[None, :]) * pdf[None, :]
    trapezoid = getattr(np, "trapezoid", None) or np.trapz  # numpy < 2 has only trapz
    return trapezoid(vals, z, axis=1)


def empirical(stds: np.ndarray, samples: int, seed: int) -> dict[str, np.ndarray]:
    """Sampled mean and quartiles of tanh'(x), x ~ N(0, std^2), ``samples`` draws per std
    (the same standard normal draws scaled by each std)."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(samples, generator=g, dtype=torch.float64)
    qs = torch.tensor(QUANTILES, dtype=torch.float64)
    means, quart = [], []
    for s in stds:
        d = 1.0 - torch.tanh(float(s) * z) ** 2
        means.append(float(d.mean()))
        quart.append(torch.quantile(d, qs).tolist())
    quart_arr = np.asarray(quart)
    return {
        "mean": np.asarray(means),
        "q25": quart_arr[:, 0],
        "median": quart_arr[:, 1],
        "q75": quart_arr[:, 2],
    }


def compute(max_std: float = 1.0, points: int = 101, samples: int = 100_000, seed: int = 1):
    if max_std <= 0:
        raise ValueError(f"max_std must be positive, got {max_std}")
    if points < 2:
        raise ValueError(f"points must be at least 2, got {points}")
    if samples < 2:
        raise ValueError(f"samples must be at least 2, got {samples}")
    stds = np.linspace(0.0, max_std, points)
    emp = empirical(stds, samples, seed)
    exact = {
        "mean": exact_mean(stds),
        "q25": exact_quantile(stds, 0.25),
        "median": exact_quantile(stds, 0.5),
        "q75": exact_quantile(stds, 0.75),
    }
    return stds, emp, exact


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--max-std", type=float, default=1.0, help="largest input standard deviation (paper: 1)"
    )
    p.add_argument("--points", type=int, default=101, help="number of standard deviations")
    p.add_argument("--samples", type=int, default=100_000, help="Gaussian draws per std")
    p.add_argument("--seed", type=int, default=1, help="seed of the draws")
    p.add_argument("--out", default=DEFAULT_OUT, help="output directory (default: figures)")
    p.add_argument("--name", default="tanh_derivative", help="base name of the output files")


def _at(stds: np.ndarray, values: np.ndarray, s: float) -> float:
    return float(np.interp(s, stds, values))


def run(args: argparse.Namespace, argv: list[str] | None = None) -> Any:
    t0 = time.perf_counter()
    stds, emp, exact = compute(args.max_std, args.points, args.samples, args.seed)
    fig, ax = new_figure(6.4, 4.6)
    ax.fill_between(
        stds, emp["q25"], emp["q75"], color="C0", alpha=0.25, label="interquartile range (sampled)"
    )
    ax.plot(stds, emp["mean"], color="C0", lw=2, label="mean of tanh'(x) (sampled)")
    ax.plot(stds, exact["mean"], color="k", lw=1, ls="--", label="mean (quadrature)")
    ax.plot(stds, exact["q25"], color="C3", lw=0.9, ls=":", label="quartiles (closed form)")
    ax.plot(stds, exact["q75"], color="C3", lw=0.9, ls=":")
    for s in (0.1, 1.0):
        if s <= args.max_std:
            m = _at(stds, exact["mean"], s)
            ax.annotate(
                f"E[tanh'] = {m:.3f}\nat std {s:g}",
                (s, m),
                textcoords="offset points",
                xytext=(-70 if s > 0.5 else 10, -30),
                fontsize=8,
                arrowprops={"arrowstyle": "->", "lw": 0.6},
            )
    ax.set_xlabel("standard deviation of the input x ~ N(0, std^2)")
    ax.set_ylabel("tanh'(x) = 1 - tanh(x)^2")
    ax.set_ylim(0, 1.02)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower left")
    fig.suptitle("Expected derivative of tanh vs input spread (Cooijmans Fig. 1b)")
    header = [
        "std",
        "mean",
        "q25",
        "median",
        "q75",
        "exact_mean",
        "exact_q25",
        "exact_median",
        "exact_q75",
    ]
    keys = ("mean", "q25", "median", "q75")
    rows = [
        [float(s), *(float(emp[k][i]) for k in keys), *(float(exact[k][i]) for k in keys)]
        for i, s in enumerate(stds)
    ]
    summary: dict[str, Any] = {}
    for s in (0.1, 0.25, 0.5, 0.75, 1.0):
        if s <= args.max_std:
            summary[f"std={s:g}"] = {k: _at(stds, exact[k], s) for k in keys} | {
                f"sampled_{k}": _at(stds, emp[k], s) for k in keys
            }
    summary["max_abs_error_mean"] = float(np.max(np.abs(emp["mean"] - exact["mean"])))
    summary["wall_seconds"] = round(time.perf_counter() - t0, 1)
    settings = {
        "stds": f"0..{args.max_std:g} ({args.points} points)",
        "samples_per_std": args.samples,
        "seed": args.seed,
    }
    note = (
        "Shaded: sampled interquartile range; dotted: its closed form sech^2(std*Phi^-1(1-q/2)); "
        "dashed: E[tanh'] by quadrature. Paper: std from 0 to 1."
    )
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
    )
