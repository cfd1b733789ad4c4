"""Checks of the arguments a user gives the modules, and warnings addressed to the user's
own line of code (not to the library's frame that noticed the problem)."""

from __future__ import annotations

import math
import numbers
import os
import sys
import warnings

import torch

# Frames in these directories are skipped when a warning looks for the user's line: the
# library's own, and torch's (nn.Module.__call__, torch.no_grad's wrapper) between them.
_INTERNAL = (
    os.path.dirname(os.path.abspath(__file__)) + os.sep,
    os.path.dirname(os.path.abspath(torch.__file__)) + os.sep,
)


def warn_user(message: str, category: type[Warning] = UserWarning) -> None:
    """`warnings.warn` with the stack level of the innermost frame outside bnrnn and
    torch: the user's line that led here, however deep in the library it was noticed."""
    frame = sys._getframe(1)
    level = 2  # stacklevel 2 is this function's caller
    while frame is not None and frame.f_code.co_filename.startswith(_INTERNAL):
        frame = frame.f_back
        level += 1
    warnings.warn(message, category, stacklevel=level)


def positive_int(name: str, value: object) -> int:
    """``value`` as an int if it is an integer >= 1 (not a bool), else a ValueError."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return int(value)


def finite(name: str, value: object) -> float:
    """``value`` as a float if it is a finite real number (not a bool), else a ValueError."""
    if (
        isinstance(value, bool)
        or not isinstance(value, numbers.Real)
        or not math.isfinite(float(value))
    ):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    return float(value)


def positive_eps(eps: object) -> float:
    """The BN ``eps`` (added to the variance before the square root): finite and > 0, so
    that a step with zero variance still divides by a positive number."""
    if finite("eps", eps) <= 0:
        raise ValueError(f"eps must be a positive number, got {eps!r}")
    return float(eps)  # type: ignore[arg-type]


def momentum_value(momentum: object) -> float | None:
    """The running-average factor: a number in [0, 1], or None (cumulative average)."""
    if momentum is None:
        return None
    if (
        isinstance(momentum, bool)
        or not isinstance(momentum, numbers.Real)
        or not 0.0 <= float(momentum) <= 1.0
    ):
        raise ValueError(f"momentum must be a number in [0, 1] or None, got {momentum!r}")
    return float(momentum)


def check_layer_args(
    input_size: object,
    hidden_size: object,
    eps: object,
    momentum: object,
    gamma_init: object,
    forget_bias: object,
) -> None:
    """The arguments that the layers and the cells share: a ValueError naming the first
    bad one and its value."""
    positive_int("input_size", input_size)
    positive_int("hidden_size", hidden_size)
    positive_eps(eps)
    momentum_value(momentum)
    finite("gamma_init", gamma_init)
    finite("forget_bias", forget_bias)
