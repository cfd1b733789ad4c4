"""The tasks: how the data becomes minibatches and how a model is scored.

- `SequentialMNIST` (smnist, pmnist): 784 pixels one at a time, classify from the last
  hidden state (Cooijmans §5.1); accuracy in percent.
- `CharLM` (ptb-char, text8): next-character prediction on non-overlapping sequences,
  randomly cropped per epoch (Cooijmans §5.2-5.3); bits per character.
- `WordLM` (ptb-word): truncated BPTT over a stream with the hidden state carried between
  batches (Laurent §5.2, after Zaremba et al.); perplexity.
- `bnrnn_experiments.qa.task.QATask` (cnn-qa, ptb-cloze): the Attentive Reader, a
  `ClassifierTask` like sequential MNIST.

`make_task` builds the task a configuration names, from the registry (`config.TASKS`).

A task's training batches are a pure function of (seed, epoch, index): the data order of an
epoch comes from a generator seeded with (seed, epoch). Resuming therefore needs only the
step counter (and the carried hidden state of `WordLM`).
"""

from __future__ import annotations

import contextlib
import functools
import math
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import data
from .config import TASKS, Config
from .models import build_classifier, build_language_model, count_parameters

MNIST_VALID = 5000  # the last 5,000 training images are the validation set


class Task:
    """Interface of a task; see the module docstring."""

    name: str
    metric: str  # "acc", "bpc" or "ppl"
    higher_is_better: bool
    steps_per_epoch: int
    vocab_size: int = 0
    # From the mean loss per prediction (what is logged and scored) to the loss whose
    # gradient the optimiser follows: 1, unless a paper's setup sums over the steps.
    loss_scale: float = 1.0

    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg

    def build_model(self) -> nn.Module:
        raise NotImplementedError

    def train_batch(self, epoch: int, index: int) -> Any:
        """Batch ``index`` (0-based) of epoch ``epoch``, deterministic for the seed."""
        raise NotImplementedError

    def train_loss(self, model: nn.Module, batch: Any, carry: Any) -> tuple[Tensor, int, int, Any]:
        """(mean loss, correct, count, new carry); correct/count are 0 for LMs."""
        raise NotImplementedError

    def evaluate(self, model: nn.Module, split: str, length: int | None = None) -> dict[str, float]:
        """{"loss": nats, self.metric: score, "count": n} on ``split`` ("valid" or "test")."""
        raise NotImplementedError

    def score(self, loss: float, correct: int = 0, count: int = 0) -> float:
        raise NotImplementedError

    def pop_stats_batches(
        self, n: int
    ) -> tuple[Iterable[Any], Callable[[nn.Module, Any], Any] | None]:
        """The first ``n`` training batches of epoch 0 (``n=0``: all), for
        `bnrnn.update_population_stats`, and the forward function to run them."""
        return self._first_batches(n), None

    def _first_batches(self, n: int) -> Iterator[Any]:
        n = self.steps_per_epoch if n <= 0 else min(n, self.steps_per_epoch)
        return (self.train_batch(0, i) for i in range(n))

    def better(self, a: float, b: float | None) -> bool:
        """Is score ``a`` better than ``b`` (None: no score yet)?"""
        if b is None:
            return True
        return a > b if self.higher_is_better else a < b

    def save_artifacts(self, run_dir: Path) -> None:
        """Files that belong with the run (e.g. the pMNIST permutation)."""

    def describe(self) -> str:
        return self.name


@functools.lru_cache(maxsize=3)
def _load(name: str, data_dir: str, verify: bool) -> Any:
    """The raw data set, cached per process (``reproduce`` and the tests load it repeatedly).

    Callers must not modify what is returned."""
    if name == "mnist":
        return (
            data.load_mnist(data_dir, "train", verify=verify),
            data.load_mnist(data_dir, "test", verify=verify),
        )
    if name == "ptb-char":  # every token is one character
        return {k: "".join(v) for k, v in data.load_ptb_chars(data_dir, verify=verify).items()}
    if name == "text8":
        return data.load_text8(data_dir, verify=verify)
    return data.load_ptb_words(data_dir, verify=verify)


