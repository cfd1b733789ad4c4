"""Stateless step functions: one time step of the (batch-normalised) LSTM and tanh RNN.

The cells, the reference layer loop and the tests all call these, so the equations live in
one place. A step receives the input term ``wx`` already computed (and, for the
``"cooijmans"`` and ``"input"`` placements, already normalised, since its statistics may be
sequence-wise), the previous state, and the step's normalisations as plain callables.

State is a tuple whose first entry is ``h``: ``(h, c)`` for the LSTM, ``(h,)`` for the RNN.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

Normalize = Callable[[Tensor], Tensor]
State = tuple[Tensor, ...]


class StepNorms(NamedTuple):
    """The normalisations applied inside one step (``None``: not normalised).

    ``hh``: the recurrent term W_hh h (Cooijmans eq. 6). ``pre``: the whole pre-activation
    W_hh h + W_ih x (Laurent eq. 17). ``c``: the cell before the output tanh (Cooijmans
    eq. 8; LSTM only).
    """

    hh: Normalize | None = None
    pre: Normalize | None = None
    c: Normalize | None = None


def _preactivation(
    wx: Tensor, h: Tensor, weight_hh: Tensor, bias: Tensor | None, norms: StepNorms
) -> Tensor:
    wh = F.linear(h, weight_hh)  # (n, G*H)
    if norms.hh is not None:
        wh = norms.hh(wh)
    a = wx + wh
    if norms.pre is not None:
        a = norms.pre(a)
    # The bias is added after normalisation: it is the shift of every BN (Cooijmans §3).
    return a if bias is None else a + bias


def lstm_step(
    wx: Tensor, state: State, weight_hh: Tensor, bias: Tensor | None, norms: StepNorms
) -> State:
    """One LSTM step, gates in torch order (i, f, g, o).

    wx: (n, 4H) input term; state: (h, c) each (n, H); weight_hh: (4H, H); bias: (4H,) =
    bias_ih + bias_hh. The un-normalised cell is carried; BN(c) only feeds the output
    (Cooijmans eq. 7-8).
    """
    h, c = state
    a = _preactivation(wx, h, weight_hh, bias, norms)
    i, f, g, o = a.chunk(4, 1)
    c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
    c_out = c if norms.c is None else norms.c(c)
    h = torch.sigmoid(o) * torch.tanh(c_out)
    return h, c


def rnn_step(
    wx: Tensor,
    state: State,
    weight_hh: Tensor,
    bias: Tensor | None,
    norms: StepNorms,
    nonlinearity: str = "tanh",
) -> State:
    """One step of the simple RNN: h = tanh(BN(W_hh h) + BN(W_ih x) + b) (Cooijmans §4)."""
    (h,) = state
    a = _preactivation(wx, h, weight_hh, bias, norms)
    return (torch.tanh(a) if nonlinearity == "tanh" else torch.relu(a),)
