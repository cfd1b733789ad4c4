"""What happens inside an Attentive Reader while it trains: the measurements behind
docs/qa.md's "Why the BN readers do not learn".

    python -m bnrnn_experiments.qa.diagnostics ptb-cloze --models 'lstm,bn-e**' \\
        --preset quick --steps 300 --at 0,100,300 --threads 1 --out diag.json

Each model trains as `bnrnn train` does (same task, batches, initialisation, optimiser,
learning rate and clipping for the seed), and at the steps ``--at`` (after that many
updates) is measured on fixed data, without changing it (buffers are restored):

- loss and accuracy of the validation probe (the first ``--probe`` validation questions)
  in training mode (batch statistics) and in evaluation mode (population statistics);
- the attention s(t) on the probe: normalised entropy H(s) / log(length) (1 = uniform),
  the largest weight, and the weight on the answer's occurrences in the document against
  what a uniform attention gives it;
- the gradient norm of each module and of each parameter, averaged over
  ``--grad-batches`` fixed training batches, and how far each module's parameters have
  moved since step 0;
- every batch normalisation of the reader: mean and std of the term before
  normalisation and after (gamma * zhat + beta), per feature over the rows it normalises,
  averaged over features and steps (the smallest step's std too), and gamma. The BN-LSTMs
  run their reference loop for this probe, so that each term is seen;
- the un-normalised terms that the BN models normalise in the attention (W_ym y, W_um u,
  W_rg r, W_ug u) and the document states y_d, for every model, BN or not;
- for the BN-LSTMs: the largest relative difference between the gradients of the fast
  path and of the reference loop on one training batch (the reader uses the fast path).

The training loss, gradient norm before clipping and learning rate applied are recorded at
every step. Writes everything to ``--out`` (JSON) and prints a summary.

``--time-steps N`` only times N training steps of each model (wall and CPU time).

Interventions, to test a cause by removing it (`Interventions`): ``--freeze REGEX`` keeps
the matching parameters at their initial values, ``--zero REGEX`` starts them at zero,
``--min-rows K`` cuts every training batch's documents and queries to the K-th longest of
the batch, so that every step has at least K sequences for its frame-wise statistics (the
longest K-1 lose their last tokens); ``--answer most-frequent`` replaces every answer
(training batches and the probe) by the candidate occurring most often in its document, an
easier task that the plain LSTM reader learns within a few hundred steps.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import math
import re
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import bnrnn
from bnrnn import StepBatchNorm
from bnrnn.packing import batch_sizes_of, present, present_steps

from ..checkpoint import seed_everything
from ..config import Config, make_config
from ..tasks import make_task
from ..train import lr_at, make_optimizer
from .batching import QABatch, make_batch

__all__ = ["diagnose", "main"]


# ------------------------------------------------------------------------ probes


@contextlib.contextmanager
def _frozen(model: nn.Module, training: bool) -> Iterator[None]:
    """Run ``model`` in the given mode and give back its buffers (population statistics)
    and mode afterwards: a probe leaves no trace."""
    saved = {k: b.clone() for k, b in model.named_buffers()}
    was_training = model.training
    model.train(training)
    try:
        yield
    finally:
        with torch.no_grad():
            for k, b in model.named_buffers():
                b.copy_(saved[k])
        model.train(was_training)


@contextlib.contextmanager
def _reference_loops(model: nn.Module) -> Iterator[None]:
    """The BN-LSTMs of ``model`` run their plain reference loop (every `StepBatchNorm`
    call goes through Python, where it can be observed)."""
    lstms = [m for m in model.modules() if isinstance(m, bnrnn.BNLSTM)]
    impls = [m.impl for m in lstms]
    for m in lstms:
        m.impl = "reference"
    try:
        yield
    finally:
        for m, impl in zip(lstms, impls):
            m.impl = impl


class _Moments:
    """Per-feature mean and std over the rows a term is normalised over, accumulated over
    calls: averages over features and calls, and the smallest per-call mean std."""

    def __init__(self) -> None:
        self.calls = 0
        self.mean = 0.0
        self.std = 0.0
        self.min_std = math.inf

    def add(self, rows: Tensor) -> None:
        """rows: (n, F), n >= 2."""
        rows = rows.detach().double()
        std = float(rows.std(0, unbiased=False).mean())
        self.mean += float(rows.mean(0).mean())
        self.std += std
        self.min_std = min(self.min_std, std)
        self.calls += 1

    def result(self) -> dict[str, float] | None:
        if self.calls == 0:
            return None
        return {"mean": self.mean / self.calls, "std": self.std / self.calls,
                "min_std": self.min_std, "calls": self.calls}  # fmt: skip


def _frames_of(z: Tensor, batch_sizes: Sequence[int]) -> Iterator[Tensor]:
    """The present rows of each step of (T, N, F), sorted layout."""
    for t, n in enumerate(batch_sizes):
        if n >= 2:
            yield z[t, :n]


@contextlib.contextmanager
def _watch_norms(model: nn.Module) -> Iterator[dict[str, dict[str, _Moments]]]:
    """Observe every `StepBatchNorm` of ``model``: the terms going in and coming out."""
    seen: dict[str, dict[str, _Moments]] = {}
    norms = [(n, m) for n, m in model.named_modules() if isinstance(m, StepBatchNorm)]

    def wrap(name: str, bn: StepBatchNorm, method: str) -> Callable[..., Tensor]:
        inner = getattr(bn, method)

        def observed(z: Tensor, *args: Any, **kw: Any) -> Tensor:
            out = inner(z, *args, **kw)
            rec = seen.setdefault(name, {"input": _Moments(), "output": _Moments()})
            if method == "step":
                parts = [(z, out)] if z.shape[0] >= 2 else []
            elif method == "frames":
                sizes = args[0] if args else kw["batch_sizes"]
                parts = list(zip(_frames_of(z, sizes), _frames_of(out, sizes)))
            else:  # sequence: every present frame of the batch at once
                sizes = args[0] if args else kw["batch_sizes"]
                mask = present(sizes, z.shape[1])
                parts = [(z[mask], out[mask])]
            for a, b in parts:
                rec["input"].add(a)
                rec["output"].add(b)
            return out

        return observed

    for name, bn in norms:
        for method in ("step", "frames", "sequence"):
            setattr(bn, method, wrap(name, bn, method))
    try:
        yield seen
    finally:
        for _, bn in norms:
            for method in ("step", "frames", "sequence"):
                delattr(bn, method)


def _gammas(model: nn.Module) -> dict[str, dict[str, float]]:
    out = {}
    for name, bn in model.named_modules():
        if isinstance(bn, StepBatchNorm):
            g = bn.weight.detach().double()
            out[name] = {"mean": float(g.mean()), "min": float(g.min()), "max": float(g.max())}
            if bn.bias is not None:
                out[name]["beta_mean"] = float(bn.bias.detach().double().mean())
    return out


def _module_of(param_name: str) -> str:
    """The reader's part a parameter belongs to: embed, doc_encoder, ..., output."""
    return param_name.split(".")[0]