def load_data(name: str, cfg: Config) -> Any:
    return _load(name, str(data.resolve_data_dir(cfg.data_dir)), cfg.verify_data)


def char_vocabulary(text: str) -> data.Vocabulary:
    """`Vocabulary.build(text)` (ids by decreasing count, ties by character) for Latin-1
    text, counted with numpy: the Counter over 5M characters takes most of a second."""
    try:
        raw = np.frombuffer(text.encode("latin-1"), dtype=np.uint8)
    except UnicodeEncodeError:
        return data.Vocabulary.build(text)
    counts = np.bincount(raw, minlength=256)
    present = [chr(b) for b in np.flatnonzero(counts)]
    return data.Vocabulary(sorted(present, key=lambda c: (-int(counts[ord(c)]), c)))


def epoch_rng(seed: int, epoch: int) -> np.random.Generator:
    """The generator of an epoch's data order."""
    return np.random.default_rng([seed, epoch, 7919])


def subset(x: Any, n: int) -> Any:
    """The first ``n`` items of ``x`` (``n=0``: all of it)."""
    return x[:n] if n > 0 else x


def split_limits(cfg: Config) -> dict[str, int]:
    """Examples (or tokens) kept of each split: ``*_subset``, 0 = all."""
    return {"train": cfg.train_subset, "valid": cfg.valid_subset, "test": cfg.test_subset}


@contextlib.contextmanager
def evaluating(model: nn.Module) -> Iterator[nn.Module]:
    """``model`` in evaluation mode for the block, then back in the mode it was in."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)


def accuracy(correct: int, count: int) -> float:
    """Percent."""
    return 100.0 * correct / max(count, 1)


class ClassifierTask(Task):
    """A task with one class per example, scored by accuracy (percent): sequential MNIST and
    the question answering. Subclasses give `logits` (N, C) and `targets` (N,) of a batch,
    the evaluation batches of a split, and the number of training examples (`_set_train_size`);
    the epochs' order of the training examples is drawn here."""

    metric = "acc"
    higher_is_better = True
    n_train: int

    def logits(self, model: nn.Module, batch: Any) -> Tensor:
        raise NotImplementedError

    def targets(self, batch: Any) -> Tensor:
        raise NotImplementedError

    def eval_batches(self, split: str) -> Iterator[Any]:
        raise NotImplementedError

    def _set_train_size(self, n: int) -> None:
        self.n_train = n
        self.steps_per_epoch = n // self.cfg.batch_size
        if self.steps_per_epoch == 0:
            raise ValueError(
                f"batch_size {self.cfg.batch_size} is larger than the training set ({n})"
            )
        self._order: tuple[int, np.ndarray] | None = None

    def _batch_rows(self, epoch: int, index: int) -> np.ndarray:
        """Indices of the training examples in batch ``index`` of ``epoch``: a slice of a
        permutation drawn from the epoch's generator."""
        if self._order is None or self._order[0] != epoch:
            self._order = (epoch, epoch_rng(self.cfg.seed, epoch).permutation(self.n_train))
        B = self.cfg.batch_size
        return self._order[1][index * B : (index + 1) * B]

    def train_loss(self, model, batch, carry):
        logits, y = self.logits(model, batch), self.targets(batch)
        loss = F.cross_entropy(logits, y)
        return loss, int((logits.argmax(-1) == y).sum()), y.numel(), None

    def score(self, loss: float, correct: int = 0, count: int = 0) -> float:
        return accuracy(correct, count)

    @torch.no_grad()
    def evaluate(self, model, split, length=None):
        total, correct, n = 0.0, 0, 0
        with evaluating(model):
            for batch in self.eval_batches(split):
                logits, y = self.logits(model, batch), self.targets(batch)
                total += float(F.cross_entropy(logits, y, reduction="sum"))
                correct += int((logits.argmax(-1) == y).sum())
                n += y.numel()
        return {"loss": total / n, "acc": accuracy(correct, n), "count": n}

    def pop_stats_batches(self, n):
        return self._first_batches(n), self.logits


# ---------------------------------------------------------------------- sequential MNIST


