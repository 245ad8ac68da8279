"""Soak test (outside CI): AdEMAMix trained for many steps while being killed and resumed.

A worker process trains a tiny model (a 2-layer MLP on synthetic regression data drawn from the step
number, so no data-loader state is needed) with ``longmem.AdEMAMix`` and saves a checkpoint (model,
optimizer, step) with ``longmem.checkpoint.save`` at random points, about every ``--every`` steps.
This script starts the worker, kills it with SIGKILL at random points about every ``--every`` steps
(some while it is stepping, some while it is writing a checkpoint), and starts it again; the worker
resumes from the last checkpoint with ``longmem.checkpoint.load`` and ``load_state_dict``. A second,
uninterrupted worker runs the same steps in one go. The final parameters and optimizer state of both
must be bit-identical. Both run a copy of this script and of the longmem package taken at the start,
so that edits to the checkout during the soak cannot make them differ.

A few gradients are poisoned with NaN (every ``--nan-every`` steps) and ``nonfinite="skip"`` skips
those steps, in both runs alike.

    PYTHONPATH=src python3 benchmarks/soak.py --steps 100000          # the full soak
    PYTHONPATH=src python3 benchmarks/soak.py --steps 10000 --seed 1  # a few minutes

Prints a summary (kills, of which during a save; resumes; steps redone; verdict) and exits 1 if the
runs differ or a worker fails.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CKPT = "ckpt.pt"


# ============================================================================ worker


def _batch(step: int, seed: int):
    import torch

    gen = torch.Generator().manual_seed(seed * 1_000_003 + step)
    x = torch.randn(16, 8, generator=gen)
    y = torch.sin(x[:, :1] * 2.0) + 0.1 * x[:, 1:2]
    return x, y


def worker(args: argparse.Namespace) -> None:
    import torch

    import longmem
    from longmem import checkpoint

    torch.set_num_threads(1)  # the same kernels, thread count and reduction order in every process
    torch.manual_seed(args.seed)
    model = torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.Tanh(), torch.nn.Linear(32, 1))
    opt = longmem.AdEMAMix(
        model.parameters(),
        lr=1e-3,
        betas=(0.9, 0.999, 0.9999),
        alpha=5.0,
        alpha_warmup=args.steps // 4,
        beta3_warmup=args.steps // 4,
        weight_decay=0.01,
        fused=args.fused or None,
        nonfinite="skip",
    )
    out = Path(args.dir)
    step = 0
    if (out / CKPT).exists():
        saved = checkpoint.load(out / CKPT)
        model.load_state_dict(saved["model"])
        opt.load_state_dict(saved["optimizer"])
        step = saved["step"]
    rng = random.Random(os.getpid())  # save points differ from one process to the next
    next_save = step + rng.randint(args.every // 2, args.every * 3 // 2) if args.every else None
    print(f"start {step}", flush=True)
    while step < args.steps:
        x, y = _batch(step, args.seed)
        opt.zero_grad(set_to_none=True)
        torch.nn.functional.mse_loss(model(x), y).backward()
        if args.nan_every and step % args.nan_every == args.nan_every - 1:
            model[0].weight.grad[0, 0] = float("nan")
        opt.step()
        step += 1
        print(step, flush=True)
        if next_save is not None and step >= next_save and step < args.steps:
            print(f"save {step}", flush=True)
            checkpoint.save(
                out / CKPT, {"step": step, "model": model.state_dict(), "optimizer": opt.state_dict()}
            )
            next_save = step + rng.randint(args.every // 2, args.every * 3 // 2)
    final = {"step": step, "model": model.state_dict(), "optimizer": opt.state_dict()}
    checkpoint.save(out / "final.pt", final)
    print(f"done {step}", flush=True)


# ============================================================================ driver


def _worker_cmd(args: argparse.Namespace, directory: Path, every: int) -> list[str]:
    cmd = [
        sys.executable,
        str(Path(directory).parent / "soak.py"),
        "--worker",
        "--dir",
        str(directory),
        "--steps",
        str(args.steps),
    ]
    cmd += ["--seed", str(args.seed), "--every", str(every), "--nan-every", str(args.nan_every)]
    return cmd + (["--fused"] if args.fused else [])


def _snapshot(folder: Path) -> Path:
    """A copy of this script and of the longmem package it imports, so that every worker runs the same
    code even if the checkout is edited meanwhile; returns the folder to put on PYTHONPATH."""
    import longmem

    src = folder / "src"
    shutil.copytree(
        Path(longmem.__file__).parent, src / "longmem", ignore=shutil.ignore_patterns("__pycache__")
    )
    shutil.copy2(__file__, folder / "soak.py")
    return src


def _env(directory: Path) -> dict[str, str]:
    src = str(Path(directory).parent / "src")
    return {**os.environ, "PYTHONPATH": os.pathsep.join([src, os.environ.get("PYTHONPATH", "")])}


def _same(a, b) -> bool:
    import torch

    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    if torch.is_tensor(a):
        return torch.is_tensor(b) and a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)
    return a == b


def interrupted_run(args: argparse.Namespace, directory: Path, rng: random.Random) -> dict:
    """The worker, killed with SIGKILL about every ``args.every`` steps and restarted, until it ends."""
    kills = kills_in_save = starts = redone = leftovers = 0
    last_reached = 0
    while True:
        proc = subprocess.Popen(
            _worker_cmd(args, directory, args.every), stdout=subprocess.PIPE, text=True, env=_env(directory)
        )
        starts += 1
        assert proc.stdout is not None
        kill_at = None
        killed = False
        for line in proc.stdout:
            word = line.split()
            if word[0] == "start":
                resumed = int(word[1])
                redone += max(0, last_reached - resumed)
                # mostly after a save or two (saves come every every/2 .. 3*every/2 steps)
                kill_at = resumed + rng.randint(args.every * 3 // 4, args.every * 7 // 4)
                mid_save = rng.random() < args.save_kill_fraction  # this time: kill while it saves
                continue
            if word[0] == "done":
                break
            if word[0] == "save":
                if mid_save and kill_at is not None and int(word[1]) >= kill_at - args.every:
                    time.sleep(rng.uniform(0.0, 0.002))  # somewhere in torch.save, fsync or rename
                    proc.send_signal(signal.SIGKILL)
                    kills, kills_in_save, killed = kills + 1, kills_in_save + 1, True
                    break
                continue
            last_reached = max(last_reached, int(word[0]))
            if not mid_save and kill_at is not None and int(word[0]) >= kill_at:
                time.sleep(rng.uniform(0.0, 0.002))  # somewhere in the next step(s)
                proc.send_signal(signal.SIGKILL)
                kills, killed = kills + 1, True
                break
        proc.stdout.close()
        code = proc.wait()
        if not killed:
            if code != 0:
                raise SystemExit(f"the worker failed (exit code {code}); see its output above")
            break
        for tmp in directory.glob(f".{CKPT}.*.tmp"):  # a save that the kill interrupted
            leftovers += 1
            tmp.unlink()
        if args.verbose:
            print(f"  killed at or after step {last_reached}; restarts: {starts}", flush=True)
    return dict(
        starts=starts,
        kills=kills,
        kills_aimed_at_saves=kills_in_save,
        interrupted_saves_left_temp_files=leftovers,
        steps_redone=redone,
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--steps", type=int, default=100_000)
    parser.add_argument("--every", type=int, default=1000, help="about this many steps between saves, kills")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--nan-every", type=int, default=9973, help="poison a gradient every N steps (0: never)"
    )
    parser.add_argument("--save-kill-fraction", type=float, default=0.25, help="kills aimed at a save")
    parser.add_argument("--fused", action="store_true", help="fused=True (the C kernel on CPU)")
    parser.add_argument("--dir", help="working folder (default: a temporary one)")
    parser.add_argument("--verbose", action="store_true")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return

    import torch

    rng = random.Random(args.seed)
    with tempfile.TemporaryDirectory(prefix="longmem-soak-", dir=args.dir) as tmp:
        killed_dir, straight_dir = Path(tmp, "killed"), Path(tmp, "straight")
        killed_dir.mkdir()
        straight_dir.mkdir()
        _snapshot(Path(tmp))
        check = [sys.executable, "-c", "import longmem; print(longmem.__file__)"]
        used = subprocess.run(check, env=_env(straight_dir), check=True, capture_output=True, text=True)
        assert used.stdout.startswith(tmp), f"the workers would import {used.stdout.strip()}, not the copy"
        start = time.perf_counter()
        subprocess.run(
            _worker_cmd(args, straight_dir, 0), check=True, stdout=subprocess.DEVNULL, env=_env(straight_dir)
        )
        straight_s = time.perf_counter() - start
        start = time.perf_counter()
        summary = interrupted_run(args, killed_dir, rng)
        killed_s = time.perf_counter() - start
        a = torch.load(straight_dir / "final.pt", weights_only=True)
        b = torch.load(killed_dir / "final.pt", weights_only=True)
        identical = _same(a, b)
        first_param = next(iter(a["optimizer"]["state"].values()))
        summary.update(
            steps=args.steps,
            seed=args.seed,
            fused=args.fused,
            optimizer_steps_taken=int(first_param["step"]),
            uninterrupted_s=round(straight_s, 1),
            interrupted_s=round(killed_s, 1),
            bit_identical=identical,
        )
    print(json.dumps(summary, indent=1))
    if not identical:
        raise SystemExit("FAIL: the interrupted run differs from the uninterrupted one")
    print("OK: final parameters and optimizer state bit-identical to the uninterrupted run")


if __name__ == "__main__":
    main()
