"""The distributed runs behind tests/test_distributed.py: one 2-process gloo job on CPU, and the
single-process references it is compared with.

Every scenario trains the same tiny float64 model on the same data: rank ``r`` of 2 takes batch
``batch(step, r)``, the single-process reference takes both (``full_batch(step)``), so with gradients
averaged across ranks the two runs agree to float rounding. Rank 0 saves each scenario's results to
``<out>/<scenario>.pt`` as soon as it is done, or its traceback to ``<out>/<scenario>.err``.
"""

from __future__ import annotations

import inspect
import os
import traceback
import warnings
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

import longmem

WORLD = 2
STEPS = 4
DTYPE = torch.float64
FUSED_DTYPE = torch.float32  # what the fused kernels take

#: optimizer name -> create_optimizer keyword arguments
CONFIGS: dict[str, dict[str, Any]] = {
    "ademamix": dict(lr=1e-2, weight_decay=0.1, alpha=5.0, alpha_warmup=6, beta3_warmup=6),
    "simplified_ademamix": dict(lr=1e-3, weight_decay=0.1, alpha=2.0, beta1_warmup=6),
    "adamod": dict(lr=1e-2, weight_decay=0.1),
    "diffgrad": dict(lr=1e-2, weight_decay=0.01),
    "diffmod": dict(lr=1e-2, weight_decay=0.1, len_memory=10),
}


def make_model(dtype: torch.dtype = DTYPE) -> nn.Module:
    torch.manual_seed(0)
    # odd sizes: a 2-way shard of 5 or 3 rows is uneven, and the 1-element bias leaves rank 1 empty
    model = nn.Sequential(
        nn.Linear(4, 5), nn.LayerNorm(5), nn.Tanh(), nn.Linear(5, 3), nn.Tanh(), nn.Linear(3, 1)
    )
    return model.to(dtype)


def batch(step: int, rank: int, dtype: torch.dtype = DTYPE) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1000 * step + rank)
    x = torch.randn(8, 4, generator=g, dtype=DTYPE)
    y = torch.randn(8, 1, generator=g, dtype=DTYPE)
    return x.to(dtype), y.to(dtype)


def full_batch(step: int, dtype: torch.dtype = DTYPE) -> tuple[torch.Tensor, torch.Tensor]:
    xs, ys = zip(*(batch(step, r, dtype) for r in range(WORLD)), strict=True)
    return torch.cat(xs), torch.cat(ys)


def train(
    model: nn.Module, opt: torch.optim.Optimizer, steps: range, rank: int | None, dtype: torch.dtype = DTYPE
) -> None:
    """``rank=None``: the single-process reference on the full batch."""
    for step in steps:
        x, y = full_batch(step, dtype) if rank is None else batch(step, rank, dtype)
        loss = nn.functional.mse_loss(model(x), y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)


def reference(
    name: str, steps: int = STEPS, dtype: torch.dtype = DTYPE, **extra: Any
) -> tuple[nn.Module, torch.optim.Optimizer]:
    model = make_model(dtype)
    opt = longmem.create_optimizer(name, model, **CONFIGS[name], **extra)
    train(model, opt, range(steps), None, dtype)
    return model, opt


def supports_fused() -> bool:
    return "fused" in inspect.signature(longmem.AdEMAMix.__init__).parameters


def _full(t: torch.Tensor) -> torch.Tensor:
    full = t.full_tensor() if hasattr(t, "full_tensor") else t
    return full.detach().clone()


def _params(model: nn.Module) -> dict[str, torch.Tensor]:
    return {name: _full(p) for name, p in model.named_parameters()}


def _state(model: nn.Module, opt: torch.optim.Optimizer) -> dict[str, dict[str, torch.Tensor]]:
    """Optimizer state keyed by parameter name, DTensors gathered (a collective: every rank calls it)."""
    names = {id(p): name for name, p in model.named_parameters()}
    return {
        names[id(p)]: {k: _full(v) for k, v in s.items() if isinstance(v, torch.Tensor)}
        for p, s in opt.state.items()
    }


# ---- scenarios (run on every rank; return what rank 0 saves) ----------------------------------------


def scenario_ddp(rank: int, out: Path) -> dict[str, Any]:
    from torch.nn.parallel import DistributedDataParallel as DDP

    results = {}
    for name in CONFIGS:
        model = make_model()
        ddp = DDP(model)
        opt = longmem.create_optimizer(name, ddp.module, **CONFIGS[name])
        train(ddp, opt, range(STEPS), rank)
        results[name] = _params(model)
    return results


def scenario_zero(rank: int, out: Path) -> dict[str, Any]:
    from torch.distributed.optim import ZeroRedundancyOptimizer
    from torch.nn.parallel import DistributedDataParallel as DDP

    def build(model: nn.Module) -> ZeroRedundancyOptimizer:
        kwargs = dict(CONFIGS["ademamix"])
        groups = longmem.param_groups(model, kwargs.pop("weight_decay"))
        return ZeroRedundancyOptimizer(groups, optimizer_class=longmem.AdEMAMix, **kwargs)

    model = make_model()
    ddp = DDP(model)
    opt = build(model)
    owned = sum(p.numel() for group in opt.optim.param_groups for p in group["params"])
    train(ddp, opt, range(STEPS), rank)
    opt.consolidate_state_dict(to=0)
    result: dict[str, Any] = {"params": _params(model), "owned": owned}
    # saved on rank 0, it loads back into a new ZeroRedundancyOptimizer and goes on identically
    if rank == 0:
        torch.save(opt.state_dict(), out / "zero-optimizer.pt")  # (it holds live tensors of rank 0's share)
    dist.barrier()
    result["state_dict"] = torch.load(out / "zero-optimizer.pt", weights_only=True)
    model2 = make_model()
    with torch.no_grad():
        for p, q in zip(model2.parameters(), model.parameters(), strict=True):
            p.copy_(q)
    ddp2 = DDP(model2)
    opt2 = build(model2)
    opt2.load_state_dict(torch.load(out / "zero-optimizer.pt", weights_only=True))  # (it edits its argument)
    train(ddp, opt, range(STEPS, STEPS + 2), rank)
    train(ddp2, opt2, range(STEPS, STEPS + 2), rank)
    result["continued"] = _params(model)
    result["reloaded"] = _params(model2)
    return result


