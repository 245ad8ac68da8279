"""Per-step hyperparameter schedules shared by the optimizers.

Both are pure functions of the 1-based step count ``t`` so that a resumed run recomputes exactly the
values it would have used, with nothing extra to save. ``t`` is a Python float, or under
``torch.compile`` a 0-d float64 tensor (see ``longmem._scalars``); the result is of the same kind.
"""

from __future__ import annotations

import math
from typing import Any

from torch import Tensor

from . import _scalars

__all__ = ["alpha_schedule", "beta_halflife_schedule"]


def alpha_schedule(t: Any, alpha: float, warmup: float | None) -> Any:
    """Linear warm-up of AdEMAMix's mixing coefficient: ``alpha * min(t / warmup, 1)``.

    ``warmup=None`` means no warm-up. From ``t >= warmup`` on the result is exactly ``alpha``.
    (Pagliardini et al. 2024, arXiv:2409.03137, Algorithm 1.)
    """
    if warmup is None:
        return alpha
    if isinstance(t, Tensor):
        return _scalars.once_reached(t, warmup, alpha, (t / warmup) * alpha)
    if t >= warmup:
        return alpha
    return (t / warmup) * alpha


def beta_halflife_schedule(
    t: Any, beta_start: float, beta_end: float, warmup: float | None, *, log_eps: float = 0.0
) -> Any:
    """EMA coefficient whose half-life grows linearly from ``beta_start``'s to ``beta_end``'s.

    ``beta_t = exp(1 / ((1 - s) / ln(beta_start) + s / ln(beta_end)))`` with ``s = min(t / warmup, 1)``.
    ``1 / ln(0)`` is taken as its limit 0, so ``beta_start = 0`` gives ``beta_end ** (warmup / t)``.
    From ``t >= warmup`` on the result is exactly ``beta_end``; ``warmup=None`` means no warm-up.
    (Pagliardini et al. 2024, arXiv:2409.03137, the beta3 scheduler.)

    ``log_eps`` evaluates ``ln(beta + log_eps)`` instead, as the authors' code does with 1e-8; that
    moves the result by at most ~1e-6. AdEMAMix uses the exact form (``log_eps=0``); Simplified
    AdEMAMix keeps its authors' ``log_eps=1e-8``, which its test vector (docs/algorithms.md) follows.
    """
    if warmup is None:
        return beta_end
    if isinstance(t, Tensor):
        # s = t / warmup, capped at 1 so that the branch not taken stays finite
        s = (t / warmup).clamp(max=1.0)
    elif t >= warmup:
        return beta_end
    else:
        s = t / warmup
    inv_log = _over_log(1.0 - s, beta_start + log_eps) + _over_log(s, beta_end + log_eps)
    if not isinstance(inv_log, Tensor) and inv_log == 0.0:  # both betas are 0: an EMA with zero memory
        return 0.0
    beta_t = _scalars.exp(1.0 / inv_log)
    return _scalars.once_reached(t, warmup, beta_end, beta_t) if isinstance(t, Tensor) else beta_t


def _over_log(weight: Any, beta: float) -> Any:
    return 0.0 if beta == 0.0 else weight / math.log(beta)
