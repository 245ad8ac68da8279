"""Lean optimizer state (``state_precision``): memory, slow-EMA tracking, step time, and the demo's LM task.

    python benchmarks/state_precision.py                       # everything (several minutes on 2 cores)
    python benchmarks/state_precision.py --skip-lm --ema-steps 20000
    python benchmarks/state_precision.py --lm-steps 300 --lm-size small --json out.json

Sections:

1. Optimizer-state bytes per parameter, for every optimizer and mode: on one 1024 x 1024 matrix, and on
   the demo's GPT (``--lm-size``), whose small tensors (biases, norms) keep float32 state in 8-bit mode.
2. Peak process memory of a step on one 38.6M-element tensor per mode and path (fresh processes):
   fused (lean state coded in the kernel) and foreach (decoded and encoded in pieces).
3. Slow EMA (beta 0.9999) of 0.5 + N(0, 1) over ``--ema-steps`` steps and ``--ema-elements`` elements,
   kept in each mode, against float32: the error of the mean and the per-element RMS error; and
   the slow EMA of bitsandbytes' ``AdEMAMix8bit`` (lr 0) on the same gradients, when it is installed.
4. Step time of AdEMAMix per mode and path (median of ``--repeats``) on ``--time-params`` parameters,
   beside torchao's ``AdamW8bit`` and bitsandbytes' ``AdEMAMix8bit`` when they are installed and run
   here, every row interleaved step by step with torch's fused AdamW (its ratio to it, as
   benchmarks/step_speed.py), under the host's description.
5. The demo's LM task (``longmem.experiments``' LMTask, the ``lm`` experiment's settings for AdEMAMix:
   lr 2e-3 with 5% warm-up then cosine, weight decay 0.1, clipping 1.0, alpha 8, beta3 by the paper's
   guidance, schedulers over the run) for ``--lm-steps`` steps in each mode: final held-out loss.
6. Pure bf16 training: the same task with bf16 weights and no float32 copy (fp32 weights; bf16 with
   round-to-nearest; bf16 with ``param_rounding="stochastic"``; and that with 8-bit state), AdEMAMix
   and AdamW-like settings, ``--bf16-seeds`` seeds: final held-out loss and weights + state bytes
   per parameter.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
import warnings
from typing import Any

import torch

import longmem
from longmem import _state_precision as sp

MODES = ["fp32", "bf16", "8bit"]
NAMES = ["AdEMAMix", "SimplifiedAdEMAMix", "AdaMod", "DiffGrad", "DiffMod"]


def _table(headers: list[str], rows: list[list[Any]]) -> str:
    cells = [headers, *[[str(c) for c in row] for row in rows]]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = ["| " + " | ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) + " |" for r in cells]
    lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(lines)


# ---- 1. memory -------------------------------------------------------------------------------------


def state_bytes_per_param(name: str, mode: str, params: list[torch.nn.Parameter]) -> float:
    opt = getattr(longmem, name)(params, state_precision=mode)
    for p in params:
        p.grad = torch.zeros_like(p)
    opt.step()
    return sp.state_bytes(opt) / sum(p.numel() for p in params)


def memory_section(lm_size: str) -> dict[str, Any]:
    from longmem.experiments._models import GPT, GPT_SIZES

    results: dict[str, Any] = {}
    rows = []
    for name in NAMES:
        row: list[Any] = [name]
        for mode in MODES:
            matrix = state_bytes_per_param(name, mode, [torch.nn.Parameter(torch.zeros(1024, 1024))])
            gpt = state_bytes_per_param(name, mode, list(GPT(GPT_SIZES[lm_size]).parameters()))
            results[f"{name}/{mode}"] = {"matrix": matrix, "gpt": gpt}
            row.append(f"{matrix:.3f} / {gpt:.3f}")
        rows.append(row)
    print(f"\n## Optimizer-state bytes per parameter (1024x1024 matrix / the {lm_size} GPT)\n")
    print(_table(["optimizer", *MODES], rows))
    return results


PEAK_SNIPPET = """
import resource, sys, torch, longmem
torch.set_num_threads(1)
p = torch.nn.Parameter(torch.randn(50257, 768))
p.grad = torch.randn_like(p)
path = {"fused": dict(fused=True), "foreach": dict(foreach=True)}[sys.argv[1]]
opt = longmem.AdEMAMix([p], lr=1e-4, state_precision=sys.argv[2], **path)
for _ in range(3):
    opt.step()
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
"""


def peak_section() -> dict[str, Any]:
    """Peak process memory (max RSS) of three AdEMAMix steps on one 38.6M-element tensor (GPT-2's
    embedding), each mode and path in a fresh process: fused (lean state decoded and encoded in
    the kernel, no float32 copy) and foreach (decoded to float32 a piece of ``CHUNK_ELEMENTS`` at
    a time, the codec in pieces of ``CODEC_PIECE``)."""
    import subprocess

    results: dict[str, Any] = {}
    rows = []
    for path in ("fused", "foreach"):
        for mode in MODES:
            done = subprocess.run(
                [sys.executable, "-c", PEAK_SNIPPET, path, mode], capture_output=True, text=True, check=True
            )
            mib = int(done.stdout.split()[-1]) / 1024  # ru_maxrss is in KiB on Linux
            results[f"{mode}, {path}"] = mib
            rows.append([mode, path, f"{mib:.0f}"])
    print("\n## Peak process memory, 3 AdEMAMix steps on one 50257 x 768 tensor")
    print("(294 MiB of parameter and gradient)\n")
    print(_table(["state", "path", "peak RSS MiB"], rows))
    return results


# ---- 2. slow EMA -------------------------------------------------------------------------------------


def slow_ema_errors(m: torch.Tensor, exact: torch.Tensor) -> tuple[float, float]:
    """Error of the mean and per-element RMS error of a kept EMA ``m`` against the float32 one."""
    mean_error = m.mean().item() / exact.mean().item() - 1
    rms = ((m - exact).pow(2).mean().sqrt() / exact.abs().mean()).item()
    return mean_error, rms


def bitsandbytes_slow_ema_trace(
    steps: int, n: int, beta: float = 0.9999, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor] | str:
    """As ``sp.slow_ema_trace``, the slow EMA (``m2``) that bitsandbytes' AdEMAMix8bit keeps (lr 0, so the
    parameter stays put) of the same gradients, and the float32 one: ``(kept, exact)``; or why it did
    not run."""
    try:
        import bitsandbytes as bnb
        import bitsandbytes.functional as bnb_f
    except Exception as err:
        return f"bitsandbytes does not import ({type(err).__name__})"
    gen = torch.Generator().manual_seed(seed)  # the gradient stream of sp.slow_ema_trace
    p = torch.nn.Parameter(torch.zeros(n))
    opt = bnb.optim.AdEMAMix8bit([p], lr=0.0, betas=(0.9, 0.999, beta), weight_decay=0.0)
    exact = torch.zeros(n)
    try:
        for _ in range(steps):
            p.grad = torch.randn(n, generator=gen).add_(0.5)
            exact.lerp_(p.grad, 1 - beta)
            opt.step()
        state = opt.state[p]  # state1 stacks m1 and m2, each with its blocks' absmax
        m = bnb_f.dequantize_blockwise(
            state["state1"][1].contiguous(), absmax=state["absmax1"][1].contiguous(), code=state["qmap1"],
            blocksize=256,
        )  # fmt: skip
    except Exception as err:
        return f"bitsandbytes' AdEMAMix8bit did not run here ({type(err).__name__}: {str(err)[:160]})"
    return m, exact


#: the rows of the slow-EMA table: key in the results, sp.slow_ema_trace's mode (None: bitsandbytes'), label
EMA_ROWS = [
    ("bf16 round-to-nearest", "bf16-nearest", "bf16 round-to-nearest"),
    ("bf16", "bf16", "longmem bf16 (stochastic rounding)"),
    ("8bit", "8bit", "longmem 8bit (stochastic rounding)"),
    ("bitsandbytes", None, "bitsandbytes AdEMAMix8bit's m2 (its 8-bit format)"),
]


def ema_section(steps: int, n: int) -> dict[str, Any]:
    results: dict[str, Any] = {}
    rows, notes = [], []
    for key, mode, label in EMA_ROWS:
        start = time.perf_counter()
        trace = bitsandbytes_slow_ema_trace(steps, n) if mode is None else sp.slow_ema_trace(mode, steps, n)
        if isinstance(trace, str):
            results[key] = trace
            notes.append(f"{trace}: its slow EMA was not measured")
            continue
        mean_error, rms = slow_ema_errors(*trace)
        verdict = "within 5%" if abs(mean_error) < 0.05 else "FAILS"
        results[key] = {"mean_error": mean_error, "rms_error": rms}
        rows.append([label, f"{mean_error:+.2%}", f"{rms:.1%}", verdict])
        print(f"  ema {key}: {time.perf_counter() - start:.1f}s", file=sys.stderr)
    print(f"\n## Slow EMA, beta 0.9999, 0.5 + N(0, 1), {steps} steps x {n} elements, against float32\n")
    print(_table(["state", "error of the mean", "per-element RMS error", "verdict"], rows))
    for note in notes:
        print(f"\n{note}")
    return results


# ---- 3. step time ------------------------------------------------------------------------------------


def _time_interleaved(
    opt: torch.optim.Optimizer, ref: torch.optim.Optimizer, repeats: int, warmup: int = 2
) -> tuple[float, float]:
    """Median step time of ``opt`` and the median of its per-step ratios to ``ref`` (torch's fused
    AdamW on the same parameters), each of ``opt``'s steps right after one of ``ref``'s, so both
    see the same load (as benchmarks/step_speed.py)."""
    for _ in range(warmup):
        opt.step()
    times, ratios = [], []
    for _ in range(repeats):
        start = time.perf_counter()
        ref.step()
        middle = time.perf_counter()
        opt.step()
        end = time.perf_counter()
        times.append(end - middle)
        ratios.append((end - middle) / (middle - start))
    return statistics.median(times), statistics.median(ratios)


def _params(total: int) -> list[torch.nn.Parameter]:
    side = 1024
    count = max(1, total // (side * side))
    gen = torch.Generator().manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(side, side, generator=gen) * 0.02) for _ in range(count)]
    for p in params:
        p.grad = torch.randn(p.shape, generator=gen) * 1e-3
    return params


def timing_section(total: int, repeats: int) -> dict[str, Any]:
    """Step time of AdEMAMix per mode and path, torchao's AdamW8bit and bitsandbytes' AdEMAMix8bit
    (when installed), each interleaved with torch's fused AdamW (fp32 state) on the same parameters."""
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import _host

    results: dict[str, Any] = {}
    rows = []
    params = _params(total)
    n = sum(p.numel() for p in params)
    ref = torch.optim.AdamW(params, lr=1e-3, fused=True)
    ref.step()

    def row(label: str, path: str, opt: torch.optim.Optimizer, state: str) -> None:
        seconds, ratio = _time_interleaved(opt, ref, repeats)
        results[f"{label}/{path}"] = {"seconds": seconds, "x_adamw_fused": ratio}
        rows.append([label, path, f"{seconds * 1e3:.1f}", f"{ratio:.2f}", state])

    for mode in MODES:
        for path, kw in {
            "single": dict(foreach=False),
            "foreach": dict(foreach=True),
            "fused": dict(fused=True),
        }.items():
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                opt = longmem.AdEMAMix(params, lr=1e-3, state_precision=mode, **kw)
                opt.step()
                row(f"longmem AdEMAMix {mode}", path, opt, f"{sp.state_bytes(opt) / n:.2f}")
            del opt
    others = []
    try:
        import torchao.optim as tao

        try:
            opt = tao.AdamW8bit(params, lr=1e-3)
            opt.step()
            state = sum(
                x.numel() * x.element_size() if not hasattr(x, "codes") else _tao_bytes(x)
                for s in opt.state.values()
                for x in s.values()
                if isinstance(x, torch.Tensor)
            )
            row("torchao AdamW8bit (2 buffers)", "-", opt, f"{state / n:.2f}")
        except Exception as err:
            others.append(f"torchao AdamW8bit is installed but did not run here: {type(err).__name__}: {err}")
    except ImportError:
        others.append("torchao is not installed: AdamW8bit not timed")
    try:
        import bitsandbytes as bnb

        try:
            opt = bnb.optim.AdEMAMix8bit(params, lr=1e-3)
            opt.step()
            row(f"bitsandbytes {bnb.__version__} AdEMAMix8bit", "-", opt, "-")
        except Exception as err:
            others.append(
                f"bitsandbytes AdEMAMix8bit did not run here: {type(err).__name__}: {str(err)[:200]}"
            )
    except ImportError:
        others.append("bitsandbytes is not installed: AdEMAMix8bit not timed")
    print(f"\n## Step time, {n / 1e6:.1f}M parameters ({n // (1024 * 1024)} x 1024x1024), "
          f"{torch.get_num_threads()} thread(s), median of {repeats}, interleaved with torch's fused "
          "AdamW\n")  # fmt: skip
    print("\n".join(_host.describe()) + "\n")
    print(_table(["optimizer", "path", "ms / step", "x AdamW fused", "state bytes / param"], rows))
    bnb_key = next((k for k in results if k.startswith("bitsandbytes")), None)
    for mode in ("bf16", "8bit"):
        ours = results[f"longmem AdEMAMix {mode}/fused"]
        line = f"AdEMAMix fused, {mode} state: {ours['x_adamw_fused']:.2f}x torch's fused AdamW"
        if bnb_key is not None:  # both against the same interleaved reference
            speedup = results[bnb_key]["x_adamw_fused"] / ours["x_adamw_fused"]
            line += f"; {speedup:.0f}x faster than bitsandbytes' AdEMAMix8bit (target >= 20)"
        print(line)
    for line in others:
        print(f"\n{line}")
    results["notes"] = others
    return results