class SequentialMNIST(ClassifierTask):
    """sMNIST (scanline order) and pMNIST (one fixed permutation, seeded by
    ``permutation_seed``, saved as ``permutation.npy`` in the run directory)."""

    def __init__(self, cfg: Config) -> None:
        super().__init__(cfg)
        self.name = cfg.task
        (images, labels), (test_images, test_labels) = load_data("mnist", cfg)
        images, test_images = images.reshape(-1, 784), test_images.reshape(-1, 784)  # uint8
        if cfg.task == "pmnist":
            self.permutation = np.random.default_rng(cfg.permutation_seed).permutation(784)
            idx = torch.from_numpy(self.permutation)
            images, test_images = images[:, idx], test_images[:, idx]
        else:
            self.permutation = None
        n = images.shape[0] - MNIST_VALID
        raw = {"train": (images[:n], labels[:n]), "valid": (images[n:], labels[n:]),
               "test": (test_images, test_labels)}  # fmt: skip
        limits = split_limits(cfg)
        self.splits = {k: (subset(x, limits[k]), subset(y, limits[k])) for k, (x, y) in raw.items()}
        self._set_train_size(self.splits["train"][0].shape[0])

    @staticmethod
    def _inputs(images: Tensor) -> Tensor:
        return (images.float() / 255.0).t().unsqueeze(-1)  # (784, N, 1), pixels in [0, 1]

    def build_model(self) -> nn.Module:
        return build_classifier(self.cfg, 1, 10)

    def train_batch(self, epoch: int, index: int) -> tuple[Tensor, Tensor]:
        idx = torch.from_numpy(self._batch_rows(epoch, index))
        images, labels = self.splits["train"]
        return self._inputs(images[idx]), labels[idx]

    def logits(self, model: nn.Module, batch: tuple[Tensor, Tensor]) -> Tensor:
        return model(batch[0])  # (N, 10)

    def targets(self, batch: tuple[Tensor, Tensor]) -> Tensor:
        return batch[1]

    def eval_batches(self, split: str) -> Iterator[tuple[Tensor, Tensor]]:
        images, labels = self.splits[split]
        B = self.cfg.eval_batch_size
        for i in range(0, images.shape[0], B):
            yield self._inputs(images[i : i + B]), labels[i : i + B]

    def save_artifacts(self, run_dir: Path) -> None:
        if self.permutation is not None:
            np.save(run_dir / "permutation.npy", self.permutation)

    def describe(self) -> str:
        sizes = ", ".join(f"{k} {v[0].shape[0]:,}" for k, v in self.splits.items())
        order = "fixed permutation" if self.permutation is not None else "scanline order"
        return f"{self.name}: 784 pixels in {order}; {sizes} images"


# --------------------------------------------------------------------- language models


def _lm_score(metric: str, loss: float) -> float:
    if metric == "bpc":
        return loss / math.log(2)
    return math.exp(min(loss, 50.0))  # perplexity


