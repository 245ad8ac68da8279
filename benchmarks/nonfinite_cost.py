"""What ``nonfinite="skip"``/``"raise"`` costs: the gradient check against a whole optimizer step.

The check (``longmem._nonfinite.grads_are_finite``) reads every gradient once and synchronizes with
the host once per step. This script times, on one parameter list, interleaved round by round so that
every row sees the same machine load:

* ``check``: the check alone, on finite gradients (what every step pays);
* ``step``: ``optimizer.step()`` with ``nonfinite="ignore"`` (no check), per path (fused, foreach);
* ``step+check``: ``optimizer.step()`` with ``nonfinite="skip"``;

and prints medians and minima, and per path the ratio check / step (of the medians, of the minima,
and the median over rounds of each round's ratio) and (step+check) / step - 1. With
``--kernels`` it also times candidate check kernels on their own, each with its host sync: ``sum`` per
tensor (the CPU default), ``aminmax`` per tensor (the exact confirmation of a flagged step) and
GradScaler's ``_amp_foreach_non_finite_check_and_unscale_`` (the default on other devices; it writes
every gradient back, so it is no read-only check).

Workloads: ``gpt2`` (GPT-2 small's parameter shapes, 124M parameters in 148 tensors), ``gpt2-8``
(the same tensor count with every dimension but the vocabulary/context divided by 8; 2.2M parameters:
per-tensor overheads weigh more), ``many`` (2,000 tensors of 4,096 elements).

    PYTHONPATH=src python3 benchmarks/nonfinite_cost.py --workload gpt2 --rounds 15 --threads 2 --kernels
"""

from __future__ import annotations

import argparse
import statistics
import time
import warnings
from collections.abc import Callable

import torch

import longmem
from longmem import _nonfinite


def gpt2_shapes(div: int = 1) -> list[tuple[int, ...]]:
    """GPT-2 small (124M): token and position embeddings, 12 blocks, final layer norm; ``div``
    divides every width (and the vocabulary and context), keeping the 148 tensors."""
    d, vocab, ctx, layers = 768 // div, 50257 // div, 1024 // div, 12
    shapes: list[tuple[int, ...]] = [(vocab, d), (ctx, d)]
    for _ in range(layers):
        shapes += [(d,), (d,), (d, 3 * d), (3 * d,), (d, d), (d,)]  # ln_1, attn.c_attn, attn.c_proj
        shapes += [(d,), (d,), (d, 4 * d), (4 * d,), (4 * d, d), (d,)]  # ln_2, mlp.c_fc, mlp.c_proj
    return [*shapes, (d,), (d,)]  # ln_f


WORKLOADS: dict[str, Callable[[], list[tuple[int, ...]]]] = {
    "gpt2": gpt2_shapes,
    "gpt2-8": lambda: gpt2_shapes(8),
    "many": lambda: [(4096,)] * 2000,
}


def _timed(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--workload", choices=sorted(WORKLOADS), default="gpt2")
    parser.add_argument("--optimizer", default="AdEMAMix", choices=["AdEMAMix", "AdaMod", "DiffGrad"])
    parser.add_argument("--rounds", type=int, default=15, help="timed rounds (after 2 warm-up rounds)")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    parser.add_argument("--paths", default="fused,foreach")
    parser.add_argument("--kernels", action="store_true", help="also time the candidate check kernels")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    shapes = WORKLOADS[args.workload]()
    numel = sum(torch.Size(s).numel() for s in shapes)
    paths = args.paths.split(",")
    gen = torch.Generator().manual_seed(0)
    grads = [torch.randn(s, generator=gen) * 1e-3 for s in shapes]

    rows: dict[str, Callable[[], object]] = {}
    cls = getattr(longmem, args.optimizer)
    for path in paths:
        for mode in ("ignore", "skip"):
            params = [torch.nn.Parameter(torch.randn(s, generator=gen) * 0.02) for s in shapes]
            for p, g in zip(params, grads, strict=True):
                p.grad = g  # shared, read-only for the optimizer
            kw = {"fused": True} if path == "fused" else {"foreach": path == "foreach"}
            opt = cls(params, lr=1e-6, nonfinite=mode, **kw)
            rows[f"{path} step" + ("" if mode == "ignore" else "+check")] = opt.step
            if path == paths[0] and mode == "skip":
                groups = opt.param_groups
                rows["check"] = lambda groups=groups: _nonfinite.grads_are_finite("bench", groups)
    if args.kernels:
        found, one = torch.zeros(1), torch.ones(1)
        rows["kernel sum"] = lambda: _nonfinite._found_sum(grads).item()
        rows["kernel aminmax"] = lambda: _nonfinite._found_minmax(grads).item()
        rows["kernel amp_foreach"] = lambda: (
            torch._amp_foreach_non_finite_check_and_unscale_(grads, found, one),
            found.item(),
        )

    times: dict[str, list[float]] = {name: [] for name in rows}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for r in range(args.rounds + 2):
            for name, fn in rows.items():
                t = _timed(fn)
                if r >= 2:
                    times[name].append(t)
    assert all(float(s["step"]) > 0 for s in opt.state.values())
    med = {name: statistics.median(ts) * 1e3 for name, ts in times.items()}
    print(
        f"workload {args.workload}: {len(shapes)} tensors, {numel / 1e6:.1f}M parameters; {args.optimizer}; "
        f"threads {torch.get_num_threads()}; median of {args.rounds} interleaved rounds; "
        f"torch {torch.__version__}"
    )
    for name, ms in med.items():
        lo = min(times[name]) * 1e3
        print(f"  {name:<26} median {ms:9.2f} ms   min {lo:9.2f} ms")
    check = med["check"]
    for path in paths:
        step, both = med[f"{path} step"], med[f"{path} step+check"]
        # per round, the check against the step timed next to it: less exposed to load that drifts
        paired = statistics.median(c / s for c, s in zip(times["check"], times[f"{path} step"], strict=True))
        print(
            f"  {path:<8} check / step: of medians {100 * check / step:5.1f}%, of minima "
            f"{100 * min(times['check']) / min(times[f'{path} step']):5.1f}%, median per round "
            f"{100 * paired:5.1f}%;  (step+check) / step - 1 = {100 * (both / step - 1):+5.1f}%"
        )


if __name__ == "__main__":
    main()