def _tao_bytes(x: Any) -> int:
    return sum(t.numel() * t.element_size() for t in (x.codes, x.scale) if isinstance(t, torch.Tensor))


# ---- 4. the LM task ----------------------------------------------------------------------------------


def lm_run(mode: str, size: str, steps: int, seed: int, optimizer: str) -> dict[str, float]:
    from longmem.experiments._lm import lm_task_from_config
    from longmem.experiments._optim import ademamix_beta3_for, lr_at

    task, _ = lm_task_from_config({"size": size, "corpus": "stdlib"})
    torch.manual_seed(seed)
    model = task.build_model()
    peak, warmup = 2e-3, max(1, round(0.05 * steps))
    if optimizer == "AdEMAMix":
        opt: torch.optim.Optimizer = longmem.AdEMAMix(
            model.parameters(), lr=peak, betas=(0.9, 0.999, ademamix_beta3_for(steps)), alpha=8.0,
            alpha_warmup=steps, beta3_warmup=steps, weight_decay=0.1, state_precision=mode,
        )  # fmt: skip
    else:
        opt = getattr(longmem, optimizer)(model.parameters(), lr=peak, weight_decay=0.1, state_precision=mode)
    start = time.perf_counter()
    for step in range(steps):
        for group in opt.param_groups:
            group["lr"] = lr_at(step, peak=peak, total=steps, warmup=warmup)
        batch = task.train_batch(step, seed)
        loss = task.loss(model, batch)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
    seconds = time.perf_counter() - start
    model.eval()
    held_out = task.evaluate(model, final=True)["loss"]
    return {
        "held_out": held_out,
        "train_seconds": seconds,
        "state_bytes_per_param": sp.state_bytes(opt) / task.n_params,
    }


