"""Weight initialisation schemes (per gate block of rows, torch gate order i, f, g, o).

- "uniform": `torch.nn.LSTM`'s default, U(-1/sqrt(H), 1/sqrt(H)) for every weight and bias.
- "orthogonal": each gate's (H, in) block orthogonal, biases zero (Cooijmans §5.2-5.3).
- "identity": orthogonal W_ih, identity W_hh blocks, biases zero (Cooijmans §5.1).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

WEIGHT_INITS = ("uniform", "orthogonal", "identity")


@torch.no_grad()
def init_direction(
    weight_ih: Tensor,
    weight_hh: Tensor,
    bias_ih: Tensor | None,
    bias_hh: Tensor | None,
    scheme: str,
    gates: int,
    forget_bias: float,
) -> None:
    """Initialise one direction's parameters in place."""
    H = weight_hh.shape[1]
    if scheme == "uniform":
        bound = 1.0 / math.sqrt(H)
        for w in (weight_ih, weight_hh, bias_ih, bias_hh):
            if w is not None:
                nn.init.uniform_(w, -bound, bound)
    else:
        for block in weight_ih.split(H, 0):
            nn.init.orthogonal_(block)
        for block in weight_hh.split(H, 0):
            if scheme == "identity":
                block.copy_(torch.eye(H, dtype=block.dtype, device=block.device))
            else:
                nn.init.orthogonal_(block)
        for b in (bias_ih, bias_hh):
            if b is not None:
                nn.init.zeros_(b)
    if gates == 4 and forget_bias != 0.0 and bias_ih is not None and bias_hh is not None:
        bias_ih[H : 2 * H] = forget_bias  # gate order i, f, g, o: f is the second block
        bias_hh[H : 2 * H] = 0.0
