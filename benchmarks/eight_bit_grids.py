"""Which 8-bit grid for a signed EMA: the shipped power grid against the linear and float-like ones.

    python benchmarks/eight_bit_grids.py                 # about three minutes on one core
    python benchmarks/eight_bit_grids.py --json out.json

Stochastic rounding keeps a stored EMA unbiased, but the stored value becomes a random walk around the
exact EMA. A value resting on a grid point, with an increment ``inc = (1 - beta) (g - m)`` far below the
local spacing ``D``, jumps by ``D`` with probability ``|inc| / D``: a variance of ``D |inc|`` per step,
which the EMA's own decay damps, so the variance settles at ``D E|inc| / (1 - beta^2)`` ~ ``D E|g - m| / 2``,
whatever beta is. The per-element error of a slow EMA is therefore set by the grid's spacing where the
values sit, and the synthetic check of ``benchmarks/state_precision.py`` (an EMA of ``0.5 + N(0, 1)``,
every element of a block near the block's absmax) measures the spacing at the top of the grid. The
``predicted`` column states that formula from each element's spacing and the run's mean ``|g - m|``
(for the slow EMA only: with beta 0.9 the increments are not far below the spacing).

Grids, each a signed code (sign and 128 magnitudes ``G[c]``, ``G[127] = 1``) times the block's absmax
(blocks of 256), stochastically rounded between neighbours with torch's generator:

* ``power 3``: ``G[c] = (c / 127)^3``, the grid ``state_precision="8bit"`` ships (signed buffers);
* ``linear``: ``G[c] = c / 127``;
* ``E3M4``: a float-like code (3 exponent bits, 4 mantissa bits, linear below 2^-7 of the top), the
  kind of format whose encoding is a few integer operations on a float's bits (with codes of that
  kind a scratch harness ran the whole fused 8-bit step 2.2-2.9x faster, docs/speed.md).

Workloads: EMAs of ``(mu + N(0, 1)) * s_i`` whose per-element scales ``s_i`` are log-uniform over
``spread`` decades and placed at random in the blocks (a block of a real weight's state mixes scales):
the slow one (beta 0.9999, mu 0.5) and AdEMAMix's fast one (beta 0.9, mu 0). Errors: the RMS of
``stored - exact`` over the mean ``|exact|`` (the synthetic check's figure) and in units of ``s_i``
(what matters for the update of an element, whatever its scale).
"""

from __future__ import annotations

import argparse
import json
import math
from typing import Any

import torch

from longmem._state_precision import BLOCK_SIZE, SIGNED_GRID

LEVELS, POWER = SIGNED_GRID


def power3_grid() -> torch.Tensor:
    return (torch.arange(LEVELS + 1, dtype=torch.float64) / LEVELS) ** POWER


def linear_grid() -> torch.Tensor:
    return torch.arange(LEVELS + 1, dtype=torch.float64) / LEVELS


def e3m4_grid() -> torch.Tensor:
    c = torch.arange(LEVELS + 1)
    exponent, mantissa = c >> 4, (c & 15).double()
    normal = (1 + mantissa / 16) * torch.pow(2.0, exponent.double() - 8)
    subnormal = mantissa / 16 * 2.0**-7
    values = torch.where(exponent == 0, subnormal, normal)
    return values / values[-1]


GRIDS = {"power 3": power3_grid, "linear": linear_grid, "E3M4": e3m4_grid}


