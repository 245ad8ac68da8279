"""The experiments behind ``longmem demo`` and ``longmem run EXPERIMENT``.

Each experiment reproduces one claim of the seed papers on real data at laptop scale and writes a
report folder: ``report.md`` (verdict, tables, plots, exact command, versions), PNG plots and one JSON
file with every curve. Shared machinery: ``_train`` (the training loop, checkpoints, Ctrl-C),
``_runner`` (options, running, report writing), ``_report`` (statistics, plots, markdown).
"""

from __future__ import annotations

from ._runner import Experiment
from .forgetting import ForgettingExperiment
from .horizon import HorizonExperiment
from .lm import DemoExperiment, LMExperiment
from .lr_sensitivity import LRSensitivityExperiment
from .no_warmup import NoWarmupExperiment
from .schedulers import SchedulersExperiment
from .toy import ToyExperiment
from .vision import VisionExperiment

__all__ = ["DEMO", "EXPERIMENTS", "Experiment"]

DEMO = DemoExperiment()

#: ``longmem run NAME``: every experiment, in the order ``--help`` lists them
EXPERIMENTS: dict[str, Experiment] = {
    e.name: e
    for e in [
        LMExperiment(),
        HorizonExperiment(),
        ForgettingExperiment(),
        LRSensitivityExperiment(),
        NoWarmupExperiment(),
        VisionExperiment(),
        SchedulersExperiment(),
        ToyExperiment(),
    ]
}
