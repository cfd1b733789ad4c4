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
    (no dropout) but with the layers' initial-state noise (``init_noise``) applied as in
    training, uses batch statistics and folds them into a cumulative average per step row
    (like `torch.optim.swa_utils.update_bn`). Each batch is
    run as ``forward_fn(model, batch)`` if given, else ``model(batch[0])`` for a tuple or
    list, else ``model(batch)``. Rows of steps that no batch reached are left untracked, so
    evaluation reuses the last row reached (`StepBatchNorm.population_row`). The model's
    modes and the momenta are restored afterwards. Returns the number of batches seen.

    All or nothing: if ``batches`` yields no batch (an empty sequence, a spent generator)
    a ValueError is raised, and if a batch raises (any exception, KeyboardInterrupt too),
    the exception propagates; either way the model is left exactly as it was (statistics,
    counts, momenta, modes). A model without `StepBatchNorm` is left alone: 0 is returned
    and no batch is run.
    """
    norms = [m for m in model.modules() if isinstance(m, StepBatchNorm)]
    if not norms:
        return 0
    modes = [(m, m.training) for m in model.modules()]
    saved = [
        (
            m.running_mean.clone(),
            m.running_var.clone(),
            m.num_batches_tracked.clone(),
            m.momentum,
            m.collecting,
            m._warned_beyond,
        )
        for m in norms
    ]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None
        m.collecting = True
    model.eval()
    seen = 0
    done = False
    try:
        for batch in batches:
            if forward_fn is not None:
                forward_fn(model, batch)
            elif isinstance(batch, (tuple, list)):
                model(batch[0])
            else:
                model(batch)
            seen += 1
        if seen == 0:
            raise ValueError(
                "update_population_stats: batches yielded no batch (empty, or a generator "
                "already consumed); the population statistics were left unchanged"
            )
        done = True
    finally:
        for m, (mean, var, counts, momentum, collecting, warned) in zip(norms, saved):
            if not done:
                m.running_mean.copy_(mean)
                m.running_var.copy_(var)
                m.num_batches_tracked.copy_(counts)
                m._warned_beyond = warned
            m.momentum = momentum
            m.collecting = collecting
        for m, training in modes:
            m.training = training
    return seen
