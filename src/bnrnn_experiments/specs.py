"""What a task and a model are to the harness: `TaskSpec` and `ModelSpec`.

The registries themselves are `bnrnn_experiments.config.TASKS` and ``MODELS``. This module
imports nothing from the harness, so that every part (the QA presets included) can
describe itself with these classes without an import cycle.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

__all__ = ["ModelSpec", "TaskSpec"]

Values = Mapping[str, Any]


@dataclass(frozen=True)
class ModelSpec:
    """What a ``--model`` name means.

    ``norm``: the batch normalisation of the LSTMs (``bnrnn.BNLSTM(norm=...)``); None is
    `torch.nn.LSTM` itself. The other fields matter to the Attentive Reader only
    (Cooijmans §5.4): ``bn_attention``, each term inside the attention's two tanh
    batch-normalised; ``input_stats``, the statistics of the LSTMs' input terms when the
    model fixes them (None: the ``input_stats`` option); ``reverse``, how the backward
    LSTM reads a padded batch ("unpadded": each sequence's own part reversed, "padded": the
    padded batch flipped in time, padding first). ``defaults``: configuration values of
    the model, on top of the preset (below the task's per-model values and the overrides).
    """

    help: str
    norm: str | None
    bn_attention: bool = False
    input_stats: str | None = None
    reverse: str = "unpadded"
    defaults: Values = field(default_factory=dict)


@dataclass(frozen=True)
class TaskSpec:
    """A task: where its class lives, which models it trains, its presets.

    ``task_class``: ``"module:Class"``, imported by `load_class` (the configuration does
    not load the tasks' code). ``base``: the paper's setup, the layer every preset starts
    from; ``presets``: the named presets on top of it (``"paper"`` among them).
    ``dry_run``: the data sizes of ``--dry-run``. ``model_defaults(model, preset)``:
    per-model values on top of the preset. ``options``: the configuration fields that only
    this task (and the others that list them) reads.
    """

    task_class: str
    models: tuple[str, ...]
    base: Values
    presets: Mapping[str, Values]
    dry_run: Values
    model_defaults: Callable[[str, str], dict[str, Any]] | None = None
    options: tuple[str, ...] = field(default=())

    def defaults(self, model: str, preset: str) -> dict[str, Any]:
        return {} if self.model_defaults is None else self.model_defaults(model, preset)

    def load_class(self) -> type:
        module, _, name = self.task_class.partition(":")
        return getattr(importlib.import_module(module), name)
