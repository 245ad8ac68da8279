"""Optimizer step time against torch's AdamW and against the memory-bandwidth bound.

An optimizer step reads and writes every parameter and state element at least once, so its time
is bounded below by (bytes moved) / (memory bandwidth). This script times ``optimizer.step()`` per
optimizer and path on a fixed parameter list and prints, per row:

* ms/step: minimum and median over ``--repeats`` steps;
* x AdamW fused: the median of per-step ratios to ``torch.optim.AdamW(fused=True)``, timed in the
  same process and interleaved step by step with the row's own steps, so both see the same load
  (each repeat starts with the triad below; which of the two steps follows it alternates, so a
  ratio is taken over two consecutive repeats);
* x AdamW foreach: the same against ``torch.optim.AdamW(foreach=True)``, for non-fused rows;
* bound: the fraction of the bandwidth bound reached, bytes / bandwidth / time (median over steps),
  the bandwidth measured by an in-place streaming triad ``a += s * b`` over 2 x 256 MiB (each byte
  moved once, as in an optimizer step, with ``--threads`` threads) timed next to every step, like
  the references: this machine's bandwidth varies with what else runs on its host; bytes = parameter
  read and write, gradient read, every state buffer read and write;
* 1st extra: the first step's time minus the median (mostly the state's allocation, as the
  reference rows show; for fused rows also the kernel's load, or its build if it is not cached:
  the first fused row loads the kernel library for all).
  ``--first-build`` measures the first fused step's extra cost over a foreach first step in fresh
  processes, with an empty kernel cache (the builds) and then with the cache filled.

After each table: the targets of issue 12 (met or missed, as measured here), whether each fused
path is faster than its own foreach path, and how much faster longmem's AdEMAMix is than
pytorch_optimizer's. ``--markdown`` prints the tables as markdown.

Workloads: ``gpt2`` (GPT-2 small's parameter shapes, 124M parameters in 148 tensors, built here),
``small`` (nanoGPT's CPU configuration, 0.80M parameters in 27 tensors: per-step fixed costs count),
``many`` (2,000 tensors of 4,096 elements), ``one`` (one tensor of 64M elements).

The output starts with the host (CPU model, what ``gcc -march=native`` means, the compiler and flags
the fused kernels were built with); the ``vectorized`` column says, per fused row, whether gcc
vectorized every element loop of the kernels that row ran (its ``-fopt-info-vec`` report).

    python3 benchmarks/step_speed.py --workload all --repeats 30 --threads 2 --first-build --markdown

``--state-precision bf16 8bit`` adds AdEMAMix fused rows with lean state (``state_precision``),
against issue 14's targets (<= 1.0x and <= 0.85x torch's fused AdamW).

pytorch_optimizer's AdEMAMix is timed when that package is installed (it is no dependency of
longmem; otherwise the output says so): as constructed by default (``foreach=None``, which takes its
foreach path, on CPU too), the configuration the 4x target is read against, and with
``foreach=False``.

With lean rows (``--state-precision bf16 8bit``), bitsandbytes' ``AdEMAMix8bit`` is timed beside them
when that package is installed and runs here (same hyperparameters; its default ``min_8bit_size``, so
tensors under 4,096 elements keep float32 state there), for issue 14's >= 20x target; otherwise the
output says why it was not timed. ``--no-bitsandbytes`` skips it.

``--codec-floors`` (with ``8bit`` in ``--state-precision``) adds two timing-only rows that bound what any
8-bit code could reach in this kernel: AdEMAMix's fused 8-bit step with each encoding replaced by a
multiply, the noise and a conversion (``encode floor``), and with the decoding too replaced by one
multiply (``codec floor``). Their codes are no codec (the numbers they compute are meaningless); the
rows only say how much of the 8-bit step's time the power grid's encoding and decoding take.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import gc
import os
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

import longmem
from longmem.kernels import cpu, vectorization

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _host

Factory = Callable[[list[torch.nn.Parameter]], torch.optim.Optimizer]

# The rows run AdEMAMix at alpha 5 without warm-ups, as pytorch_optimizer's row does, for speed only:
# the warning about that setting's early divergence says nothing about step time.
warnings.filterwarnings("ignore", category=longmem.AdEMAMixWarmupWarning)

OPTIMIZERS: dict[str, Callable[..., torch.optim.Optimizer]] = {
    "AdEMAMix": lambda ps, **kw: longmem.AdEMAMix(ps, lr=1e-4, alpha=5.0, weight_decay=0.1, **kw),
    "SimplifiedAdEMAMix": lambda ps, **kw: longmem.SimplifiedAdEMAMix(ps, lr=1e-5, weight_decay=0.1, **kw),
    "AdaMod": lambda ps, **kw: longmem.AdaMod(ps, lr=1e-4, weight_decay=0.1, **kw),
    "DiffGrad": lambda ps, **kw: longmem.DiffGrad(ps, lr=1e-4, weight_decay=0.1, **kw),
    "DiffMod": lambda ps, **kw: longmem.DiffMod(ps, lr=1e-4, weight_decay=0.1, **kw),
}


def gpt2_shapes() -> list[tuple[int, ...]]:
    """GPT-2 small (124M): token and position embeddings, 12 blocks, final layer norm."""
    d, vocab, ctx, layers = 768, 50257, 1024, 12
    shapes: list[tuple[int, ...]] = [(vocab, d), (ctx, d)]
    for _ in range(layers):
        shapes += [
            (d,),
            (d,),  # ln_1
            (d, 3 * d),
            (3 * d,),  # attn.c_attn
            (d, d),
            (d,),  # attn.c_proj
            (d,),
            (d,),  # ln_2
            (d, 4 * d),
            (4 * d,),  # mlp.c_fc
            (4 * d, d),
            (d,),  # mlp.c_proj
        ]
    shapes += [(d,), (d,)]  # ln_f
    return shapes


def small_shapes() -> list[tuple[int, ...]]:
    """nanoGPT's CPU configuration (shakespeare_char: 4 layers, 4 heads, d 128, context 64, 65
    characters, no biases, tied head): 0.80M parameters in 27 tensors."""
    d, vocab, ctx, layers = 128, 65, 64, 4
    shapes: list[tuple[int, ...]] = [(vocab, d), (ctx, d)]
    for _ in range(layers):
        shapes += [(d,), (3 * d, d), (d, d), (d,), (4 * d, d), (d, 4 * d)]  # ln_1, attn, ln_2, mlp
    return [*shapes, (d,)]  # ln_f


WORKLOADS: dict[str, Callable[[], list[tuple[int, ...]]]] = {
    "gpt2": gpt2_shapes,
    "small": small_shapes,
    "many": lambda: [(4096,)] * 2000,
    "one": lambda: [(64 * 2**20,)],
}


def make_params(shapes: list[tuple[int, ...]], dtype: torch.dtype) -> list[torch.nn.Parameter]:
    gen = torch.Generator().manual_seed(0)
    params = []
    for shape in shapes:
        p = torch.nn.Parameter((torch.randn(shape, generator=gen) * 0.02).to(dtype))
        p.grad = (torch.randn(shape, generator=gen) * 1e-3).to(dtype)
        params.append(p)
    return params


class Triad:
    """An in-place streaming triad ``a += s * b`` over 2 x 256 MiB: each byte moved once."""

    def __init__(self, n: int = 64 * 2**20) -> None:
        self.a, self.b = torch.ones(n), torch.full((n,), 0.5)
        self.nbytes = 3 * 4 * n

    def step(self) -> None:
        self.a.add_(self.b, alpha=1e-6)

    def bandwidth(self, repeats: int = 15) -> float:
        """Bytes per second, best of ``repeats``."""
        best = float("inf")
        for _ in range(repeats):
            start = time.perf_counter()
            self.step()
            best = min(best, time.perf_counter() - start)
        return self.nbytes / best


def bytes_per_step(opt: torch.optim.Optimizer) -> int:
    """Parameter read and write, gradient read, every full-size state buffer read and write."""
    total = 0
    for group in opt.param_groups:
        for p in group["params"]:
            if p.grad is None:
                continue
            total += 2 * p.numel() * p.element_size() + p.grad.numel() * p.grad.element_size()
            for value in opt.state[p].values():
                if isinstance(value, torch.Tensor) and value.shape == p.shape and value.dim() > 0:
                    total += 2 * value.numel() * value.element_size()
    return total


@dataclass
class Row:
    name: str
    path: str
    times: list[float] = field(default_factory=list)
    ref_times: dict[str, list[float]] = field(default_factory=dict)  # interleaved reference steps
    first: float = 0.0
    nbytes: int = 0
    vectorized: str = "-"  # fused rows: whether every loop of the kernels it ran vectorized here

    @property
    def median(self) -> float:
        return statistics.median(self.times)

    def bound(self, triad: Triad) -> float:
        """Median over steps of the fraction of the bandwidth bound, with the triad timed beside each."""
        pairs = zip(self.times, self.ref_times["triad"], strict=True)
        return statistics.median(self.nbytes * tt / triad.nbytes / t for t, tt in pairs)

    def ratio(self, ref: str) -> float | None:
        """Median of per-step ratios to the interleaved ``ref`` steps, a step being two consecutive
        repeats (the order alternates between them, see ``time_steps``: each of the two ran once in
        each place)."""
        if ref not in self.ref_times:
            return None
        mine, refs = self.times, self.ref_times[ref]
        pairs = range(0, len(mine) - 1, 2)
        if not pairs:
            return mine[0] / refs[0]
        return statistics.median((mine[k] + mine[k + 1]) / (refs[k] + refs[k + 1]) for k in pairs)

    def ratio_cell(self, ref: str) -> str:
        ratio = self.ratio(ref)
        return "-" if ratio is None else f"{ratio:.2f}"


def time_steps(opt: torch.optim.Optimizer, refs: dict[str, Triad | torch.optim.Optimizer], repeats: int,
               row: Row) -> None:  # fmt: skip
    """Time ``opt``'s steps, each beside one step of every reference (optimizers, the triad)."""
    gc.collect()
    start = time.perf_counter()
    opt.step()
    row.first = time.perf_counter() - start
    row.nbytes = bytes_per_step(opt)
    opt.step()
    row.ref_times = {name: [] for name in refs}
    # The triad first, then the references and the row's step, in an order that alternates from one
    # repeat to the next: whatever runs right after the triad pays for the dirty cache lines it
    # leaves (measured: 0.2-0.4 ms on the small workload), so no row always takes that place.
    triads = [(name, ref) for name, ref in refs.items() if isinstance(ref, Triad)]
    others: list[tuple[str | None, Any]] = [
        (name, ref) for name, ref in refs.items() if not isinstance(ref, Triad)
    ]
    others.append((None, opt))
    for k in range(repeats):
        for name, item in triads + (others if k % 2 == 0 else others[::-1]):
            start = time.perf_counter()
            item.step()
            elapsed = time.perf_counter() - start
            if name is None:
                row.times.append(elapsed)
            else:
                row.ref_times[name].append(elapsed)


