"""Experiment configuration: the registry of tasks (`TASKS`) and of models (`MODELS`), the
papers' setups as named presets per task, and one dataclass (`Config`).

A run's configuration is resolved in layers, each overriding the previous one:

1. the `Config` field defaults,
2. the task's ``paper`` preset (the papers' setup: docs/design.md, Paper presets),
3. the chosen preset (``quick``, or for ptb-word ``small`` / ``medium`` / ``large``),
4. model-specific defaults (initial-state noise for the BN models on sequential MNIST,
   the paper's learning rate and batch of bn-e* and bn-e** on the QA tasks),
5. the ``--dry-run`` sizes, if asked,
6. the options given explicitly on the command line.

The question-answering tasks describe themselves in `qa/presets.py`; `TASKS` takes them in
with the others.

Every field is a command-line flag of ``bnrnn train`` (``hidden_size`` is
``--hidden-size``), with the ``help`` text given here. Zero means "not set" for the
optional integer sizes (``0`` = the whole split, no limit, the task's default).
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from typing import Any

from .qa.presets import QA_TASKS
from .specs import ModelSpec, TaskSpec

# The models, by name: what each means (`ModelSpec`). A task lists those it trains.
MODELS: dict[str, ModelSpec] = {
    "lstm": ModelSpec("torch.nn.LSTM, the honest baseline", None),
    "bnlstm": ModelSpec("BN-LSTM, Cooijmans eq. 6-8", "cooijmans", reverse="padded"),
    "bnlstm-input": ModelSpec("BN of the input term only, Laurent eq. 18", "input"),
    "bnlstm-preact": ModelSpec("BN of the pre-activation, Laurent eq. 17", "preactivation"),
    # Ba et al. (2016) §6.5: gains start at 1 (the library's default for norm="layer")
    "lnlstm": ModelSpec(
        "LN-LSTM, layer normalisation of Ba et al. 2016 §6.5", "layer", defaults={"gamma_init": 1.0}
    ),
    # the Attentive Reader's variants (Cooijmans §5.4)
    "bn-everywhere": ModelSpec(
        "BN-LSTM and BN in the attention", "cooijmans", bn_attention=True, reverse="padded"
    ),
    "bn-e*": ModelSpec(
        "bn-everywhere with sequence-wise input statistics",
        "cooijmans",
        bn_attention=True,
        input_stats="sequence",
        reverse="padded",
    ),
    "bn-e**": ModelSpec(
        "bn-e* whose backward LSTMs reverse each sequence's unpadded part",
        "cooijmans",
        bn_attention=True,
        input_stats="sequence",
    ),
}
SEQUENCE_MODELS = ("lstm", "bnlstm", "bnlstm-input", "bnlstm-preact", "lnlstm")

OPTIMIZERS = ("rmsprop", "adam", "sgd")
WEIGHT_INITS = ("uniform", "orthogonal", "identity")
INPUT_STATS = ("frame", "sequence")


def _f(default: Any, help: str, **kw: Any) -> Any:
    return field(default=default, metadata={"help": help, **kw})


@dataclass
class Config:
    """Everything a run needs; saved as ``config.json`` in the run directory."""

    # what
    task: str = _f("pmnist", "task: one of the TASKS")
    model: str = _f("lstm", "model: one of the MODELS of the task")
    preset: str = _f("paper", "named preset the configuration started from")
    dry_run: bool = _f(False, "a few steps on small data (for tests and smoke checks)")
    seed: int = _f(1, "seed of every random number generator (data order, init, dropout)")

    # data
    data_dir: str | None = _f(None, "data directory (default: $BNRNN_DATA_DIR, else ~/.cache)")
    verify_data: bool = _f(True, "verify the data files' checksums")
    seq_len: int = _f(784, "training sequence length (MNIST: 784 pixels; LMs: example/BPTT length)")
    batch_size: int = _f(64, "training minibatch size")
    eval_batch_size: int = _f(250, "minibatch size for evaluation")
    train_subset: int = _f(
        0, "use only the first N training examples (MNIST) or tokens (LMs); 0=all"
    )
    valid_subset: int = _f(
        0, "validate on the first N examples/tokens of the validation split; 0=all"
    )
    test_subset: int = _f(0, "test on the first N examples/tokens of the test split; 0=all")
    permutation_seed: int = _f(
        92916, "pMNIST: seed of the fixed pixel permutation (saved with the run)"
    )

    # model
    hidden_size: int = _f(100, "hidden units per layer")
    num_layers: int = _f(1, "number of stacked LSTM layers")
    dropout: float = _f(
        0.0, "dropout probability (between layers; LMs also on embeddings and outputs)"
    )
    embed_size: int = _f(
        0, "LM input embedding size; 0 = one-hot characters (char LMs) / hidden size (words)"
    )
    gamma_init: float = _f(
        0.1, "initial normalisation scale gamma (Cooijmans §4: 0.1; lnlstm: 1, Ba et al.)"
    )
    max_length: int = _f(0, "steps with their own BN population statistics; 0 = seq_len")
    input_stats: str = _f(
        "frame", "BN statistics of the input term: frame or sequence", choices=INPUT_STATS
    )
    momentum: float = _f(0.1, "BN running-average momentum of the population statistics")
    eps: float = _f(1e-5, "BN epsilon added to the variance")
    init_noise: float = _f(0.0, "std of Gaussian noise on the initial hidden state in training")
    weight_init: str = _f(
        "orthogonal", "weight init: uniform (nn.LSTM's), orthogonal, identity", choices=WEIGHT_INITS
    )
    init_range: float = _f(
        0.0, "if > 0: every non-BN parameter ~ U(-r, r) (Zaremba/Laurent word LMs)"
    )
    forget_bias: float = _f(0.0, "initial forget-gate bias")
    learn_init: bool = _f(False, "learn the initial states h0, c0")

    # optimisation
    optimizer: str = _f("rmsprop", "optimiser: rmsprop, adam or sgd", choices=OPTIMIZERS)
    lr: float = _f(1e-3, "learning rate")
    optim_momentum: float = _f(0.9, "RMSProp momentum (Cooijmans §5.1: 0.9) / SGD momentum")
    clip: float = _f(1.0, "clip the gradient norm to this value; 0 = no clipping")
    lr_decay: float = _f(1.0, "multiply the learning rate by this every epoch after lr_decay_start")
    lr_decay_start: int = _f(0, "number of epochs at the initial learning rate before decaying")

    # schedule
    max_steps: int = _f(0, "stop after this many training steps; 0 = no limit")
    max_epochs: int = _f(0, "stop after this many epochs; 0 = no limit")
    eval_interval: int = _f(0, "validate every N steps; 0 = once per epoch")
    log_interval: int = _f(100, "print a training log line every N steps")
    save_interval: int = _f(0, "save the last checkpoint every N steps; 0 = at every validation")
    patience: int = _f(0, "early stopping: stop after N validations without improvement; 0 = never")
    pop_batches: int = _f(
        100, "training batches for re-estimating BN population statistics; 0 = one epoch"
    )
    max_skipped_steps: int = _f(
        5,
        "a step whose gradient norm is not finite is skipped (no update; counted in the log "
        "and metrics.jsonl); stop the run after this many such steps in a row",
    )
    threads: int = _f(0, "torch CPU threads; 0 = torch's default")
    sync_stats: bool = _f(
        True,
        "under torchrun: synchronise the BN statistics over the processes (else each "
        "process normalises over its own rows)",
    )

    # question answering (cnn-qa, ptb-cloze; see qa/): the QA tasks' `TaskSpec.options`
    doc_sentences: int = _f(3, "ptb-cloze: sentences per document (the query is the next one)")
    relevant_sentences: int = _f(
        0, "cnn-qa: keep the N sentences most relevant to the query (Cooijmans App. C: 4); 0=all"
    )
    max_vocab: int = _f(0, "QA vocabulary size, specials and entities included; 0 = all words")
    tie_entities: bool = _f(
        False, "QA: score an entity with its input embedding, not a free output vector"
    )

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @property
    def norm(self) -> str | None:
        return MODELS[self.model].norm

    @property
    def is_bn(self) -> bool:
        return self.norm is not None

    @property
    def bn_max_length(self) -> int:
        return self.max_length or self.seq_len


FIELDS = {f.name: f for f in dataclasses.fields(Config)}

# --------------------------------------------------------------------------- presets

_MNIST_PAPER: dict[str, Any] = {
    # Cooijmans §5.1: 100 units, RMSProp lr 1e-3 momentum 0.9, clip 1, orthogonal init with
    # identity W_hh; softmax on the last hidden state.
    "seq_len": 784,
    "hidden_size": 100,
    "weight_init": "identity",
    "optimizer": "rmsprop",
    "lr": 1e-3,
    "optim_momentum": 0.9,
    "clip": 1.0,
    "batch_size": 64,  # (choice) the paper does not give the sMNIST batch size
    "eval_batch_size": 250,
    "max_epochs": 50,  # (choice) early-stopped on validation accuracy
    "eval_interval": 1000,
    "log_interval": 100,
    "patience": 10,
    "pop_batches": 200,
}
_MNIST_QUICK: dict[str, Any] = {
    # Minutes on 2 CPU cores: small net, a fixed budget of steps, validation on a subset.
    "hidden_size": 64,
    "batch_size": 32,
    "train_subset": 20000,
    "valid_subset": 1000,
    "test_subset": 2000,
    "max_epochs": 0,
    "max_steps": 300,
    "eval_interval": 50,
    "log_interval": 25,
    "patience": 0,
    "pop_batches": 30,
    "threads": 1,  # one thread, see _QUICK_THREADS below
}
# The quick presets run on one thread: at these sizes a second OpenMP thread gains little,
# and on a busy 2-core machine it made steps 3-8x slower (measured for nn.LSTM and BNLSTM).
_QUICK_THREADS = 1
_CHAR_PAPER: dict[str, Any] = {
    # Cooijmans §5.2: 1000 units, Adam lr 2e-3, batch 64, clip 1, sequences of 100,
    # orthogonal init, random crop per epoch.
    "seq_len": 100,
    "hidden_size": 1000,
    "weight_init": "orthogonal",
    "optimizer": "adam",
    "lr": 2e-3,
    "clip": 1.0,
    "batch_size": 64,
    "eval_batch_size": 256,
    "max_epochs": 50,  # (choice) early-stopped on validation bpc
    "eval_interval": 1000,
    "log_interval": 100,
    "patience": 5,
    "pop_batches": 200,
}
_TEXT8_PAPER: dict[str, Any] = {
    # Cooijmans §5.3: 2000 units, Adam lr 1e-3, batch 128, clip 1, sequences of 180,
    # orthogonal init; 90M/5M/5M split.
    **_CHAR_PAPER,
    "seq_len": 180,
    "hidden_size": 2000,
    "lr": 1e-3,
    "batch_size": 128,
    "max_epochs": 20,
    "eval_interval": 2000,
}
_CHAR_QUICK: dict[str, Any] = {
    "hidden_size": 128,
    "batch_size": 32,
    "eval_batch_size": 256,
    "train_subset": 0,
    "valid_subset": 50000,
    "test_subset": 100000,
    "max_epochs": 0,
    "max_steps": 500,
    "eval_interval": 100,
    "log_interval": 50,
    "patience": 0,
    "pop_batches": 50,
    "threads": _QUICK_THREADS,
}
_WORD_SMALL: dict[str, Any] = {
    # Laurent §5.2 (after Zaremba et al.): 2 layers, SGD lr 1, batch 32; small: 200 units,
    # U(-0.1, 0.1), BPTT 20, clip 10, 15 epochs, halve the lr every epoch after the 6th.
    # As in Zaremba et al., the loss is summed over the BPTT steps (WordLM.loss_scale).
    "seq_len": 20,
    "num_layers": 2,
    "hidden_size": 200,
    "dropout": 0.0,
    "init_range": 0.1,
    "weight_init": "uniform",
    "optimizer": "sgd",
    "lr": 1.0,
    "optim_momentum": 0.0,
    "clip": 10.0,
    "batch_size": 32,
    "eval_batch_size": 32,
    "max_epochs": 15,
    "lr_decay": 0.5,
    "lr_decay_start": 6,
    "eval_interval": 0,
    "log_interval": 200,
    "patience": 0,
    "pop_batches": 200,
}
_WORD_MEDIUM: dict[str, Any] = {
    # Laurent §5.2: 650 units, U(-0.05, 0.05), dropout 0.5, BPTT 35, clip 5, 40 epochs,
    # lr divided by 1.2 every epoch after the 6th.
    "seq_len": 35,
    "hidden_size": 650,
    "dropout": 0.5,
    "init_range": 0.05,
    "clip": 5.0,
    "max_epochs": 40,
    "lr_decay": 1 / 1.2,
    "lr_decay_start": 6,
}
_WORD_LARGE: dict[str, Any] = {
    # Laurent §5.2: 1500 units, U(-0.04, 0.04), dropout 0.65 (Zaremba's large), BPTT 35,
    # clip 5, 55 epochs, lr divided by 1.15 every epoch after the 15th.
    "seq_len": 35,
    "hidden_size": 1500,
    "dropout": 0.65,
    "init_range": 0.04,
    "clip": 5.0,
    "max_epochs": 55,
    "lr_decay": 1 / 1.15,
    "lr_decay_start": 15,
}
_WORD_QUICK: dict[str, Any] = {
    "hidden_size": 128,
    "train_subset": 200000,
    "valid_subset": 30000,
    "test_subset": 30000,
    "max_epochs": 2,
    "lr_decay_start": 2,  # two epochs at lr 1: too short a run to decay
    "log_interval": 50,
    "pop_batches": 50,
    "threads": _QUICK_THREADS,
}

DRY_RUN: dict[str, Any] = {
    "hidden_size": 8,
    "batch_size": 4,
    "eval_batch_size": 64,
    "max_steps": 3,
    "max_epochs": 0,
    "eval_interval": 2,
    "log_interval": 1,
    "save_interval": 0,
    "patience": 0,
    "pop_batches": 2,
    "threads": 1,  # tiny matrices: a second thread only adds synchronisation
}
# 784-step sequences are the slow ones: two steps, one validation, one batch for statistics
_DRY_MNIST = {"train_subset": 64, "valid_subset": 16, "test_subset": 16, "max_steps": 2,
              "pop_batches": 1}  # fmt: skip
_DRY_LM = {"train_subset": 5000, "valid_subset": 1000, "test_subset": 1000}


def _mnist_model_defaults(model: str, preset: str) -> dict[str, Any]:
    if MODELS[model].norm is not None:
        # Cooijmans §5.1: the first ~100 pixels are constant over the batch, so the hidden
        # state has zero variance there; noise on the initial state avoids exploding
        # gradients. (choice) std 0.1: the paper does not give the value. LN ("layer")
        # needs it too: with zero pixels, zero h_0 and zero biases h stays exactly 0, so
        # W_hh h is a zero row whose LN scales the gradient by 1/sqrt(eps) at every step
        # (non-finite gradients in a dry run of pMNIST without it).
        return {"init_noise": 0.1}
    return {}


def _mnist(task: str) -> TaskSpec:
    return TaskSpec(
        "bnrnn_experiments.tasks:SequentialMNIST",
        SEQUENCE_MODELS,
        base=_MNIST_PAPER,
        presets={"paper": {}, "quick": _MNIST_QUICK},
        dry_run=_DRY_MNIST,
        model_defaults=_mnist_model_defaults,
        options=("permutation_seed",) if task == "pmnist" else (),
    )


_CHAR_LM = "bnrnn_experiments.tasks:CharLM"
# The tasks, by name: the registry every part of the harness reads (`TaskSpec`).
TASKS: dict[str, TaskSpec] = {
    "smnist": _mnist("smnist"),
    "pmnist": _mnist("pmnist"),
    "ptb-char": TaskSpec(
        _CHAR_LM, SEQUENCE_MODELS, _CHAR_PAPER, {"paper": {}, "quick": _CHAR_QUICK}, _DRY_LM
    ),  # fmt: skip
    "text8": TaskSpec(
        _CHAR_LM,
        SEQUENCE_MODELS,
        _TEXT8_PAPER,
        {"paper": {}, "quick": {**_CHAR_QUICK, "hidden_size": 128}},
        _DRY_LM,
    ),  # fmt: skip
    "ptb-word": TaskSpec(
        "bnrnn_experiments.tasks:WordLM",
        SEQUENCE_MODELS,
        base=_WORD_SMALL,
        presets={
            "paper": {},
            "small": {},
            "medium": _WORD_MEDIUM,
            "large": _WORD_LARGE,
            "quick": _WORD_QUICK,
        },  # fmt: skip
        dry_run={"train_subset": 2000, "valid_subset": 500, "test_subset": 500},
    ),
    **QA_TASKS,  # cnn-qa, ptb-cloze: the Attentive Reader (qa/)
}
ALL_TASKS = tuple(TASKS)
ALL_MODELS = tuple(MODELS)
#: Preset names of each task (for the command line).
PRESETS = {name: tuple(spec.presets) for name, spec in TASKS.items()}


def models_help() -> str:
    """The models and the tasks that train them, for ``--help``."""
    groups: dict[tuple[str, ...], list[str]] = {}
    for name, spec in TASKS.items():
        groups.setdefault(spec.models, []).append(name)
    return "; ".join(
        f"{', '.join(tasks)}: " + ", ".join(f"{m} ({MODELS[m].help})" for m in models)
        for models, tasks in groups.items()
    )


def _check_choice(name: str, value: Any, choices: Any) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(map(str, choices))}; got {value!r}")


def _check_model_of_task(task: str, model: str) -> None:
    _check_choice(f"model of {task}", model, TASKS[task].models)


def _check_options_of_task(cfg: Config) -> None:
    """A field that only some tasks read (`TaskSpec.options`) keeps its default in the
    others: a value set for nothing is an error (old ``config.json`` files hold defaults)."""
    for name in dict.fromkeys(o for spec in TASKS.values() for o in spec.options):
        owners = [task for task, spec in TASKS.items() if name in spec.options]
        if cfg.task not in owners and getattr(cfg, name) != FIELDS[name].default:
            raise ValueError(f"{name} applies to {', '.join(owners)}, not to {cfg.task}")


def _coerce(name: str, value: Any) -> Any:
    """Convert a JSON or command-line value to the field's type."""
    f = FIELDS[name]
    kind = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type))
    if value is None:
        return None
    if kind.startswith("bool"):
        if isinstance(value, str):
            if value.lower() in ("1", "true", "yes", "on"):
                return True
            if value.lower() in ("0", "false", "no", "off"):
                return False
            raise ValueError(f"{name} must be a boolean, got {value!r}")
        return bool(value)
    if kind.startswith("int"):
        if isinstance(value, float) and not value.is_integer():
            raise ValueError(f"{name} must be an integer, got {value!r}")
        return int(value)
    if kind.startswith("float"):
        return float(value)
    return value