def _grouped_norms(named: Iterator[tuple[str, Tensor]]) -> dict[str, float]:
    squares: dict[str, float] = {}
    for name, t in named:
        key = _module_of(name)
        squares[key] = squares.get(key, 0.0) + float(t.double().square().sum())
        if ".bn_" in name and name.endswith("weight"):  # the BN scales, also on their own
            squares["bn gammas"] = squares.get("bn gammas", 0.0) + float(t.double().square().sum())
    return {k: math.sqrt(v) for k, v in squares.items()}


def _gradient_norms(
    task: Any, model: nn.Module, batches: Sequence[QABatch]
) -> tuple[dict[str, float], dict[str, float]]:
    """Gradient norm of each module and of each parameter, averaged over ``batches``
    (training mode)."""
    total: dict[str, float] = {}
    each: dict[str, float] = {}
    with _frozen(model, training=True):
        for batch in batches:
            model.zero_grad(set_to_none=True)
            loss = task.train_loss(model, batch, None)[0]
            loss.backward()
            grads = [(n, p.grad) for n, p in model.named_parameters() if p.grad is not None]
            norms = _grouped_norms(iter(grads))
            norms["total"] = math.sqrt(sum(v * v for k, v in norms.items() if k != "bn gammas"))
            for k, v in norms.items():
                total[k] = total.get(k, 0.0) + v / len(batches)
            for n, g in grads:
                each[n] = each.get(n, 0.0) + float(g.double().norm()) / len(batches)
    model.zero_grad(set_to_none=True)
    return total, each


