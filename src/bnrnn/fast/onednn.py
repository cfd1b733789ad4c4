"""The large GEMMs of the fast path outside the loops, through oneDNN's matmul where it is
available: the input GEMM over all steps (W_ih x), dx, and the weight gradients."""

from __future__ import annotations

import torch
from torch import Tensor


def _onednn_linear() -> bool:
    try:
        return torch.backends.mkldnn.is_available() and bool(torch.ops.mkldnn._linear_pointwise)
    except (AttributeError, RuntimeError):
        return False


_ONEDNN_LINEAR = _onednn_linear()


def onednn(a: Tensor) -> bool:
    """float32 on the CPU with oneDNN's matmul available and enabled
    (``torch.backends.mkldnn.enabled``)."""
    cpu32 = a.dtype == torch.float32 and a.device.type == "cpu"
    return _ONEDNN_LINEAR and cpu32 and torch._C._get_mkldnn_enabled()


def linear(a: Tensor, w: Tensor) -> Tensor:
    """a @ w.t() for the large input GEMMs over all steps, through oneDNN's matmul (the
    GEMM nn.LSTM uses) where `onednn`: faster than torch.mm (MKL) on these shapes."""
    if onednn(a):
        return torch.ops.mkldnn._linear_pointwise(a, w, None, "none", [], "")
    return torch.mm(a, w.t())


def add_weight_grad(out_t: Tensor, a: Tensor, d: Tensor) -> None:
    """out_t (P, G) += a^T @ d for a (R, P) and d (R, G): a weight gradient accumulated
    transposed, dW^T = sum over rows of a_r d_r^T. oneDNN computes a^T @ d (a^T copied
    contiguous, d^T a view) at well above torch.mm's rate on these shapes, where the
    untransposed dW = d^T @ a ran at torch.mm's."""
    if onednn(a):
        # a^T made contiguous here: handed the transposed view, the call took longer than
        # this copy and the call together
        a_t = a.t().contiguous()
        out_t.add_(torch.ops.mkldnn._linear_pointwise(a_t, d.t(), None, "none", [], ""))
    else:
        out_t.addmm_(a.t(), d)