class CharLM(Task):
    """ptb-char and text8. Training examples are non-overlapping subsequences of
    ``seq_len`` characters of the training text, each read from a zero state; every epoch
    crops the text at a random offset so that it divides into whole examples
    (Cooijmans §5.2) and shuffles the examples. Evaluation splits the validation or test
    text into non-overlapping subsequences of the given length, each from a zero state
    (Cooijmans Fig. 3: "bits-per-character on length-100 subsequences")."""

    metric = "bpc"
    higher_is_better = False

    def __init__(self, cfg: Config) -> None:
        super().__init__(cfg)
        self.name = cfg.task
        texts = load_data(cfg.task, cfg)
        # (choice) the symbols of all three splits, so that no test character is unknown
        self.vocab = char_vocabulary(texts["train"] + texts["valid"] + texts["test"])
        self.vocab_size = len(self.vocab)
        limits = split_limits(cfg)
        self.splits = {k: self._encode(subset(t, limits[k])) for k, t in texts.items()}
        L = cfg.seq_len
        self.n_examples = (len(self.splits["train"]) - 1) // L  # inputs + shifted targets
        self.steps_per_epoch = self.n_examples // cfg.batch_size
        if self.steps_per_epoch == 0:
            raise ValueError(
                f"the training text ({len(self.splits['train']):,} characters) holds fewer than "
                f"one batch of {cfg.batch_size} sequences of {L}"
            )
        self._epoch: tuple[int, int, np.ndarray] | None = None

    def _encode(self, text: str, chunk: int = 10_000_000) -> Tensor:
        """Ids as uint8 (text8's 90M training characters in 90 MB), encoded in chunks so
        that the int64 intermediate stays small."""
        if self.vocab_size > 256:
            raise ValueError(f"{self.vocab_size} symbols do not fit in uint8")
        parts = [self.vocab.encode(text[i : i + chunk]).to(torch.uint8)
                 for i in range(0, len(text), chunk)]  # fmt: skip
        return torch.cat(parts) if parts else torch.zeros(0, dtype=torch.uint8)

    def build_model(self) -> nn.Module:
        return build_language_model(self.cfg, self.vocab_size, one_hot=True)

    def _epoch_layout(self, epoch: int) -> tuple[int, np.ndarray]:
        if self._epoch is None or self._epoch[0] != epoch:
            rng = epoch_rng(self.cfg.seed, epoch)
            slack = len(self.splits["train"]) - 1 - self.n_examples * self.cfg.seq_len
            offset = int(rng.integers(0, slack + 1))  # Cooijmans §5.2: random crop per epoch
            self._epoch = (epoch, offset, rng.permutation(self.n_examples))
        return self._epoch[1], self._epoch[2]

    def train_batch(self, epoch: int, index: int) -> tuple[Tensor, Tensor]:
        offset, order = self._epoch_layout(epoch)
        B, L = self.cfg.batch_size, self.cfg.seq_len
        starts = torch.from_numpy(offset + order[index * B : (index + 1) * B] * L)
        tokens = self.splits["train"][starts[:, None] + torch.arange(L + 1)]  # (B, L+1)
        tokens = tokens.t().long()  # (L+1, B)
        return tokens[:-1], tokens[1:]

    def train_loss(self, model, batch, carry):
        x, y = batch
        logits, _ = model(x)  # (L, B, V)
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))
        return loss, 0, 0, None

    def score(self, loss: float, correct: int = 0, count: int = 0) -> float:
        return _lm_score(self.metric, loss)

    @torch.no_grad()
    def evaluate(self, model, split, length=None):
        L = length or self.cfg.seq_len
        text = self.splits[split]
        n = (len(text) - 1) // L
        if n == 0:
            raise ValueError(f"the {split} text ({len(text)} characters) is shorter than {L + 1}")
        idx = torch.arange(n)[:, None] * L + torch.arange(L + 1)  # (n, L+1)
        total = 0.0
        with evaluating(model):
            for i in range(0, n, self.cfg.eval_batch_size):
                tokens = text[idx[i : i + self.cfg.eval_batch_size]].t().long()  # (L+1, b)
                logits, _ = model(tokens[:-1])
                total += float(
                    F.cross_entropy(
                        logits.reshape(-1, logits.shape[-1]),
                        tokens[1:].reshape(-1),
                        reduction="sum",
                    )
                )
        loss = total / (n * L)
        return {"loss": loss, self.metric: self.score(loss), "count": n * L, "length": L}

    def describe(self) -> str:
        sizes = ", ".join(f"{k} {len(v):,}" for k, v in self.splits.items())
        return (
            f"{self.name}: {self.vocab_size} symbols; {sizes} characters; "
            f"{self.n_examples:,} training sequences of {self.cfg.seq_len}"
        )


def _batchify(stream: Tensor, batch_size: int) -> Tensor:
    """(n,) -> (n // B, B): column b is the b-th contiguous chunk of the stream."""
    n = len(stream) // batch_size
    return stream[: n * batch_size].view(batch_size, n).t().contiguous()


def _detach(state: Any) -> Any:
    return None if state is None else tuple(s.detach() for s in state)


