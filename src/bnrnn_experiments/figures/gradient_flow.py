"""``bnrnn figure gradient-flow``: Cooijmans Fig. 1(a), gradient flow through a batch-normalised
tanh RNN on sequential MNIST as a function of the initial BN scale gamma.

For each gamma, a `bnrnn.BNRNNCell` (``h_t = tanh(BN(W_hh h_{t-1}) + BN(W_ih x_t) + b)``,
Cooijmans §4, gamma on every BN scale) reads a batch of real MNIST images one pixel per step,
with the same step function and per-step statistics as `bnrnn.BNRNN`; a linear classifier
on the last hidden state gives the cross-entropy loss (Cooijmans §5.1). The quantity plotted
is ``||dL/dh_t||`` for t = 1 .. T: the Frobenius norm over the batch and the units of the
gradient of the batch-mean loss with respect to the hidden state at step t, from autograd
(`torch.autograd.grad` with every h_t as an input). BN uses batch statistics (training
mode), as it does when the gradient is used. Optionally the network first takes some
training steps (RMSProp, Cooijmans §5.1) and the gradients are measured again.

Setup (Cooijmans §5.1, "the sequential MNIST task described in Section 5.1"): 100 units,
orthogonal W_ih, identity W_hh, zero biases, Gaussian noise of std 0.1 on the initial
hidden state (the first ~100 pixels are constant over the batch; without the noise every
BN there divides zero by sqrt(eps)). Computed in float64 by default so that vanishing norms
far below float32's range are measured rather than flushed to zero.
"""

from __future__ import annotations

import argparse
import math
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import bnrnn

from .common import DEFAULT_OUT, new_figure, parse_floats, write_figure

PAPER_GAMMAS = (0.1, 0.3, 0.5, 0.7, 1.0)  # Cooijmans Fig. 1(a) and Fig. 6
MNIST_VALID = 5000  # the harness holds out the last 5,000 training images
NORM_CHOICES = ("cooijmans", "input", "preactivation", "none")


@dataclass
class GradientFlow:
    """``grads[t-1]`` = dL/dh_t of shape (N, H) for t = 1 .. T; ``loss`` the batch-mean loss."""

    grads: Tensor  # (T, N, H)
    loss: float

    @property
    def norms(self) -> Tensor:
        """(T,): ||dL/dh_t|| (Frobenius over batch and units)."""
        return self.grads.flatten(1).norm(dim=1)


def unroll(cell: bnrnn.BNRNNCell, x: Tensor, h0: Tensor | None = None) -> list[Tensor]:
    """Run ``cell`` over ``x`` (T, N, I) with the explicit step index; return [h_1 .. h_T]."""
    h = h0
    states = []
    for t in range(x.shape[0]):
        h = cell(x[t], h, t)  # (N, H); t selects the BN statistics row
        states.append(h)
    return states


def hidden_state_grads(
    cell: bnrnn.BNRNNCell, head: nn.Linear, x: Tensor, y: Tensor, h0: Tensor | None = None
) -> GradientFlow:
    """dL/dh_t for every step of ``cell`` over ``x`` (T, N, I), with L the mean cross-entropy
    of ``head`` on the last hidden state against labels ``y`` (N,)."""
    states = unroll(cell, x, h0)
    loss = F.cross_entropy(head(states[-1]), y)
    grads = torch.autograd.grad(loss, states)
    return GradientFlow(torch.stack(grads).detach(), float(loss.detach()))


def mnist_sequences(images: Tensor, permutation: np.ndarray | None = None) -> Tensor:
    """uint8 images (N, 28, 28) -> pixel sequences (784, N, 1) in [0, 1]."""
    x = images.reshape(images.shape[0], -1).float() / 255.0
    if permutation is not None:
        x = x[:, torch.from_numpy(permutation)]
    return x.t().unsqueeze(-1)


