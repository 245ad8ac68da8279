"""The one training loop every experiment uses, with checkpoints, Ctrl-C handling and resume.

A run is fully described by a :class:`RunSpec`; the data, model and metrics come from a :class:`Task`.
The batch of step ``s`` is a pure function of ``(seed, s)``, the lr of step ``s`` a pure function of
``s``, and there is no other randomness after the model's seeded initialisation, so every optimizer
sees the same data in the same order, and a run resumed from a checkpoint continues exactly as if it
had never stopped (same parameters, same curves, bit for bit on the same machine and thread count).
"""

from __future__ import annotations

import math
import os
import signal
import sys
import threading
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import FrameType, TracebackType
from typing import Any

import torch
from torch import Tensor, nn

from .. import checkpoint as checkpoint_file
from ..ademamix import AdEMAMixWarmupWarning
from ._distributed import current_world, data_parallel_loss, shard_batch, step_totals
from ._optim import OPTIMIZERS, lr_at, make_optimizer
from ._progress import ProgressBar

__all__ = [
    "INTERRUPT_AFTER_ENV",
    "Interrupt",
    "InterruptedRun",
    "RunSpec",
    "Task",
    "batch_generator",
    "train_run",
]

#: Test hook: behave as if Ctrl-C were pressed once this many training steps have run in this process.
INTERRUPT_AFTER_ENV = "LONGMEM_INTERRUPT_AFTER"
CHECKPOINT_EVERY_S = 120.0  # also save a checkpoint this often, in case of a hard kill


class InterruptedRun(Exception):
    """Raised by :func:`train_run` after it saved a checkpoint because Ctrl-C was pressed."""


class Interrupt:
    """Context manager turning the first Ctrl-C into a request to stop at the next step boundary.

    A second Ctrl-C raises :class:`KeyboardInterrupt` at once (losing only the unfinished run's progress
    since its last checkpoint). ``LONGMEM_INTERRUPT_AFTER=k`` requests a stop after ``k`` steps.
    """

    def __init__(self, stream: Any = None) -> None:
        self.requested = False
        self.steps = 0
        env = os.environ.get(INTERRUPT_AFTER_ENV, "").strip()
        self.after = int(env) if env else None
        self.stream = stream if stream is not None else sys.stderr
        self._previous: Any = None

    def __enter__(self) -> Interrupt:
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._handler)
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)
            self._previous = None

    def _handler(self, signum: int, frame: FrameType | None) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        self.stream.write(
            "\nCtrl-C: finishing this step and saving a checkpoint (press again to abort now)\n"
        )
        self.stream.flush()

    def step_done(self) -> bool:
        """Count one finished step; True when the run should stop here."""
        self.steps += 1
        if self.after is not None and self.steps >= self.after:
            self.requested = True
        return self.requested


class Task:
    """Data, model and metrics of one experiment. Subclasses override what they need."""

    name = "task"
    #: how the progress bar and reports name the metrics of :meth:`evaluate`
    eval_prefix = "held-out "

    def seed_note(self) -> str:
        """What a seed fixes, for the report's setup section."""
        return (
            "a seed fixes the initialisation and the data order; every optimizer sees the same batches in "
            "the same order"
        )

    def build_model(self) -> nn.Module:
        """A fresh model; called right after ``torch.manual_seed(seed)``."""
        raise NotImplementedError

    def train_batch(self, step: int, seed: int) -> Any:
        """The training batch of 0-based ``step`` (a pure function of ``step`` and ``seed``)."""
        raise NotImplementedError

    def loss(self, model: nn.Module, batch: Any) -> Tensor:
        raise NotImplementedError

    def evaluate(self, model: nn.Module, final: bool = False) -> dict[str, float]:
        """Held-out metrics; the first key is the one the progress bar shows. ``final``: the run's end."""
        raise NotImplementedError

    def probe(self, model: nn.Module, done: int, seed: int) -> dict[str, float] | None:
        """Extra measurements after ``done`` finished steps (0: before training), or None."""
        return None

    def describe(self) -> str:
        return self.name


def batch_generator(seed: int, step: int) -> torch.Generator:
    """The random stream that draws the batch of ``step`` for data seed ``seed``."""
    return torch.Generator().manual_seed(1_000_003 * (seed + 1) + step)


@dataclass
class RunSpec:
    """Everything that defines one training run."""

    run_id: str  # unique in the experiment, used for file names
    optimizer: str  # key of OPTIMIZERS
    group: str  # runs of one group differ only by seed; tables show the group's mean and spread
    label: str  # legend label of the group
    seed: int
    steps: int
    lr: float  # the shared (Adam-family) peak lr; this optimizer's peak is lr * lr_scale
    warmup: int  # linear warm-up steps
    eval_every: int
    weight_decay: float = 0.0
    clip: float | None = None  # gradient-norm clipping, the same for every optimizer of an experiment
    lr_scale: float | None = None  # None: the optimizer's own (OPTIMIZERS[key].lr_scale)
    options: dict[str, Any] = field(default_factory=dict)  # optimizer options (AdEMAMix alpha, ...)
    task: str = "main"  # which of the experiment's tasks
    params: dict[str, Any] = field(default_factory=dict)  # anything the summary groups by (lr, variant)

    @property
    def peak_lr(self) -> float:
        scale = OPTIMIZERS[self.optimizer].lr_scale if self.lr_scale is None else self.lr_scale
        return self.lr * scale

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "peak_lr": self.peak_lr}


