"""Train a small MLP with AdEMAMix under DDP, FSDP2 or ZeRO; save and resume with distributed checkpoints.

    torchrun --nproc-per-node 2 examples/distributed_training.py --mode fsdp2 --steps 20 --ckpt /tmp/ckpt

On CPU it uses gloo, on GPUs nccl. With --ckpt, FSDP2 saves a distributed checkpoint half-way
(model and optimizer) and a second run with --resume continues from it, on any number of ranks.
"""

from __future__ import annotations

import argparse
import os

import torch
import torch.distributed as dist
from torch import nn

import longmem


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--mode", choices=["ddp", "fsdp2", "zero"], default="fsdp2")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--ckpt", default=None, help="distributed checkpoint directory (fsdp2)")
    parser.add_argument("--resume", action="store_true", help="load --ckpt first, then train the second half")
    args = parser.parse_args()

    cuda = torch.cuda.is_available()
    dist.init_process_group("nccl" if cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 64), nn.LayerNorm(64), nn.GELU(), nn.Linear(64, 1)).to(device)
    hp = dict(lr=1e-3, alpha=5.0, alpha_warmup=args.steps, beta3_warmup=args.steps)

    if args.mode == "ddp":
        train_model = nn.parallel.DistributedDataParallel(model)
        opt = longmem.create_optimizer("ademamix", model, weight_decay=0.1, **hp)
    elif args.mode == "zero":
        from torch.distributed.optim import ZeroRedundancyOptimizer

        train_model = nn.parallel.DistributedDataParallel(model)
        opt = ZeroRedundancyOptimizer(
            longmem.param_groups(model, 0.1), optimizer_class=longmem.AdEMAMix, **hp
        )
    else:
        from torch.distributed.fsdp import fully_shard

        for layer in model:
            if isinstance(layer, nn.Linear):
                fully_shard(layer)
        fully_shard(model)  # parameters are now DTensors: each rank keeps and updates its shard
        train_model = model
        opt = longmem.create_optimizer("ademamix", model, weight_decay=0.1, **hp)

    start, stop = 0, args.steps
    if args.ckpt and args.mode == "fsdp2":
        start, stop = (args.steps // 2, args.steps) if args.resume else (0, args.steps // 2)
        if args.resume:
            load_checkpoint(model, opt, args.ckpt)

    for step in range(start, stop):
        g = torch.Generator().manual_seed(step * world + rank)  # each rank its own data
        x = torch.randn(64, 32, generator=g).to(device)
        y = x[:, :4].sum(1, keepdim=True).sin()
        loss = nn.functional.mse_loss(train_model(x), y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if rank == 0 and (step % 5 == 0 or step == stop - 1):
            print(f"step {step:4d}  loss {loss.item():.4f}", flush=True)

    if args.ckpt and args.mode == "fsdp2" and not args.resume:
        save_checkpoint(model, opt, args.ckpt)
        if rank == 0:
            print(f"saved a distributed checkpoint to {args.ckpt}", flush=True)
    dist.barrier()
    dist.destroy_process_group()


def save_checkpoint(model: nn.Module, opt: torch.optim.Optimizer, path: str) -> None:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

    dcp.save(
        {"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, opt)},
        checkpoint_id=path,
    )


def load_checkpoint(model: nn.Module, opt: torch.optim.Optimizer, path: str) -> None:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (
        get_model_state_dict,
        get_optimizer_state_dict,
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    state = {"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, opt)}
    dcp.load(state, checkpoint_id=path)  # reshards: saved on any number of ranks
    set_model_state_dict(model, state["model"])
    set_optimizer_state_dict(model, opt, state["optim"])


if __name__ == "__main__":
    main()
