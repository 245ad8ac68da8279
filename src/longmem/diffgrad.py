"""diffGrad: Adam whose first moment is scaled by a friction from the change in the gradient.

Dubey, Chakraborty, Roy, Mukherjee, Singh, Chaudhuri, "diffGrad: An Optimization Method for
Convolutional Neural Networks", IEEE TNNLS 2019, https://arxiv.org/abs/1909.11015
(authors' code: shivram1987/diffGrad, diffGrad_v2.py). For step ``t`` (1-based)::

    g  = g + wd * p                            (L2 weight decay, added to the gradient)
    xi = sigmoid(|g_prev - g|)                 (in [0.5, 1); g_prev starts at zero)
    m  = beta1 * m + (1 - beta1) * g
    v  = beta2 * v + (1 - beta2) * g^2
    p  = p - lr * sqrt(1 - beta2^t) / (1 - beta1^t) * xi * m / (sqrt(v) + eps)

The previous gradient is a copy, never an alias of the current one (the authors' first version
aliased it, which pinned xi at 0.5).
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial
from typing import Any

from torch import Tensor

from . import _rounding, _scalars
from . import _validation as check
from ._base import LongMemOptimizer, ParamsT
from ._elementwise import default_foreach, run_rule

__all__ = ["DiffGrad", "diffgrad", "friction"]


def friction(ops: Any, previous_grad: Any, g: Any) -> Any:
    """diffGrad's friction ``sigmoid(|g_prev - g|)`` as a new tensor; stores ``g`` as the new ``g_prev``."""
    xi = ops.sub(previous_grad, g)
    ops.abs_(xi)
    ops.sigmoid_(xi)
    ops.copy_(previous_grad, g)
    return xi


class DiffGrad(LongMemOptimizer):
    """diffGrad (arXiv:1909.11015).

    Args:
        params: parameters or parameter groups to optimize.
        lr: learning rate (a float or a 0-d tensor).
        betas: ``(beta1, beta2)`` as in Adam.
        eps: added to ``sqrt(v)``.
        weight_decay: L2 penalty added to the gradient (as the authors' code; not decoupled).
        {common_args}

    State per parameter: ``step``, ``exp_avg``, ``exp_avg_sq``, ``previous_grad``.
    """

    _buffers = ("exp_avg", "exp_avg_sq", "previous_grad")

    def __init__(
        self,
        params: ParamsT,
        lr: float | Tensor = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
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
            eps=eps,
            weight_decay=weight_decay,
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
        diffgrad(
            params,
            grads,
            state["exp_avg"],
            state["exp_avg_sq"],
            state["previous_grad"],
            steps,
            foreach=foreach,
            fused=fused,
            lr=group["lr"],
            beta1=beta1,
            beta2=beta2,
            eps=group["eps"],
            weight_decay=group["weight_decay"],
            maximize=group["maximize"],
            param_rounding=group["param_rounding"],
            rounding_streams=_rounding.streams_for(self, group, params),
        )


def _diffgrad_rule(
    ops: Any,
    t: Any,
    p: Any,
    g: Any,
    exp_avg: Any,
    exp_avg_sq: Any,
    previous_grad: Any,
    *,
    lr: Any,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
) -> None:
    if weight_decay != 0.0:
        g = ops.add(g, p, alpha=weight_decay)
    ops.lerp_(exp_avg, g, 1.0 - beta1)
    ops.mul_(exp_avg_sq, beta2)
    ops.addcmul_(exp_avg_sq, g, g, value=1.0 - beta2)
    denom = ops.sqrt(exp_avg_sq)
    ops.add_scalar_(denom, eps)

    scaled_momentum = friction(ops, previous_grad, g)
    ops.mul_(scaled_momentum, exp_avg)
    step_size = lr * _scalars.sqrt(1.0 - beta2**t) / (1.0 - beta1**t)
    ops.addcdiv_(p, scaled_momentum, denom, value=-step_size)


def diffgrad(
    params: Sequence[Tensor],
    grads: Sequence[Tensor],
    exp_avgs: Sequence[Tensor],
    exp_avg_sqs: Sequence[Tensor],
    previous_grads: Sequence[Tensor],
    state_steps: Sequence[Tensor],
    *,
    foreach: bool | None = None,
    fused: bool | None = None,
    lr: float | Tensor,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    maximize: bool = False,
    param_rounding: str = "nearest",
    rounding_streams: Sequence[int] | None = None,
) -> None:
    """Functional diffGrad step (see :class:`DiffGrad`)."""
    rule = partial(
        _diffgrad_rule,
        lr=_scalars.learning_rate(lr),
        beta1=beta1,
        beta2=beta2,
        eps=eps,
        weight_decay=weight_decay,
    )
    run_rule(
        rule,
        params,
        grads,
        {"exp_avg": exp_avgs, "exp_avg_sq": exp_avg_sqs, "previous_grad": previous_grads},
        state_steps,
        foreach=default_foreach(params) if foreach is None else foreach,
        maximize=maximize,
        fused=bool(fused),
        param_rounding=param_rounding,
        rounding_streams=rounding_streams,
    )
