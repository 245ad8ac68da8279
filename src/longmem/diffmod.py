"""DiffMod: AdaMod's bounded step sizes with diffGrad's friction on the momentum.

AdaMod (Ding et al. 2019, https://arxiv.org/abs/1910.12249) combined with diffGrad (Dubey et al.
2019, https://arxiv.org/abs/1909.11015), as in the DiffMod of lessw2020/Best-Deep-Learning-Optimizers.
For step ``t`` (1-based), with AdaMod's ``m``, ``v``, ``eta`` and ``s``::

    xi = sigmoid(|g_prev - g|)
    p  = p * (1 - lr * wd) - min(eta, s) * xi * m        (beta3 = 1 - 1 / len_memory)
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from torch import Tensor

from . import _rounding
from . import _validation as check
from ._base import LongMemOptimizer, ParamsT
from ._elementwise import default_foreach, run_rule
from .adamod import bound_rule

__all__ = ["DiffMod", "diffmod"]

_DEFAULT_LEN_MEMORY = 1000


def _check_len_memory(value: Any) -> None:
    check.check_nonnegative("len_memory", value)
    if value < 1:
        raise ValueError(f"len_memory must be a number >= 1 (steps of memory), got {value!r}")


def _resolve_memory(len_memory: float | None, beta3: float | None) -> tuple[float | None, float]:
    """``(len_memory, beta3)`` from the one given, or neither (1000 steps). Both only as this
    function returns them, ``beta3 == 1 - 1 / len_memory``: an optimizer's ``defaults`` (or a
    group) passed back whole, ``DiffMod(params, **opt.defaults)``, rebuilds the same optimizer."""
    if len_memory is not None and beta3 is not None:
        _check_len_memory(len_memory)
        if beta3 == 1.0 - 1.0 / len_memory:
            return len_memory, beta3
        raise ValueError(
            "give either len_memory (>= 1) or beta3 (in [0, 1)), or both only with "
            f"beta3 = 1 - 1 / len_memory; got len_memory={len_memory!r}, beta3={beta3!r} "
            f"(1 - 1 / len_memory = {1.0 - 1.0 / len_memory!r})"
        )
    if beta3 is not None:
        check.check_beta("beta3", beta3)
        return None, beta3
    if len_memory is None:
        len_memory = _DEFAULT_LEN_MEMORY
    _check_len_memory(len_memory)
    return len_memory, 1.0 - 1.0 / len_memory


class DiffMod(LongMemOptimizer):
    """DiffMod: AdaMod with diffGrad's friction.

    Args:
        params: parameters or parameter groups to optimize.
        lr: learning rate (a float or a 0-d tensor).
        betas: ``(beta1, beta2)`` as in Adam.
        len_memory: memory of the step-size average in steps; ``beta3 = 1 - 1 / len_memory``
            (default 1000, for example the number of batches in an epoch).
        beta3: give beta3 directly instead of ``len_memory`` (exactly one of the two).
        eps: added to ``sqrt(v)``.
        weight_decay: decoupled weight decay, ``p *= 1 - lr * weight_decay``.
        {common_args}

    State per parameter: ``step``, ``exp_avg``, ``exp_avg_sq``, ``exp_avg_lr``, ``previous_grad``.
    """

    _buffers = ("exp_avg", "exp_avg_sq", "exp_avg_lr", "previous_grad")

    def __init__(
        self,
        params: ParamsT,
        lr: float | Tensor = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        len_memory: float | None = None,
        beta3: float | None = None,
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
        len_memory, beta3 = _resolve_memory(len_memory, beta3)
        defaults = dict(
            lr=lr,
            betas=betas,
            len_memory=len_memory,
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

    def _prepare_group(self, group: dict[str, Any], given: dict[str, Any]) -> None:
        # A group that names one of len_memory/beta3 overrides both defaults.
        if "len_memory" in given or "beta3" in given:
            group["len_memory"], group["beta3"] = _resolve_memory(given.get("len_memory"), given.get("beta3"))

    def _validate_group(self, group: dict[str, Any]) -> None:
        check.check_common(group, 2)
        check.check_beta("beta3", group["beta3"])
        if group["len_memory"] is not None:
            _check_len_memory(group["len_memory"])

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
        diffmod(
            params,
            grads,
            state["exp_avg"],
            state["exp_avg_sq"],
            state["exp_avg_lr"],
            state["previous_grad"],
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


def diffmod(
    params: Sequence[Tensor],
    grads: Sequence[Tensor],
    exp_avgs: Sequence[Tensor],
    exp_avg_sqs: Sequence[Tensor],
    exp_avg_lrs: Sequence[Tensor],
    previous_grads: Sequence[Tensor],
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
    """Functional DiffMod step (see :class:`DiffMod`)."""
    rule = bound_rule(lr, beta1, beta2, beta3, eps, weight_decay)
    run_rule(
        rule,
        params,
        grads,
        {
            "exp_avg": exp_avgs,
            "exp_avg_sq": exp_avg_sqs,
            "exp_avg_lr": exp_avg_lrs,
            "previous_grad": previous_grads,
        },
        state_steps,
        foreach=default_foreach(params) if foreach is None else foreach,
        maximize=maximize,
        fused=bool(fused),
        param_rounding=param_rounding,
        rounding_streams=rounding_streams,
    )
