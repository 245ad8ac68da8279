"""Glue for training frameworks: Hugging Face ``Trainer`` (:mod:`.huggingface`) and Lightning
(:mod:`.lightning`). Neither framework is imported until its module is."""

from __future__ import annotations

from typing import Any

import torch

from ..ademamix import AdEMAMix
from ..registry import get_optimizer_class

__all__ = ["warmup_kwargs"]


def warmup_kwargs(
    name_or_class: str | type[torch.optim.Optimizer], total_steps: int | None, **kwargs: Any
) -> dict[str, Any]:
    """``kwargs`` with AdEMAMix's ``alpha_warmup`` and ``beta3_warmup`` set to ``total_steps``.

    The paper warms both up over the whole run; without the warm-ups a large ``alpha`` with
    ``beta3 = 0.9999`` diverges early. Values given in ``kwargs`` win; other optimizers, or
    ``total_steps=None``, get ``kwargs`` unchanged.
    """
    out = dict(kwargs)
    if total_steps is not None and issubclass(get_optimizer_class(name_or_class), AdEMAMix):
        total = int(total_steps)
        if total != total_steps or total < 1:
            raise ValueError(f"total_steps must be a whole number >= 1, got {total_steps!r}")
        out.setdefault("alpha_warmup", total)
        out.setdefault("beta3_warmup", total)
    return out
