"""Whether the fused CPU kernels' loops vectorize, for each CPU level, as the compiler reports it.

A fused step is only as fast as its innermost loop: one that the compiler leaves scalar runs 3-12x
slower than torch's AdamW on a CPU without AVX-512's masked instructions (a branch per element, a
libm call). Every loop that touches elements carries the marker ``LM_BODY_LOOP`` in its source
(the generated kernels of :func:`longmem.kernels.cpu.specialized_source` and the generic kernel of
``longmem_cpu.c``); :func:`check` compiles a source with the kernels' own flags for one target and
reads ``-fopt-info-vec`` for those lines. No kernel is built or loaded: this is for tests and
benchmarks, and cross compilers (Debian's ``gcc-aarch64-linux-gnu``) check other architectures.
"""

from __future__ import annotations

import contextlib
import platform
import re
import shutil
import subprocess
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from . import cpu, program
from .cpu import BASE_FLAGS, KERNEL_DIR

MARKER = "LM_BODY_LOOP"

#: target name -> (machine, flags): the x86-64 micro-architecture levels and two Arm ones
TARGETS: dict[str, tuple[str, tuple[str, ...]]] = {
    "x86-64-v2": ("x86_64", ("-march=x86-64-v2",)),  # SSE4.2
    "x86-64-v3": ("x86_64", ("-march=x86-64-v3",)),  # AVX2, FMA
    "x86-64-v4": ("x86_64", ("-march=x86-64-v4",)),  # AVX-512
    "armv8-a": ("aarch64", ("-march=armv8-a",)),  # NEON
    "neoverse-v1": ("aarch64", ("-mcpu=neoverse-v1",)),  # SVE (AWS Graviton3)
}
_CROSS = {"x86_64": "x86_64-linux-gnu-gcc", "aarch64": "aarch64-linux-gnu-gcc"}
_HOST_ALIASES = {"amd64": "x86_64", "arm64": "aarch64"}


def compiler_for(machine: str) -> str | None:
    """A gcc that emits code for ``machine``: the host's own, or a cross compiler on PATH."""
    host = platform.machine().lower()
    if _HOST_ALIASES.get(host, host) == machine:
        native = shutil.which("gcc")
        if native:
            return native
    return shutil.which(_CROSS[machine])


@dataclass
class Report:
    """The compiler's verdict on every marked loop of one source, for one target."""

    target: str
    loops: dict[int, bool]  # marked line -> vectorized
    messages: dict[int, list[str]]  # marked line -> what the compiler said there

    @property
    def ok(self) -> bool:
        return bool(self.loops) and all(self.loops.values())

    def failures(self) -> str:
        return "\n".join(
            f"line {line}: " + "; ".join(sorted(set(self.messages[line])) or ["no report"])
            for line, good in sorted(self.loops.items())
            if not good
        )


_INFO = re.compile(r"^[^:]*:(\d+):\d+: (optimized|missed): (.*)$")


def check(source: str, target: str) -> Report:
    """Compile ``source`` for ``target`` (a key of :data:`TARGETS`) with the kernels' flags and
    report, for each line marked ``LM_BODY_LOOP``, whether every loop there was vectorized."""
    machine, flags = TARGETS[target]
    cc = compiler_for(machine)
    if cc is None:
        raise FileNotFoundError(f"no compiler for {machine} (install {_CROSS[machine]})")
    return _check(source, target, cc, flags)


def check_host(source: str) -> Report:
    """:func:`check` with the compiler and ``-march`` the fused kernels are built with here."""
    cpu.load()
    builder = cpu._builder
    assert builder is not None
    # a cache built before the builder recorded its flags: the first choice, which nearly always works
    arch = builder.arch if builder.arch is not None else cpu.ARCH_FLAGS[0]
    return _check(source, " ".join(arch) or "(no -march)", builder.compiler, arch)


def _check(source: str, target: str, cc: str, flags: Sequence[str]) -> Report:
    marked = [i for i, line in enumerate(source.splitlines(), 1) if MARKER in line]
    with tempfile.TemporaryDirectory(prefix="longmem-vec-") as tmp:
        src = Path(tmp) / "kernel.c"
        src.write_text(source)
        cmd = [cc, *BASE_FLAGS, *flags, f"-I{KERNEL_DIR}", "-c", str(src), "-o", str(Path(tmp) / "k.o"),
               "-fopt-info-vec-optimized", "-fopt-info-vec-missed"]  # fmt: skip
        result = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    if result.returncode != 0:
        raise RuntimeError(f"$ {' '.join(cmd)}\n{result.stderr[-2000:]}")
    messages: dict[int, list[str]] = {line: [] for line in marked}
    vectorized = dict.fromkeys(marked, False)
    refused = dict.fromkeys(marked, False)
    for out in result.stderr.splitlines():
        m = _INFO.match(out)
        if not m or int(m.group(1)) not in messages:
            continue
        line, kind, text = int(m.group(1)), m.group(2), m.group(3)
        if kind == "optimized" and text.startswith("loop vectorized"):
            vectorized[line] = True
        elif kind == "missed" and ("couldn't vectorize loop" in text or text.startswith("not vectorized")):
            refused[line] = True
            messages[line].append(text)
    loops = {line: vectorized[line] and not refused[line] for line in marked}
    return Report(target, loops, messages)


@dataclass
class Kernel:
    """What a fused step asked a kernel for: the traced program and, for lean kernels, the state
    forms and whether parameters are stochastically rounded (``cpu.specialized_source``'s arguments)."""

    program: program.Program
    forms: tuple[str, ...] | None = None
    stochastic: bool = False

    def source(self) -> str:
        """The C source of the generated kernel."""
        return cpu.specialized_source(self.program, self.forms, self.stochastic)


@contextlib.contextmanager
def recorded_kernels() -> Iterator[list[Kernel]]:
    """Inside the block, fused steps record the kernels they would run in the yielded list, and
    leave the step itself to the foreach path (which computes the same numbers)."""
    from .. import kernels
    from .._rounding import ROUNDED_DTYPES
    from .._state_precision import LeanBuffer, LeanBuffers

    original = kernels.run_fused
    recorded: list[Kernel] = []

    def record(rule, params, grads, buffers, steps, *, maximize, param_streams=None):  # type: ignore[no-untyped-def]
        trace, rows = kernels.prepare(rule, buffers)
        lean = any(isinstance(row, LeanBuffers) for row in rows)
        wanted: dict[tuple, None] = {}
        for i, t in enumerate(steps):
            stochastic = param_streams is not None and params[i].dtype in ROUNDED_DTYPES
            forms = tuple(row[i].form if isinstance(row[i], LeanBuffer) else "f32" for row in rows)
            wanted[(t, forms if lean or stochastic else None, stochastic)] = None
        recorded.extend(Kernel(trace(t), f, st) for t, f, st in wanted)
        return list(range(len(params)))

    kernels.run_fused = record  # type: ignore[assignment]
    try:
        yield recorded
    finally:
        kernels.run_fused = original


@contextlib.contextmanager
def recorded_programs() -> Iterator[list[program.Program]]:
    """As :func:`recorded_kernels`, the programs alone."""
    programs: list[program.Program] = []
    with recorded_kernels() as recorded:
        yield programs
    programs.extend(k.program for k in recorded if k.forms is None)


def generic_source() -> str:
    """The generic kernel's source (``longmem_cpu.c``)."""
    return (KERNEL_DIR / "longmem_cpu.c").read_text()
