"""Training with a longmem optimizer in Hugging Face ``transformers.Trainer``.

Two ways, both with AdEMAMix's warm-ups over the Trainer's total number of steps:

* ``Trainer(..., optimizer_cls_and_kwargs=optimizer_cls_and_kwargs("ademamix", args, alpha=5.0),
  callbacks=[AdEMAMixWarmupCallback()])``: the Trainer builds the optimizer over its own two
  weight-decay groups and its own scheduler; the callback sets any warm-up left unset to the
  Trainer's ``state.max_steps`` when training begins (needed when the run is set in epochs).
* ``Trainer(..., optimizers=create_optimizer_and_scheduler(model, args, num_training_steps))``: a
  ready pair, with :func:`longmem.create_optimizer`'s groups and the Trainer's scheduler type.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments, get_scheduler

from ..ademamix import AdEMAMix
from ..registry import create_optimizer, get_optimizer_class
from . import warmup_kwargs

__all__ = ["AdEMAMixWarmupCallback", "create_optimizer_and_scheduler", "optimizer_cls_and_kwargs"]


def optimizer_cls_and_kwargs(
    name_or_class: str | type[torch.optim.Optimizer] = "ademamix",
    args: TrainingArguments | None = None,
    *,
    total_steps: int | None = None,
    **kwargs: Any,
) -> tuple[type[torch.optim.Optimizer], dict[str, Any]]:
    """The ``(class, kwargs)`` pair for ``Trainer(optimizer_cls_and_kwargs=...)``.

    ``lr`` defaults to ``args.learning_rate``; weight decay comes from the Trainer's parameter
    groups (``args.weight_decay``, none on biases and norms). AdEMAMix's warm-ups are set to
    ``total_steps``, else to ``args.max_steps`` when it is positive; otherwise add
    :class:`AdEMAMixWarmupCallback`, which sets them once the Trainer knows its total.
    """
    cls = get_optimizer_class(name_or_class)
    if args is not None:
        kwargs.setdefault("lr", args.learning_rate)
        if total_steps is None and args.max_steps > 0:
            total_steps = args.max_steps
    return cls, warmup_kwargs(cls, total_steps, **kwargs)


class AdEMAMixWarmupCallback(TrainerCallback):
    """Sets every AdEMAMix group's unset (``None``) ``alpha_warmup``/``beta3_warmup`` to the
    Trainer's total number of optimizer steps (``state.max_steps``) when training begins."""

    def on_train_begin(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        optimizer: torch.optim.Optimizer | None = None,
        **kwargs: Any,
    ) -> None:
        if optimizer is None or state.max_steps is None or state.max_steps < 1:
            return
        for opt in _unwrap(optimizer):
            if not isinstance(opt, AdEMAMix):
                continue
            for group in opt.param_groups:
                for key in ("alpha_warmup", "beta3_warmup"):
                    if group.get(key) is None:
                        group[key] = int(state.max_steps)


def _unwrap(optimizer: Any) -> list[Any]:
    """The optimizer and those it wraps (accelerate's ``AcceleratedOptimizer``, ZeRO's ``optim``)."""
    found = []
    seen: set[int] = set()
    while optimizer is not None and id(optimizer) not in seen:
        seen.add(id(optimizer))
        found.append(optimizer)
        optimizer = getattr(optimizer, "optimizer", None) or getattr(optimizer, "optim", None)
    return found


def create_optimizer_and_scheduler(
    model: nn.Module,
    args: TrainingArguments,
    num_training_steps: int | None = None,
    name_or_class: str | type[torch.optim.Optimizer] = "ademamix",
    **kwargs: Any,
) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler]:
    """A ready ``(optimizer, scheduler)`` for ``Trainer(optimizers=...)``.

    The optimizer is :func:`longmem.create_optimizer` over ``model`` with ``args.learning_rate`` and
    ``args.weight_decay`` (no decay on biases, norms and embeddings), AdEMAMix's warm-ups set to
    ``num_training_steps`` (default: ``args.max_steps``, which must then be positive); the
    scheduler is the Trainer's own (``args.lr_scheduler_type``, ``args.warmup_steps``/``warmup_ratio``).
    Build it after moving the model to its device.
    """
    if num_training_steps is None:
        if args.max_steps <= 0:
            raise ValueError("num_training_steps is needed when args.max_steps is not set")
        num_training_steps = args.max_steps
    kwargs.setdefault("lr", args.learning_rate)
    kwargs.setdefault("weight_decay", args.weight_decay)
    optimizer = create_optimizer(
        name_or_class, model, **warmup_kwargs(name_or_class, num_training_steps, **kwargs)
    )
    scheduler = get_scheduler(
        args.lr_scheduler_type,
        optimizer=optimizer,
        num_warmup_steps=args.get_warmup_steps(num_training_steps),
        num_training_steps=num_training_steps,
        scheduler_specific_kwargs=args.lr_scheduler_kwargs,
    )
    return optimizer, scheduler