def make_config(
    task: str,
    model: str = "lstm",
    preset: str = "quick",
    dry_run: bool = False,
    **overrides: Any,
) -> Config:
    """Resolve a configuration: defaults < paper < preset < model (`ModelSpec.defaults`,
    then the task's) < dry-run < overrides."""
    _check_choice("task", task, ALL_TASKS)
    _check_model_of_task(task, model)
    spec = TASKS[task]
    _check_choice(f"preset of {task}", preset, tuple(spec.presets))
    values: dict[str, Any] = {}
    values.update(spec.base)
    values.update(spec.presets[preset])
    values.update(MODELS[model].defaults)
    values.update(spec.defaults(model, preset))
    if dry_run:
        values.update(DRY_RUN)
        values.update(spec.dry_run)
    for key in overrides:
        if key not in FIELDS or key in ("task", "model", "preset", "dry_run"):
            raise ValueError(f"unknown configuration field {key!r}")
    values.update(overrides)
    values.update(task=task, model=model, preset=preset, dry_run=dry_run)
    return validate(Config(**{k: _coerce(k, v) for k, v in values.items()}))


def validate(cfg: Config) -> Config:
    """Check a configuration; raise ValueError naming the field and the allowed values."""
    for f in dataclasses.fields(cfg):
        choices = f.metadata.get("choices")
        if choices is not None:
            _check_choice(f.name, getattr(cfg, f.name), choices)
    positive = ("seq_len", "batch_size", "eval_batch_size", "hidden_size", "num_layers")
    for name in positive:
        if getattr(cfg, name) <= 0:
            raise ValueError(f"{name} must be a positive integer, got {getattr(cfg, name)}")
    non_negative = ("train_subset", "valid_subset", "test_subset", "max_steps", "max_epochs",
                    "eval_interval", "save_interval", "patience", "pop_batches", "threads",
                    "max_length", "embed_size", "lr_decay_start")  # fmt: skip
    for name in non_negative:
        if getattr(cfg, name) < 0:
            raise ValueError(f"{name} must be >= 0, got {getattr(cfg, name)}")
    _check_choice("task", cfg.task, ALL_TASKS)
    _check_model_of_task(cfg.task, cfg.model)
    _check_options_of_task(cfg)
    for name in ("doc_sentences", "relevant_sentences", "max_vocab"):
        if getattr(cfg, name) < (1 if name == "doc_sentences" else 0):
            raise ValueError(f"{name} must be {'>= 1' if name == 'doc_sentences' else '>= 0'}, "
                             f"got {getattr(cfg, name)}")  # fmt: skip
    if cfg.log_interval <= 0:
        raise ValueError(f"log_interval must be a positive integer, got {cfg.log_interval}")
    if cfg.max_steps == 0 and cfg.max_epochs == 0:
        raise ValueError("set max_steps or max_epochs (both are 0: the run would never end)")
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if isinstance(value, float) and not math.isfinite(value):
            raise ValueError(f"{f.name} must be a finite number, got {value}")
    if not 0.0 <= cfg.dropout < 1.0:
        raise ValueError(f"dropout must be in [0, 1), got {cfg.dropout}")
    for name in ("momentum", "optim_momentum"):
        if not 0.0 <= getattr(cfg, name) <= 1.0:
            raise ValueError(f"{name} must be in [0, 1], got {getattr(cfg, name)}")
    for name in ("lr", "eps"):  # eps: added to the variance before its square root
        if getattr(cfg, name) <= 0:
            raise ValueError(f"{name} must be positive, got {getattr(cfg, name)}")
    if not 0.0 < cfg.lr_decay <= 1.0:
        raise ValueError(f"lr_decay must be in (0, 1], got {cfg.lr_decay}")
    for name in ("clip", "init_noise", "init_range"):
        if getattr(cfg, name) < 0:
            raise ValueError(f"{name} must be >= 0, got {getattr(cfg, name)}")
    if cfg.max_skipped_steps < 1:
        raise ValueError(f"max_skipped_steps must be >= 1, got {cfg.max_skipped_steps}")
    if cfg.task in ("smnist", "pmnist") and cfg.seq_len != 784:
        raise ValueError(f"{cfg.task} reads 784 pixels one by one; seq_len must be 784")
    return cfg


