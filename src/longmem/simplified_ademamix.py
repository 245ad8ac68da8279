"""Simplified AdEMAMix: one momentum kept as a sum (not an EMA), mixed with the raw gradient.

Morwani, Shapira, Vyas, Malach, Kakade, Janson, "Connections between Schedule-Free Optimizers,
AdEMAMix, and Accelerated SGD Variants", 2025, https://arxiv.org/abs/2502.02431
(authors' code: DepenM/Simplified-AdEMAMix). For step ``t`` (1-based)::

    beta1_t = exp(1 / ((1 - s) / ln(min_beta1 + 1e-8) + s / ln(beta1 + 1e-8))),  s = min(t / T_beta1, 1)
    m  = beta1_t * m + g                       (a sum, no (1 - beta1) factor)
    nu = beta2 * nu + (1 - beta2) * g^2
    p  = p - lr * ((alpha * g + m) / (sqrt(nu / (1 - beta2^t)) + eps) + wd * p)

``bias_correction1=True`` divides the first term by ``W_t = beta1_t * W_{t-1} + 1``, the sum of the
momentum's weights; ``bias_correction2=False`` uses ``sqrt(nu) + eps`` (the authors' code then scales
eps by ``sqrt(1 - beta2^t)``; the two differ only while ``sqrt(nu)`` is near eps in the first steps).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from functools import partial
from typing import Any, ClassVar

import torch
from torch import Tensor

from . import _rounding
from . import _validation as check
from ._base import LongMemOptimizer, ParamsT
from ._elementwise import default_foreach, run_rule
from .schedules import beta_halflife_schedule

__all__ = ["SimplifiedAdEMAMix", "simplified_ademamix"]


#: The authors' schedule evaluates ln(beta + 1e-8); SPEC.md's vector follows it.
AUTHORS_LOG_EPS = 1e-8


def _new_weight_sum() -> Tensor:
    return torch.zeros((), dtype=torch.float64)


class SimplifiedAdEMAMix(LongMemOptimizer):
    """Simplified AdEMAMix (arXiv:2502.02431).

    Args:
        params: parameters or parameter groups to optimize.
        lr: learning rate (a float or a 0-d tensor). The momentum is a sum, so lr and beta1 are
            coupled: a larger beta1 wants a smaller lr (default 1e-4).
        betas: ``(beta1, beta2)``.
        alpha: weight of the current gradient beside the momentum.
        beta1_warmup: steps over which beta1's half-life grows from ``min_beta1``'s to beta1's
            (None: beta1 from the start). The authors set it to the total number of steps.
        min_beta1: beta1 at the start of the warm-up.
        eps: added to the (bias-corrected) ``sqrt(nu)``.
        weight_decay: decoupled weight decay, ``p -= lr * weight_decay * p``.
        bias_correction1: divide the momentum term by the sum of its weights.
        bias_correction2: bias-correct the second moment.
        {common_args}

    State per parameter: ``step``, ``exp_avg`` (m), ``exp_avg_sq`` (nu), ``num_sum`` (W_t, float64).
    """

    _buffers = ("exp_avg", "exp_avg_sq")
    _scalars: ClassVar[dict[str, Callable[[], Tensor]]] = {"num_sum": _new_weight_sum}

    def __init__(
        self,
        params: ParamsT,
        lr: float | Tensor = 1e-4,
        betas: tuple[float, float] = (0.99, 0.95),
        alpha: float = 0.0,
        beta1_warmup: int | None = None,
        min_beta1: float = 0.9,
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        bias_correction1: bool = False,
        bias_correction2: bool = True,
        *,
        foreach: bool | None = None,
        maximize: bool = False,
        fused: bool | None = None,
        nonfinite: str = "ignore",
        state_precision: str = "fp32",
        param_rounding: str = "nearest",
    ) -> None:
        defaults = dict(
            lr=lr,
            betas=betas,
            alpha=alpha,
            beta1_warmup=beta1_warmup,
            min_beta1=min_beta1,
            eps=eps,
            weight_decay=weight_decay,
            bias_correction1=bias_correction1,
            bias_correction2=bias_correction2,
            foreach=foreach,
            maximize=maximize,
            fused=fused,
            nonfinite=nonfinite,
            state_precision=state_precision,
            param_rounding=param_rounding,
        )
        super().__init__(params, defaults)

    def _validate_group(self, group: dict[str, Any]) -> None:
        check.check_common(group, 2)
        check.check_nonnegative("alpha", group["alpha"])
        check.check_warmup("beta1_warmup", group["beta1_warmup"])
        check.check_beta("min_beta1", group["min_beta1"])
        check.check_bool("bias_correction1", group["bias_correction1"])
        check.check_bool("bias_correction2", group["bias_correction2"])

    def _update_group(
        self,
        group: dict[str, Any],
        params: list[Tensor],
        grads: list[Tensor],
        state: dict[str, Any],
        steps: list[Tensor],
        foreach: bool,
        fused: bool,
    ) -> None:
        beta1, beta2 = group["betas"]
        simplified_ademamix(
            params,
            grads,
            state["exp_avg"],
            state["exp_avg_sq"],
            state["num_sum"],
            steps,
            foreach=foreach,
            fused=fused,
            lr=group["lr"],
            beta1=beta1,
            beta2=beta2,
            alpha=group["alpha"],
            beta1_warmup=group["beta1_warmup"],
            min_beta1=group["min_beta1"],
            eps=group["eps"],
            weight_decay=group["weight_decay"],
            bias_correction1=group["bias_correction1"],
            bias_correction2=group["bias_correction2"],
            maximize=group["maximize"],
            param_rounding=group["param_rounding"],
            rounding_streams=_rounding.streams_for(self, group, params),
        )


def _simplified_ademamix_rule(
    ops: Any,
    t: float,
    p: Any,
    g: Any,
    exp_avg: Any,
    exp_avg_sq: Any,
    *,
    lr: float,
    beta1: float,
    beta2: float,
    alpha: float,
    beta1_warmup: int | None,
    min_beta1: float,
    eps: float,
    weight_decay: float,
    bias_correction1: bool,
    bias_correction2: bool,
    weight_sums: dict[float, float],
) -> None:
    ops.mul_(exp_avg, beta_halflife_schedule(t, min_beta1, beta1, beta1_warmup, log_eps=AUTHORS_LOG_EPS))
    ops.add_(exp_avg, g)
    ops.mul_(exp_avg_sq, beta2)
    ops.addcmul_(exp_avg_sq, g, g, value=1.0 - beta2)

    # The update, rearranged exactly so that the foreach path makes few passes and allocates one
    # temporary: with c = sqrt(1 - beta2^t) (1 without bias_correction2) and W = W_t (1 without
    # bias_correction1),
    #   (alpha * g + m) / (sqrt(nu) / c + eps) / W = (c / W) * m / d + (c / W) * alpha * g / d,
    # d = sqrt(nu) + eps * c; and the decoupled decay p - lr * wd * p as one product.
    c = math.sqrt(1.0 - beta2**t) if bias_correction2 else 1.0
    scale = lr * c / weight_sums[t] if bias_correction1 else lr * c
    denom = ops.sqrt(exp_avg_sq)
    ops.add_scalar_(denom, eps * c)
    if weight_decay != 0.0:
        ops.mul_(p, 1.0 - lr * weight_decay)
    ops.addcdiv_(p, exp_avg, denom, value=-scale)
    if alpha != 0.0:
        ops.addcdiv_(p, g, denom, value=-scale * alpha)


def simplified_ademamix(
    params: Sequence[Tensor],
    grads: Sequence[Tensor],
    exp_avgs: Sequence[Tensor],
    exp_avg_sqs: Sequence[Tensor],
    num_sums: Sequence[Tensor],
    state_steps: Sequence[Tensor],
    *,
    foreach: bool | None = None,
    fused: bool | None = None,
    lr: float | Tensor,
    beta1: float,
    beta2: float,
    alpha: float,
    beta1_warmup: int | None,
    min_beta1: float,
    eps: float,
    weight_decay: float,
    bias_correction1: bool,
    bias_correction2: bool,
    maximize: bool = False,
    param_rounding: str = "nearest",
    rounding_streams: Sequence[int] | None = None,
) -> None:
    """Functional Simplified AdEMAMix step (see :class:`SimplifiedAdEMAMix`)."""
    # W_t depends on t alone, so tensors that share a step share it: keep one value per step.
    weight_sums: dict[float, float] = {}
    for step, num_sum in zip(state_steps, num_sums, strict=True):
        t = step.item() + 1
        beta1_t = beta_halflife_schedule(t, min_beta1, beta1, beta1_warmup, log_eps=AUTHORS_LOG_EPS)
        num_sum.mul_(beta1_t).add_(1.0)
        weight_sums[t] = num_sum.item()
    rule = partial(
        _simplified_ademamix_rule,
        lr=float(lr),
        beta1=beta1,
        beta2=beta2,
        alpha=alpha,
        beta1_warmup=beta1_warmup,
        min_beta1=min_beta1,
        eps=eps,
        weight_decay=weight_decay,
        bias_correction1=bias_correction1,
        bias_correction2=bias_correction2,
        weight_sums=weight_sums,
    )
    run_rule(
        rule,
        params,
        grads,
        {"exp_avg": exp_avgs, "exp_avg_sq": exp_avg_sqs},
        state_steps,
        foreach=default_foreach(params) if foreach is None else foreach,
        maximize=maximize,
        fused=bool(fused),
        param_rounding=param_rounding,
        rounding_streams=rounding_streams,
    )