def _fast_vs_reference(task: Any, model: nn.Module, batch: QABatch) -> float | None:
    """Largest relative difference (per parameter, in norm) between the gradients of the
    fast path and of the reference loop; None without `bnrnn.BNLSTM` layers."""
    if not any(isinstance(m, bnrnn.BNLSTM) for m in model.modules()):
        return None
    grads = []
    for reference in (False, True):
        with (
            _frozen(model, training=True),
            _reference_loops(model) if reference else contextlib.nullcontext(),
        ):
            model.zero_grad(set_to_none=True)
            task.train_loss(model, batch, None)[0].backward()
            grads.append({n: p.grad.clone() for n, p in model.named_parameters()
                          if p.grad is not None})  # fmt: skip
    model.zero_grad(set_to_none=True)
    fast, ref = grads
    worst = 0.0
    for n, g in ref.items():
        worst = max(worst, float((fast[n] - g).norm() / g.norm().clamp(min=1e-30)))
    return worst


def _attention(model: nn.Module, batch: QABatch) -> dict[str, float]:
    """Normalised entropy, largest weight and the weight on the answer's occurrences."""
    doc, doc_len, query, query_len, _ = batch.inputs()
    y_d, _ = model.encode(doc, doc_len, model.doc_encoder)
    _, u = model.encode(query, query_len, model.query_encoder)
    _, s = model.attend(y_d, doc_len, u)  # (T, N)
    present = present_steps(doc_len, doc.shape[0])
    p = s.clamp(min=1e-30)
    entropy = -(torch.where(present, p * p.log(), 0)).sum(0)  # (N,)
    norm = torch.log(doc_len.double().clamp(min=2))
    entity_offset = model.entity_offset
    answer_ids = batch.answer + entity_offset  # vocabulary ids (test: the model's layout)
    on_answer = (doc == answer_ids[None, :]) & present
    mass = torch.where(on_answer, s, 0).sum(0)
    uniform = on_answer.sum(0).double() / doc_len.double()
    return {
        "entropy_normalised": float((entropy.double() / norm).mean()),
        "max_weight": float(s.max(0).values.mean()),
        "answer_weight": float(mass.mean()),
        "answer_weight_uniform": float(uniform.mean()),
        "y_d_std": float(y_d[present].std()),
    }


def _attention_terms(model: nn.Module, batch: QABatch) -> dict[str, dict[str, float]]:
    """Mean and std (per feature, averaged) of the four terms inside the attention's tanh
    before any normalisation: W_ym y (present positions), W_um u, W_rg r, W_ug u."""
    seen: dict[str, _Moments] = {}
    doc_present = present_steps(batch.doc_lengths, batch.document.shape[0])

    def hook(name: str) -> Callable[..., None]:
        def record(module: nn.Module, args: Any, out: Tensor) -> None:
            rows = out[doc_present] if out.dim() == 3 else out
            seen.setdefault(name, _Moments()).add(rows)

        return record

    terms = {"W_ym y": model.attend_m.proj_a, "W_um u": model.attend_m.proj_b,
             "W_rg r": model.attend_g.proj_a, "W_ug u": model.attend_g.proj_b}  # fmt: skip
    handles = [m.register_forward_hook(hook(n)) for n, m in terms.items()]
    try:
        model(*batch.inputs())
    finally:
        for h in handles:
            h.remove()
    return {n: m.result() for n, m in seen.items()}  # type: ignore[misc]