def make_model(
    gamma: float,
    hidden_size: int,
    max_length: int,
    weight_init: str,
    norm: str,
    dtype: torch.dtype,
) -> tuple[bnrnn.BNRNNCell, nn.Linear]:
    """The cell and the classifier head (orthogonal weight, zero bias: Cooijmans §5.1)."""
    cell = bnrnn.BNRNNCell(
        1,
        hidden_size,
        norm=None if norm == "none" else norm,
        max_length=max_length,
        gamma_init=gamma,
        weight_init=weight_init,
        dtype=dtype,
    )
    head = nn.Linear(hidden_size, 10, dtype=dtype)
    nn.init.orthogonal_(head.weight)
    nn.init.zeros_(head.bias)
    return cell, head


def train_steps(
    cell: bnrnn.BNRNNCell,
    head: nn.Linear,
    images: Tensor,
    labels: Tensor,
    steps: int,
    batch_size: int,
    init_noise: float,
    generator: torch.Generator,
    permutation: np.ndarray | None,
    seq_len: int,
    lr: float = 1e-3,
) -> list[float]:
    """``steps`` RMSProp steps (Cooijmans §5.1: lr 1e-3, momentum 0.9, clip 1); the losses."""
    params = [*cell.parameters(), *head.parameters()]
    opt = torch.optim.RMSprop(params, lr=lr, momentum=0.9)
    dtype = cell.weight_hh.dtype
    losses = []
    for _ in range(steps):
        idx = torch.randint(0, images.shape[0], (batch_size,), generator=generator)
        x = mnist_sequences(images[idx], permutation)[:seq_len].to(dtype)
        h0 = init_noise * torch.randn(batch_size, cell.hidden_size, generator=generator)
        states = unroll(cell, x, h0.to(dtype))
        loss = F.cross_entropy(head(states[-1]), labels[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        losses.append(float(loss.detach()))
    return losses


def summarize(norms: Tensor) -> dict[str, Any]:
    """Numbers behind one curve: first/last norms and the mean decay per step (read from
    right to left: how much the norm shrinks per step as it is propagated back)."""
    n = norms.double()
    T = n.numel()
    first, last = float(n[0]), float(n[-1])
    out: dict[str, Any] = {
        "norm_at_t1": first,
        "norm_at_T": last,
        "zero_norms": int((n == 0).sum()),
        "nonfinite_norms": int((~torch.isfinite(n)).sum()),
    }
    if first > 0 and last > 0 and math.isfinite(first) and T > 1:
        out["log10_ratio_t1_over_T"] = math.log10(first / last)
        out["factor_per_step"] = (first / last) ** (1.0 / (T - 1))
    else:
        out["log10_ratio_t1_over_T"] = None
        out["factor_per_step"] = None
    return out


def compute(
    images: Tensor,
    labels: Tensor,
    gammas: list[float],
    *,
    hidden_size: int = 100,
    batch_size: int = 64,
    seq_len: int = 784,
    weight_init: str = "identity",
    init_noise: float = 0.1,
    norm: str = "cooijmans",
    train_steps_n: int = 0,
    permutation: np.ndarray | None = None,
    seed: int = 1,
    dtype: torch.dtype = torch.float64,
    log: Any = print,
) -> dict[str, Any]:
    """Gradient norms per gamma: ``{"t": [1..T], "curves": {(gamma, step): norms (T,)},
    "summary": {...}}``. The measurement batch is drawn from the last `MNIST_VALID` images
    (held out from the training steps) when there are more than that many."""
    if batch_size < 2 and norm != "none":
        raise ValueError(f"batch_size must be at least 2 for batch statistics, got {batch_size}")
    if not 1 <= seq_len <= 784:
        raise ValueError(f"seq_len must be in 1..784, got {seq_len}")
    n_train = images.shape[0] - MNIST_VALID if images.shape[0] > 2 * MNIST_VALID else 0
    held_out = slice(n_train, None) if n_train else slice(None)
    g = torch.Generator().manual_seed(seed)
    pick = torch.randperm(images[held_out].shape[0], generator=g)[:batch_size]
    x = mnist_sequences(images[held_out][pick], permutation)[:seq_len].to(dtype)
    y = labels[held_out][pick]
    if x.shape[1] < batch_size:
        raise ValueError(f"batch_size {batch_size} is larger than the {x.shape[1]} images given")
    h0 = (init_noise * torch.randn(batch_size, hidden_size, generator=g)).to(dtype)
    curves: dict[tuple[float, int], Tensor] = {}
    summary: dict[str, Any] = {}
    for gamma in gammas:
        torch.manual_seed(seed)  # the same weights for every gamma
        cell, head = make_model(gamma, hidden_size, seq_len, weight_init, norm, dtype)
        cell.train()
        t0 = time.perf_counter()
        flow = hidden_state_grads(cell, head, x, y, h0)
        curves[(gamma, 0)] = flow.norms
        summary[f"gamma={gamma:g}@step0"] = {**summarize(flow.norms), "loss": flow.loss}
        log(
            f"| gamma {gamma:g} | init | loss {flow.loss:.3f} | ||dL/dh_1|| "
            f"{float(flow.norms[0]):.3g} | ||dL/dh_T|| {float(flow.norms[-1]):.3g} "
            f"| {time.perf_counter() - t0:.1f} s"
        )
        if train_steps_n > 0:
            tg = torch.Generator().manual_seed(seed + 1)
            src_images = images[:n_train] if n_train else images
            src_labels = labels[:n_train] if n_train else labels
            t0 = time.perf_counter()
            losses = train_steps(
                cell,
                head,
                src_images,
                src_labels,
                train_steps_n,
                batch_size,
                init_noise,
                tg,
                permutation,
                seq_len,
            )
            flow = hidden_state_grads(cell, head, x, y, h0)
            curves[(gamma, train_steps_n)] = flow.norms
            summary[f"gamma={gamma:g}@step{train_steps_n}"] = {
                **summarize(flow.norms),
                "loss": flow.loss,
                "train_loss_first": losses[0],
                "train_loss_last": losses[-1],
            }
            log(
                f"| gamma {gamma:g} | after {train_steps_n} steps | loss {flow.loss:.3f} "
                f"| ||dL/dh_1|| {float(flow.norms[0]):.3g} | {time.perf_counter() - t0:.1f} s"
            )
    return {"t": list(range(1, seq_len + 1)), "curves": curves, "summary": summary}


def plot(result: dict[str, Any], gammas: list[float], steps: list[int], title: str) -> Any:
    fig, axes = new_figure(6.4 * len(steps), 4.6, 1, len(steps))
    axes = [axes] if len(steps) == 1 else list(axes)
    from matplotlib import colormaps

    cmap = colormaps["viridis"]
    t = np.asarray(result["t"])
    for ax, step in zip(axes, steps):
        for k, gamma in enumerate(gammas):
            norms = result["curves"][(gamma, step)].double().numpy().copy()
            norms[~(norms > 0)] = np.nan  # zeros (underflow) cannot be drawn on a log axis
            color = cmap(k / max(1, len(gammas) - 1) * 0.9)
            ax.plot(t, norms, color=color, lw=1.4, label=f"gamma = {gamma:g}")
        ax.set_yscale("log")
        ax.set_xlabel("time step t (pixel)")
        ax.set_ylabel("||dL/dh_t||")
        ax.set_title("at initialisation" if step == 0 else f"after {step} training steps")
        ax.grid(alpha=0.3, which="both", lw=0.4)
        ax.legend(fontsize=8)
    fig.suptitle(title)
    return fig


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--gammas",
        default=",".join(f"{g:g}" for g in PAPER_GAMMAS),
        help="comma-separated initial BN scales (default: the paper's 0.1,...,1)",
    )
    p.add_argument("--hidden-size", type=int, default=100, help="hidden units (paper: 100)")
    p.add_argument(
        "--batch-size",
        type=int,
        default=64,
        help="images in the measured batch (and in each training step)",
    )
    p.add_argument(
        "--seq-len",
        type=int,
        default=784,
        help="pixels read (paper: all 784; fewer only for quick checks)",
    )
    p.add_argument(
        "--weight-init",
        default="identity",
        choices=("identity", "orthogonal", "uniform"),
        help="identity: orthogonal W_ih, identity W_hh (Cooijmans §5.1, default)",
    )
    p.add_argument(
        "--init-noise",
        type=float,
        default=0.1,
        help="std of the Gaussian noise on h_0 (Cooijmans §5.1; default 0.1)",
    )
    p.add_argument(
        "--norm",
        default="cooijmans",
        choices=NORM_CHOICES,
        help="BN placement (cooijmans: BN on W_hh h and W_ih x; none: plain RNN)",
    )
    p.add_argument(
        "--train-steps",
        type=int,
        default=0,
        help="also measure after this many RMSProp training steps (default 0)",
    )
    p.add_argument(
        "--permuted",
        action="store_true",
        help="permuted MNIST (the harness's fixed permutation) instead of scanline",
    )
    p.add_argument(
        "--permutation-seed",
        type=int,
        default=92916,
        help="seed of the pMNIST permutation (the harness's default)",
    )
    p.add_argument(
        "--dtype",
        default="float64",
        choices=("float64", "float32"),
        help="precision of the measurement (float64 resolves tiny norms)",
    )
    p.add_argument("--seed", type=int, default=1, help="seed of the weights, batch and noise")
    p.add_argument("--data-dir", help="data directory (default: $BNRNN_DATA_DIR)")
    p.add_argument(
        "--no-verify-data",
        dest="verify_data",
        action="store_false",
        help="skip the checksum verification of the MNIST files",
    )
    p.add_argument("--out", default=DEFAULT_OUT, help="output directory (default: figures)")
    p.add_argument("--name", default="gradient_flow", help="base name of the output files")


def run(args: argparse.Namespace, argv: list[str] | None = None) -> Any:
    from ..data import load_mnist

    gammas = parse_floats(args.gammas, "--gammas")
    if args.train_steps < 0:
        raise ValueError(f"--train-steps must be >= 0, got {args.train_steps}")
    if args.hidden_size <= 0:
        raise ValueError(f"--hidden-size must be a positive integer, got {args.hidden_size}")
    t_start = time.perf_counter()
    images, labels = load_mnist(args.data_dir, "train", verify=args.verify_data)
    permutation = None
    if args.permuted:
        permutation = np.random.default_rng(args.permutation_seed).permutation(784)
    dtype = torch.float64 if args.dtype == "float64" else torch.float32
    result = compute(
        images,
        labels,
        gammas,
        hidden_size=args.hidden_size,
        batch_size=args.batch_size,
        seq_len=args.seq_len,
        weight_init=args.weight_init,
        init_noise=args.init_noise,
        norm=args.norm,
        train_steps_n=args.train_steps,
        permutation=permutation,
        seed=args.seed,
        dtype=dtype,
    )
    steps = [0] + ([args.train_steps] if args.train_steps else [])
    task = "permuted MNIST" if args.permuted else "sequential MNIST"
    fig = plot(
        result, gammas, steps, f"Gradient flow in a BN tanh-RNN on {task} (Cooijmans Fig. 1a)"
    )
    keys = [(g, s) for s in steps for g in gammas]
    header = ["t"] + [f"gamma={g:g}@step{s}" for g, s in keys]
    columns = [result["curves"][k].tolist() for k in keys]
    rows = [[t, *(c[i] for c in columns)] for i, t in enumerate(result["t"])]
    settings = {
        "task": "pmnist" if args.permuted else "smnist",
        "pixels": args.seq_len,
        "hidden": args.hidden_size,
        "batch": args.batch_size,
        "norm": args.norm,
        "gammas": gammas,
        "weight_init": args.weight_init,
        "init_noise": args.init_noise,
        "train_steps": args.train_steps,
        "dtype": args.dtype,
        "seed": args.seed,
    }
    note = (
        "||dL/dh_t||: Frobenius norm over the batch of the gradient of the batch-mean "
        "cross-entropy (linear classifier on h_T) w.r.t. h_t, BN with batch statistics; "
        "read right to left. Paper: 100 units, all 784 pixels."
    )
    summary = {**result["summary"], "wall_seconds": round(time.perf_counter() - t_start, 1)}
    return write_figure(
        fig,
        args.out,
        args.name,
        settings=settings,
        summary=summary,
        header=header,
        rows=rows,
        note=note,
        argv=argv,
    )
