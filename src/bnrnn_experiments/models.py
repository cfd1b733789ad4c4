"""Models of the experiments: the recurrent layer (`torch.nn.LSTM` or `bnrnn.BNLSTM`) inside
a sequence classifier (sequential MNIST) or a language model (characters, words).

All tensors are time-major: inputs (T, N, I), tokens (T, N).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import bnrnn
from bnrnn.init import init_direction

from .config import Config

State = tuple[Tensor, Tensor]


class BaselineLSTM(nn.LSTM):
    """`torch.nn.LSTM` itself (its fused kernels and parameter names), plus the options the
    BN models have that make sense without normalisation, so that the baseline gets the same
    initialisation as the BN-LSTM: ``weight_init`` (bnrnn's schemes), ``forget_bias``,
    ``learn_init`` (h0, c0 of shape (L, H)) and ``init_noise``. ``time_offset`` is accepted
    and ignored (there are no per-step statistics).
    """

    def __init__(
        self,
        input_size: int,
        hidden_size: int,
        num_layers: int = 1,
        dropout: float = 0.0,
        weight_init: str = "uniform",
        forget_bias: float = 0.0,
        learn_init: bool = False,
        init_noise: float = 0.0,
    ) -> None:
        self.weight_init = weight_init
        self.forget_bias = forget_bias
        super().__init__(input_size, hidden_size, num_layers, dropout=dropout)
        self.init_noise = init_noise
        if learn_init:
            self.h0 = nn.Parameter(torch.zeros(num_layers, hidden_size))
            self.c0 = nn.Parameter(torch.zeros(num_layers, hidden_size))
        else:
            self.register_parameter("h0", None)
            self.register_parameter("c0", None)

    def reset_parameters(self) -> None:
        super().reset_parameters()  # U(-1/sqrt(H), 1/sqrt(H)), as nn.LSTM
        scheme = getattr(self, "weight_init", "uniform")
        for k in range(self.num_layers):
            p = [
                getattr(self, f"{n}_l{k}") for n in ("weight_ih", "weight_hh", "bias_ih", "bias_hh")
            ]
            init_direction(*p, scheme, 4, getattr(self, "forget_bias", 0.0))

    def forward(self, input: Tensor, hx: State | None = None, time_offset: int = 0):  # type: ignore[override]
        if hx is None and (self.h0 is not None or (self.training and self.init_noise > 0)):
            shape = (self.num_layers, input.shape[1], self.hidden_size)
            h = input.new_zeros(shape) if self.h0 is None else self.h0[:, None].expand(shape)
            c = input.new_zeros(shape) if self.c0 is None else self.c0[:, None].expand(shape)
            if self.training and self.init_noise > 0:
                # Cooijmans §5.1: Gaussian noise on the initial hidden state.
                h = h + self.init_noise * torch.randn_like(h)
            hx = (h.contiguous(), c.contiguous())
        return super().forward(input, hx)


def make_rnn(cfg: Config, input_size: int) -> nn.Module:
    """The recurrent layer of ``cfg.model``: `BaselineLSTM` for "lstm", else `bnrnn.BNLSTM`."""
    if cfg.norm is None:
        return BaselineLSTM(
            input_size,
            cfg.hidden_size,
            cfg.num_layers,
            dropout=cfg.dropout if cfg.num_layers > 1 else 0.0,
            weight_init=cfg.weight_init,
            forget_bias=cfg.forget_bias,
            learn_init=cfg.learn_init,
            init_noise=cfg.init_noise,
        )
    return bnrnn.BNLSTM(
        input_size,
        cfg.hidden_size,
        cfg.num_layers,
        dropout=cfg.dropout if cfg.num_layers > 1 else 0.0,
        norm=cfg.norm,
        input_stats=cfg.input_stats,
        max_length=cfg.bn_max_length,
        momentum=cfg.momentum,
        eps=cfg.eps,
        gamma_init=cfg.gamma_init,
        forget_bias=cfg.forget_bias,
        learn_init=cfg.learn_init,
        init_noise=cfg.init_noise,
        weight_init=cfg.weight_init,
    )


def _init_head(linear: nn.Linear, weight_init: str) -> None:
    # Cooijmans §5: "orthogonal initialization for all weight matrices".
    if weight_init != "uniform":
        nn.init.orthogonal_(linear.weight)
        nn.init.zeros_(linear.bias)


def uniform_init_(model: nn.Module, init_range: float) -> None:
    """Every parameter ~ U(-r, r) except the BN scales and shifts and the learned initial
    states (Zaremba et al. 2014, used by Laurent §5.2); the BN (and LN) gamma keeps its
    ``gamma_init``, h0 and c0 stay zero."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.startswith(("bn_", "ln_")) or ".bn_" in name or ".ln_" in name:
                continue
            if name.endswith(("h0", "c0")):
                continue
            p.uniform_(-init_range, init_range)


class SequenceClassifier(nn.Module):
    """Reads a sequence, classifies from the last hidden state (Cooijmans §5.1).

    forward(x (T, N, I)) -> logits (N, C).
    """

    def __init__(self, rnn: nn.Module, hidden_size: int, num_classes: int, weight_init: str):
        super().__init__()
        self.rnn = rnn
        self.head = nn.Linear(hidden_size, num_classes)
        _init_head(self.head, weight_init)

    def forward(self, x: Tensor) -> Tensor:
        out, _ = self.rnn(x)  # (T, N, H)
        return self.head(out[-1])  # (N, C)


class LanguageModel(nn.Module):
    """Next-token prediction with a softmax on the hidden state.

    Inputs are one-hot vectors (``embed_size=0``, the character models) or embeddings.
    Dropout (Zaremba et al.) on the embeddings and on the top layer's output; the recurrent
    layer applies it between layers. forward(tokens (T, N), hx, time_offset) ->
    (logits (T, N, V), (h_n, c_n)).
    """

    def __init__(
        self,
        rnn: nn.Module,
        vocab_size: int,
        embed_size: int,
        hidden_size: int,
        dropout: float,
        weight_init: str,
    ) -> None:
        super().__init__()
        self.vocab_size = vocab_size
        self.embed = nn.Embedding(vocab_size, embed_size) if embed_size > 0 else None
        self.rnn = rnn
        self.drop = nn.Dropout(dropout)
        self.decoder = nn.Linear(hidden_size, vocab_size)
        _init_head(self.decoder, weight_init)

    def forward(
        self, tokens: Tensor, hx: State | None = None, time_offset: int = 0
    ) -> tuple[Tensor, State]:
        if self.embed is None:
            x = F.one_hot(tokens, self.vocab_size).float()  # (T, N, V)
        else:
            x = self.drop(self.embed(tokens))  # (T, N, E)
        out, hx = self.rnn(x, hx, time_offset=time_offset)  # (T, N, H)
        return self.decoder(self.drop(out)), hx  # (T, N, V)


def build_classifier(cfg: Config, input_size: int, num_classes: int) -> SequenceClassifier:
    model = SequenceClassifier(
        make_rnn(cfg, input_size), cfg.hidden_size, num_classes, cfg.weight_init
    )
    if cfg.init_range > 0:
        uniform_init_(model, cfg.init_range)
    return model


def build_language_model(cfg: Config, vocab_size: int, one_hot: bool) -> LanguageModel:
    embed = 0 if one_hot and cfg.embed_size == 0 else (cfg.embed_size or cfg.hidden_size)
    rnn = make_rnn(cfg, embed or vocab_size)
    model = LanguageModel(rnn, vocab_size, embed, cfg.hidden_size, cfg.dropout, cfg.weight_init)
    if cfg.init_range > 0:
        uniform_init_(model, cfg.init_range)
    return model


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
