"""Shared test helpers: the paper's equations written out by hand, and small utilities."""

from __future__ import annotations

import copy

import torch
from torch import Tensor
from torch.nn.utils.rnn import pack_padded_sequence


def manual_bn(
    z: Tensor,
    gamma: Tensor,
    beta: Tensor | None,
    eps: float,
    mean: Tensor | None = None,
    var: Tensor | None = None,
) -> Tensor:
    """BN(z; gamma, beta) with the batch mean and biased variance computed by hand."""
    if mean is None:
        n = z.shape[0]
        mean = z.sum(0) / n
        var = ((z - mean) ** 2).sum(0) / n
    out = gamma * (z - mean) / torch.sqrt(var + eps)
    return out if beta is None else out + beta


def _last_tracked(bn) -> int:
    """The last row of a StepBatchNorm with a nonzero count (max_length - 1 if none)."""
    tracked = [k for k, n in enumerate(bn.num_batches_tracked.tolist()) if n > 0]
    return tracked[-1] if tracked else bn.max_length - 1


def with_rows_filled(model):
    """A copy of ``model`` whose BN rows past each module's last tracked row hold that
    row's statistics, written out and counted as tracked: what evaluation of ``model``
    must compute if rows never trained are never read."""
    model = copy.deepcopy(model)
    with torch.no_grad():
        for bn in model.modules():
            if hasattr(bn, "num_batches_tracked"):
                last = _last_tracked(bn)
                bn.running_mean[last + 1 :] = bn.running_mean[last]
                bn.running_var[last + 1 :] = bn.running_var[last]
                bn.num_batches_tracked.clamp_(min=1)
    return model


def manual_bnlstm(model, x: Tensor, train: bool) -> tuple[Tensor, Tensor, Tensor]:
    """One-layer, one-direction BNLSTM over a full-length batch x (T, N, I), by hand.

    Cooijmans eq. 6-8 / Laurent eq. 17-18, gates (i, f, g, o). In eval mode the population
    statistics of row min(t, last) are used, last being the last row with a nonzero
    num_batches_tracked (max_length - 1 if there is none): steps past the longest sequence
    trained on reuse its last step's row (Cooijmans §3).
    """
    W_ih, W_hh = model.weight_ih_l0, model.weight_hh_l0
    b = model.bias_ih_l0 + model.bias_hh_l0
    T, N, _ = x.shape
    H = model.hidden_size
    h = x.new_zeros(N, H)
    c = x.new_zeros(N, H)
    outs = []

    def bn(name, z, t):
        m = getattr(model, f"bn_{name}_l0")
        if train:
            return manual_bn(z, m.weight, m.bias, m.eps)
        row = min(t, _last_tracked(m))
        return manual_bn(z, m.weight, m.bias, m.eps, m.running_mean[row], m.running_var[row])

    for t in range(T):
        wx = x[t] @ W_ih.T
        wh = h @ W_hh.T
        if model.norm == "cooijmans":
            a = bn("hh", wh, t) + bn("ih", wx, t) + b
        elif model.norm == "input":
            a = wh + bn("ih", wx, t) + b
        elif model.norm == "preactivation":
            a = bn("pre", wh + wx, t) + b
        else:
            a = wh + wx + b
        i, f, g, o = a.chunk(4, 1)
        c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
        c_out = bn("c", c, t) if model.norm == "cooijmans" else c
        h = torch.sigmoid(o) * torch.tanh(c_out)
        outs.append(h)
    return torch.stack(outs), h, c


def all_grads(module, *inputs) -> dict[str, Tensor]:
    """Gradients of every parameter and input, keyed by name."""
    out = {n: p.grad.clone() for n, p in module.named_parameters() if p.grad is not None}
    for k, t in enumerate(inputs):
        out[f"input{k}"] = t.grad.clone()
    return out


def eval_outputs(modules: dict, x: Tensor) -> dict[str, Tensor]:
    """The evaluation output of each module of a dict (keyed by class name: BNLSTM, BNRNN,
    BNLSTMCell, BNRNNCell, StepBatchNorm) on x (T, N, I), without gradients."""
    run = {
        "BNLSTM": lambda m: m(x)[0],
        "BNRNN": lambda m: m(x)[0],
        "BNLSTMCell": lambda m: m(x[0], t=2)[0],
        "BNRNNCell": lambda m: m(x[0], t=2),
        "StepBatchNorm": lambda m: m.frames(x, [x.shape[1]] * x.shape[0]),
    }
    with torch.no_grad():
        return {name: run[type(m).__name__](m.eval()) for name, m in modules.items()}


