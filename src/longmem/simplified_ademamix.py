"""Simplified AdEMAMix: one momentum kept as a sum (not an EMA), mixed with the raw gradient.

Morwani, Shapira, Vyas, Malach, Kakade, Janson, "Connections between Schedule-Free Optimizers,
AdEMAMix, and Accelerated SGD Variants", 2025, https://arxiv.org/abs/2502.02431
(authors' code: DepenM/Simplified-AdEMAMix). For step ``t`` (1-based)::

    beta1_t = exp(1 / ((1 - s) / ln(min_beta1 + 1e-8) + s / ln(beta1 + 1e-8))),  s = min(t / T_beta1, 1)
    m  = beta1_t * m + g                       (a sum, no (1 - beta1) factor)
    nu = beta2 * nu + (1 - beta2) * g^2
    p  = p - lr * ((alpha * g + m) / (sqrt(nu / (1 - beta2^t)) + eps) + wd * p)

``bias_correction1=True`` divides the update by ``W_t = beta1_t * W_{t-1} + 1``, the sum of the
momentum's weights; ``bias_correction2=False`` drops the factor ``sqrt(1 - beta2^t)`` from the update
but, as the authors' code, keeps eps scaled by it: ``(alpha * g + m) / (sqrt(nu) + eps * sqrt(1 - beta2^t))``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from functools import partial
from typing import Any, ClassVar

import torch
from torch import Tensor

from . import _rounding, _scalars
from . import _validation as check
from ._base import LongMemOptimizer, ParamsT
from ._elementwise import default_foreach, mutable, run_rule
from .schedules import beta_halflife_schedule

__all__ = ["SimplifiedAdEMAMix", "simplified_ademamix"]


#: The authors' schedule evaluates ln(beta + 1e-8); the test vector of docs/algorithms.md follows it.
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
    t: Any,
    p: Any,
    g: Any,
    exp_avg: Any,
    exp_avg_sq: Any,
    *,
    lr: Any,
    beta1: float,
    beta2: float,
    alpha: float,
    beta1_warmup: float | None,
    min_beta1: float,
    eps: float,
    weight_decay: float,
    bias_correction1: bool,
    bias_correction2: bool,
    weight_sum: Any,
) -> None:
    """One step at ``t``; ``weight_sum`` is W_t (this step's ``num_sum``)."""
    ops.mul_(exp_avg, beta_halflife_schedule(t, min_beta1, beta1, beta1_warmup, log_eps=AUTHORS_LOG_EPS))
    ops.add_(exp_avg, g)
    ops.mul_(exp_avg_sq, beta2)
    ops.addcmul_(exp_avg_sq, g, g, value=1.0 - beta2)

    # The authors' denominator is sqrt(nu) + eps * sqrt(1 - beta2^t) in both modes (their
    # den_sum is 1 - beta2^t); bias_correction2 multiplies the update by c = sqrt(1 - beta2^t):
    #   (alpha * g + m) / d * (c if bias_correction2 else 1) / (W if bias_correction1 else 1),
    # d = sqrt(nu) + eps * c, as two addcdivs with the scale folded in (the foreach path then makes
    # few passes and allocates one temporary); and the decoupled decay p - lr * wd * p as one product.
    c = _scalars.sqrt(1.0 - beta2**t)
    scale = lr * c if bias_correction2 else lr
    if bias_correction1:
        scale = scale / weight_sum
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
    # W_t = beta1_t * W_{t-1} + 1 is kept in float64 state; the rule takes this step's value. In
    # eager mode the parameters are stepped together per distinct step count (one group, as a
    # rule); under torch.compile each one with its own W_t tensor (no value is read back).
    compiling = torch.compiler.is_compiling()
    batches: list[tuple[Any, list[int]]] = []  # (W_t, indices of the parameters at it)
    if compiling:
        for i, (step, num_sum) in enumerate(zip(state_steps, num_sums, strict=True)):
            t = _scalars.step_scalar(step) + 1
            beta1_t = beta_halflife_schedule(t, min_beta1, beta1, beta1_warmup, log_eps=AUTHORS_LOG_EPS)
            mutable(num_sum).mul_(beta1_t).add_(1.0)  # a float64 0-d tensor: see mutable
            batches.append((num_sum, [i]))
    elif num_sums:
        # two multi-tensor calls instead of two tiny operations per parameter (the same products
        # and sums): on a small model those were most of a fused step's fixed cost
        ts = [step.item() + 1 for step in state_steps]
        by_t = {
            t: beta_halflife_schedule(t, min_beta1, beta1, beta1_warmup, log_eps=AUTHORS_LOG_EPS) for t in ts
        }
        sums = list(num_sums)
        torch._foreach_mul_(sums, [by_t[t] for t in ts])
        torch._foreach_add_(sums, 1.0)
        seen: dict[tuple[float, float], list[int]] = {}
        for i, (t, num_sum) in enumerate(zip(ts, sums, strict=True)):
            key = (t, num_sum.item())
            if key not in seen:
                seen[key] = []
                batches.append((key[1], seen[key]))
            seen[key].append(i)
    rule = partial(
        _simplified_ademamix_rule,
        lr=_scalars.learning_rate(lr),
        beta1=beta1,
        beta2=beta2,
        alpha=alpha,
        beta1_warmup=beta1_warmup,
        min_beta1=min_beta1,
        eps=eps,
        weight_decay=weight_decay,
        bias_correction1=bias_correction1,
        bias_correction2=bias_correction2,
    )
    for weight_sum, members in batches:
        streams = rounding_streams
        if len(members) == len(params):
            ps, gs, ms, nus, steps = params, grads, exp_avgs, exp_avg_sqs, state_steps
        else:
            ps, gs, ms, nus, steps = (
                [xs[i] for i in members] for xs in (params, grads, exp_avgs, exp_avg_sqs, state_steps)
            )
            if streams is not None:
                streams = [streams[i] for i in members]
        run_rule(
            partial(rule, weight_sum=weight_sum),
            ps,
            gs,
            {"exp_avg": ms, "exp_avg_sq": nus},
            steps,
            foreach=default_foreach(ps) if foreach is None else foreach,
            maximize=maximize,
            fused=bool(fused),
            param_rounding=param_rounding,
            rounding_streams=streams,
        )
