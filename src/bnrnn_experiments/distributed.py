"""Data-parallel training under ``torchrun``: process-group setup, rank-0-only I/O, and
sharding of the tasks' global batches.

    torchrun --standalone --nproc-per-node 2 -m bnrnn_experiments train pmnist --model bnlstm

``torchrun`` sets ``WORLD_SIZE``, ``RANK`` and ``LOCAL_RANK``; `session` initialises the
default process group from them (gloo on the CPU, nccl when CUDA is available) and tears it
down afterwards. Without those variables (or with ``WORLD_SIZE=1``) everything here is a
no-op and training is the single-process loop, unchanged.

Sharding (`shard_task`): every process builds the same task with the same seed, so batch
``(epoch, index)`` is the same *global* batch everywhere; process ``r`` of ``W`` keeps its
rows ``r::W`` (the sequences of the classifier / char LM, the parallel streams of the word
LM, whose carried hidden state then stays per row on the process that owns the row). This is
what `torch.utils.data.DistributedSampler` does with a shared global order, without padding:
with ``batch_size`` divisible by ``W`` every process gets ``batch_size / W`` rows. The QA
tasks (variable-length padded documents with attention) are not sharded: under torchrun
they are refused.
"""

from __future__ import annotations

import contextlib
import datetime
import os
from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

#: Collectives wait this long for a slow process (rank 0 validating while the others wait).
TIMEOUT = datetime.timedelta(hours=2)


def env_world_size() -> int:
    """The ``WORLD_SIZE`` torchrun set (1 when not launched by torchrun)."""
    try:
        return int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        return 1


def launched_by_torchrun() -> bool:
    return env_world_size() > 1 and "RANK" in os.environ


def is_distributed() -> bool:
    """Is a process group of more than one process initialised?"""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def is_main() -> bool:
    """Rank 0 (or the only process): the one that writes files and prints log lines."""
    return rank() == 0


def env_is_main() -> bool:
    """`is_main` before the process group exists (from torchrun's ``RANK``)."""
    return os.environ.get("RANK", "0") == "0"


@contextlib.contextmanager
def session() -> Iterator[bool]:
    """Initialise the default process group if launched by torchrun and none exists;
    destroy it on exit if it was created here. Yields whether training is distributed."""
    created = False
    if launched_by_torchrun() and not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(backend, timeout=TIMEOUT)
        created = True
    try:
        yield is_distributed()
    finally:
        if created:
            dist.destroy_process_group()


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """``obj`` of rank ``src`` on every process (pickled; for small objects and decisions)."""
    if not is_distributed():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def on_main(fn: Callable[[], Any]) -> Any:
    """``fn()`` run by rank 0 alone, its result on every process; if it raises, every
    process raises the same exception (none waits forever for the others)."""
    outcome: tuple[str, Any] = ("ok", None)
    if is_main():
        try:
            outcome = ("ok", fn())
        except Exception as e:
            outcome = ("error", e)
    outcome = broadcast_object(outcome)
    if outcome[0] == "error":
        raise outcome[1]
    return outcome[1]


def all_true(flag: bool) -> bool:
    """Is ``flag`` true on every process? (a collective when distributed)"""
    if not is_distributed():
        return flag
    return all_reduce_sum([0.0 if flag else 1.0])[0] == 0.0


def gather_objects(obj: Any) -> list[Any] | None:
    """Every rank's ``obj`` on rank 0 (a list indexed by rank), None elsewhere."""
    if not is_distributed():
        return [obj]
    out: list[Any] | None = [None] * world_size() if is_main() else None
    dist.gather_object(obj, out, dst=0)
    return out


def all_reduce_sum(values: list[float]) -> list[float]:
    """Element-wise sum over the processes (float64)."""
    if not is_distributed():
        return list(values)
    t = torch.tensor(values, dtype=torch.float64)
    dist.all_reduce(t)
    return t.tolist()


def broadcast_module_state(module: torch.nn.Module, src: int = 0) -> None:
    """Copy every parameter and buffer of ``src``'s ``module`` to the other processes."""
    if not is_distributed():
        return
    with torch.no_grad():
        for t in module.state_dict().values():
            if isinstance(t, Tensor):
                dist.broadcast(t, src=src)


@contextlib.contextmanager
def main_first() -> Iterator[None]:
    """Rank 0 runs the body first (e.g. downloads the data), then the others."""
    if not is_main():
        barrier()
    yield
    if is_main():
        barrier()


# ---------------------------------------------------------------------- sharding


def shard_rows(n: int, r: int, w: int) -> slice:
    """Rows of a global batch of ``n`` rows kept by rank ``r`` of ``w``."""
    return slice(r, n, w)


def rows_of(n: int, r: int, w: int) -> int:
    return len(range(n)[shard_rows(n, r, w)])


def shardable(task: Any) -> str | None:
    """None if ``task``'s batches can be split by rows, else the reason they cannot."""
    from .tasks import CharLM, SequentialMNIST, WordLM

    if isinstance(task, (SequentialMNIST, CharLM, WordLM)):
        return None
    return (
        f"{task.name} batches are not split across processes (variable-length padded "
        "documents and queries); train it in a single process"
    )


def shard_batch(task: Any, batch: Any, r: int, w: int) -> Any:
    """Rank ``r``'s rows of the global ``batch`` of ``task``.

    Every task's batch is ``(inputs, targets)``, time-major: inputs (T, N, ...) or tokens
    (T, N); targets (N,) for the classifier, (T, N) for the language models."""
    x, y = batch
    rows = shard_rows(x.shape[1], r, w)
    return x[:, rows], (y[rows] if y.dim() == 1 else y[:, rows])


def shard_task(task: Any, r: int, w: int) -> Any:
    """Make ``task.train_batch`` return rank ``r``'s shard of every global batch (the
    training loop and `Task.pop_stats_batches` both read it); returns ``task``."""
    reason = shardable(task)
    if reason is not None:
        raise ValueError(f"torchrun: {reason}")
    if w == 1:
        return task
    full = task.train_batch

    def train_batch(epoch: int, index: int) -> Any:
        return shard_batch(task, full(epoch, index), r, w)

    task.train_batch = train_batch  # instance attribute: shadows the method
    task.shard = (r, w)
    return task


def merge_rows(shards: list[Tensor], dim: int) -> Tensor:
    """Inverse of the sharding: interleave the ranks' rows (rank r holds rows r::W)."""
    w = len(shards)
    n = sum(s.shape[dim] for s in shards)
    shape = list(shards[0].shape)
    shape[dim] = n
    out = shards[0].new_empty(shape)
    for r, s in enumerate(shards):
        index = [slice(None)] * out.dim()
        index[dim] = shard_rows(n, r, w)
        out[tuple(index)] = s
    return out