def lm_section(size: str, steps: int, seeds: int, optimizers: list[str]) -> dict[str, Any]:
    results: dict[str, Any] = {}
    rows = []
    for optimizer in optimizers:
        losses: dict[str, list[float]] = {}
        for mode in MODES:
            runs = [lm_run(mode, size, steps, seed, optimizer) for seed in range(seeds)]
            losses[mode] = [r["held_out"] for r in runs]
            results[f"{optimizer}/{mode}"] = runs
            print(f"  lm {optimizer} {mode}: {[round(x, 4) for x in losses[mode]]}", file=sys.stderr)
        base = statistics.mean(losses["fp32"])
        for mode in MODES:
            loss = statistics.mean(losses[mode])
            diff = loss / base - 1
            verdict = "-" if mode == "fp32" else ("within 1%" if abs(diff) < 0.01 else "NOT within 1%")
            train_s = statistics.mean(r["train_seconds"] for r in results[f"{optimizer}/{mode}"])
            rows.append([optimizer, mode, f"{loss:.4f}", f"{diff:+.2%}", verdict, f"{train_s:.0f}"])
    print(f"\n## Demo LM task (--size {size}, {steps} steps, mean of {seeds} seed(s)): final held-out loss\n")
    print(_table(["optimizer", "state", "held-out loss (nats/byte)", "vs fp32", "verdict", "train s"], rows))
    return results


