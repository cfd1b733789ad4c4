"""Where the normalisations go: the placements (design.md, Placements) and their BN modules.

| norm            | normalised                          | source             |
|-----------------|-------------------------------------|--------------------|
| "cooijmans"     | W_ih x, W_hh h (no shift), c (shift) | Cooijmans eq. 6-8 |
| "input"         | W_ih x                              | Laurent eq. 18     |
| "preactivation" | W_hh h + W_ih x                     | Laurent eq. 17     |
| None            | nothing: the plain LSTM / RNN       |                    |
"""

from __future__ import annotations

import torch

from .checks import positive_int
from .norm import StepBatchNorm

NORMS = ("cooijmans", "input", "preactivation", None)
INPUT_STATS = ("frame", "sequence")


def check_placement(norm: str | None, input_stats: str, max_length: int) -> None:
    """Raise ValueError for an unknown or inconsistent configuration."""
    if norm not in NORMS:
        raise ValueError(f"norm must be one of {NORMS}, got {norm!r}")
    if input_stats not in INPUT_STATS:
        raise ValueError(f"input_stats must be one of {INPUT_STATS}, got {input_stats!r}")
    if input_stats == "sequence" and norm not in ("cooijmans", "input"):
        raise ValueError(
            "input_stats='sequence' normalises the separate input term W_ih x, which only "
            f"norm='cooijmans' and norm='input' have; got norm={norm!r}"
        )
    positive_int("max_length", max_length)


def build_norms(
    norm: str | None,
    gates: int,
    hidden_size: int,
    has_cell: bool,
    input_stats: str,
    max_length: int,
    eps: float,
    momentum: float | None,
    gamma_init: float,
    device: torch.device | str | None,
    dtype: torch.dtype | None,
) -> dict[str, StepBatchNorm]:
    """The BN modules of one direction of one layer, keyed "ih", "hh", "pre", "c"."""
    kw = {
        "eps": eps,
        "momentum": momentum,
        "gamma_init": gamma_init,
        "device": device,
        "dtype": dtype,
    }
    G = gates * hidden_size
    out: dict[str, StepBatchNorm] = {}
    if norm in ("cooijmans", "input"):
        # Sequence-wise statistics have a single row (Laurent eq. 20-21).
        rows = 1 if input_stats == "sequence" else max_length
        out["ih"] = StepBatchNorm(G, rows, **kw)
    if norm == "cooijmans":
        out["hh"] = StepBatchNorm(G, max_length, **kw)
        if has_cell:
            # Cooijmans eq. 8: BN(c_t; gamma_c, beta_c), beta_c initialised to 0.
            out["c"] = StepBatchNorm(hidden_size, max_length, shift=True, **kw)
    if norm == "preactivation":
        out["pre"] = StepBatchNorm(G, max_length, **kw)
    return out


def needs_batch_of_two(norm: str | None, input_stats: str) -> bool:
    """Whether training needs at least two sequences: a frame-wise BN is present."""
    return norm is not None and not (norm == "input" and input_stats == "sequence")