def candidates(include: list[str], paths: list[str], lean: list[str] = ()) -> list[tuple[str, str, Factory]]:
    """Each optimizer on each path; AdEMAMix fused also with each state precision of ``lean``."""
    out = []
    for name in include:
        make = OPTIMIZERS[name]
        for path in paths:
            kw = {"fused": True} if path == "fused" else {"foreach": path == "foreach"}
            out.append((name, path, lambda ps, make=make, kw=kw: make(ps, **kw)))
            if name == "AdEMAMix" and path == "fused":
                for mode in lean:
                    out.append(
                        (
                            lean_row(mode),
                            path,
                            lambda ps, make=make, m=mode: make(ps, fused=True, state_precision=m),
                        )
                    )
    return out


def lean_row(mode: str) -> str:
    return f"AdEMAMix, {mode} state"


def pytorch_optimizer_candidates() -> tuple[list[tuple[str, str, Factory]], str]:
    try:
        from pytorch_optimizer import AdEMAMix as PoAdEMAMix
    except ImportError:
        return [], "pytorch_optimizer is not installed: its AdEMAMix was not timed"
    from importlib.metadata import version

    def make(ps: list[torch.nn.Parameter], foreach: bool | None) -> torch.optim.Optimizer:
        return PoAdEMAMix(ps, lr=1e-4, alpha=5.0, weight_decay=0.1, weight_decouple=True, foreach=foreach)

    # Its default (foreach=None) takes its foreach path for real dense tensors, on CPU too.
    label = f"pytorch_optimizer {version('pytorch_optimizer')} AdEMAMix"
    return [
        (label, PYTORCH_OPTIMIZER_DEFAULT, lambda ps: make(ps, None)),
        (label, "single", lambda ps: make(ps, False)),
    ], ""