# ---- 5. pure bf16 training -------------------------------------------------------------------------

#: (label, parameter dtype, param_rounding, state_precision)
BF16_SETTINGS = [
    ("fp32 params", torch.float32, "nearest", "fp32"),
    ("bf16 params, nearest", torch.bfloat16, "nearest", "fp32"),
    ("bf16 params, stochastic", torch.bfloat16, "stochastic", "fp32"),
    ("bf16 params, stochastic, 8-bit state", torch.bfloat16, "stochastic", "8bit"),
]


def _make_optimizer(optimizer: str, params: Any, steps: int, **options: Any) -> torch.optim.Optimizer:
    """The lm experiment's AdEMAMix settings (lr 2e-3, weight decay 0.1, alpha 8, beta3 by the
    paper's guidance, both warm-ups over the run), or "AdamW-like": AdEMAMix with alpha 0, whose
    update is AdamW's exactly (its slow EMA is kept but unused)."""
    from longmem.experiments._optim import ademamix_beta3_for

    if optimizer == "AdEMAMix":
        betas = (0.9, 0.999, ademamix_beta3_for(steps))
        return longmem.AdEMAMix(params, lr=2e-3, betas=betas, alpha=8.0, alpha_warmup=steps,
                                beta3_warmup=steps, weight_decay=0.1, **options)  # fmt: skip
    return longmem.AdEMAMix(params, lr=2e-3, alpha=0.0, weight_decay=0.1, **options)


