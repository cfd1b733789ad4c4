"""Where the normalisations go: the placements (design.md, Placements) and their BN modules.

| norm            | normalised                          | source             |
|-----------------|-------------------------------------|--------------------|
| "cooijmans"     | W_ih x, W_hh h (no shift), c (shift) | Cooijmans eq. 6-8 |
| "input"         | W_ih x                              | Laurent eq. 18     |
| "preactivation" | W_hh h + W_ih x                     | Laurent eq. 17     |
| "layer"         | LN of W_ih x, W_hh h (no shift), c (shift) | Ba et al. §6.5, suppl. |
| None            | nothing: the plain LSTM / RNN       |                    |

"layer" normalises the terms of "cooijmans" with `StepLayerNorm` (each row over its
features, no statistics kept) instead of `StepBatchNorm`; its modules are named ``ln_*``
instead of ``bn_*``.
"""

from __future__ import annotations

import torch

from .checks import positive_int
from .layernorm import StepLayerNorm
from .norm import StepBatchNorm

NORMS = ("cooijmans", "input", "preactivation", "layer", None)
# The initial gain of the normalisations when ``gamma_init`` is not given: Cooijmans §4
# (0.1) for batch normalisation, Ba et al. (1) for layer normalisation.
GAMMA_INIT = {"layer": 1.0}
GAMMA_INIT_BN = 0.1
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


def default_gamma_init(norm: str | None, gamma_init: float | None) -> float:
    """``gamma_init`` if given, else the placement's default (`GAMMA_INIT`)."""
    if gamma_init is not None:
        return gamma_init
    return GAMMA_INIT.get(norm, GAMMA_INIT_BN)  # type: ignore[arg-type]


def norm_prefix(norm: str | None) -> str:
    """The prefix of the normalisation modules' attribute names: ``ln`` for "layer"."""
    return "ln" if norm == "layer" else "bn"


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
) -> dict[str, StepBatchNorm | StepLayerNorm]:
    """The normalisation modules of one direction of one layer, keyed "ih", "hh", "pre",
    "c"."""
    if norm == "layer":
        # Ba et al., supplementary LSTM: LN(W_hh h; a_hh) + LN(W_ih x; a_ih) + b, no shift
        # on the two products (the bias is theirs), LN(c_t; a_c, b_c) with a shift.
        ln = {"eps": eps, "gamma_init": gamma_init, "device": device, "dtype": dtype}
        G = gates * hidden_size
        out_ln: dict[str, StepBatchNorm | StepLayerNorm] = {
            "ih": StepLayerNorm(G, **ln),
            "hh": StepLayerNorm(G, **ln),
        }
        if has_cell:
            out_ln["c"] = StepLayerNorm(hidden_size, shift=True, **ln)
        return out_ln
    kw = {
        "eps": eps,
        "momentum": momentum,
        "gamma_init": gamma_init,
        "device": device,
        "dtype": dtype,
    }
    G = gates * hidden_size
    out: dict[str, StepBatchNorm | StepLayerNorm] = {}
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
    return norm not in (None, "layer") and not (norm == "input" and input_stats == "sequence")
