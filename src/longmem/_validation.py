"""Hyperparameter checks: each raises ``ValueError`` naming the parameter and its allowed range.

Nothing is clamped or coerced: a value out of range is an error, never silently fixed.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from typing import Any

import torch

from ._nonfinite import DEFAULT as NONFINITE_DEFAULT
from ._nonfinite import check_mode as check_nonfinite
from ._rounding import DEFAULT as PARAM_ROUNDING_DEFAULT
from ._rounding import check_mode as check_param_rounding
from ._state_precision import DEFAULT as STATE_PRECISION_DEFAULT
from ._state_precision import check_mode as check_state_precision


def _as_real(name: str, value: Any) -> float:
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:  # torch.optim's wording, which tools and tests match
            raise ValueError(
                f"Tensor {name} must be 1-element, got a tensor of shape {tuple(value.shape)}: "
                f"give {name} as a number or a one-element tensor"
            )
        if value.is_complex():
            raise ValueError(f"{name} must be a real number or a one-element real tensor, got {value!r}")
        return float(value.item())
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"{name} must be a real number, got {value!r}")
    return float(value)


def check_nonnegative(name: str, value: Any) -> None:
    """``value`` must be a finite real number >= 0 (``lr`` may also be a one-element tensor)."""
    x = _as_real(name, value)
    if not (math.isfinite(x) and x >= 0.0):
        raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")


def check_beta(name: str, value: Any) -> None:
    """An EMA coefficient: a real number in [0, 1)."""
    x = _as_real(name, value)
    if not 0.0 <= x < 1.0:
        raise ValueError(f"{name} must be in [0, 1), got {value!r}")


def check_betas(value: Any, count: int, missing: Sequence[tuple[str, float]] = ()) -> None:
    """``betas``: a sequence of ``count`` numbers, each in [0, 1). ``missing`` names the betas after
    the first two, with a recommended value each, for the message when only two are given (AdamW's
    form, as scripts written for AdamW pass)."""
    if not isinstance(value, Sequence) or isinstance(value, str) or len(value) != count:
        hint = ""
        if missing and isinstance(value, Sequence) and not isinstance(value, str) and len(value) == 2:
            names = ", ".join(name for name, _ in missing)
            example = ", ".join(repr(v) for v in (*value, *(default for _, default in missing)))
            hint = (
                f"; two betas are AdamW's form: add {names} (the paper's value: "
                f"{', '.join(f'{name}={default}' for name, default in missing)}), e.g. betas=({example})"
            )
        raise ValueError(f"betas must be a tuple of {count} numbers, each in [0, 1), got {value!r}{hint}")
    for i, beta in enumerate(value):
        check_beta(f"betas[{i}]", beta)


def check_warmup(name: str, value: Any) -> None:
    """A warm-up length in steps: ``None`` (no warm-up) or a whole number >= 1; an integral float
    (``1000.0``, as scripts compute it from a fraction of the run) counts as the integer."""
    if value is None:
        return
    integral = isinstance(value, numbers.Integral) or (
        isinstance(value, numbers.Real) and math.isfinite(value) and float(value).is_integer()
    )
    if isinstance(value, bool) or not integral or value < 1:
        raise ValueError(
            f"{name} must be None or a whole number >= 1 (a number of steps, e.g. 1000 or 1000.0), "
            f"got {value!r}"
        )


def check_bool(name: str, value: Any) -> None:
    if not isinstance(value, bool):
        raise ValueError(f"{name} must be True or False, got {value!r}")


def check_foreach(value: Any) -> None:
    if value is not None and not isinstance(value, bool):
        raise ValueError(f"foreach must be None, True or False, got {value!r}")


def check_fused(fused: Any, foreach: Any) -> None:
    """``fused``: None, True or False; not True together with ``foreach=True`` (as torch.optim)."""
    if fused is not None and not isinstance(fused, bool):
        raise ValueError(f"fused must be None, True or False, got {fused!r}")
    if fused and foreach:
        raise ValueError("fused=True and foreach=True cannot both be set; choose one (fused is one pass)")


def check_common(
    group: dict[str, Any], beta_count: int, missing_betas: Sequence[tuple[str, float]] = ()
) -> None:
    """The hyperparameters every longmem optimizer has (``missing_betas``: see ``check_betas``)."""
    check_nonnegative("lr", group["lr"])
    check_betas(group["betas"], beta_count, missing_betas)
    check_nonnegative("eps", group["eps"])
    check_nonnegative("weight_decay", group["weight_decay"])
    check_bool("maximize", group["maximize"])
    check_foreach(group["foreach"])
    check_fused(group.get("fused"), group["foreach"])
    check_nonfinite(group.get("nonfinite", NONFINITE_DEFAULT))
    check_state_precision(group.get("state_precision", STATE_PRECISION_DEFAULT))
    check_param_rounding(group.get("param_rounding", PARAM_ROUNDING_DEFAULT))