@torch.no_grad()
def _scores(task: Any, model: nn.Module, batch: QABatch) -> dict[str, float]:
    logits = model(*batch.inputs())
    loss = float(F.cross_entropy(logits, batch.answer))
    acc = 100.0 * float((logits.argmax(-1) == batch.answer).double().mean())
    return {"loss": loss, "acc": acc}


def measure(
    task: Any,
    model: nn.Module,
    probe: QABatch,
    grad_batches: Sequence[QABatch],
    start: dict[str, Tensor],
) -> dict[str, Any]:
    """Every measurement of the module docstring at the model's current parameters."""
    out: dict[str, Any] = {}
    with _frozen(model, training=True):
        out["probe_train_mode"] = _scores(task, model, probe)
    with _frozen(model, training=False):
        out["probe_eval_mode"] = _scores(task, model, probe)
    with torch.no_grad(), _frozen(model, training=True):
        out["attention"] = _attention(model, probe)
        out["attention_terms"] = _attention_terms(model, probe)
        with _reference_loops(model), _watch_norms(model) as seen:
            model(*probe.inputs())
    out["norms"] = {
        name: {"input": rec["input"].result(), "output": rec["output"].result()}
        for name, rec in sorted(seen.items())
    }
    out["gammas"] = _gammas(model)
    out["grad_norms"], out["grad_norms_per_parameter"] = _gradient_norms(task, model, grad_batches)
    moved: dict[str, list[float]] = {}
    for name, p in model.named_parameters():
        d = moved.setdefault(_module_of(name), [0.0, 0.0])
        d[0] += float((p.detach() - start[name]).double().square().sum())
        d[1] += float(start[name].double().square().sum())
    out["relative_change"] = {k: math.sqrt(a / b) if b > 0 else math.sqrt(a)
                              for k, (a, b) in moved.items()}  # fmt: skip
    return out


# ------------------------------------------------------------------------ the run


@dataclass(frozen=True)
class Interventions:
    """Changes to the training that remove a suspected cause (see the module docstring)."""

    freeze: str = ""  # regex of parameter names kept at their initial values
    zero: str = ""  # regex of parameter names initialised to zero
    min_rows: int = 0  # cut each training batch to its min_rows-th longest sequence
    answer: str = "task"  # "most-frequent": the answer is the most frequent candidate

    def apply(self, model: nn.Module) -> None:
        with torch.no_grad():
            for name, p in model.named_parameters():
                if self.zero and re.search(self.zero, name):
                    p.zero_()
                if self.freeze and re.search(self.freeze, name):
                    p.requires_grad_(False)

    def batch(self, batch: QABatch, entity_offset: int) -> QABatch:
        """A training batch: cut (``min_rows``) and relabelled (`relabel`)."""
        batch = self.relabel(batch, entity_offset)
        if self.min_rows < 1:
            return batch
        T_d = int(batch.doc_lengths.sort(descending=True).values[self.min_rows - 1])
        T_q = int(batch.query_lengths.sort(descending=True).values[self.min_rows - 1])
        return replace(
            batch,
            document=batch.document[:T_d],
            doc_lengths=batch.doc_lengths.clamp(max=T_d),
            query=batch.query[:T_q],
            query_lengths=batch.query_lengths.clamp(max=T_q),
        )

    def relabel(self, batch: QABatch, entity_offset: int) -> QABatch:
        """``answer="most-frequent"``: each answer becomes the candidate occurring most
        often in its document (ties: the first to occur), a task that needs counting, not
        reading the query (a probe of whether the reader learns at all)."""
        if self.answer == "task":
            return batch
        T, N = batch.document.shape
        E = batch.candidates.shape[1]
        ids = batch.document - entity_offset  # (T, N): entity numbers where in [0, E)
        present = present_steps(batch.doc_lengths, T)
        hit = (ids >= 0) & (ids < E) & present
        index = ids.clamp(0, E - 1).t()  # (N, T)
        counts = torch.zeros(N, E).scatter_add_(1, index, hit.t().float())
        steps = torch.where(hit, torch.arange(T)[:, None], T).t()
        first = torch.full((N, E), T).scatter_reduce_(1, index, steps, "amin")
        key = torch.where(batch.candidates, counts * (T + 1) - first, float("-inf"))
        return replace(batch, answer=key.argmax(1))


