"""Layer normalisation of one term of a recurrent step (Ba et al. 2016, "Layer
Normalization", §3.1 and the supplementary's LSTM, used by §6.5).

`StepLayerNorm` normalises each row (one sequence at one step) over all the features of the
term: the G gate pre-activations of ``W_ih x_t`` or of ``W_hh h_{t-1}``, or the H cells. It
has a gain per feature and, for the cell, a shift. It keeps no statistics, so training and
evaluation compute the same thing, at any length, for a batch of any size, and one
sequence's padding cannot reach another sequence. It offers the normalising methods of
`bnrnn.StepBatchNorm` that the layers and the cells call (``step``, ``frames``) and its
population-statistics interface as no-ops, so both plug into the same step function and
the same module loops.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .checks import finite, positive_eps, positive_int


class StepLayerNorm(nn.Module):
    """LN(z; a, b) = b + a * (z - mean(z)) / sqrt(var(z) + eps), mean and biased variance
    over the features of each row (Ba et al. §3.1, eq. 4).

    Parameters: ``weight`` (the gain a) of shape (F,), initialised to ``gamma_init`` (Ba et
    al.: 1); ``bias`` (the shift b) of shape (F,), initialised to 0, or ``None`` when
    ``shift=False`` (the ih and hh terms of the LSTM: its bias plays that role). No
    buffers: there are no population statistics (`collecting` is always False,
    `reset_running_stats` does nothing, `bnrnn.update_population_stats` and
    ``sync_stats`` leave the module alone).
    """

    weight: Tensor
    bias: Tensor | None
    # `StepBatchNorm`'s interface, constant here: the statistics are always the row's own.
    collecting = False
    syncing = False
    sync = False

    def __init__(
        self,
        num_features: int,
        shift: bool = False,
        eps: float = 1e-5,
        gamma_init: float = 1.0,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self.num_features = positive_int("num_features", num_features)
        self.eps = positive_eps(eps)
        self.gamma_init = finite("gamma_init", gamma_init)
        factory = {"device": device, "dtype": dtype}
        self.weight = nn.Parameter(torch.empty(num_features, **factory))
        if shift:
            self.bias = nn.Parameter(torch.empty(num_features, **factory))
        else:
            self.register_parameter("bias", None)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.constant_(self.weight, self.gamma_init)
        if self.bias is not None:
            nn.init.zeros_(self.bias)

    def reset_running_stats(self) -> None:
        """No-op: layer normalisation keeps no statistics."""

    @property
    def uses_batch_stats(self) -> bool:
        return False

    def extra_repr(self) -> str:
        return f"{self.num_features}, eps={self.eps}, shift={self.bias is not None}"

    def forward(self, z: Tensor) -> Tensor:
        """Normalise every row of ``z`` (..., F) over its last dimension."""
        return F.layer_norm(z, (self.num_features,), self.weight, self.bias, self.eps)

    def step(self, z: Tensor, t: int) -> Tensor:
        """One step's rows (n, F); ``t`` is not used (no statistics per step)."""
        return self(z)

    def frames(self, z: Tensor, batch_sizes: Sequence[int], time_offset: int = 0) -> Tensor:
        """Every step at once, (T, N, F): each row on its own. Padded rows (zero) give
        zero, or the shift: the caller ignores them."""
        return self(z)
