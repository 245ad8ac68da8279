"""AdEMAMix: Adam with a mixture of a fast and a very slow gradient EMA.

Pagliardini, Ablin, Grangier, "The AdEMAMix Optimizer: Better, Faster, Older", 2024,
https://arxiv.org/abs/2409.03137 (authors' code: apple/ml-ademamix). For step ``t`` (1-based)::

    alpha_t = alpha * min(t / T_alpha, 1)
    beta3_t = exp(1 / ((1 - s) / ln(beta1) + s / ln(beta3))),  s = min(t / T_beta3, 1)
    m1 = beta1 * m1 + (1 - beta1) * g            (beta1 == 0: no m1 buffer, m1 := g)
    m2 = beta3_t * m2 + (1 - beta3_t) * g        (never bias-corrected)
    nu = beta2 * nu + (1 - beta2) * g^2
    p  = p - lr * ((m1 / (1 - beta1^t) + alpha_t * m2) / (sqrt(nu / (1 - beta2^t)) + eps) + wd * p)
"""

from __future__ import annotations

import os
import sys
import warnings
from collections.abc import Callable, Sequence
from functools import partial
from typing import Any

import torch
from torch import Tensor

from . import _rounding, _scalars
from . import _validation as check
from ._base import LongMemOptimizer, ParamsT, state_dtype
from ._elementwise import default_foreach, run_rule
from .schedules import alpha_schedule, beta_halflife_schedule

__all__ = ["AdEMAMix", "AdEMAMixWarmupWarning", "ademamix"]

#: The setting the paper reports diverging early: a large alpha on a very slow EMA, neither warmed up.
RISKY_ALPHA = 4.0
RISKY_BETA3 = 0.9999


class AdEMAMixWarmupWarning(UserWarning):
    """AdEMAMix runs with a large ``alpha`` and ``beta3 >= 0.9999`` but neither ``alpha_warmup`` nor
    ``beta3_warmup``, which the paper reports diverging early. Given once, at the optimizer's first step."""


def _outside_stacklevel(skip: tuple[str, ...]) -> int:
    """``warnings.warn``'s stacklevel, for its caller, of the first frame whose file is not under ``skip``:
    the user's ``opt.step()`` rather than torch's step wrappers (an lr scheduler adds one)."""
    level, frame = 1, sys._getframe(1)
    while frame is not None and frame.f_code.co_filename.startswith(skip):
        level, frame = level + 1, frame.f_back
    return level


def _warn_if_unwarmed(optimizer: AdEMAMix) -> None:
    risky = [
        f"param group {i}: alpha {group['alpha']:g}, beta3 {group['betas'][2]:g}"
        for i, group in enumerate(optimizer.param_groups)
        if group["alpha"] >= RISKY_ALPHA
        and group["betas"][2] >= RISKY_BETA3
        and group["alpha_warmup"] is None
        and group["beta3_warmup"] is None
    ]
    if risky:
        warnings.warn(
            f"AdEMAMix with alpha >= {RISKY_ALPHA:g} and beta3 >= {RISKY_BETA3:g} but neither alpha_warmup "
            f"nor beta3_warmup ({'; '.join(risky)}) is the setting the paper reports diverging early. Set "
            "alpha_warmup = beta3_warmup = the run's total number of steps (Hugging Face Trainer: "
            "callbacks=[longmem.integrations.huggingface.AdEMAMixWarmupCallback()]).",
            AdEMAMixWarmupWarning,
            stacklevel=_outside_stacklevel((os.path.dirname(__file__), os.path.dirname(torch.__file__))),
        )