# ---- timing floors of the 8-bit codec (not codecs: timing only) ---------------------------------

#: C put after the generated kernel's #include: the cheapest encodings and decodings of that shape
FLOOR_CODECS = """
static inline int8_t floor_enc_s8(float x, float inv, uint32_t h) {
    return (int8_t)(int32_t)LM_FMA(x, inv * 127.0f, (float)(int32_t)(h >> 8) * 0x1p-24f);
}
static inline uint8_t floor_enc_u8(float x, float inv, uint32_t h) {
    return (uint8_t)(uint32_t)LM_FMA(x, inv * 255.0f, (float)(int32_t)(h >> 8) * 0x1p-24f);
}
static inline float floor_dec_s8(int8_t c, float a) { return (float)c * a; }
static inline float floor_dec_u8(uint8_t c, float a) { return (float)c * a; }
"""
FLOORS = {
    "encode floor": ("lm_enc_s8", "lm_enc_u8"),
    "codec floor": ("lm_enc_s8", "lm_enc_u8", "lm_dec_s8", "lm_dec_u8"),
}
_floor_caches: dict[str, dict] = {}


def _floor_source(original: Callable[..., str], floor: str, *args: Any) -> str:
    source = original(*args)
    for name in FLOORS[floor]:
        source = source.replace(f"{name}(", f"floor_{name[3:]}(")
    return source.replace('#include "longmem_ops.h"\n', '#include "longmem_ops.h"\n' + FLOOR_CODECS, 1)


