"""longmem: exact, fast PyTorch optimizers that remember gradients for a long time.

AdEMAMix (arXiv:2409.03137), Simplified AdEMAMix (arXiv:2502.02431), AdaMod (arXiv:1910.12249),
diffGrad (arXiv:1909.11015) and DiffMod, each a drop-in ``torch.optim.Optimizer``.
"""

from ._nonfinite import NonFiniteGradientError
from .adamod import AdaMod
from .ademamix import AdEMAMix, AdEMAMixWarmupWarning
from .diffgrad import DiffGrad
from .diffmod import DiffMod
from .registry import create_optimizer, get_optimizer_class, list_optimizers, param_groups
from .simplified_ademamix import SimplifiedAdEMAMix

__version__ = "0.1.0"

__all__ = [
    "AdEMAMix",
    "AdEMAMixWarmupWarning",
    "AdaMod",
    "DiffGrad",
    "DiffMod",
    "NonFiniteGradientError",
    "SimplifiedAdEMAMix",
    "__version__",
    "create_optimizer",
    "get_optimizer_class",
    "list_optimizers",
    "param_groups",
]