def _new_record(spec: RunSpec) -> dict[str, Any]:
    return {
        "run_id": spec.run_id,
        "spec": spec.to_dict(),
        "train": {"step": [], "loss": [], "lr": []},
        "eval": {"step": []},
        "probe": {"step": []},
        "diverged_at": None,
        "steps_done": 0,
        "wall_time_s": 0.0,
    }


def _append(curves: dict[str, list[Any]], done: int, values: dict[str, float]) -> None:
    curves["step"].append(done)
    for k, v in values.items():
        curves.setdefault(k, []).append(float(v))


def _finite(x: float) -> bool:
    return math.isfinite(x)


def train_run(
    task: Task,
    spec: RunSpec,
    *,
    checkpoint: Path | None = None,
    state: dict[str, Any] | None = None,
    interrupt: Interrupt | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Train one run and return its record (curves and metrics, JSON-ready).

    ``state``: a checkpoint saved by an interrupted call, to continue from. On an interrupt request,
    saves a checkpoint to ``checkpoint`` and raises :class:`InterruptedRun`. Under ``torchrun`` each
    rank trains on its share of every batch (see :mod:`._distributed`); rank 0 alone saves and shows
    progress.
    """
    world = current_world()
    torch.manual_seed(spec.seed)
    model = task.build_model()
    optimizer = make_optimizer(
        spec.optimizer,
        model.parameters(),
        lr=spec.peak_lr,
        total_steps=spec.steps,
        weight_decay=spec.weight_decay,
        options=spec.options,
    )
    if state is not None:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        torch.set_rng_state(state["rng"])
        record: dict[str, Any] = state["record"]
    else:
        record = _new_record(spec)
        model.eval()
        with torch.no_grad():
            _append(record["eval"], 0, task.evaluate(model))
            first_probe = task.probe(model, 0, spec.seed)
        if first_probe is not None:
            _append(record["probe"], 0, first_probe)
    start = int(record["steps_done"])
    params = [p for p in model.parameters() if p.requires_grad]
    compute_loss = data_parallel_loss(task, model, world)

    def save_checkpoint() -> None:
        if checkpoint is not None and world.main:
            checkpoint_file.save(
                checkpoint,
                {
                    "done": False,
                    "model": model.state_dict(),
                    "optimizer": optimizer.state_dict(),
                    "rng": torch.get_rng_state(),
                    "record": record,
                },
            )

    eval_key = next((k for k in record["eval"] if k != "step"), None)

    def postfix() -> str:
        train = record["train"]["loss"][-20:]
        text = f"loss {sum(train) / len(train):.3f}" if train else ""
        if eval_key and record["eval"].get(eval_key):
            text += f"  {task.eval_prefix}{eval_key} {record['eval'][eval_key][-1]:.3f}"
        return text

    bar = ProgressBar(spec.run_id, spec.steps, start=start, enabled=progress and world.main)
    if start:
        bar.update(start, postfix())
    t_start = time.perf_counter() - float(record["wall_time_s"])
    last_save = time.perf_counter()
    unwarmed_on_purpose = spec.optimizer == "ademamix" and spec.options.get("schedulers") is False
    for step in range(start, spec.steps):
        lr = lr_at(step, peak=spec.peak_lr, total=spec.steps, warmup=spec.warmup)
        for group in optimizer.param_groups:
            group["lr"] = lr
        batch = shard_batch(task.train_batch(step, spec.seed), world)
        model.train()
        loss = compute_loss(batch)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if spec.clip:
            torch.nn.utils.clip_grad_norm_(params, spec.clip)
        if unwarmed_on_purpose and step == start:  # the schedulers experiment's point: no warning about it
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", AdEMAMixWarmupWarning)
                optimizer.step()
        else:
            optimizer.step()
        done = step + 1
        requested = interrupt.step_done() if interrupt is not None else False
        value, stop = step_totals(float(loss.detach()), requested, world)
        _append(record["train"], done, {"loss": value, "lr": lr})
        record["steps_done"] = done
        diverged = not _finite(value)
        if not diverged and (done % spec.eval_every == 0 or done == spec.steps):
            model.eval()
            with torch.no_grad():
                metrics = task.evaluate(model, final=done == spec.steps)
            _append(record["eval"], done, metrics)
            diverged = not all(_finite(v) for v in metrics.values())
        if not diverged:
            model.eval()
            with torch.no_grad():
                extra = task.probe(model, done, spec.seed)
            if extra is not None:
                _append(record["probe"], done, extra)
        record["wall_time_s"] = time.perf_counter() - t_start
        if diverged:
            record["diverged_at"] = done
            bar.close(f"diverged at step {done}")
            return record
        bar.update(done, postfix())
        if stop and done < spec.steps:
            save_checkpoint()
            bar.close("interrupted, checkpoint saved")
            raise InterruptedRun(spec.run_id)
        if checkpoint is not None and time.perf_counter() - last_save > CHECKPOINT_EVERY_S:
            save_checkpoint()
            last_save = time.perf_counter()
    bar.close()
    return record
