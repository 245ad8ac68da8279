"""Optimizers by name, with the usual weight-decay parameter groups.

``create_optimizer("ademamix", model, lr=1e-3, weight_decay=0.1, alpha=5.0)`` builds the optimizer
over two parameter groups: one with ``weight_decay`` and one without it, for biases, norm weights
(every parameter with ``ndim <= 1``) and embedding tables. Names are case-insensitive and ignore
``_``/``-``; torch's AdamW, Adam and SGD are there too, for comparisons.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn

from .adamod import AdaMod
from .ademamix import AdEMAMix
from .diffgrad import DiffGrad
from .diffmod import DiffMod
from .simplified_ademamix import SimplifiedAdEMAMix

__all__ = ["create_optimizer", "get_optimizer_class", "list_optimizers", "param_groups"]

#: canonical name -> optimizer class
_OPTIMIZERS: dict[str, type[torch.optim.Optimizer]] = {
    "ademamix": AdEMAMix,
    "simplified_ademamix": SimplifiedAdEMAMix,
    "adamod": AdaMod,
    "diffgrad": DiffGrad,
    "diffmod": DiffMod,
    "adamw": torch.optim.AdamW,
    "adam": torch.optim.Adam,
    "sgd": torch.optim.SGD,
}

#: a predicate ``(name, param) -> True`` for parameters that get no weight decay
NoDecay = Callable[[str, torch.Tensor], bool] | Iterable[str] | None


def _key(name: str) -> str:
    return re.sub(r"[^a-z0-9]", "", name.lower())


_BY_KEY = {_key(name): cls for name, cls in _OPTIMIZERS.items()}


def list_optimizers() -> list[str]:
    """The names :func:`create_optimizer` accepts (canonical spelling), sorted."""
    return sorted(_OPTIMIZERS)


def get_optimizer_class(name_or_class: str | type[torch.optim.Optimizer]) -> type[torch.optim.Optimizer]:
    """The optimizer class for a name (case-insensitive; ``_`` and ``-`` ignored) or a class itself.

    Raises ``ValueError`` listing the known names for an unknown one.
    """
    if isinstance(name_or_class, type) and issubclass(name_or_class, torch.optim.Optimizer):
        return name_or_class
    if not isinstance(name_or_class, str):
        raise ValueError(
            f"expected an optimizer name or a torch.optim.Optimizer subclass, got {name_or_class!r}"
        )
    cls = _BY_KEY.get(_key(name_or_class))
    if cls is None:
        raise ValueError(f"unknown optimizer {name_or_class!r}; known: {', '.join(list_optimizers())}")
    return cls


def _no_decay_rule(no_decay: NoDecay) -> Callable[[str, torch.Tensor], bool]:
    if no_decay is None:
        return lambda name, p: p.ndim <= 1
    if callable(no_decay):
        return no_decay
    if isinstance(no_decay, str):
        raise ValueError("no_decay must be a predicate or a list of name patterns, not a single string")
    patterns = [re.compile(pattern) for pattern in no_decay]
    return lambda name, p: any(pattern.search(name) for pattern in patterns)


def param_groups(
    model: nn.Module,
    weight_decay: float,
    *,
    no_decay: NoDecay = None,
    decay_embeddings: bool = False,
) -> list[dict[str, Any]]:
    """``[{"params": decayed, "weight_decay": weight_decay}, {"params": others, "weight_decay": 0.0}]``.

    ``no_decay`` selects the parameters without decay: ``None`` (default) means every parameter with
    ``ndim <= 1`` (biases, norm weights); a callable ``(name, param) -> bool`` or a list of regular
    expressions searched in the parameter's qualified name replaces that rule. Weights of
    ``nn.Embedding``/``nn.EmbeddingBag`` get no decay either, unless ``decay_embeddings=True``.
    Parameters that do not require grad are left out, shared (tied) ones counted once, and an
    empty group is dropped. Each group lists its parameter names under ``"param_names"``.
    """
    rule = _no_decay_rule(no_decay)
    embeddings = set()
    if not decay_embeddings:
        for module in model.modules():
            if isinstance(module, (nn.Embedding, nn.EmbeddingBag)):
                embeddings.add(id(module.weight))
    decay: dict[str, list[Any]] = {"params": [], "param_names": []}
    other: dict[str, list[Any]] = {"params": [], "param_names": []}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        group = other if id(p) in embeddings or rule(name, p) else decay
        group["params"].append(p)
        group["param_names"].append(name)
    groups = [{**decay, "weight_decay": weight_decay}, {**other, "weight_decay": 0.0}]
    groups = [group for group in groups if group["params"]]
    if not groups:
        raise ValueError("the model has no parameters that require grad")
    return groups


def create_optimizer(
    name_or_class: str | type[torch.optim.Optimizer],
    model: nn.Module,
    lr: float | torch.Tensor | None = None,
    weight_decay: float = 0.0,
    *,
    no_decay: NoDecay = None,
    decay_embeddings: bool = False,
    **kwargs: Any,
) -> torch.optim.Optimizer:
    """Build an optimizer by name over ``model``'s parameters, in the two groups of :func:`param_groups`.

    ``lr=None`` keeps the optimizer's own default; ``kwargs`` go to the optimizer (``alpha=5.0``,
    ``betas=...``, ``alpha_warmup=total_steps``, ...). For example::

        opt = longmem.create_optimizer("ademamix", model, lr=3e-4, weight_decay=0.1, alpha=5.0,
                                       alpha_warmup=total_steps, beta3_warmup=total_steps)
    """
    cls = get_optimizer_class(name_or_class)
    if not isinstance(model, nn.Module):
        raise ValueError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    groups = param_groups(model, weight_decay, no_decay=no_decay, decay_embeddings=decay_embeddings)
    if lr is not None:
        kwargs["lr"] = lr
    return cls(groups, **kwargs)
