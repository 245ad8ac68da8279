"""``configure_optimizers`` for PyTorch Lightning (``lightning`` or ``pytorch_lightning``)::

    class Model(lightning.LightningModule):
        def configure_optimizers(self):
            return longmem.integrations.lightning.configure_optimizers(
                self, "ademamix", lr=1e-3, weight_decay=0.1, alpha=5.0)

Lightning itself is not imported here: the helper only reads ``module.trainer``.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from ..registry import create_optimizer
from . import warmup_kwargs

__all__ = ["configure_optimizers", "total_steps"]


def total_steps(module: nn.Module) -> int:
    """The run's number of optimizer steps, from the attached Trainer's ``estimated_stepping_batches``."""
    trainer = getattr(module, "trainer", None)
    if trainer is None:
        raise ValueError("the module is not attached to a Lightning Trainer")
    steps = trainer.estimated_stepping_batches
    if not math.isfinite(steps) or steps < 1:
        raise ValueError(f"the Trainer cannot tell the number of steps ({steps}); set max_steps")
    return int(steps)


def configure_optimizers(
    module: nn.Module,
    name_or_class: str | type[torch.optim.Optimizer] = "ademamix",
    lr: float | None = None,
    weight_decay: float = 0.0,
    *,
    cosine: bool = True,
    **kwargs: Any,
) -> dict[str, Any]:
    """What ``LightningModule.configure_optimizers`` returns: a :func:`longmem.create_optimizer`
    optimizer over ``module`` (no weight decay on biases, norms and embeddings), AdEMAMix's warm-ups
    set to the run's total steps, and, with ``cosine=True``, a per-step cosine learning-rate decay
    over the same steps."""
    steps = total_steps(module)
    optimizer = create_optimizer(
        name_or_class, module, lr, weight_decay, **warmup_kwargs(name_or_class, steps, **kwargs)
    )
    if not cosine:
        return {"optimizer": optimizer}
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=steps)
    return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
