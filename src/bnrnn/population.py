"""Re-estimating population statistics over training batches (Cooijmans §3: "At test time
we use estimates obtained by averaging the minibatch estimates over the training set")."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn

from .norm import StepBatchNorm


@torch.no_grad()
def update_population_stats(
    model: nn.Module,
    batches: Iterable[Any],
    forward_fn: Callable[[nn.Module, Any], Any] | None = None,
) -> int:
    """Recompute every BN population statistic in ``model`` as the plain average of the
    per-batch statistics over ``batches``, with the weights frozen.

    Every `StepBatchNorm` in ``model`` is reset and then, while the model is in eval mode
    (no dropout, no initial-state noise), uses batch statistics and folds them into a
    cumulative average per step row (like `torch.optim.swa_utils.update_bn`). Each batch is
    run as ``forward_fn(model, batch)`` if given, else ``model(batch[0])`` for a tuple or
    list, else ``model(batch)``. The model's mode and the momenta are restored afterwards.
    Returns the number of batches seen.
    """
    norms = [m for m in model.modules() if isinstance(m, StepBatchNorm)]
    if not norms:
        return 0
    was_training = model.training
    momenta = [m.momentum for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None
        m.collecting = True
    model.eval()
    seen = 0
    try:
        for batch in batches:
            if forward_fn is not None:
                forward_fn(model, batch)
            elif isinstance(batch, (tuple, list)):
                model(batch[0])
            else:
                model(batch)
            seen += 1
    finally:
        for m, momentum in zip(norms, momenta):
            m.momentum = momentum
            m.collecting = False
        model.train(was_training)
    return seen