@contextlib.contextmanager
def codec_floor(floor: str) -> Iterator[None]:
    """Build and run the lean kernels with the floor's codecs (each floor keeps its own kernels)."""
    saved = cpu.lean_source, cpu._specialized
    cpu.lean_source = functools.partial(_floor_source, saved[0], floor)
    cpu._specialized = _floor_caches.setdefault(floor, {})
    try:
        yield
    finally:
        cpu.lean_source, cpu._specialized = saved


def floor_candidates() -> list[tuple[str, str, Factory]]:
    def make(ps: list[torch.nn.Parameter], floor: str) -> torch.optim.Optimizer:
        opt = OPTIMIZERS["AdEMAMix"](ps, fused=True, state_precision="8bit")
        step = opt.step

        def floor_step(closure: Any = None) -> Any:
            with codec_floor(floor):
                return step(closure)

        opt.step = floor_step  # type: ignore[method-assign]
        return opt

    return [
        (f"{lean_row('8bit')}, {floor}", "fused", functools.partial(make, floor=floor)) for floor in FLOORS
    ]


BITSANDBYTES_ROW = "default"  # the path column of bitsandbytes' row


def bitsandbytes_candidates() -> tuple[list[tuple[str, str, Factory]], str]:
    """bitsandbytes' AdEMAMix8bit at the rows' hyperparameters, if it imports and steps here."""
    try:
        import bitsandbytes as bnb
    except Exception as err:  # not installed, or no backend for this machine
        return [], f"bitsandbytes does not import ({type(err).__name__}): its AdEMAMix8bit was not timed"

    def make(ps: list[torch.nn.Parameter]) -> torch.optim.Optimizer:
        return bnb.optim.AdEMAMix8bit(ps, lr=1e-4, alpha=5.0, weight_decay=0.1)

    probe = [torch.nn.Parameter(torch.zeros(8192))]
    probe[0].grad = torch.ones(8192)
    try:
        make(probe).step()
    except Exception as err:
        return [], f"bitsandbytes' AdEMAMix8bit does not step here ({type(err).__name__}: {str(err)[:160]})"
    return [(f"bitsandbytes {bnb.__version__} AdEMAMix8bit", BITSANDBYTES_ROW, make)], ""