def config_from_dict(d: dict[str, Any]) -> Config:
    """Rebuild a Config from ``config.json`` (unknown keys are an error, missing ones default)."""
    unknown = set(d) - set(FIELDS)
    if unknown:
        raise ValueError(f"unknown configuration fields {sorted(unknown)}")
    return validate(Config(**{k: _coerce(k, v) for k, v in d.items()}))


def apply_overrides(cfg: Config, overrides: dict[str, Any]) -> Config:
    """A copy of ``cfg`` with ``overrides`` (field name -> value) applied and checked."""
    for key in overrides:
        if key not in FIELDS:
            raise ValueError(f"unknown configuration field {key!r}")
    new = dataclasses.replace(cfg, **{k: _coerce(k, v) for k, v in overrides.items()})
    return validate(new)


# What `--resume` may change: when and how often to stop, log, validate and save, where the
# data lives, the threads. Everything else (architecture, data, optimiser, seed) made the
# checkpoint and stays as it was saved.
RESUMABLE = ("max_steps", "max_epochs", "eval_interval", "log_interval", "save_interval",
             "patience", "pop_batches", "max_skipped_steps", "eval_batch_size", "threads",
             "data_dir", "verify_data")  # fmt: skip


def resume_conflicts(saved: Config, new: Config) -> dict[str, tuple[Any, Any]]:
    """{field: (saved, new)} for the fields outside `RESUMABLE` that differ."""
    return {k: (v, getattr(new, k)) for k, v in saved.to_dict().items()
            if k not in RESUMABLE and getattr(new, k) != v}  # fmt: skip


def format_config(cfg: Config) -> str:
    return json.dumps(cfg.to_dict(), indent=2)