def few_rows(batches: Sequence[QABatch], k: int = 8) -> dict[str, float]:
    """How much of the reading happens with fewer than ``k`` sequences present: the
    fraction of the document and query steps of ``batches`` with fewer than ``k`` rows
    (and with fewer than 4), where a frame-wise statistic is over that few values."""
    out = {}
    for part in ("doc", "query"):
        steps, below_k, below_4 = 0, 0, 0
        for b in batches:
            lengths = b.doc_lengths if part == "doc" else b.query_lengths
            present = torch.tensor(batch_sizes_of(lengths, int(lengths.max())))
            steps += len(present)
            below_k += int((present < k).sum())
            below_4 += int((present < 4).sum())
        out[f"{part}_steps_below_{k}"] = below_k / steps
        out[f"{part}_steps_below_4"] = below_4 / steps
    return out


def _train_step(
    cfg: Config,
    task: Any,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    params: list[nn.Parameter],
    step: int,
    change: Interventions,
) -> dict[str, Any]:
    """Training step ``step`` (0-based) as `bnrnn train` takes it; its record: loss,
    accuracy, gradient norm before clipping, the learning rate applied, wall and CPU time
    (milliseconds; CPU time is that of this process, less sensitive to a busy machine)."""
    t0, c0 = time.perf_counter(), time.process_time()
    epoch, index = divmod(step, task.steps_per_epoch)
    for group in optimizer.param_groups:
        group["lr"] = lr_at(cfg, epoch)
    batch = change.batch(task.train_batch(epoch, index), model.entity_offset)
    loss, correct, count, _ = task.train_loss(model, batch, None)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    norm = torch.nn.utils.clip_grad_norm_(params, cfg.clip if cfg.clip > 0 else math.inf)
    optimizer.step()
    return {"step": step + 1, "loss": loss.item(), "acc": 100 * correct / count,
            "grad_norm": float(norm), "lr": optimizer.param_groups[0]["lr"],
            "wall_ms": 1000 * (time.perf_counter() - t0),
            "cpu_ms": 1000 * (time.process_time() - c0)}  # fmt: skip


def step_times(cfg: Config, steps: int, warmup: int = 2) -> dict[str, float]:
    """Wall and CPU milliseconds per training step of ``cfg``'s reader, the mean over
    ``steps`` steps after ``warmup`` (nothing measured, no evaluation)."""
    seed_everything(cfg.seed)
    task = make_task(cfg)
    model = task.build_model().train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = make_optimizer(cfg, params)
    records = [_train_step(cfg, task, model, optimizer, params, i, Interventions())
               for i in range(warmup + steps)][warmup:]  # fmt: skip
    return {key: sum(r[key] for r in records) / steps for key in ("wall_ms", "cpu_ms")}


