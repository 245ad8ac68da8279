"""Arithmetic on the scalars that change with the step: bias corrections, schedules, the lr.

In eager mode the step count ``t`` reaches a rule as a Python float (read once per step from the
0-d state tensor), so these values are exact doubles, as in the authors' code. Under
``torch.compile`` reading the counter would break the graph (``Tensor.item()``), and a Python
float derived from it becomes a symbolic value that the compiled graph mishandles; so there ``t``
is a 0-d float64 tensor (the float32 counter, converted exactly) and the same formulas run as
float64 tensor operations, as torch's own optimizers do while compiling. The helpers here take
either form and keep the eager path on ``math``, so eager numbers do not change.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

__all__ = ["exp", "learning_rate", "once_reached", "sqrt", "step_scalar"]

#: the dtype of step-dependent scalars under torch.compile: as exact as the eager path's doubles
SCALAR_DTYPE = torch.float64


def sqrt(x: Any) -> Any:
    return torch.sqrt(x) if isinstance(x, Tensor) else math.sqrt(x)


def exp(x: Any) -> Any:
    return torch.exp(x) if isinstance(x, Tensor) else math.exp(x)


def once_reached(t: Tensor, threshold: float, reached: float, before: Tensor) -> Tensor:
    """``reached`` from step ``threshold`` on, ``before`` until then (a tensor ``t``: no branch on
    its value, which would read it back to the host)."""
    return torch.where(t >= threshold, reached, before)


def step_scalar(step: Tensor) -> Tensor:
    """A (float32, advanced) step counter as the float64 0-d tensor that rules take under compile."""
    return step.to(SCALAR_DTYPE)


def learning_rate(lr: float | Tensor) -> float | Tensor:
    """The lr as rules take it: a float (eager: a tensor lr is read once per step, as before), or,
    under torch.compile, a tensor lr kept as a float64 tensor, so that changing its value (an LR
    scheduler) reuses the compiled graph instead of recompiling it."""
    if isinstance(lr, Tensor) and torch.compiler.is_compiling():
        return lr.to(SCALAR_DTYPE)
    return float(lr)
