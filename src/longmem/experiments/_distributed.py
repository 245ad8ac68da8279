"""Data-parallel experiments under ``torchrun`` (DDP over gloo: the experiments train on the CPU).

Under ``torchrun --nproc-per-node N`` every rank runs every run of the experiment on its 1/N share of
each batch. The loss is a mean over equal shares, and DDP averages the gradients, so each step is the
single-process step on the whole batch, to the float rounding of the sums' order; the recorded
training loss is the mean over ranks, which is the whole batch's loss. The parameters stay identical on
every rank, so held-out evaluation needs no communication. Rank 0 alone writes files and shows
progress; a Ctrl-C on any rank stops every rank at the same step.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

__all__ = [
    "DataParallelError",
    "World",
    "barrier",
    "current_world",
    "data_parallel_loss",
    "init_world",
    "leave_world",
    "local_world_size",
    "shard_batch",
    "step_totals",
]


class DataParallelError(ValueError):
    """The experiment cannot run split between these processes."""


_joined = False  # whether init_world set up the process group


@dataclass(frozen=True)
class World:
    """This process's place in the run: ``rank`` of ``size`` processes."""

    rank: int = 0
    size: int = 1

    @property
    def main(self) -> bool:
        """Whether this process writes the files and shows progress."""
        return self.rank == 0

    @property
    def parallel(self) -> bool:
        return self.size > 1


def current_world() -> World:
    """The initialised default process group's world, or a world of one."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return World(dist.get_rank(), dist.get_world_size())
    return World()


def init_world() -> World:
    """Join the process group that ``torchrun`` describes in the environment (``WORLD_SIZE`` > 1)."""
    import torch.distributed as dist

    global _joined
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        dist.init_process_group("gloo")
        _joined = True
    return current_world()


def leave_world() -> None:
    """Leave the process group that :func:`init_world` joined (one set up by the caller stays)."""
    import torch.distributed as dist

    global _joined
    if _joined and dist.is_initialized():
        dist.destroy_process_group()
    _joined = False


def local_world_size() -> int:
    """Processes sharing this machine (``torchrun``'s ``LOCAL_WORLD_SIZE``), 1 outside torchrun."""
    return max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))


def shard_batch(batch: Any, world: World) -> Any:
    """This rank's equal share of ``batch`` (a tensor, or a tuple/list of tensors) along dim 0."""
    if not world.parallel:
        return batch
    if isinstance(batch, (tuple, list)):
        return type(batch)(shard_batch(b, world) for b in batch)
    if not isinstance(batch, Tensor) or batch.dim() == 0:
        raise DataParallelError(
            "this experiment's batches cannot be split between processes: run it without torchrun"
        )
    n = batch.shape[0]
    if n % world.size:
        raise DataParallelError(
            f"a batch of {n} examples cannot be split evenly between {world.size} processes; "
            "use a --nproc-per-node that divides it"
        )
    share = n // world.size
    return batch[world.rank * share : (world.rank + 1) * share]


class _TaskLoss(nn.Module):
    """``task.loss(model, batch)`` as a module's forward, so that DDP sees the forward pass."""

    def __init__(self, task: Any, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self._task = task

    def forward(self, batch: Any) -> Tensor:
        return self._task.loss(self.model, batch)


def data_parallel_loss(task: Any, model: nn.Module, world: World) -> nn.Module:
    """A module computing ``task.loss(model, batch)``; under several processes, DDP-wrapped."""
    loss = _TaskLoss(task, model)
    if not world.parallel:
        return loss
    from torch.nn.parallel import DistributedDataParallel

    return DistributedDataParallel(loss)


def step_totals(loss: float, stop: bool, world: World) -> tuple[float, bool]:
    """(the mean of ``loss`` over ranks, whether any rank asked to stop): one all-reduce a step."""
    if not world.parallel:
        return loss, stop
    import torch.distributed as dist

    values = torch.tensor([loss, float(stop)], dtype=torch.float64)
    dist.all_reduce(values)
    return float(values[0]) / world.size, bool(values[1] > 0)


def barrier(world: World) -> None:
    if world.parallel:
        import torch.distributed as dist

        dist.barrier()