def bf16_run(setting: tuple, optimizer: str, size: str, steps: int, seed: int) -> dict[str, float]:
    """The demo's LM trained with its weights in the setting's dtype (no float32 copy: the
    optimizer writes the bf16 weights themselves), fused steps; the held-out loss is evaluated on
    a float32 copy of the final weights, exactly as they were stored."""
    from longmem.experiments._lm import lm_task_from_config
    from longmem.experiments._optim import lr_at

    _, dtype, rounding, precision = setting
    task, _ = lm_task_from_config({"size": size, "corpus": "stdlib"})
    torch.manual_seed(seed)
    model = task.build_model().to(dtype)
    opt = _make_optimizer(optimizer, model.parameters(), steps, fused=True, param_rounding=rounding,
                          state_precision=precision)  # fmt: skip
    peak, warmup = 2e-3, max(1, round(0.05 * steps))
    start = time.perf_counter()
    for step in range(steps):
        for group in opt.param_groups:
            group["lr"] = lr_at(step, peak=peak, total=steps, warmup=warmup)
        loss = task.loss(model, task.train_batch(step, seed))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
    seconds = time.perf_counter() - start
    stored = sum(p.numel() * p.element_size() for p in model.parameters()) + sp.state_bytes(opt)
    model = model.float().eval()
    return {
        "held_out": task.evaluate(model, final=True)["loss"],
        "train_seconds": seconds,
        "weights_and_state_bytes_per_param": stored / task.n_params,
    }


