"""The small models the experiments train: a GPT-style byte-level transformer and a small CNN."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["GPT", "GPT_SIZES", "GPTConfig", "SmallCNN", "count_parameters"]


@dataclass(frozen=True)
class GPTConfig:
    """A GPT-2-style decoder: learned positions, GELU MLP (4x), tied input/output embedding."""

    d_model: int
    n_layers: int
    n_heads: int
    context: int
    batch_size: int
    vocab_size: int = 256
    post_ln: bool = False  # True: the original Transformer's post-LN blocks (need lr warm-up)

    def describe(self) -> str:
        ln = "post-LN" if self.post_ln else "pre-LN"
        return (
            f"{self.n_layers} layers, d_model {self.d_model}, {self.n_heads} heads, context {self.context}, "
            f"{ln}, batch {self.batch_size} x {self.context} = {self.batch_size * self.context} "
            "bytes per step"
        )

    def to_dict(self) -> dict[str, object]:
        return asdict(self)


#: ``--size`` presets. ``tiny`` is for the tests (seconds); ``base`` is the demo's ~1.2M-parameter model.
GPT_SIZES: dict[str, GPTConfig] = {
    "tiny": GPTConfig(d_model=32, n_layers=1, n_heads=2, context=32, batch_size=4),
    "small": GPTConfig(d_model=96, n_layers=3, n_heads=4, context=64, batch_size=16),
    "base": GPTConfig(d_model=128, n_layers=6, n_heads=4, context=128, batch_size=16),
}


class _Block(nn.Module):
    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        d = cfg.d_model
        self.n_heads = cfg.n_heads
        self.post_ln = cfg.post_ln
        self.ln1 = nn.LayerNorm(d)
        self.ln2 = nn.LayerNorm(d)
        self.qkv = nn.Linear(d, 3 * d)
        self.proj = nn.Linear(d, d)
        self.fc = nn.Linear(d, 4 * d)
        self.fc_out = nn.Linear(4 * d, d)

    def _attention(self, x: Tensor) -> Tensor:
        b, t, c = x.shape
        q, k, v = self.qkv(x).split(c, dim=2)
        q, k, v = (z.view(b, t, self.n_heads, c // self.n_heads).transpose(1, 2) for z in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.proj(y.transpose(1, 2).reshape(b, t, c))

    def _mlp(self, x: Tensor) -> Tensor:
        return self.fc_out(F.gelu(self.fc(x)))

    def forward(self, x: Tensor) -> Tensor:
        if self.post_ln:
            x = self.ln1(x + self._attention(x))
            return self.ln2(x + self._mlp(x))
        x = x + self._attention(self.ln1(x))
        return x + self._mlp(self.ln2(x))


class GPT(nn.Module):
    """Byte-level causal language model; ``forward(idx) -> logits`` of shape (B, T, vocab)."""

    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.tok = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.pos = nn.Embedding(cfg.context, cfg.d_model)
        self.blocks = nn.ModuleList(_Block(cfg) for _ in range(cfg.n_layers))
        self.ln_f = nn.Identity() if cfg.post_ln else nn.LayerNorm(cfg.d_model)
        self.head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        self.head.weight = self.tok.weight  # tied
        self.apply(self._init)
        for block in self.blocks:  # GPT-2's scaled init of the residual projections
            for lin in (block.proj, block.fc_out):
                nn.init.normal_(lin.weight, std=0.02 / math.sqrt(2 * cfg.n_layers))

    @staticmethod
    def _init(m: nn.Module) -> None:
        if isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Embedding):
            nn.init.normal_(m.weight, std=0.02)

    def forward(self, idx: Tensor) -> Tensor:
        t = idx.shape[1]
        x = self.tok(idx) + self.pos(torch.arange(t, device=idx.device))
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln_f(x))

    def loss(self, idx: Tensor) -> Tensor:
        """Mean next-byte cross-entropy (nats) of a (B, T+1) batch of byte windows."""
        logits = self(idx[:, :-1])
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), idx[:, 1:].reshape(-1))


class SmallCNN(nn.Module):
    """conv(1->c)-ReLU-pool, conv(c->2c)-ReLU-pool, linear: a few tens of thousands of parameters."""

    def __init__(self, channels: int = 16, n_classes: int = 10) -> None:
        super().__init__()
        c = channels
        self.features = nn.Sequential(
            nn.Conv2d(1, c, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(c, 2 * c, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
        )
        self.classifier = nn.Linear(2 * c * 7 * 7, n_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.features(x).flatten(1))


def count_parameters(model: nn.Module) -> int:
    """Number of distinct trainable parameters (a tied weight counts once)."""
    seen: set[int] = set()
    total = 0
    for p in model.parameters():
        if p.requires_grad and id(p) not in seen:
            seen.add(id(p))
            total += p.numel()
    return total
