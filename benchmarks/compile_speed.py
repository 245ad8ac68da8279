"""Compiled optimizer steps: ``torch.compile(opt.step)`` against eager fused steps and torch's AdamW.

Per optimizer, on one parameter list (``step_speed.py``'s workloads, shared by every optimizer),
the rows are:

* ``compiled``: ``torch.compile(opt.step)`` of the longmem optimizer as constructed by default
  (under compile every path traces the same rule; inductor's C++ backend fuses it);
* ``eager fused``: the same optimizer with ``fused=True``, not compiled (longmem's C kernel);
* ``torch AdamW compiled``: ``torch.compile(AdamW(...).step)``, torch's default path;
* ``torch AdamW fused``: ``AdamW(fused=True)``, not compiled.

Steps are interleaved (one step of each row in turn, ``--repeats`` times), so that all rows see the
same load; the table gives each row's median and its median per-step ratio to the others. The
compile time is that of the first two compiled calls (dynamo, inductor, the C++ builds; the second
call finds its graph compiled), cold: the script gives inductor a fresh, empty cache directory
(``--warm-cache`` keeps the usual one, whose FX graph cache makes later processes faster).

    python3 benchmarks/compile_speed.py --workload gpt2 --repeats 20 --threads 2
"""

from __future__ import annotations

import argparse
import atexit
import gc
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable

if "--warm-cache" not in sys.argv:  # before torch is imported: inductor reads it then
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="compile_speed-inductor-")
    atexit.register(shutil.rmtree, os.environ["TORCHINDUCTOR_CACHE_DIR"], ignore_errors=True)

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from step_speed import OPTIMIZERS, WORKLOADS, make_params

import longmem

ROWS = ("compiled", "eager fused", "torch AdamW compiled", "torch AdamW fused")


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def steppers(
    name: str, params: list[torch.nn.Parameter]
) -> tuple[dict[str, Callable[[], None]], dict[str, float]]:
    """Each row's step function, with the compiled rows' compile time (their first two calls)."""
    make = OPTIMIZERS[name]
    compiled_opt = make(params)
    adamw = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.1)
    steps = {
        "compiled": torch.compile(compiled_opt.step),
        "eager fused": make(params, fused=True).step,
        "torch AdamW compiled": torch.compile(adamw.step),
        "torch AdamW fused": torch.optim.AdamW(params, lr=1e-4, weight_decay=0.1, fused=True).step,
    }
    compile_s = {}
    for row, step in steps.items():
        start = time.perf_counter()
        step()
        step()
        if "compiled" in row:
            compile_s[row] = time.perf_counter() - start
    return steps, compile_s


def run(name: str, workload: str, repeats: int) -> None:
    params = make_params(WORKLOADS[workload](), torch.float32)
    n = sum(p.numel() for p in params)
    torch._dynamo.reset()
    steps, compile_s = steppers(name, params)
    times: dict[str, list[float]] = {row: [] for row in ROWS}
    for _ in range(repeats):
        for row in ROWS:
            start = time.perf_counter()
            steps[row]()
            times[row].append(time.perf_counter() - start)
    print(f"\n{name}, {workload}: {n / 1e6:.1f}M float32 parameters in {len(params)} tensors, "
          f"load average {os.getloadavg()[0]:.2f}")  # fmt: skip
    header = ("row", "median ms", "min ms", *(f"x {ref}" for ref in ROWS), "compile s")
    lines = []
    for row in ROWS:
        ratios = [
            f"{statistics.median(t / r for t, r in zip(times[row], times[ref], strict=True)):.2f}"
            for ref in ROWS
        ]
        compile_cell = f"{compile_s[row]:.1f}" if row in compile_s else "-"
        lines.append((row, f"{statistics.median(times[row]) * 1e3:.1f}", f"{min(times[row]) * 1e3:.1f}",
                      *ratios, compile_cell))  # fmt: skip
    print("| " + " | ".join(header) + " |")
    print("|" + "|".join("---" for _ in header) + "|")
    for line in lines:
        print("| " + " | ".join(line) + " |")
    del steps
    gc.collect()


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--workload", choices=list(WORKLOADS), default="gpt2")
    parser.add_argument("--optimizers", nargs="+", default=["AdEMAMix"], choices=list(OPTIMIZERS))
    parser.add_argument("--repeats", type=int, default=20, help="interleaved timed steps per row")
    parser.add_argument(
        "--threads", type=int, default=2, help="torch.set_num_threads (and the fused kernel's)"
    )
    parser.add_argument(
        "--warm-cache", action="store_true", help="keep inductor's usual cache (warm compiles)"
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, longmem {longmem.__version__}, {torch.get_num_threads()} threads, "
          f"CPU: {cpu_model()}")  # fmt: skip
    print(f"command: {' '.join([os.path.basename(sys.executable), *sys.argv])}")
    print(f"inductor cache: {os.environ.get('TORCHINDUCTOR_CACHE_DIR', '(the usual one)')}")
    for name in args.optimizers:
        run(name, args.workload, args.repeats)


if __name__ == "__main__":
    main()