def run_workload(workload: str, args: argparse.Namespace, triad: Triad) -> None:
    dtype = getattr(torch, args.dtype)
    params = make_params(WORKLOADS[workload](), dtype)
    n = sum(p.numel() for p in params)
    print(f"\n== {workload}: {n / 1e6:.1f}M {args.dtype} parameters in {len(params)} tensors ==", flush=True)
    print(f"load average {os.getloadavg()[0]:.2f}", flush=True)
    fused_ref = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.1, fused=True)
    foreach_ref = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.1, foreach=True)
    # the references' own rows, from their interleaved steps with every candidate
    ref_rows = {"fused": Row("torch AdamW", "fused"), "foreach": Row("torch AdamW", "foreach")}
    for path, opt in (("fused", fused_ref), ("foreach", foreach_ref)):
        gc.collect()
        start = time.perf_counter()
        opt.step()
        ref_rows[path].first = time.perf_counter() - start
        ref_rows[path].nbytes = bytes_per_step(opt)
    # Touch as much memory as the largest candidate's state and temporaries, once: otherwise the first
    # row's first step also pays for the process's first use of that memory (in a VM, seconds).
    torch.ones(5 * n)
    rows: list[Row] = []
    lean = [m for m in args.state_precision if m != "fp32"]
    todo = candidates(args.optimizers, args.paths, lean)
    notes = []
    if args.codec_floors and "8bit" in lean and "AdEMAMix" in args.optimizers:
        todo += floor_candidates()
    if "AdEMAMix" in args.optimizers and not args.no_pytorch_optimizer:
        extra, note = pytorch_optimizer_candidates()
        todo += extra
        notes.append(note)
    if lean and not args.no_bitsandbytes:
        extra, note = bitsandbytes_candidates()
        todo += extra
        notes.append(note)
    for name, path, make in todo:
        opt = make(params)
        row = Row(name, path)
        refs: dict[str, Triad | torch.optim.Optimizer] = {"fused": fused_ref, "triad": triad}
        if path != "fused":
            refs["foreach"] = foreach_ref
        time_steps(opt, refs, args.repeats, row)
        if path == "fused" and name.split(",")[0] in OPTIMIZERS:
            row.vectorized = kernels_vectorized(opt)
        rows.append(row)
        for ref in ("fused", "foreach"):
            if ref in row.ref_times:
                ref_rows[ref].times += row.ref_times[ref]
                ref_rows[ref].ref_times.setdefault("triad", []).extend(row.ref_times["triad"])
        summary = f"median {row.median * 1e3:8.2f} ms   x AdamW fused {row.ratio_cell('fused')}"
        print(f"  {name:38s} {path:8s} {summary}", flush=True)
        del opt
        gc.collect()
    rows = [row for row in ref_rows.values() if row.times] + rows
    gbs = [triad.nbytes / t / 1e9 for t in ref_rows["fused"].ref_times["triad"]]
    print(f"\nbandwidth (the triad beside each step): median {statistics.median(gbs):.1f} GB/s, "
          f"range {min(gbs):.1f} to {max(gbs):.1f} GB/s")  # fmt: skip
    print_table(workload, rows, triad, args.markdown)
    for note in filter(None, notes):
        print(f"\n{note}")
    print_targets(workload, rows)


def kernels_vectorized(opt: torch.optim.Optimizer) -> str:
    """'yes' if every body loop of the kernels ``opt``'s fused step runs vectorizes as built here
    (gcc's own report, longmem.kernels.vectorization), else what the compiler said."""
    with vectorization.recorded_kernels() as kernels:
        opt.step()
    sources = {k.source() for k in kernels}
    failures = [r.failures() for r in map(vectorization.check_host, sources) if not r.ok]
    return "yes" if not failures else "NO: " + " | ".join(failures)


HEADER = (
    "optimizer", "path", "min ms", "median ms", "x AdamW fused", "x AdamW foreach", "bound", "1st extra ms",
    "vectorized",
)  # fmt: skip


def print_table(workload: str, rows: list[Row], triad: Triad, markdown: bool) -> None:
    lines = []
    for row in rows:
        med = row.median
        lines.append(
            (
                row.name,
                row.path,
                f"{min(row.times) * 1e3:.1f}",
                f"{med * 1e3:.1f}",
                row.ratio_cell("fused"),
                row.ratio_cell("foreach"),
                f"{row.bound(triad):.0%}",
                f"{(row.first - med) * 1e3:.0f}",
                row.vectorized,
            )
        )
    print()
    if markdown:
        print(f"{workload}:\n")
        print("| " + " | ".join(HEADER) + " |")
        print("|" + "|".join("---" for _ in HEADER) + "|")
        for line in lines:
            print("| " + " | ".join(line) + " |")
        return
    widths = [max(map(len, col)) for col in zip(HEADER, *lines, strict=True)]
    for line in (HEADER, *lines):
        print("  ".join(x.ljust(w) for x, w in zip(line, widths, strict=True)).rstrip())


