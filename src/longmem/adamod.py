"""AdaMod: Adam whose per-element step sizes are capped by their own long-term average.

Ding, Ren, Luo, Sun, "An Adaptive and Momental Bound Method for Stochastic Learning", 2019,
https://arxiv.org/abs/1910.12249 (authors' code: lancopku/AdaMod). For step ``t`` (1-based)::

    m   = beta1 * m + (1 - beta1) * g
    v   = beta2 * v + (1 - beta2) * g^2
    eta = lr * sqrt(1 - beta2^t) / (1 - beta1^t) / (sqrt(v) + eps)
    s   = beta3 * s + (1 - beta3) * eta            (starts at 0, never bias-corrected)
    p   = p * (1 - lr * wd) - min(eta, s) * m      (decoupled decay, as the authors' code)

``s`` starting at zero is a built-in warm-up: with a constant gradient the step is Adam's times
``1 - beta3^t``. ``beta3 = 0`` is Adam (with eps on the raw ``sqrt(v)``). Every step is elementwise
no larger than Adam's. (The authors' docstring gives beta3 = 0.9999 and calls the decay L2; their
code uses 0.999 and decoupled decay, which is what this follows.)
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
from .diffgrad import friction

__all__ = ["AdaMod", "adamod"]


class AdaMod(LongMemOptimizer):
    """AdaMod (arXiv:1910.12249).

    Args:
        params: parameters or parameter groups to optimize.
        lr: learning rate (a float or a 0-d tensor).
        betas: ``(beta1, beta2)`` as in Adam.
        beta3: memory of the step-size average (about ``1 / (1 - beta3)`` steps).
        eps: added to ``sqrt(v)``.
        weight_decay: decoupled weight decay, ``p *= 1 - lr * weight_decay``.
        {common_args}

    State per parameter: ``step``, ``exp_avg`` (m), ``exp_avg_sq`` (v), ``exp_avg_lr`` (s).
    """

    _buffers = ("exp_avg", "exp_avg_sq", "exp_avg_lr")

    def __init__(
        self,
        params: ParamsT,
        lr: float | Tensor = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        beta3: float = 0.999,
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
            beta3=beta3,
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
        check.check_beta("beta3", group["beta3"])

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
        adamod(
            params,
            grads,
            state["exp_avg"],
            state["exp_avg_sq"],
            state["exp_avg_lr"],
            steps,
            foreach=foreach,
            fused=fused,
            lr=group["lr"],
            beta1=beta1,
            beta2=beta2,
            beta3=group["beta3"],
            eps=group["eps"],
            weight_decay=group["weight_decay"],
            maximize=group["maximize"],
            param_rounding=group["param_rounding"],
            rounding_streams=_rounding.streams_for(self, group, params),
        )


def adamod_rule(
    ops: Any,
    t: Any,
    p: Any,
    g: Any,
    exp_avg: Any,
    exp_avg_sq: Any,
    exp_avg_lr: Any,
    previous_grad: Any = None,
    *,
    lr: Any,
    beta1: float,
    beta2: float,
    beta3: float,
    eps: float,
    weight_decay: float,
) -> None:
    """AdaMod's update; with ``previous_grad`` (DiffMod) the bounded step is also scaled by diffGrad's
    friction."""
    ops.lerp_(exp_avg, g, 1.0 - beta1)
    ops.mul_(exp_avg_sq, beta2)
    ops.addcmul_(exp_avg_sq, g, g, value=1.0 - beta2)

    eta = ops.sqrt(exp_avg_sq)
    ops.add_scalar_(eta, eps)
    ops.reciprocal_(eta)
    ops.mul_(eta, lr * _scalars.sqrt(1.0 - beta2**t) / (1.0 - beta1**t))
    # not lerp: with eps = 0 a zero gradient makes eta infinite, and lerp(inf, inf) is NaN
    ops.mul_(exp_avg_lr, beta3)
    ops.add_(exp_avg_lr, eta, alpha=1.0 - beta3)
    ops.minimum_(eta, exp_avg_lr)

    if weight_decay != 0.0:
        ops.mul_(p, 1.0 - lr * weight_decay)
    if previous_grad is not None:
        scaled_momentum = friction(ops, previous_grad, g)
        ops.mul_(scaled_momentum, exp_avg)
        ops.addcmul_(p, eta, scaled_momentum, value=-1.0)
    else:
        ops.addcmul_(p, eta, exp_avg, value=-1.0)


def bound_rule(
    lr: float | Tensor, beta1: float, beta2: float, beta3: float, eps: float, weight_decay: float
) -> Any:
    """``adamod_rule`` with its hyperparameters bound (AdaMod's and DiffMod's functional steps)."""
    return partial(
        adamod_rule,
        lr=_scalars.learning_rate(lr),
        beta1=beta1,
        beta2=beta2,
        beta3=beta3,
        eps=eps,
        weight_decay=weight_decay,
    )


def adamod(
    params: Sequence[Tensor],
    grads: Sequence[Tensor],
    exp_avgs: Sequence[Tensor],
    exp_avg_sqs: Sequence[Tensor],
    exp_avg_lrs: Sequence[Tensor],
    state_steps: Sequence[Tensor],
    *,
    foreach: bool | None = None,
    fused: bool | None = None,
    lr: float | Tensor,
    beta1: float,
    beta2: float,
    beta3: float,
    eps: float,
    weight_decay: float,
    maximize: bool = False,
    param_rounding: str = "nearest",
    rounding_streams: Sequence[int] | None = None,
) -> None:
    """Functional AdaMod step (see :class:`AdaMod`)."""
    rule = bound_rule(lr, beta1, beta2, beta3, eps, weight_decay)
    run_rule(
        rule,
        params,
        grads,
        {"exp_avg": exp_avgs, "exp_avg_sq": exp_avg_sqs, "exp_avg_lr": exp_avg_lrs},
        state_steps,
        foreach=default_foreach(params) if foreach is None else foreach,
        maximize=maximize,
        fused=bool(fused),
        param_rounding=param_rounding,
        rounding_streams=rounding_streams,
    )