def bf16_section(size: str, steps: int, seeds: int, optimizers: list[str]) -> dict[str, Any]:
    results: dict[str, Any] = {}
    rows = []
    for optimizer in optimizers:
        base = None
        for setting in BF16_SETTINGS:
            runs = [bf16_run(setting, optimizer, size, steps, seed) for seed in range(seeds)]
            losses = [r["held_out"] for r in runs]
            results[f"{optimizer}/{setting[0]}"] = runs
            print(f"  bf16 {optimizer} {setting[0]}: {[round(x, 4) for x in losses]}", file=sys.stderr)
            mean = statistics.mean(losses)
            base = mean if base is None else base
            rows.append([optimizer, setting[0], " / ".join(f"{x:.4f}" for x in losses), f"{mean:.4f}",
                         "-" if base == mean and setting[1] == torch.float32 else f"{mean / base - 1:+.2%}",
                         f"{runs[0]['weights_and_state_bytes_per_param']:.2f}",
                         f"{statistics.mean(r['train_seconds'] for r in runs):.0f}"])  # fmt: skip
    print(f"\n## Pure bf16 training: the demo LM (--size {size}, {steps} steps, seeds 0..{seeds - 1}), "
          "fused steps, weights without a float32 copy\n")  # fmt: skip
    print(_table(["optimizer", "weights", "held-out loss per seed", "mean", "vs fp32",
                  "weights + state B/param", "train s"], rows))  # fmt: skip
    print(
        "\nB/param counts the weights and the optimizer state (not the gradients); AdamW in mixed precision "
        "keeps bf16 weights (2), a float32 master copy (4) and two float32 moments (8): 14, 16 with "
        "float32 gradients. AdamW-like: AdEMAMix with alpha 0 (AdamW's update; its unused slow EMA is "
        "stored, 1/3 of the state)."
    )
    return results


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    parser.add_argument("--ema-steps", type=int, default=20_000)
    parser.add_argument("--ema-elements", type=int, default=8192)
    parser.add_argument("--time-params", type=int, default=4 << 20, help="parameters in the step-time runs")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--lm-size", default="small", choices=["tiny", "small", "base"])
    parser.add_argument("--lm-steps", type=int, default=300)
    parser.add_argument("--lm-seeds", type=int, default=1)
    parser.add_argument("--lm-optimizers", nargs="+", default=["AdEMAMix"], choices=NAMES)
    parser.add_argument("--skip-ema", action="store_true")
    parser.add_argument("--skip-timing", action="store_true")
    parser.add_argument("--skip-lm", action="store_true")
    parser.add_argument("--skip-peak", action="store_true")
    parser.add_argument("--skip-bf16", action="store_true", help="skip the pure bf16 training runs")
    parser.add_argument("--bf16-seeds", type=int, default=2)
    parser.add_argument("--bf16-steps", type=int, default=300)
    parser.add_argument("--bf16-optimizers", nargs="+", default=["AdEMAMix", "AdamW-like"],
                        choices=["AdEMAMix", "AdamW-like"])  # fmt: skip
    parser.add_argument("--json", help="also write the figures to this file")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {args.threads} thread(s), longmem {longmem.__version__}")
    out: dict[str, Any] = {"args": vars(args), "memory": memory_section(args.lm_size)}
    if not args.skip_peak:
        out["peak"] = peak_section()
    if not args.skip_ema:
        out["ema"] = ema_section(args.ema_steps, args.ema_elements)
    if not args.skip_timing:
        out["timing"] = timing_section(args.time_params, args.repeats)
    if not args.skip_lm:
        out["lm"] = lm_section(args.lm_size, args.lm_steps, args.lm_seeds, args.lm_optimizers)
    if not args.skip_bf16:
        out["bf16"] = bf16_section(args.lm_size, args.bf16_steps, args.bf16_seeds, args.bf16_optimizers)
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(out, f, indent=1, default=lambda x: x if math.isfinite(x) else str(x))


if __name__ == "__main__":
    main()