#: issue 12's targets: the most a fused row may take, in units of torch's fused AdamW (DiffMod moves
#: 44 B per parameter against AdamW's 28: 1.57x at the bandwidth bound)
FUSED_TARGETS = {"AdEMAMix": 1.35, "DiffMod": 1.65} | dict.fromkeys(
    ["SimplifiedAdEMAMix", "AdaMod", "DiffGrad"], 1.45
)
#: the small (nanoGPT CPU) workload, where per-step fixed costs count: every fused row within 1.5x
SMALL_FUSED_TARGET = 1.5
FOREACH_TARGET = 1.3  # foreach rows, in units of torch's foreach AdamW
#: issue 14's targets: AdEMAMix fused with lean state, in units of torch's fused AdamW (fp32 state)
LEAN_TARGETS = {"bf16": 1.0, "8bit": 0.85}
PYTORCH_OPTIMIZER_SPEEDUP = 4.0  # AdEMAMix fused against pytorch_optimizer's AdEMAMix as built by default
PYTORCH_OPTIMIZER_DEFAULT = "default: foreach"
BITSANDBYTES_SPEEDUP = 20.0  # issue 14: AdEMAMix fused with lean state against bitsandbytes' AdEMAMix8bit


def print_targets(workload: str, rows: list[Row]) -> None:
    """The targets as measured here (median of the interleaved per-step ratios)."""
    print(f"\ntargets ({workload}; median of per-step ratios):")
    by_key = {(row.name, row.path): row for row in rows}
    for row in rows:
        if row.name in FUSED_TARGETS and row.path == "fused":
            limit = (
                max(SMALL_FUSED_TARGET, FUSED_TARGETS[row.name])
                if workload == "small"
                else FUSED_TARGETS[row.name]
            )
            ratio, ref = row.ratio("fused"), "fused"
        elif row.name in FUSED_TARGETS and row.path == "foreach":
            ratio, limit, ref = row.ratio("foreach"), FOREACH_TARGET, "foreach"
        else:
            continue
        verdict = "met" if ratio is not None and ratio <= limit else "MISSED"
        print(f"  {row.name} {row.path}: {ratio:.2f}x torch {ref} AdamW (target <= {limit}): {verdict}")
        if row.path == "fused" and row.vectorized != "yes":
            print(f"  {row.name} fused: kernels not vectorized here: {row.vectorized}")
    bnb = next((r for r in rows if r.name.startswith("bitsandbytes") and r.times), None)
    for mode, limit in LEAN_TARGETS.items():
        row = by_key.get((lean_row(mode), "fused"))
        if row is not None:
            ratio = row.ratio("fused")
            verdict = "met" if ratio is not None and ratio <= limit else "MISSED"
            print(f"  {row.name} fused: {ratio:.2f}x torch fused AdamW (target <= {limit}): {verdict}")
            if bnb is not None:
                speedup = bnb.ratio("fused") / ratio  # both against the same interleaved reference
                verdict = "met" if speedup >= BITSANDBYTES_SPEEDUP else "MISSED"
                print(f"  {row.name} fused vs {bnb.name}: {speedup:.1f}x faster "
                      f"(target >= {BITSANDBYTES_SPEEDUP:.0f}): {verdict}")  # fmt: skip
    for floor in FLOORS:
        row = by_key.get((f"{lean_row('8bit')}, {floor}", "fused"))
        if row is not None:
            print(f"  ({row.name}: {row.ratio('fused'):.2f}x torch fused AdamW; timing only, against the "
                  f"8-bit target of {LEAN_TARGETS['8bit']})")  # fmt: skip
    for name in FUSED_TARGETS:
        fused, foreach = by_key.get((name, "fused")), by_key.get((name, "foreach"))
        if fused is None or foreach is None:
            continue
        # both rows against the same interleaved reference, so their ratio is the rows' own
        speedup = foreach.ratio("fused") / fused.ratio("fused")
        verdict = "met" if speedup > 1.0 else "MISSED"
        print(f"  {name} fused vs its own foreach path: {speedup:.2f}x faster (target > 1): {verdict}")
    ours = by_key.get(("AdEMAMix", "fused"))
    for row in rows:
        if ours is not None and row.name.startswith("pytorch_optimizer") and row.times:
            speedup = row.ratio("fused") / ours.ratio("fused")  # both against the same reference
            if row.path == PYTORCH_OPTIMIZER_DEFAULT:
                verdict = "met" if speedup >= PYTORCH_OPTIMIZER_SPEEDUP else "MISSED"
                goal = f"(target >= {PYTORCH_OPTIMIZER_SPEEDUP}): {verdict}"
            else:
                goal = "(its opt-in path; the target is stated for its default)"
            print(f"  AdEMAMix fused vs {row.name} ({row.path}): {speedup:.1f}x faster {goal}")