class AdEMAMix(LongMemOptimizer):
    """AdEMAMix (arXiv:2409.03137), with the paper's alpha and beta3 warm-up schedulers.

    Args:
        params: parameters or parameter groups to optimize.
        lr: learning rate (a float or a 0-d tensor); as for AdamW.
        betas: ``(beta1, beta2, beta3)``: fast EMA, second moment, slow EMA coefficients.
            ``beta1 = 0`` keeps no fast-EMA buffer (the state size of AdamW).
        alpha: weight of the slow EMA in the update (the paper recommends 4 to 10).
        beta3_warmup: steps over which beta3's half-life grows from beta1's to beta3's
            (None: beta3 from the start). The paper sets it to the total number of steps.
        alpha_warmup: steps over which alpha grows linearly from 0 (None: no warm-up).
        eps: added to the bias-corrected ``sqrt(nu)``.
        weight_decay: decoupled weight decay, ``p -= lr * weight_decay * p``.
        {common_args}

    State per parameter: ``step``, ``exp_avg_fast`` (m1), ``exp_avg_slow`` (m2), ``exp_avg_sq`` (nu),
    float32 for bf16/fp16 parameters.
    """

    _buffers = ("exp_avg_fast", "exp_avg_slow", "exp_avg_sq")
    #: whether this optimizer has checked its groups for the unwarmed setting (at its first step)
    _warmup_checked: bool = False

    def __init__(
        self,
        params: ParamsT,
        lr: float | Tensor = 1e-3,
        betas: tuple[float, float, float] = (0.9, 0.999, 0.9999),
        alpha: float = 2.0,
        beta3_warmup: int | None = None,
        alpha_warmup: int | None = None,
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
            alpha=alpha,
            beta3_warmup=beta3_warmup,
            alpha_warmup=alpha_warmup,
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

    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        """Perform one optimization step; ``closure`` re-evaluates the model and returns the loss.

        The first call checks the groups for the setting the paper reports diverging early and gives
        one :class:`AdEMAMixWarmupWarning` if a group is in it."""
        if not self._warmup_checked:
            self._warmup_checked = True
            _warn_if_unwarmed(self)
        return super().step(closure)

    def _validate_group(self, group: dict[str, Any]) -> None:
        check.check_common(group, 3, missing_betas=[("beta3", 0.9999)])
        check.check_nonnegative("alpha", group["alpha"])
        check.check_warmup("beta3_warmup", group["beta3_warmup"])
        check.check_warmup("alpha_warmup", group["alpha_warmup"])

    def _buffers_for(self, group: dict[str, Any]) -> tuple[str, ...]:
        if group["betas"][0] == 0.0:
            return self._buffers[1:]
        return self._buffers

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
        beta1, beta2, beta3 = group["betas"]
        ademamix(
            params,
            grads,
            state["exp_avg_fast"],
            state["exp_avg_slow"],
            state["exp_avg_sq"],
            steps,
            foreach=foreach,
            fused=fused,
            lr=group["lr"],
            beta1=beta1,
            beta2=beta2,
            beta3=beta3,
            alpha=group["alpha"],
            beta3_warmup=group["beta3_warmup"],
            alpha_warmup=group["alpha_warmup"],
            eps=group["eps"],
            weight_decay=group["weight_decay"],
            maximize=group["maximize"],
            param_rounding=group["param_rounding"],
            rounding_streams=_rounding.streams_for(self, group, params),
        )

    @classmethod
    def from_adamw(cls, adamw: torch.optim.Optimizer, **overrides: Any) -> AdEMAMix:
        """Switch a run from ``torch.optim.AdamW`` (or Adam without weight decay) to AdEMAMix.

        As in the paper's AdamW-to-AdEMAMix experiment: each parameter keeps its first moment
        (as m1), its second moment (as nu) and its step count; the slow EMA m2 starts at zero.
        Each group keeps its lr, beta1, beta2, eps and weight decay; ``overrides`` (for example
        ``alpha``, ``betas``, ``beta3_warmup``) apply to every group. The schedules count the
        kept step ``t``, so set ``alpha_warmup``/``beta3_warmup`` in steps of the whole run.
        """
        groups = []
        for group in adamw.param_groups:
            if group.get("amsgrad", False):
                raise ValueError("from_adamw: amsgrad=True keeps a max_exp_avg_sq that AdEMAMix cannot use")
            if group.get("maximize", False) != overrides.get("maximize", group.get("maximize", False)):
                raise ValueError("from_adamw: maximize cannot change when switching optimizers")
            decoupled = isinstance(adamw, torch.optim.AdamW) or group.get("decoupled_weight_decay", False)
            if group["weight_decay"] != 0 and not decoupled:
                raise ValueError(
                    "from_adamw: the optimizer uses coupled (L2) weight decay; AdEMAMix's is "
                    "decoupled, as AdamW's"
                )
            b1, b2 = group["betas"]
            new = {
                "params": group["params"],
                "lr": group["lr"],
                "eps": group["eps"],
                "weight_decay": group["weight_decay"],
                "maximize": group.get("maximize", False),
                "betas": (b1, b2, 0.9999),
            }
            new.update(overrides)
            groups.append(new)
        new_opt = cls(groups)
        for group in new_opt.param_groups:
            if group["betas"][0] == 0.0:
                raise ValueError("from_adamw: betas[0] must be > 0 to carry AdamW's first moment over")
            for p in group["params"]:
                old = adamw.state.get(p)
                if not old:
                    continue
                dtype = state_dtype(p)
                new_opt.state[p] = {
                    "step": torch.as_tensor(old["step"], dtype=torch.float32).detach().to("cpu", copy=True),
                    "exp_avg_fast": old["exp_avg"].detach().to(p.device, dtype, copy=True),
                    "exp_avg_slow": torch.zeros_like(p, dtype=dtype, memory_format=torch.preserve_format),
                    "exp_avg_sq": old["exp_avg_sq"].detach().to(p.device, dtype, copy=True),
                }
        return new_opt


def _ademamix_rule(
    ops: Any,
    t: Any,
    p: Any,
    g: Any,
    exp_avg_fast: Any,
    exp_avg_slow: Any,
    exp_avg_sq: Any,
    *,
    lr: Any,
    beta1: float,
    beta2: float,
    beta3: float,
    alpha: float,
    beta3_warmup: float | None,
    alpha_warmup: float | None,
    eps: float,
    weight_decay: float,
) -> None:
    alpha_t = alpha_schedule(t, alpha, alpha_warmup)
    beta3_t = beta_halflife_schedule(t, beta1, beta3, beta3_warmup)
    bias_correction1 = 1.0 - beta1**t
    bias_correction2_sqrt = _scalars.sqrt(1.0 - beta2**t)

    # The EMAs as lerps, m += (1 - beta) * (g - m): one pass over memory each instead of two.
    if exp_avg_fast is not None:
        ops.lerp_(exp_avg_fast, g, 1.0 - beta1)
        fast = exp_avg_fast
    else:
        fast = g
    ops.lerp_(exp_avg_slow, g, 1.0 - beta3_t)
    ops.mul_(exp_avg_sq, beta2)
    ops.addcmul_(exp_avg_sq, g, g, value=1.0 - beta2)

    # The update, rearranged exactly so that the foreach path makes few passes and allocates one
    # temporary (as torch's AdamW does):
    #   (m1 / bc1 + alpha_t * m2) / (sqrt(nu) / sqrt(bc2) + eps)
    #     = (sqrt(bc2) / bc1) * m1 / d + sqrt(bc2) * alpha_t * m2 / d,   d = sqrt(nu) + eps * sqrt(bc2)
    # and the decoupled decay p - lr * wd * p as one product.
    denom = ops.sqrt(exp_avg_sq)
    ops.add_scalar_(denom, eps * bias_correction2_sqrt)
    if weight_decay != 0.0:
        ops.mul_(p, 1.0 - lr * weight_decay)
    ops.addcdiv_(p, fast, denom, value=-lr * bias_correction2_sqrt / bias_correction1)
    ops.addcdiv_(p, exp_avg_slow, denom, value=-lr * bias_correction2_sqrt * alpha_t)


def ademamix(
    params: Sequence[Tensor],
    grads: Sequence[Tensor],
    exp_avg_fasts: Sequence[Tensor] | None,
    exp_avg_slows: Sequence[Tensor],
    exp_avg_sqs: Sequence[Tensor],
    state_steps: Sequence[Tensor],
    *,
    foreach: bool | None = None,
    fused: bool | None = None,
    lr: float | Tensor,
    beta1: float,
    beta2: float,
    beta3: float,
    alpha: float,
    beta3_warmup: int | None,
    alpha_warmup: int | None,
    eps: float,
    weight_decay: float,
    maximize: bool = False,
    param_rounding: str = "nearest",
    rounding_streams: Sequence[int] | None = None,
) -> None:
    """Functional AdEMAMix step (see :class:`AdEMAMix`); ``exp_avg_fasts`` is None when beta1 == 0."""
    rule = partial(
        _ademamix_rule,
        lr=_scalars.learning_rate(lr),
        beta1=beta1,
        beta2=beta2,
        beta3=beta3,
        alpha=alpha,
        beta3_warmup=beta3_warmup,
        alpha_warmup=alpha_warmup,
        eps=eps,
        weight_decay=weight_decay,
    )
    run_rule(
        rule,
        params,
        grads,
        {"exp_avg_sq": exp_avg_sqs, "exp_avg_fast": exp_avg_fasts, "exp_avg_slow": exp_avg_slows},
        state_steps,
        foreach=default_foreach(params) if foreach is None else foreach,
        maximize=maximize,
        fused=bool(fused),
        param_rounding=param_rounding,
        rounding_streams=rounding_streams,
    )