def forward_backward(
    model, x, train: bool, lengths=None, packed=False, time_offset=0, hx=None, input_grad=True
):
    """One forward and backward; returns outputs, states, gradients and buffers."""
    model.train(train)
    model.zero_grad(set_to_none=True)
    x = x.detach().clone().requires_grad_(input_grad)
    inp = x
    if packed:
        inp = pack_padded_sequence(x, lengths, enforce_sorted=False)
        out, state = model(inp, hx, time_offset=time_offset)
        out = out.data
    else:
        out, state = model(inp, hx, lengths=lengths, time_offset=time_offset)
    states = state if isinstance(state, tuple) else (state,)
    weights = torch.linspace(-1, 1, out.numel(), dtype=out.dtype).view_as(out)
    loss = (out * weights).sum()
    for k, s in enumerate(states):
        loss = loss + (s * (1.3 + k)).sum()
    loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    grads["input"] = x.grad
    buffers = {n: b.clone() for n, b in model.named_buffers()}
    return out.detach(), [s.detach() for s in states], grads, buffers


def manual_padded_reverse(
    model, x: Tensor, lengths: Tensor, train: bool
) -> tuple[Tensor, Tensor, Tensor, dict[str, list[tuple[Tensor, Tensor]]]]:
    """The backward direction of a one-layer bidirectional BNLSTM (norm="cooijmans") with
    reverse="padded", written out by hand (Cooijmans §5.4 and eq. 6-8): the padded batch
    x (T, N, I) flipped in time, so that the padding comes first; each row's state held at
    zero (its output zero) while its leading padding goes by; every BN of a step over all N
    rows, the padding's zero input included. input_stats="sequence": one mean and variance
    of W_ih x over the unpadded frames (Laurent eq. 20-21), applied to every frame. In eval
    mode, padded step t reads population row min(t, last tracked row) (Cooijmans §3).

    Returns y (T, N, H) in the input's time order, h_n, c_n (N, H), and in training the
    batch (mean, biased variance) of each BN ("ih", "hh", "c") at each step.
    """
    sfx = "_l0_reverse"
    W_ih, W_hh = getattr(model, "weight_ih" + sfx), getattr(model, "weight_hh" + sfx)
    b = getattr(model, "bias_ih" + sfx) + getattr(model, "bias_hh" + sfx)
    T, N, _ = x.shape
    H = model.hidden_size
    keep = torch.arange(T)[:, None] < lengths[None, :]  # (T, N) unpadded frames
    wx = torch.where(keep[..., None], x, 0) @ W_ih.T  # (T, N, 4H)
    stats: dict[str, list[tuple[Tensor, Tensor]]] = {"ih": [], "hh": [], "c": []}

    def bn(key, z, t):
        m = getattr(model, f"bn_{key}{sfx}")
        if train:
            mean, var = z.mean(0), z.var(0, unbiased=False)
            stats[key].append((mean.detach(), var.detach()))
        else:
            row = min(t, _last_tracked(m))
            mean, var = m.running_mean[row], m.running_var[row]
        return manual_bn(z, m.weight, m.bias, m.eps, mean, var)

    sequence = model.input_stats == "sequence"
    if sequence:
        m = getattr(model, "bn_ih" + sfx)
        if train:
            z = wx[keep]  # (sum of lengths, 4H)
            mean, var = z.mean(0), z.var(0, unbiased=False)
            stats["ih"].append((mean.detach(), var.detach()))
        else:
            mean, var = m.running_mean[0], m.running_var[0]
        wx = manual_bn(wx, m.weight, None, m.eps, mean, var)
    wx, keep = wx.flip(0), keep.flip(0)  # the padding now comes first
    h = x.new_zeros(N, H)
    c = x.new_zeros(N, H)
    outs = []
    for t in range(T):
        a = bn("hh", h @ W_hh.T, t) + (wx[t] if sequence else bn("ih", wx[t], t)) + b
        i, f, g, o = a.chunk(4, 1)
        c_new = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
        h_new = torch.sigmoid(o) * torch.tanh(bn("c", c_new, t))
        k = keep[t][:, None]
        h, c = torch.where(k, h_new, h), torch.where(k, c_new, c)  # not from padding
        outs.append(torch.where(k, h_new, 0))
    return torch.stack(outs).flip(0), h, c, stats