class WordLM(Task):
    """ptb-word: truncated BPTT. The training stream is cut into ``batch_size`` parallel
    streams; batch ``i`` of an epoch is steps ``[i*L, (i+1)*L)`` of all of them, and the
    hidden state is carried from batch to batch (detached), reset at every epoch start
    (Zaremba et al. 2014, as Laurent §5.2). Evaluation runs the same way over the whole
    split (segments of ``length``, state carried). The BN step index restarts at 0 in every
    segment, in training and evaluation alike."""

    metric = "ppl"
    higher_is_better = False

    def __init__(self, cfg: Config) -> None:
        super().__init__(cfg)
        self.name = cfg.task
        words = load_data("ptb-word", cfg)
        self.vocab = data.Vocabulary.build(words["train"])
        self.vocab_size = len(self.vocab)
        limits = split_limits(cfg)
        self.splits = {k: self.vocab.encode(subset(v, limits[k])) for k, v in words.items()}
        self.train_streams = _batchify(self.splits["train"], cfg.batch_size)  # (n, B)
        self.steps_per_epoch = (self.train_streams.shape[0] - 1) // cfg.seq_len
        # Zaremba et al. (2014), whose setup Laurent §5.2 follows, minimise the loss summed
        # over the BPTT steps and averaged over the batch: their lr 1 and clipping at 10 (5)
        # apply to the gradient of seq_len times the mean loss per word.
        self.loss_scale = float(cfg.seq_len)
        if self.steps_per_epoch == 0:
            raise ValueError(
                f"the training set ({len(self.splits['train']):,} words) is too small for "
                f"batch_size {cfg.batch_size} x seq_len {cfg.seq_len}"
            )

    def build_model(self) -> nn.Module:
        return build_language_model(self.cfg, self.vocab_size, one_hot=False)

    def train_batch(self, epoch: int, index: int) -> tuple[Tensor, Tensor]:
        L = self.cfg.seq_len
        seg = self.train_streams[index * L : (index + 1) * L + 1]  # (L+1, B)
        return seg[:-1], seg[1:]

    def train_loss(self, model, batch, carry):
        x, y = batch
        logits, state = model(x, carry)  # (L, B, V)
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))
        return loss, 0, 0, _detach(state)

    def score(self, loss: float, correct: int = 0, count: int = 0) -> float:
        return _lm_score(self.metric, loss)

    def _segments(self, streams: Tensor, L: int) -> Iterator[tuple[Tensor, Tensor]]:
        for i in range(0, streams.shape[0] - 1, L):
            seg = streams[i : i + L + 1]
            yield seg[:-1], seg[1:]

    @torch.no_grad()
    def evaluate(self, model, split, length=None):
        L = length or self.cfg.seq_len
        streams = _batchify(self.splits[split], self.cfg.eval_batch_size)
        if streams.shape[0] < 2:
            raise ValueError(f"the {split} split is too small for eval_batch_size")
        total, count, state = 0.0, 0, None
        with evaluating(model):
            for x, y in self._segments(streams, L):
                logits, state = model(x, state)
                total += float(
                    F.cross_entropy(
                        logits.reshape(-1, logits.shape[-1]), y.reshape(-1), reduction="sum"
                    )
                )
                count += y.numel()
        loss = total / count
        return {"loss": loss, self.metric: self.score(loss), "count": count, "length": L}

    def pop_stats_batches(self, n):
        carry: dict[str, Any] = {"state": None}

        def forward(model: nn.Module, batch: tuple[Tensor, Tensor]) -> None:
            # consecutive segments of the stream: carry the state as in training
            _, carry["state"] = model(batch[0], carry["state"])

        return self._first_batches(n), forward

    def describe(self) -> str:
        sizes = ", ".join(f"{k} {len(v):,}" for k, v in self.splits.items())
        return (
            f"{self.name}: {self.vocab_size:,} words; {sizes} tokens; "
            f"{self.steps_per_epoch:,} batches of {self.cfg.batch_size} x {self.cfg.seq_len} "
            "per epoch"
        )


def make_task(cfg: Config) -> Task:
    """The task ``cfg.task`` names (its class from the registry, `TaskSpec.task_class`)."""
    return TASKS[cfg.task].load_class()(cfg)


def model_summary(model: nn.Module) -> str:
    return f"{type(model).__name__} with {count_parameters(model):,} parameters"