def scenario_fsdp2(rank: int, out: Path) -> dict[str, Any]:
    results = {}
    for name in CONFIGS:
        for mode in ("single", "foreach"):
            model = _fsdp_model()
            opt = longmem.create_optimizer(name, model, **CONFIGS[name], foreach=mode == "foreach")
            train(model, opt, range(STEPS), rank)
            state_types = {type(v).__name__ for s in opt.state.values() for v in s.values()}
            results[f"{name}/{mode}"] = {"params": _params(model), "state_types": state_types}
    return results


def scenario_fsdp2_fused(rank: int, out: Path) -> dict[str, Any]:
    """``fused=True`` on float32 FSDP2 shards (float64 is not fused: it would test the fallback)."""
    results = {}
    if not supports_fused():
        return results
    for name in CONFIGS:
        model = _fsdp_model(FUSED_DTYPE)
        opt = longmem.create_optimizer(name, model, **CONFIGS[name], fused=True)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            train(model, opt, range(STEPS), rank, FUSED_DTYPE)
        results[name] = {"params": _params(model), "warnings": [str(w.message) for w in caught]}
    return results


def _fsdp_model(dtype: torch.dtype = DTYPE) -> nn.Module:
    from torch.distributed.fsdp import fully_shard

    model = make_model(dtype)
    for layer in model:
        if isinstance(layer, nn.Linear):
            fully_shard(layer)
    fully_shard(model)
    return model


def scenario_dcp(rank: int, out: Path) -> dict[str, Any]:
    """Save model and optimizer with torch.distributed.checkpoint after 2 steps; go on 2 more; then
    load the checkpoint into a fresh model and optimizer and run the same 2 steps again."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (
        get_model_state_dict,
        get_optimizer_state_dict,
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    half = STEPS // 2
    results = {}
    for name in CONFIGS:
        path = out / f"dcp-{name}"
        model = _fsdp_model()
        opt = longmem.create_optimizer(name, model, **CONFIGS[name])
        train(model, opt, range(half), rank)
        saved = {"params": _params(model), "state": _state(model, opt)}
        dcp.save(
            {"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, opt)},
            checkpoint_id=path,
        )
        train(model, opt, range(half, STEPS), rank)
        straight = {"params": _params(model), "state": _state(model, opt)}

        model = _fsdp_model()
        opt = longmem.create_optimizer(name, model, **CONFIGS[name])
        refused = _load_full_state_into_sharded(name, opt)
        loaded = {"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, opt)}
        dcp.load(loaded, checkpoint_id=path)
        set_model_state_dict(model, loaded["model"])
        set_optimizer_state_dict(model, opt, loaded["optim"])
        restored = {"params": _params(model), "state": _state(model, opt)}
        train(model, opt, range(half, STEPS), rank)
        resumed = {"params": _params(model), "state": _state(model, opt)}
        results[name] = {
            "saved": saved,
            "restored": restored,
            "straight": straight,
            "resumed": resumed,
            "path": str(path),
            "refused": refused,
        }
    return results


def _load_full_state_into_sharded(name: str, opt: torch.optim.Optimizer) -> str | None:
    """A plain (full-tensor) state dict loaded into an FSDP2 optimizer: the error it raises, if any."""
    plain = make_model()
    plain_opt = longmem.create_optimizer(name, plain, **CONFIGS[name])
    train(plain, plain_opt, range(1), None)
    try:
        opt.load_state_dict(plain_opt.state_dict())
    except ValueError as err:
        if opt.state:
            return f"raised but changed the optimizer: {err}"
        return str(err)
    return None


SCENARIOS: dict[str, Callable[[int, Path], dict[str, Any]]] = {
    "ddp": scenario_ddp,
    "zero": scenario_zero,
    "fsdp2": scenario_fsdp2,
    "fsdp2_fused": scenario_fsdp2_fused,
    "dcp": scenario_dcp,
}


def worker(rank: int, port: int, out_dir: str) -> None:
    """Entry point of each of the 2 processes (torch.multiprocessing.spawn)."""
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD, timeout=timedelta(seconds=120))
    out = Path(out_dir)
    try:
        for name, scenario in SCENARIOS.items():
            try:
                result = scenario(rank, out)
            except BaseException:
                (out / f"{name}.err").write_text(f"rank {rank}:\n{traceback.format_exc()}")
                # the other rank may be waiting in a collective: stop the job, later scenarios unrun
                os._exit(1)
            if rank == 0:
                torch.save(result, out / f"{name}.pt")
            dist.barrier()
    finally:
        dist.destroy_process_group()