def diagnose(
    cfg: Config,
    at: Sequence[int],
    probe_size: int = 250,
    grad_batches: int = 4,
    log: Callable[[str], None] = print,
    change: Interventions = Interventions(),
) -> dict[str, Any]:
    """Train ``cfg`` for ``max(at)`` steps as `bnrnn train` does (with the interventions
    ``change``); measure at each of ``at``. Returns the measurements (JSON-serialisable)."""
    steps = max(at)
    seed_everything(cfg.seed)
    task = make_task(cfg)
    model = task.build_model()
    change.apply(model)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = make_optimizer(cfg, params)
    offset = model.entity_offset
    probe = make_batch(task.splits["valid"][:probe_size], task.vocab, task.num_entities)
    probe = change.relabel(probe, offset)
    fixed = [change.batch(task.train_batch(0, i), offset)
             for i in range(min(grad_batches, task.steps_per_epoch))]  # fmt: skip
    start = {n: p.detach().clone() for n, p in model.named_parameters()}
    result: dict[str, Any] = {
        "config": cfg.to_dict(),
        "interventions": asdict(change),
        "parameters": sum(p.numel() for p in params),
        "fast_vs_reference_grad": _fast_vs_reference(task, model, fixed[0]),
        "few_rows": few_rows(
            [
                change.batch(task.train_batch(0, i), offset)
                for i in range(min(100, task.steps_per_epoch))
            ]
        ),  # fmt: skip
        "at": {},
        "train": [],
    }
    model.train()
    for step in range(steps + 1):
        if step in at:
            t0 = time.perf_counter()
            result["at"][str(step)] = measure(task, model, probe, fixed, start)
            log(f"| {cfg.model}: measured at step {step} ({time.perf_counter() - t0:.0f} s)")
        if step < steps:
            result["train"].append(_train_step(cfg, task, model, optimizer, params, step, change))
    result["ms_per_step"] = sum(r["wall_ms"] for r in result["train"]) / max(steps, 1)
    if any(isinstance(m, StepBatchNorm) for m in model.modules()):
        reestimated = copy.deepcopy(model)
        n = bnrnn.update_population_stats(reestimated, *task.pop_stats_batches(cfg.pop_batches))
        with _frozen(reestimated, training=False):
            result["probe_eval_reestimated"] = {"batches": n,
                                                **_scores(task, reestimated, probe)}  # fmt: skip
    return result


# ------------------------------------------------------------------------ report


def _fmt(x: float | None, spec: str = ".3g") -> str:
    return "-" if x is None else format(x, spec)


def summary(model: str, r: dict[str, Any]) -> str:
    """Text tables of one model's measurements."""
    lines = [f"== {model}: {r['parameters']:,} parameters, {r['ms_per_step']:.0f} ms/step; "
             f"fast vs reference gradients: {_fmt(r['fast_vs_reference_grad'])}"]  # fmt: skip
    if "few_rows" in r:
        lines.append("   steps with few sequences (first 100 batches): " + ", ".join(
            f"{k} {100 * v:.0f}%" for k, v in r["few_rows"].items()))  # fmt: skip
    changed = {k: v for k, v in r.get("interventions", {}).items() if v and v != "task"}
    if changed:
        lines.append(f"   interventions: {changed}")
    train, clip = r["train"], r["config"]["clip"]
    bounds = sorted({b for b in (0, 100, 300, *range(1000, len(train), 1000)) if b < len(train)}
                    | {len(train)})  # fmt: skip
    for lo, hi in zip(bounds, bounds[1:]):
        w = train[lo:hi]
        loss = sum(x["loss"] for x in w) / len(w)
        acc = sum(x["acc"] for x in w) / len(w)
        norms = sorted(x["grad_norm"] for x in w)
        clipped = sum(n > clip for n in norms) if clip > 0 else 0
        lines.append(
            f"   train steps {w[0]['step']}-{w[-1]['step']}: loss {loss:.3f}, acc {acc:.1f}%, "
            f"grad norm median {norms[len(w) // 2]:.3g} max {norms[-1]:.3g}, clipped "
            f"{clipped}/{len(w)}, lr {w[-1]['lr']:g}"
        )
    for step, m in r["at"].items():
        a, tr, ev = m["attention"], m["probe_train_mode"], m["probe_eval_mode"]
        lines.append(
            f"-- step {step}: probe loss/acc train-mode {tr['loss']:.3f}/{tr['acc']:.1f}%, "
            f"eval-mode {ev['loss']:.3f}/{ev['acc']:.1f}%; attention entropy "
            f"{a['entropy_normalised']:.3f} of uniform, max weight {a['max_weight']:.3f}, on the "
            f"answer {a['answer_weight']:.3f} (uniform {a['answer_weight_uniform']:.3f}); "
            f"y_d std {a['y_d_std']:.3g}"
        )
        g = m["grad_norms"]
        lines.append("   grad norms: " + ", ".join(f"{k} {v:.3g}" for k, v in g.items()))
        lines.append(
            "   moved since step 0: "
            + ", ".join(f"{k} {v:.3g}" for k, v in m["relative_change"].items())
        )
        lines.append(
            "   attention terms (mean/std): "
            + ", ".join(
                f"{k} {v['mean']:.2g}/{v['std']:.3g}" for k, v in m["attention_terms"].items()
            )
        )
        for name, rec in m["norms"].items():
            i, o = rec["input"], rec["output"]
            if i is None:
                continue
            gm = m["gammas"][name]
            lines.append(
                f"   {name:<34} in {i['mean']:+.2g}/{i['std']:.3g} (min {i['min_std']:.3g}) "
                f"-> out {o['mean']:+.2g}/{o['std']:.3g}; gamma {gm['mean']:.3g} "
                f"[{gm['min']:.3g}, {gm['max']:.3g}]"
            )
    if "probe_eval_reestimated" in r:
        e = r["probe_eval_reestimated"]
        lines.append(f"-- end, statistics re-estimated over {e['batches']} batches: probe "
                     f"loss/acc {e['loss']:.3f}/{e['acc']:.1f}%")  # fmt: skip
    return "\n".join(lines)


