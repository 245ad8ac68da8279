"""longmem: exact, fast PyTorch optimizers that remember gradients for a long time.

AdEMAMix (arXiv:2409.03137), Simplified AdEMAMix (arXiv:2502.02431), AdaMod (arXiv:1910.12249),
diffGrad (arXiv:1909.11015) and DiffMod, each a drop-in ``torch.optim.Optimizer``.

The optimizers are imported with the package. ``longmem.checkpoint``, ``longmem.integrations``,
``longmem.kernels``, ``longmem.experiments`` and ``longmem.FusedFallbackWarning`` are imported on
first use, so that ``import longmem`` costs no more than the optimizers do.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from ._nonfinite import NonFiniteGradientError
from .adamod import AdaMod
from .ademamix import AdEMAMix, AdEMAMixWarmupWarning
from .diffgrad import DiffGrad
from .diffmod import DiffMod
from .registry import create_optimizer, get_optimizer_class, list_optimizers, param_groups
from .simplified_ademamix import SimplifiedAdEMAMix

if TYPE_CHECKING:  # for type checkers and IDEs; at run time these load lazily (__getattr__)
    from . import checkpoint, integrations, kernels
    from . import experiments as experiments
    from .kernels import FusedFallbackWarning

__version__ = "0.1.0"

__all__ = [
    "AdEMAMix",
    "AdEMAMixWarmupWarning",
    "AdaMod",
    "DiffGrad",
    "DiffMod",
    "FusedFallbackWarning",
    "NonFiniteGradientError",
    "SimplifiedAdEMAMix",
    "__version__",
    "checkpoint",
    "create_optimizer",
    "get_optimizer_class",
    "integrations",
    "kernels",
    "list_optimizers",
    "param_groups",
]

#: submodules imported on first access as ``longmem.NAME``
_LAZY_MODULES = ("checkpoint", "experiments", "integrations", "kernels")
#: names imported on first access: name -> the submodule that defines it
_LAZY_NAMES = {"FusedFallbackWarning": "kernels"}


def __getattr__(name: str) -> Any:
    if name in _LAZY_MODULES:
        return importlib.import_module(f".{name}", __name__)  # the import binds it as an attribute too
    if name in _LAZY_NAMES:
        value = getattr(importlib.import_module(f".{_LAZY_NAMES[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *_LAZY_MODULES, *_LAZY_NAMES})