FIRST_STEP_SNIPPET = """
import time, torch, longmem
torch.set_num_threads({threads})
def params():
    ps = [torch.nn.Parameter(torch.zeros(1000)) for _ in range(4)]
    for p in ps:
        p.grad = torch.ones(1000)
    return ps
# the same first step without the kernel (state allocation, imports), to subtract
plain = longmem.{name}(params(), foreach=True)
start = time.perf_counter(); plain.step(); plain_first = time.perf_counter() - start
opt = longmem.{name}(params(), fused=True)
start = time.perf_counter(); opt.step(); first = time.perf_counter() - start
print(first - plain_first)
"""


def first_step_costs(threads: int, names: list[str]) -> None:
    """The first fused step's extra time in fresh processes: with an empty kernel cache (the builds),
    then with the cache filled (loading the built kernels)."""
    with tempfile.TemporaryDirectory() as cache:
        env = {**os.environ, "LONGMEM_CACHE_DIR": cache}
        print("\nFirst fused step's extra cost over a foreach first step (a fresh process each; the")
        print("first optimizer also builds the generic kernel that all share):")
        for name in names:
            code = FIRST_STEP_SNIPPET.format(threads=threads, name=name)
            costs = []
            for _ in ("first ever", "cached"):
                out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
                if out.returncode != 0:
                    raise RuntimeError(out.stderr)
                costs.append(float(out.stdout.strip().splitlines()[-1]))
            print(
                f"  {name:20s} first ever (builds into an empty cache): {costs[0] * 1e3:6.0f} ms   "
                f"cached: {costs[1] * 1e3:5.0f} ms"
            )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--workload", choices=[*WORKLOADS, "all"], default="gpt2")
    parser.add_argument("--repeats", type=int, default=20, help="timed steps per optimizer and path")
    parser.add_argument(
        "--threads", type=int, default=2, help="torch.set_num_threads (and the fused kernel's)"
    )
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--optimizers", nargs="+", default=list(OPTIMIZERS), choices=list(OPTIMIZERS))
    paths = ["fused", "foreach", "single"]
    parser.add_argument("--paths", nargs="+", default=paths[:2], choices=paths)
    parser.add_argument("--no-pytorch-optimizer", action="store_true", help="skip pytorch_optimizer")
    parser.add_argument(
        "--no-bitsandbytes", action="store_true", help="skip bitsandbytes' AdEMAMix8bit (lean rows)"
    )
    parser.add_argument(
        "--state-precision", nargs="+", default=["fp32"], choices=["fp32", "bf16", "8bit"],
        help="also time AdEMAMix fused with these state precisions (issue 14's targets)",
    )  # fmt: skip
    parser.add_argument(
        "--codec-floors", action="store_true",
        help="with 8bit lean rows: also time the 8-bit step with trivial encodings (and decodings)",
    )  # fmt: skip
    parser.add_argument("--markdown", action="store_true", help="print the tables as markdown")
    parser.add_argument(
        "--first-build",
        action="store_true",
        help="time the first fused step in fresh processes, empty cache then cached",
    )
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    print("\n".join(_host.describe()))
    print(f"longmem {longmem.__version__}, OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', '(unset)')}")
    print(f"command: {' '.join([os.path.basename(sys.executable), *sys.argv])}")
    triad = Triad()
    print(f"memory bandwidth (in-place triad, {args.threads} threads): {triad.bandwidth() / 1e9:.1f} GB/s")
    if args.first_build:
        first_step_costs(args.threads, args.optimizers)
    for workload in WORKLOADS if args.workload == "all" else [args.workload]:
        run_workload(workload, args, triad)
        gc.collect()


if __name__ == "__main__":
    main()