def _value(text: str) -> Any:
    for kind in (int, float):
        with contextlib.suppress(ValueError):
            return kind(text)
    return {"true": True, "false": False}.get(text.lower(), text)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m bnrnn_experiments.qa.diagnostics",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("task", choices=("ptb-cloze", "cnn-qa"))
    p.add_argument("--models", default="lstm,bn-e**", help="comma-separated readers")
    p.add_argument("--preset", default="quick")
    p.add_argument("--steps", type=int, default=300, help="training steps")
    p.add_argument("--at", default="", help="steps to measure at (default: 0 and --steps)")
    p.add_argument("--probe", type=int, default=250, help="validation questions probed")
    p.add_argument("--grad-batches", type=int, default=4, help="training batches for grads")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                   help="configuration override, e.g. --set lr=8e-4 (repeatable)")  # fmt: skip
    p.add_argument("--freeze", default="", metavar="REGEX",
                   help="keep the matching parameters at their initial values")  # fmt: skip
    p.add_argument("--zero", default="", metavar="REGEX",
                   help="initialise the matching parameters to zero")  # fmt: skip
    p.add_argument("--min-rows", type=int, default=0, metavar="K",
                   help="cut training batches to their K-th longest sequence")  # fmt: skip
    p.add_argument("--answer", default="task", choices=("task", "most-frequent"),
                   help="most-frequent: answers are the most frequent candidates")  # fmt: skip
    p.add_argument("--time-steps", type=int, default=0, metavar="N",
                   help="only time N training steps of each model (after 2)")  # fmt: skip
    p.add_argument("--out", help="JSON file for all measurements")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    at = sorted({int(s) for s in args.at.split(",") if s} | {0, args.steps})
    overrides = {}
    for item in args.set:
        key, _, value = item.partition("=")
        overrides[key.replace("-", "_")] = _value(value)
    report: dict[str, Any] = {
        "command": " ".join(
            [
                "python -m bnrnn_experiments.qa.diagnostics",
                *(argv if argv is not None else sys.argv[1:]),
            ]
        )
    }
    for model in [m.strip() for m in args.models.split(",") if m.strip()]:
        cfg = make_config(args.task, model, args.preset, **overrides)
        if args.time_steps:
            report[model] = step_times(cfg, args.time_steps)
            t = report[model]
            print(f"| {model}: {t['wall_ms']:.0f} ms/step wall, {t['cpu_ms']:.0f} ms CPU "
                  f"(batch {cfg.batch_size}, hidden {cfg.hidden_size})", flush=True)  # fmt: skip
        else:
            change = Interventions(args.freeze, args.zero, args.min_rows, args.answer)
            report[model] = diagnose(cfg, at, args.probe, args.grad_batches, change=change)
            print(summary(model, report[model]), flush=True)
        if args.out:
            Path(args.out).write_text(json.dumps(report, indent=1) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
