"""`BNLSTMCell` and `BNRNNCell`: one step with an explicit time index, the
`torch.nn.LSTMCell` / `torch.nn.RNNCell` contract, and the same step function as the layers.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .checks import check_layer_args
from .functional import StepNorms, lstm_step, rnn_step
from .init import WEIGHT_INITS, init_direction
from .layernorm import StepLayerNorm
from .norm import StepBatchNorm
from .placement import (
    build_norms,
    check_placement,
    default_gamma_init,
    needs_batch_of_two,
    norm_prefix,
)

_NORM_TYPES = (StepBatchNorm, StepLayerNorm)


class _BNCellBase(nn.Module):
    _gates: int
    _has_cell: bool

    def __init__(
        self,
        input_size: int,
        hidden_size: int,
        bias: bool = True,
        norm: str | None = "cooijmans",
        max_length: int = 100,
        momentum: float | None = 0.1,
        eps: float = 1e-5,
        gamma_init: float | None = None,
        forget_bias: float = 0.0,
        weight_init: str = "uniform",
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        check_placement(norm, "frame", max_length)
        gamma_init = default_gamma_init(norm, gamma_init)
        check_layer_args(input_size, hidden_size, eps, momentum, gamma_init, forget_bias)
        if weight_init not in WEIGHT_INITS:
            raise ValueError(f"weight_init must be one of {WEIGHT_INITS}, got {weight_init!r}")
        factory: dict[str, Any] = {"device": device, "dtype": dtype}
        self.input_size = input_size
        self.hidden_size = hidden_size
        self.bias = bias
        self.norm = norm
        self.max_length = max_length
        self.forget_bias = forget_bias
        self.weight_init = weight_init
        G = self._gates * hidden_size
        self.weight_ih = nn.Parameter(torch.empty(G, input_size, **factory))
        self.weight_hh = nn.Parameter(torch.empty(G, hidden_size, **factory))
        if bias:
            self.bias_ih = nn.Parameter(torch.empty(G, **factory))
            self.bias_hh = nn.Parameter(torch.empty(G, **factory))
        else:
            self.register_parameter("bias_ih", None)
            self.register_parameter("bias_hh", None)
        norms = build_norms(
            norm,
            self._gates,
            hidden_size,
            self._has_cell,
            "frame",
            max_length,
            eps,
            momentum,
            gamma_init,
            device,
            dtype,
        )
        # BN modules as bn_<key> (None where absent); norm="layer": ln_ih, ln_hh, ln_c
        for key in ("ih", "hh", "pre", "c"):
            setattr(self, f"bn_{key}", None)
        for key, module in norms.items():
            setattr(self, f"{norm_prefix(norm)}_{key}", module)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        init_direction(
            self.weight_ih,
            self.weight_hh,
            self.bias_ih,
            self.bias_hh,
            self.weight_init,
            self._gates,
            self.forget_bias,
        )
        for m in self.children():
            if isinstance(m, _NORM_TYPES):
                m.reset_parameters()

    def reset_running_stats(self) -> None:
        for m in self.children():
            if isinstance(m, StepBatchNorm):
                m.reset_running_stats()

    def extra_repr(self) -> str:
        s = f"{self.input_size}, {self.hidden_size}, norm={self.norm!r}"
        return s + ("" if self.bias else ", bias=False")

    def _step(self, input: Tensor, hx: tuple[Tensor, ...] | None, t: int, step) -> tuple:
        if isinstance(t, bool) or not isinstance(t, int) or t < 0:
            raise ValueError(f"t must be a non-negative integer, got {t!r}")
        if input.dim() not in (1, 2):
            raise ValueError(f"Expected input to be 1D or 2D, got {input.dim()}D instead")
        if not input.is_floating_point():
            raise TypeError(f"input must be a floating point tensor, got dtype {input.dtype}")
        if input.size(-1) != self.input_size:
            raise RuntimeError(
                f"input.size(-1) must be equal to input_size. Expected {self.input_size}, "
                f"got {input.size(-1)}"
            )
        unbatched = input.dim() == 1
        x = input.unsqueeze(0) if unbatched else input
        N = x.shape[0]
        uses_batch = self.training or any(
            m.collecting for m in self.children() if isinstance(m, _NORM_TYPES)
        )
        if uses_batch and N < 2 and needs_batch_of_two(self.norm, "frame"):
            raise ValueError(
                "Expected more than 1 sequence per batch when training with batch statistics "
                f"(norm={self.norm!r}), got a batch of {N} sequence"
            )
        n_parts = 2 if self._has_cell else 1
        if hx is None:
            state = tuple(x.new_zeros(N, self.hidden_size) for _ in range(n_parts))
        else:
            state = []
            for k, s in enumerate(hx):
                expect = (self.hidden_size,) if unbatched else (N, self.hidden_size)
                if tuple(s.shape) != expect:
                    raise RuntimeError(f"Expected hidden[{k}] size {expect}, got {list(s.shape)}")
                state.append(s.unsqueeze(0) if unbatched else s)
            state = tuple(state)
        prefix = norm_prefix(self.norm)
        bn_ih, bn_hh, bn_pre, bn_c = (
            getattr(self, f"{prefix}_{key}", None) for key in ("ih", "hh", "pre", "c")
        )
        wx = F.linear(x, self.weight_ih)
        if bn_ih is not None:
            wx = bn_ih.step(wx, t)
        bias = None if self.bias_ih is None else self.bias_ih + self.bias_hh

        def at(bn):
            return None if bn is None else (lambda z: bn.step(z, t))

        norms = StepNorms(hh=at(bn_hh), pre=at(bn_pre), c=at(bn_c))
        out = step(wx, state, self.weight_hh, bias, norms)
        return tuple(s.squeeze(0) for s in out) if unbatched else out


class BNLSTMCell(_BNCellBase):
    """One batch-normalised LSTM step (Cooijmans eq. 6-8 by default) at step ``t``.

    ``forward(input (N, I), hx=(h, c) each (N, H), t=0) -> (h', c')``. Parameters as
    `torch.nn.LSTMCell` (``weight_ih`` (4H, I), ``weight_hh`` (4H, H), ``bias_ih``,
    ``bias_hh`` (4H,)); BN modules ``bn_ih``, ``bn_hh``, ``bn_c``, ``bn_pre`` as in `BNLSTM`
    (``norm="layer"``: `StepLayerNorm` modules ``ln_ih``, ``ln_hh``, ``ln_c``, Ba et al.).
    Step ``t`` selects the row of population statistics (`StepBatchNorm.population_row`;
    not used by layer normalisation). ``gamma_init``: 0.1 by default, 1.0 for "layer".
    """

    _gates = 4
    _has_cell = True

    def forward(
        self, input: Tensor, hx: tuple[Tensor, Tensor] | None = None, t: int = 0
    ) -> tuple[Tensor, Tensor]:
        h, c = self._step(input, hx, t, lstm_step)
        return h, c


class BNRNNCell(_BNCellBase):
    """One batch-normalised tanh-RNN step: ``h' = tanh(BN(W_hh h) + BN(W_ih x) + b)``."""

    _gates = 1
    _has_cell = False

    def forward(self, input: Tensor, hx: Tensor | None = None, t: int = 0) -> Tensor:
        (h,) = self._step(input, None if hx is None else (hx,), t, rnn_step)
        return h
