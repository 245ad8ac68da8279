"""The optimizers the experiments compare, at their papers' settings, and the shared lr schedule.

Every optimizer gets the same learning-rate schedule (linear warm-up, then cosine decay to 10% of the
peak), the same peak lr (SGD with momentum gets 100x the adaptive methods' lr, as in AdaMod's paper:
0.1 against 1e-3; Simplified AdEMAMix, whose momentum is a sum, gets its authors' rescaling), the same
weight decay and the same gradient
clipping. Nothing is tuned per optimizer.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor
from torch.optim import Optimizer

import longmem

__all__ = [
    "OPTIMIZERS",
    "OptimizerInfo",
    "ademamix_beta3_for",
    "lr_at",
    "lr_setting",
    "make_optimizer",
    "optimizer_label",
]

#: The paper's guidance: beta3 = 0.9999, but 0.999 for runs of about 64k steps or fewer.
SHORT_RUN_STEPS = 64_000
SGD_LR_FACTOR = 100.0  # SGD's lr relative to the adaptive methods' (AdaMod paper: 0.1 vs 1e-3)
SIMPLIFIED_LR_FACTOR = math.sqrt((1 - 0.9) * (1 - 0.99))  # Simplified AdEMAMix's authors' advice


def ademamix_beta3_for(total_steps: int) -> float:
    """AdEMAMix's beta3 by the paper's guidance: 0.999 for runs of <= ~64k steps, else 0.9999."""
    return 0.999 if total_steps <= SHORT_RUN_STEPS else 0.9999


@dataclass(frozen=True)
class OptimizerInfo:
    """One entry of :data:`OPTIMIZERS`."""

    key: str
    label: str
    color: str
    build: Callable[[list[Tensor], float, int, float, dict[str, Any]], Optimizer]
    describe: Callable[[float, int, float, dict[str, Any]], str]
    #: this optimizer's peak lr is ``lr_scale`` times the shared (Adam-family) lr
    lr_scale: float = 1.0
    #: why, when ``lr_scale`` is not 1 (for the reports)
    lr_reason: str = ""


def _adamw(params: list[Tensor], lr: float, total: int, wd: float, kw: dict[str, Any]) -> Optimizer:
    return torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=wd, foreach=False)


def _adam(params: list[Tensor], lr: float, total: int, wd: float, kw: dict[str, Any]) -> Optimizer:
    return torch.optim.Adam(params, lr=lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, foreach=False)


def _ademamix_kwargs(total: int, kw: dict[str, Any]) -> dict[str, Any]:
    beta3 = kw.get("beta3") or ademamix_beta3_for(total)
    schedulers = kw.get("schedulers", True)
    return {
        "betas": (0.9, 0.999, beta3),
        "alpha": kw.get("alpha") or 8.0,
        "alpha_warmup": total if schedulers else None,
        "beta3_warmup": total if schedulers else None,
    }


def _ademamix(params: list[Tensor], lr: float, total: int, wd: float, kw: dict[str, Any]) -> Optimizer:
    return longmem.AdEMAMix(params, lr=lr, eps=1e-8, weight_decay=wd, **_ademamix_kwargs(total, kw))


def _describe_ademamix(lr: float, total: int, wd: float, kw: dict[str, Any]) -> str:
    a = _ademamix_kwargs(total, kw)
    sched = (
        f"alpha_warmup = beta3_warmup = {total} (total steps)"
        if a["alpha_warmup"]
        else "no alpha/beta3 schedulers"
    )
    return f"betas {a['betas']}, alpha {a['alpha']:g}, {sched}, eps 1e-8, weight decay {wd:g} (decoupled)"


def _adamod(params: list[Tensor], lr: float, total: int, wd: float, kw: dict[str, Any]) -> Optimizer:
    return longmem.AdaMod(params, lr=lr, betas=(0.9, 0.999), beta3=0.999, eps=1e-8, weight_decay=wd)


def _sgd(params: list[Tensor], lr: float, total: int, wd: float, kw: dict[str, Any]) -> Optimizer:
    return torch.optim.SGD(params, lr=lr, momentum=0.9, weight_decay=0.0, foreach=False)


def _diffgrad(params: list[Tensor], lr: float, total: int, wd: float, kw: dict[str, Any]) -> Optimizer:
    return longmem.DiffGrad(params, lr=lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)


def _diffmod(params: list[Tensor], lr: float, total: int, wd: float, kw: dict[str, Any]) -> Optimizer:
    return longmem.DiffMod(params, lr=lr, betas=(0.9, 0.999), len_memory=1000, eps=1e-8, weight_decay=wd)


def _simplified(params: list[Tensor], lr: float, total: int, wd: float, kw: dict[str, Any]) -> Optimizer:
    return longmem.SimplifiedAdEMAMix(
        params, lr=lr, betas=(0.99, 0.95), alpha=0.0, beta1_warmup=total, min_beta1=0.9, weight_decay=wd
    )


def _const(text: str) -> Callable[[float, int, float, dict[str, Any]], str]:
    def describe(lr: float, total: int, wd: float, kw: dict[str, Any]) -> str:
        return text.format(wd=wd, total=total, lr=lr)

    return describe


OPTIMIZERS: dict[str, OptimizerInfo] = {
    info.key: info
    for info in [
        OptimizerInfo(
            "adamw",
            "AdamW",
            "#1f77b4",
            _adamw,
            _const("torch.optim.AdamW, betas (0.9, 0.999), eps 1e-8, weight decay {wd:g} (decoupled)"),
        ),
        OptimizerInfo(
            "adam",
            "Adam",
            "#17becf",
            _adam,
            _const("torch.optim.Adam, betas (0.9, 0.999), eps 1e-8, no weight decay"),
        ),
        OptimizerInfo("ademamix", "AdEMAMix", "#d62728", _ademamix, _describe_ademamix),
        OptimizerInfo(
            "adamod",
            "AdaMod",
            "#2ca02c",
            _adamod,
            _const(
                "betas (0.9, 0.999), beta3 0.999 (authors' code), eps 1e-8, weight decay {wd:g} (decoupled)"
            ),
        ),
        OptimizerInfo(
            "sgd",
            "SGD+momentum",
            "#7f7f7f",
            _sgd,
            _const("torch.optim.SGD, momentum 0.9, no weight decay"),
            lr_scale=SGD_LR_FACTOR,
            lr_reason="as in AdaMod's paper: 0.1 against 1e-3",
        ),
        OptimizerInfo(
            "diffgrad",
            "diffGrad",
            "#9467bd",
            _diffgrad,
            _const("betas (0.9, 0.999), eps 1e-8, no weight decay"),
        ),
        OptimizerInfo(
            "diffmod",
            "DiffMod",
            "#8c564b",
            _diffmod,
            _const("betas (0.9, 0.999), len_memory 1000, eps 1e-8, weight decay {wd:g} (decoupled)"),
        ),
        OptimizerInfo(
            "simplified-ademamix",
            "Simplified AdEMAMix",
            "#ff7f0e",
            _simplified,
            _const(
                "betas (0.99, 0.95), alpha 0, beta1 warm-up from 0.9 over {total} steps, weight decay {wd:g}"
            ),
            lr_scale=SIMPLIFIED_LR_FACTOR,
            lr_reason="sqrt((1 - 0.9)(1 - 0.99)), as its authors advise: its momentum is a sum",
        ),
    ]
}


def lr_setting(key: str, shared_lr: float, scale: float | None = None, reason: str = "") -> str:
    """``'peak lr 0.002'``, or for a scaled one ``'peak lr 0.2 (100x the shared 0.002, as in ...)'``.

    ``scale``/``reason``: an experiment's own lr scale for this optimizer (default: its ``lr_scale``)."""
    info = OPTIMIZERS[key]
    scale = info.lr_scale if scale is None else scale
    text = f"peak lr {shared_lr * scale:.3g}"
    if scale != 1.0:
        text += f" ({scale:.3g}x the shared {shared_lr:g}, {reason or info.lr_reason})"
    return text