def round_to_grid(
    x: torch.Tensor, grid: torch.Tensor, gen: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """``x`` (float64) stochastically rounded to ``grid`` times each block's absmax; also each element's
    grid spacing (in ``x``'s units) at the cell it was rounded in."""
    blocks = x.view(-1, BLOCK_SIZE)
    absmax = blocks.abs().amax(dim=1, keepdim=True)
    y = (blocks.abs() / torch.where(absmax > 0, absmax, 1.0)).clamp(max=1.0)
    k = (torch.searchsorted(grid, y, right=True) - 1).clamp(0, LEVELS - 1)
    lo, hi = grid[k], grid[k + 1]
    up = torch.rand(y.shape, generator=gen, dtype=torch.float64) * (hi - lo) < y - lo
    stored = torch.where(up, hi, lo) * blocks.sign() * absmax
    return stored.view(-1), ((hi - lo) * absmax).view(-1)


def ema_errors(grid_name: str, beta: float, mu: float, spread: float, steps: int, n: int) -> dict[str, float]:
    """Run the EMA exactly (float64) and stored on the grid, from zero; the errors at the end."""
    data = torch.Generator().manual_seed(0)
    rounding = torch.Generator().manual_seed(1)
    grid = GRIDS[grid_name]()
    scale = torch.logspace(-spread / 2, spread / 2, n, dtype=torch.float64)[torch.randperm(n, generator=data)]
    exact = torch.zeros(n, dtype=torch.float64)
    stored = torch.zeros(n, dtype=torch.float64)
    spacing = torch.zeros(n, dtype=torch.float64)
    deviation = 0.0  # mean |g - m| / s over the last quarter, for the prediction
    for t in range(1, steps + 1):
        g = (torch.randn(n, generator=data, dtype=torch.float64) + mu) * scale
        if 4 * t > 3 * steps:
            deviation += ((g - stored).abs() / scale).mean().item() / (steps - 3 * steps // 4)
        exact.lerp_(g, 1 - beta)
        stored, spacing = round_to_grid(stored.lerp(g, 1 - beta), grid, rounding)
    err = stored - exact
    return {
        "relative_rms": (err.pow(2).mean().sqrt() / exact.abs().mean()).item(),
        # D E|g - m| / 2, with E|g - m| = deviation * s_i; valid where |inc| << D (slow EMAs)
        "predicted_relative_rms": math.sqrt((spacing * scale).mean().item() * deviation / 2)
        / exact.abs().mean().item(),
        "rms_in_scale_units": (err / scale).pow(2).mean().sqrt().item(),
    }


WORKLOADS = [  # (label, beta, mu, spread in decades, steps)
    ("slow EMA, one scale (the synthetic check)", 0.9999, 0.5, 0.0, 20_000),
    ("slow EMA, scales over 2 decades", 0.9999, 0.5, 2.0, 20_000),
    ("slow EMA, scales over 4 decades", 0.9999, 0.5, 4.0, 20_000),
    ("fast EMA, scales over 2 decades", 0.9, 0.0, 2.0, 2_000),
    ("fast EMA, scales over 4 decades", 0.9, 0.0, 4.0, 2_000),
]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--elements", type=int, default=8192, help="elements per EMA (a multiple of 256)")
    parser.add_argument("--step-scale", type=float, default=1.0, help="multiply every workload's steps")
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args(argv)
    if args.elements <= 0 or args.elements % BLOCK_SIZE:
        parser.error(f"--elements must be a positive multiple of {BLOCK_SIZE}, got {args.elements}")
    if args.step_scale <= 0:
        parser.error(f"--step-scale must be > 0, got {args.step_scale}")
    torch.set_num_threads(1)
    results: dict[str, Any] = {}
    print("| workload | grid | RMS / mean abs (predicted) | RMS in units of the element's scale |")
    print("|---|---|---|---|")
    for label, beta, mu, spread, steps in WORKLOADS:
        steps = max(1, round(steps * args.step_scale))
        for name in GRIDS:
            r = ema_errors(name, beta, mu, spread, steps, args.elements)
            results.setdefault(label, {})[name] = r
            predicted = f" ({r['predicted_relative_rms']:.1%})" if beta > 0.99 else ""
            print(
                f"| {label}, beta {beta}, {steps} steps | {name} | {r['relative_rms']:.1%}{predicted} "
                f"| {r['rms_in_scale_units']:.4f} |",
                flush=True,
            )
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