def optimizer_label(key: str) -> str:
    return OPTIMIZERS[key].label if key in OPTIMIZERS else key


def make_optimizer(
    key: str,
    params: Iterable[Tensor],
    *,
    lr: float,
    total_steps: int,
    weight_decay: float = 0.0,
    options: dict[str, Any] | None = None,
) -> Optimizer:
    """Build optimizer ``key`` at its papers' settings with peak ``lr`` (already multiplied by the
    optimizer's ``lr_scale``)."""
    if key not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer {key!r}; choose from {', '.join(OPTIMIZERS)}")
    return OPTIMIZERS[key].build(list(params), lr, total_steps, weight_decay, dict(options or {}))


def lr_at(step: int, *, peak: float, total: int, warmup: int, final_fraction: float = 0.1) -> float:
    """The lr for 0-based ``step``: linear warm-up over the first ``warmup`` steps (``peak * (step + 1) /
    (warmup + 1)``), then cosine decay from ``peak`` at step ``warmup`` to ``final_fraction * peak`` at the
    last step."""
    if warmup > 0 and step < warmup:
        return peak * (step + 1) / (warmup + 1)
    span = max(total - warmup - 1, 1)
    progress = min(max((step - warmup) / span, 0.0), 1.0)
    return peak * (final_fraction + (1.0 - final_fraction) * 0.5 * (1.0 + math.cos(math.pi * progress)))
