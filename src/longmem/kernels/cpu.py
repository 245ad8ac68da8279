"""The fused CPU kernels: C built on first use, cached on disk, loaded with ctypes.

As DeepSpeed does for its CPU Adam, the C source ships with the package and is compiled on the
user's machine, for the user's CPU (``-march=native``), the first time a fused step runs. Two kinds
of kernel compute through the same operations (``longmem_ops.h``), so they agree bit for bit:

* the generic kernel (``longmem_cpu.c``) runs any traced program, block by block;
* a specialized kernel, generated from one program (:func:`specialized_source`), keeps every value
  in registers and is about twice as fast; it is built the first time a program is seen (about a
  second) and used from then on. Parameters whose gradient has another dtype use the generic one.

Libraries are cached under ``$LONGMEM_CACHE_DIR``, else ``$XDG_CACHE_HOME/longmem``, else
``~/.cache/longmem``, keyed by the source, the compiler and the CPU, so later processes load them
in milliseconds. Each is written under a temporary name and renamed into place, so processes that
build concurrently never see a partial file. The sources have no torch headers.
``$LONGMEM_CC`` chooses the compiler (default ``$CC``, then ``cc``, ``gcc``, ``clang``).

Work is split into equal runs of elements, one per thread (``torch.get_num_threads()``), run by a
small persistent pool of Python threads: ctypes releases the GIL during a call, and no second
OpenMP runtime is loaded into the process.
"""

from __future__ import annotations

import array
import contextlib
import ctypes
import hashlib
import itertools
import operator
import os
import platform
import shutil
import subprocess
import tempfile
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
from torch import Tensor

from .._rounding import PARAM_STREAM
from .._state_precision import LeanBuffer
from .program import OP_NAMES, Program

KERNEL_DIR = Path(__file__).parent
SOURCE = KERNEL_DIR / "longmem_cpu.c"
HEADER = KERNEL_DIR / "longmem_ops.h"
ABI_VERSION = 1
#: flags that keep the arithmetic IEEE, as torch's own kernels: no -ffast-math, and no contraction
#: of a*b+c into a fused multiply-add except where longmem_ops.h asks for one (where torch has one)
BASE_FLAGS = ("-O3", "-std=gnu11", "-ffp-contract=off", "-fno-math-errno", "-fPIC", "-shared")
#: per-CPU tuning, tried in order until one compiles
ARCH_FLAGS = (("-march=native",), ("-mcpu=native",), ())
#: below this many elements a step runs on the calling thread alone
PARALLEL_MIN_ELEMENTS = 1 << 16
#: thread split points fall on multiples of this many elements within a tensor (whole cache lines)
SPLIT_ALIGN = 64
#: use kernels specialized to each program (False: the generic kernel only; for tests)
SPECIALIZE = os.environ.get("LONGMEM_SPECIALIZE", "1") != "0"
#: run a step's threads on torch's OpenMP team (LONGMEM_OPENMP=0: Python threads, the first design)
OPENMP = os.environ.get("LONGMEM_OPENMP", "1") != "0"
#: longmem_parallel's kinds of entry point (LM_KIND_* in longmem_cpu.c)
KIND_PROGRAM, KIND_LEAN_PROGRAM, KIND_RUN, KIND_RUN_LEAN = 0, 1, 2, 3

#: dtype -> (code in longmem_ops.h, float32 values per element)
DTYPE_CODES = {
    torch.float32: (0, 1),
    torch.bfloat16: (1, 1),
    torch.float16: (2, 1),
    torch.complex64: (0, 2),  # viewed as float32 pairs, as torch.view_as_real
    torch.complex32: (2, 2),
}
#: state dtype by float values per element (real, complex)
STATE_DTYPES = (torch.float32, torch.complex64)


class BuildError(RuntimeError):
    """A kernel could not be compiled or loaded."""


# ---- building ----------------------------------------------------------------------------------


def cache_dir() -> Path:
    """Where built kernels are kept."""
    if os.environ.get("LONGMEM_CACHE_DIR"):
        return Path(os.environ["LONGMEM_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "longmem"


def find_compiler() -> str:
    """The C compiler to use: ``$LONGMEM_CC``, ``$CC``, then the first of cc, gcc, clang on PATH."""
    for name in (os.environ.get("LONGMEM_CC"), os.environ.get("CC")):
        if name:
            # an explicit choice is not second-guessed: if it is missing, the build fails
            return shutil.which(name) or name
    for name in ("cc", "gcc", "clang"):
        path = shutil.which(name)
        if path:
            return path
    raise BuildError("no C compiler found (looked for $LONGMEM_CC, $CC, cc, gcc, clang)")


def _cpu_identity() -> str:
    """What -march=native depends on: the machine and, on Linux, the CPU's model and flags."""
    parts = [platform.system(), platform.machine()]
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                key = line.split(":", 1)[0].strip()
                if key in ("model name", "flags", "Features", "CPU part"):
                    parts.append(line.strip())
                if key == "" and len(parts) > 2:  # the first processor is enough
                    break
    except OSError:
        parts.append(platform.processor())
    return "\n".join(parts)


class Builder:
    """Compiles C sources into the cache, once per (source, compiler, CPU)."""

    def __init__(self, compiler: str) -> None:
        self.compiler = compiler
        h = hashlib.sha256()
        h.update(HEADER.read_bytes())
        h.update(repr((BASE_FLAGS, ARCH_FLAGS, ABI_VERSION)).encode())
        h.update(compiler.encode())
        try:  # a compiler upgraded in place gets a new key, without running it
            st = os.stat(compiler)
            h.update(f"{st.st_size}:{st.st_mtime_ns}".encode())
        except OSError:
            pass
        h.update(_cpu_identity().encode())
        self._salt = h.digest()
        self.arch: tuple[str, ...] | None = None  # the ARCH_FLAGS entry that worked

    def path_for(self, stem: str, source: str, extra: tuple[str, ...] = ()) -> Path:
        key = hashlib.sha256(self._salt + repr(extra).encode() + source.encode()).hexdigest()[:20]
        return cache_dir() / f"{stem}-{key}.so"

    def build(self, stem: str, source: str, extra: tuple[str, ...] = ()) -> Path:
        """The library compiled from ``source`` (with the ``extra`` flags): from the cache, or
        compiled now."""
        target = self.path_for(stem, source, extra)
        if target.exists():
            if self.arch is None:  # which -march this cache was built with, for reports
                with contextlib.suppress(OSError):
                    self.arch = tuple(target.with_suffix(".arch").read_text().split())
            return target
        target.parent.mkdir(parents=True, exist_ok=True)
        errors = []
        for arch in ARCH_FLAGS if self.arch is None else (self.arch,):
            with tempfile.TemporaryDirectory(dir=target.parent, prefix=".build-") as tmp:
                src = Path(tmp) / f"{stem}.c"
                src.write_text(source)
                out = Path(tmp) / f"{stem}.so"
                cmd = [
                    self.compiler,
                    *BASE_FLAGS,
                    *arch,
                    *extra,
                    f"-I{KERNEL_DIR}",
                    str(src),
                    "-o",
                    str(out),
                    "-lm",
                ]
                try:
                    result = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
                except (OSError, subprocess.SubprocessError) as err:
                    raise BuildError(f"could not run the C compiler {self.compiler!r}: {err}") from err
                if result.returncode == 0:
                    self.arch = arch
                    target.with_suffix(".arch").write_text(" ".join(arch))
                    os.replace(out, target)  # atomic: others see no file or the whole file
                    return target
                errors.append(f"$ {' '.join(cmd)}\n{result.stderr.strip()[-2000:]}")
        raise BuildError("the C compiler failed:\n" + "\n".join(errors))


# ---- the generic library -----------------------------------------------------------------------

_p, _i8, _i32, _i64 = ctypes.c_void_p, ctypes.c_int8, ctypes.c_int32, ctypes.c_int64


class Library:
    """The generic kernel library (longmem_cpu.c)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        lib = ctypes.CDLL(str(path))
        lib.longmem_abi_version.restype = ctypes.c_int
        if lib.longmem_abi_version() != ABI_VERSION:
            raise BuildError(f"{path} is a different version of the kernel")
        lib.longmem_run.restype = ctypes.c_int
        lib.longmem_run.argtypes = [_p, _p, _i32, _i32, _i32, _p, _p, _p, _p, _i32, _i64, _i64, _i64]
        lib.longmem_advance_steps.restype = None
        lib.longmem_advance_steps.argtypes = [_p, _i64, _p]
        lib.longmem_run_lean.restype = ctypes.c_int
        lib.longmem_run_lean.argtypes = [_p, _p, _i32, _i32, _i32, _p, _p, _p, _p, _i32, _i64, _i64, _i64,
                                         _p, _p, _p, ctypes.c_double, _i32]  # fmt: skip
        lib.longmem_parallel.restype = ctypes.c_int
        lib.longmem_parallel.argtypes = [_i32, _p, _p, ctypes.c_double, _p, _i32]
        lib.longmem_openmp.restype = ctypes.c_int
        lib.longmem_openmp_library.restype = ctypes.c_char_p
        self.lib = lib
        #: the OpenMP runtime the library's calls go to ("" for a build without OpenMP)
        self.openmp_library = os.fsdecode(lib.longmem_openmp_library() or b"")
        #: whether longmem_parallel runs its ranges on the OpenMP team that torch's operations use
        self.openmp = bool(lib.longmem_openmp()) and _torchs_openmp(self.openmp_library)


#: set in a forked child: GNU OpenMP cannot start a team in a child forked after the parent ran one
#: (it hangs, torch's own operations too), so forked children run a step's threads as Python threads
_forked = False


def _mark_forked() -> None:
    global _forked
    _forked = True


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_mark_forked)


def _torchs_openmp(ours: str) -> bool:
    """Whether ``ours`` (the OpenMP runtime the kernel library's calls go to) is torch's: the one in
    torch's own ``lib`` folder where the wheel ships one, else the one runtime loaded (Linux). Other
    packages may load runtimes of their own (scikit-learn's wheels ship a renamed libgomp)."""
    if not ours:
        return False
    ours = os.path.realpath(ours)
    shipped = sorted((Path(torch.__file__).parent / "lib").glob("lib*omp*.so*"))
    if shipped:
        return ours in {os.path.realpath(p) for p in shipped}
    try:
        with open("/proc/self/maps", encoding="utf-8", errors="replace") as f:
            paths = {
                line.split()[-1] for line in f if "libgomp" in line or "libiomp" in line or "libomp" in line
            }
    except OSError:
        return False
    return {os.path.realpath(p) for p in paths} == {ours}


def _build_generic(builder: Builder) -> Path:
    """The generic library, with OpenMP where the compiler takes it (``-fopenmp``; see
    ``longmem_parallel`` in longmem_cpu.c), else without. A compiler that refused the OpenMP build
    is remembered beside where it would be cached, so later processes do not try again."""
    source = SOURCE.read_text()
    if OPENMP:
        openmp = ("-fopenmp", "-ldl")
        refused = builder.path_for("longmem_cpu", source, openmp).with_suffix(".no-openmp")
        if not refused.exists():
            try:
                return builder.build("longmem_cpu", source, openmp)
            except BuildError as err:
                with contextlib.suppress(OSError):
                    refused.write_text(str(err))
    return builder.build("longmem_cpu", source)


_lock = threading.Lock()
_builder: Builder | None = None
_library: Library | None = None
_failure: str | None = None
#: program signature -> its specialized kernel (None: it could not be built; use the generic one)
_specialized: dict[tuple, ctypes._CFuncPtr | None] = {}  # type: ignore[name-defined]


def load() -> Library:
    """The generic kernel library, built if needed; raises :class:`BuildError` (and keeps failing
    the same way for the rest of the process) if it cannot be built or loaded."""
    global _builder, _library, _failure
    if _library is not None:
        return _library
    with _lock:
        if _library is not None:
            return _library
        if _failure is not None:
            raise BuildError(_failure)
        try:
            _builder = Builder(find_compiler())
            _library = Library(_build_generic(_builder))
        except (BuildError, OSError) as err:
            _failure = str(err)
            raise BuildError(_failure) from err
        return _library


def build_description() -> dict[str, str]:
    """The compiler, its version and the flags the kernels are built with here (builds if needed)."""
    load()
    assert _builder is not None
    arch = _builder.arch if _builder.arch is not None else ARCH_FLAGS[0]
    try:
        out = subprocess.run([_builder.compiler, "--version"], capture_output=True, text=True, timeout=30)
        version = out.stdout.splitlines()[0] if out.stdout else "?"
    except (OSError, subprocess.SubprocessError):
        version = "?"
    return {"compiler": _builder.compiler, "version": version, "flags": " ".join([*BASE_FLAGS, *arch])}


def reset() -> None:
    """Forget loaded kernels and any failure (for tests); the disk cache is kept."""
    global _builder, _library, _failure
    with _lock:
        _builder, _library, _failure = None, None, None
        _specialized.clear()


# ---- specialized kernels -----------------------------------------------------------------------

_LOAD = {
    "f32": "((const float *){ptr})[i]",
    "bf16": "lm_bf16_to_f32(((const uint16_t *){ptr})[i])",
    "f16": "lm_f16_to_f32(((const uint16_t *){ptr})[i])",
}
_STORE = {
    "f32": "((float *){ptr})[i] = {value};",
    "bf16": "((uint16_t *){ptr})[i] = lm_f32_to_bf16({value});",
    "f16": "((uint16_t *){ptr})[i] = lm_f32_to_f16({value});",
}


def specialized_source(program: Program, forms: Sequence[str] | None = None, stochastic: bool = False) -> str:
    """C source of a kernel that runs ``program`` with every value in registers.

    One loop per parameter dtype (float32, bfloat16, float16; the gradient has the parameter's
    dtype), each a straight line of calls into longmem_ops.h that the compiler vectorizes. The
    entry point takes the same pointer table as the generic kernel, and the scalars at run time,
    so one build serves every step.

    ``forms`` (one per state buffer: ``"f32"``, ``"bf16"``, ``"s8"``, ``"u8"``; see ``LEAN_FORMS``)
    or ``stochastic`` (bf16/fp16 parameters stochastically rounded) make a lean kernel instead
    (:func:`lean_source`).
    """
    if forms is not None or stochastic:
        return lean_source(program, tuple(forms or ("f32",) * len(program.buffers)), stochastic)
    n_mem, n_slots = program.n_mem, program.n_mem + program.n_temp
    written = program.written()
    params = ", ".join(
        ["void *restrict P0", "const void *restrict P1"]
        + [f"float *restrict P{k}" for k in range(2, n_mem)]
        + ["int64_t lo", "int64_t hi", "const float *restrict S", "uint32_t gsign"]
    )
    bodies = []
    for dt in ("f32", "bf16", "f16"):
        lines = [f"static void body_{dt}({params}) {{"]
        lines += [f"    const float s{k} = S[{k}];" for k in range(len(program.code))]
        size = 4 if dt == "f32" else 2
        lines.append("    for (int64_t i0 = lo; i0 < hi; i0 += LM_CHUNK) {")
        lines.append("    int64_t i1 = hi - i0 < LM_CHUNK ? hi : i0 + LM_CHUNK;")
        lines.append("#if LM_AHEAD > 0")
        for k in range(n_mem):
            lines.append(f"    lm_prefetch(P{k}, {size if k < 2 else 4}, i0 + LM_AHEAD, i1 + LM_AHEAD, hi);")
        lines.append("#endif")
        lines.append("    for (int64_t i = i0; i < i1; i++) { /* LM_BODY_LOOP */")
        lines += _loads(program, dt)
        if program.n_temp:
            lines.append("        float " + ", ".join(f"v{k}" for k in range(n_mem, n_slots)) + ";")
        lines += _instructions(program)
        for k in written:
            if k == 0:
                lines.append("        " + _STORE[dt].format(ptr="P0", value="v0"))
            else:
                lines.append(f"        P{k}[i] = v{k};")
        lines += ["    }", "    }", "}", ""]
        bodies.append("\n".join(lines))
    args = ", ".join(["p", "g"] + [f"(float *)ptrs[{k} * n_tensors + t]" for k in range(2, n_mem)])
    return f"""/* generated by longmem.kernels.cpu.specialized_source for the program:
{_comment(program)}
 */
#include "longmem_ops.h"

{"".join(bodies)}
int longmem_abi_version(void) {{ return {ABI_VERSION}; }}

int longmem_kernel(void *const *ptrs, const int64_t *numel, const int8_t *dtype, const double *scalar,
                   int32_t maximize, int64_t n_tensors, int64_t begin, int64_t end) {{
{_entry_prologue(program)}        void *p = ptrs[t];
        const void *g = ptrs[n_tensors + t];
        switch (dtype[t]) {{
        case LM_F32: body_f32({args}, lo, hi, S, gsign); break;
        case LM_BF16: body_bf16({args}, lo, hi, S, gsign); break;
        case LM_F16: body_f16({args}, lo, hi, S, gsign); break;
        default: return -1;
        }}
    }}
    return 0;
}}
"""


def _entry_prologue(program: Program) -> str:
    """The entry point's start: the scalars as floats, then the loop over the tensors of the range
    ``[begin, end)`` of their concatenation, each with its own ``[lo, hi)``."""
    return f"""    float S[{max(1, len(program.code))}];
    for (int k = 0; k < {len(program.code)}; k++) S[k] = (float)scalar[k];
    uint32_t gsign = maximize ? 0x80000000u : 0u;
    int64_t start = 0;
    for (int64_t t = 0; t < n_tensors && start < end; start += numel[t], t++) {{
        int64_t lo = begin > start ? begin - start : 0;
        int64_t hi = end - start < numel[t] ? end - start : numel[t];
        if (lo >= hi) continue;
"""


def _loads(program: Program, dt: str, forms: Sequence[str] | None = None) -> list[str]:
    """The body's loads of the parameter (dtype ``dt``), the gradient and each state buffer (in its
    form: float32 unless ``forms`` says otherwise) into float registers."""
    lines = [f"        float v0 = {_LOAD[dt].format(ptr='P0')};"]
    # maximize: the gradient's sign bit flipped as it is loaded (exactly torch.neg)
    lines.append(f"        float v1 = lm_from_bits(lm_bits({_LOAD[dt].format(ptr='P1')}) ^ gsign);")
    for k in range(2, program.n_mem):
        value = f"P{k}[i]" if forms is None else _DECODE[forms[k - 2]].format(k=k)
        lines.append(f"        float v{k} = {value};")
    return lines


def _instructions(program: Program) -> list[str]:
    return [
        f"        v{d} = lm_{OP_NAMES[op]}(v{a}, v{b}, v{c}, s{k});"
        for k, (op, d, a, b, c) in enumerate(program.code)
    ]


#: codes of the state forms of a lean kernel (as LM_FORM_* in longmem_cpu.c)
LEAN_FORMS = {"f32": 0, "bf16": 1, "s8": 2, "u8": 3}
#: elements per 8-bit block (``longmem._state_precision.BLOCK_SIZE``): lean kernels step whole blocks
LEAN_BLOCK = 256
_DECODE = {
    "f32": "((const float *)P{k})[i]",
    "bf16": "lm_bf16_to_f32(((const uint16_t *)P{k})[i])",
    "s8": "lm_dec_s8(((const int8_t *)P{k})[i], a{k})",
    "u8": "lm_dec_u8(((const uint8_t *)P{k})[i], a{k})",
}
_SR_STORE = {
    "bf16": "((uint16_t *)P0)[i] = lm_f32_to_bf16_sr(v0, {h});",
    "f16": "((uint16_t *)P0)[i] = lm_f32_to_f16_sr(v0, {h});",
}


def lean_source(program: Program, forms: tuple[str, ...], stochastic: bool) -> str:
    """C source of a kernel that runs ``program`` on state stored in ``forms`` (one per buffer; see
    ``LEAN_FORMS``), decoding, updating and encoding it in the same pass, with the counter-based
    noise of ``longmem_ops.h`` (``lm_noise``, carried by the loops as one add per element and
    stream); ``stochastic``: bf16/fp16 parameters are written back with stochastic rounding.

    Each thread takes whole blocks of ``LEAN_BLOCK`` elements (the 8-bit blocks). Block by block,
    the loop decodes each buffer (8-bit: with the block's old absmax), runs the rule, stores the
    parameter and the float32/bf16 buffers, and keeps each 8-bit buffer's new values (1 KiB, in L1)
    and their absmax (an integer max over the bits); a second loop over the block then encodes
    them with the new absmax. Every element is read and written once per step.
    """
    n_mem, n_slots = program.n_mem, program.n_mem + program.n_temp
    written = program.written()
    eight = [k for k in range(2, n_mem) if forms[k - 2] in ("s8", "u8")]
    n_streams = n_mem - 1  # a noise key per buffer, then the parameter's
    params = ", ".join(
        ["void *restrict P0", "const void *restrict P1"]
        + [f"void *restrict P{k}" for k in range(2, n_mem)]
        + [f"float *restrict A{k}" for k in eight]
        + [
            "int64_t lo",
            "int64_t hi",
            "const float *restrict S",
            "uint32_t gsign",
            "const uint32_t *restrict K",
        ]
    )
    bodies = []
    for dt in ("f32", "bf16", "f16"):
        lines = [f"static void body_{dt}({params}) {{"]
        lines += [f"    const float s{k} = S[{k}];" for k in range(len(program.code))]
        lines.append("    for (int64_t i0 = lo; i0 < hi; i0 += LM_CHUNK) {")
        lines.append("    int64_t i1 = hi - i0 < LM_CHUNK ? hi : i0 + LM_CHUNK;")
        lines.append("    const uint32_t ihi = (uint32_t)((uint64_t)i0 >> 32); /* blocks never cross 2^32 */")
        # the noise streams this body draws: each lean buffer it writes, then the parameter's
        streams = [k - 2 for k in written if k >= 2 and forms[k - 2] != "f32"]
        if stochastic and dt in _SR_STORE:
            streams.append(n_streams - 1)
        for j in streams:
            lines.append(f"    const uint32_t c{j} = lm_block_key(ihi, K[{2 * j}], K[{2 * j + 1}]);")
        first = [j for j in streams if j == n_streams - 1 or forms[j] == "bf16"]  # drawn in the first loop
        for k in eight:
            lines.append(f"    const float a{k} = A{k}[i0 / LM_CHUNK];")
            if k in written:
                lines.append(f"    float n{k}[LM_CHUNK];")
                lines.append(f"    uint32_t m{k} = 0;")
        lines += [f"    uint32_t w{j} = lm_noise((uint32_t)i0, c{j});" for j in first]
        lines.append("    for (int64_t i = i0; i < i1; i++) { /* LM_BODY_LOOP */")
        lines += _loads(program, dt, forms)
        if program.n_temp:
            lines.append("        float " + ", ".join(f"v{k}" for k in range(n_mem, n_slots)) + ";")
        lines += _instructions(program)
        for k in written:
            form = "f32" if k == 0 else forms[k - 2]
            if k == 0:
                if stochastic and dt in _SR_STORE:
                    lines.append("        " + _SR_STORE[dt].format(h=f"w{n_streams - 1}"))
                else:
                    lines.append("        " + _STORE[dt].format(ptr="P0", value="v0"))
            elif form == "f32":
                lines.append(f"        ((float *)P{k})[i] = v{k};")
            elif form == "bf16":
                lines.append(f"        ((uint16_t *)P{k})[i] = lm_f32_to_bf16_sr(v{k}, w{k - 2});")
            else:
                lines.append(f"        n{k}[i - i0] = v{k};")
                lines.append(f"        m{k} = m{k} > lm_absbits(v{k}) ? m{k} : lm_absbits(v{k});")
        lines += [f"        w{j} += LM_WEYL;" for j in first]
        lines.append("    }")
        for k in eight:
            if k not in written:
                continue
            code_type, encode = ("int8_t", "lm_enc_s8") if forms[k - 2] == "s8" else ("uint8_t", "lm_enc_u8")
            lines.append(f"    A{k}[i0 / LM_CHUNK] = lm_from_bits(m{k});")
            lines.append(f"    const float r{k} = lm_inv_absmax(lm_from_bits(m{k}));")
            lines.append(f"    uint32_t w{k - 2} = lm_noise((uint32_t)i0, c{k - 2});")
            lines.append(f"    for (int64_t i = i0; i < i1; i++, w{k - 2} += LM_WEYL) /* LM_BODY_LOOP */")
            lines.append(f"        (({code_type} *)P{k})[i] = {encode}(n{k}[i - i0], r{k}, w{k - 2});")
        lines += ["    }", "}", ""]
        bodies.append("\n".join(lines))
    args = ", ".join(
        ["p", "g"]
        + [f"ptrs[{k} * n_tensors + t]" for k in range(2, n_mem)]
        + [f"(float *)ptrs[{n_mem + k - 2} * n_tensors + t]" for k in eight]
    )
    return f"""/* generated by longmem.kernels.cpu.lean_source for state forms {", ".join(forms)}{
        ", parameters stochastically rounded" if stochastic else ""
    }, the program:
{_comment(program)}
 */
#include "longmem_ops.h"
#if LM_CHUNK != {LEAN_BLOCK}
#error "lean kernels step whole 8-bit blocks: LM_CHUNK must be {LEAN_BLOCK}"
#endif

{"".join(bodies)}
int longmem_abi_version(void) {{ return {ABI_VERSION}; }}

/* ptrs: rows of n_tensors pointers: parameters, gradients, each state buffer, then each buffer's
 * 8-bit scales (NULL for other forms); position: per tensor, its parameter's position; stream: the
 * noise stream of each buffer, then of the parameter. */
int longmem_lean_kernel(void *const *ptrs, const int64_t *numel, const int8_t *dtype, const double *scalar,
                        int32_t maximize, int64_t n_tensors, int64_t begin, int64_t end,
                        const int64_t *position, const int32_t *stream, double step) {{
{_entry_prologue(program)}        if (lo % {LEAN_BLOCK}) return -2;
        uint32_t K[{2 * n_streams}];
        for (int j = 0; j < {n_streams}; j++) {{
            uint64_t key = lm_noise_key(step, position[t], (uint32_t)stream[j]);
            K[2 * j] = (uint32_t)key;
            K[2 * j + 1] = (uint32_t)(key >> 32);
        }}
        void *p = ptrs[t];
        const void *g = ptrs[n_tensors + t];
        switch (dtype[t]) {{
        case LM_F32: body_f32({args}, lo, hi, S, gsign, K); break;
        case LM_BF16: body_bf16({args}, lo, hi, S, gsign, K); break;
        case LM_F16: body_f16({args}, lo, hi, S, gsign, K); break;
        default: return -1;
        }}
    }}
    return 0;
}}
"""


def _comment(program: Program) -> str:
    return "\n".join(" *   " + line for line in str(program).splitlines())


def _specialized_kernel(
    program: Program, forms: tuple[str, ...] | None = None, stochastic: bool = False
) -> ctypes._CFuncPtr | None:  # type: ignore[name-defined]
    """The specialized kernel for ``program``'s signature (a lean one for ``forms``/``stochastic``:
    see :func:`specialized_source`), built on first use; None if it cannot be."""
    lean = forms is not None or stochastic
    key = (program.signature(), forms, stochastic) if lean else program.signature()
    if key in _specialized:
        return _specialized[key]
    with _lock:
        if key not in _specialized:
            fn = None
            try:
                assert _builder is not None
                source = specialized_source(program, forms, stochastic)
                lib = ctypes.CDLL(str(_builder.build("longmem_lean" if lean else "longmem_prog", source)))
                if lib.longmem_abi_version() == ABI_VERSION:
                    fn = lib.longmem_lean_kernel if lean else lib.longmem_kernel
                    fn.restype = ctypes.c_int
                    fn.argtypes = [_p, _p, _p, _p, _i32, _i64, _i64, _i64]
                    if lean:
                        fn.argtypes += [_p, _p, ctypes.c_double]
            except (BuildError, OSError):
                fn = None  # the generic kernel computes the same numbers
            _specialized[key] = fn
    return _specialized[key]


# ---- running programs --------------------------------------------------------------------------

_pool: ThreadPoolExecutor | None = None
_pool_key: tuple[int, int] | None = None


def _executor(workers: int) -> ThreadPoolExecutor:
    global _pool, _pool_key
    key = (os.getpid(), workers)  # a forked child gets a pool of its own
    if _pool is None or _pool_key != key:
        _pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="longmem")
        _pool_key = key
    return _pool


def advance_steps(lib: Library, steps: Sequence[Tensor]) -> list[float]:
    """``step += 1`` for every float32 counter, in one call; returns the new values."""
    n = len(steps)
    ptrs = array.array("q", [s.data_ptr() for s in steps])
    out = (ctypes.c_double * n)()
    lib.lib.longmem_advance_steps(ptrs.buffer_info()[0], n, out)
    return list(out)


def _split(numels: Sequence[int], parts: int, align: int = SPLIT_ALIGN) -> list[int]:
    """Flat element indices that cut the concatenation into ``parts`` nearly equal runs, each cut
    falling on a multiple of ``align`` within its tensor."""
    total = sum(numels)
    cuts = [0]
    start, t = 0, 0
    for k in range(1, parts):
        target = total * k // parts
        while t < len(numels) and start + numels[t] <= target:
            start += numels[t]
            t += 1
        cut = start + (target - start) // align * align
        cuts.append(max(cut, cuts[-1]))
    cuts.append(total)
    return cuts


class Batch:
    """The tensors of one kernel call: a pointer table (parameters, gradients, then one row per
    state buffer), and per tensor its number of float values and dtype codes."""

    def __init__(self, n_buffers: int) -> None:
        self.params: list[Tensor] = []
        self.rows: list[list[int]] = [[] for _ in range(2 + n_buffers)]
        self.numel: list[int] = []
        self.p_dtype: list[int] = []
        self.g_dtype: list[int] = []
        self.keep: list[Tensor] = []  # tensors only the batch refers to (the pointers must stay valid)

    @classmethod
    def of(
        cls, params: Sequence[Tensor], grads: Sequence[Tensor], state: Sequence[Sequence[Tensor]]
    ) -> Batch:
        """A batch of tensors known to fit (no checks): for tests and direct use."""
        batch = cls(len(state))
        for i, (p, g) in enumerate(zip(params, grads, strict=True)):
            batch.params.append(p)
            for k, x in enumerate((p, g, *(s[i] for s in state))):
                batch.rows[k].append(x.data_ptr())
                batch.keep.append(x)
            code, width = DTYPE_CODES[p.dtype]
            batch.numel.append(p.numel() * width)
            batch.p_dtype.append(code)
            batch.g_dtype.append(DTYPE_CODES[g.dtype][0])
        return batch


# The per-tensor checks and pointer reads below are the Python cost of a fused step, paid for
# every tensor at every step (about 1 us a tensor, most of it torch's attribute access): they map
# C-level getters over whole lists, and check tensor by tensor only when something does not fit.
_dtype = operator.attrgetter("dtype")
_is_cpu = operator.attrgetter("is_cpu")


def _all_fit(ps: list[Tensor], gs: list[Tensor], bufs: list[list[Tensor]], pcs: list, gcs: list,
             numels: list[int]) -> bool:  # fmt: skip
    """Whether every tensor fits the kernels (the common case), without a Python loop per tensor."""
    if None in pcs or None in gcs:
        return False
    if pcs != gcs and [c[1] for c in pcs] != [c[1] for c in gcs]:  # real with real, complex with complex
        return False
    if numels != list(map(Tensor.numel, gs)) or not all(map(_is_cpu, gs)):
        return False
    if not (all(map(Tensor.is_contiguous, ps)) and all(map(Tensor.is_contiguous, gs))):
        return False
    real = all(c[1] == 1 for c in pcs)
    expected = {torch.float32} if real else None
    for row in bufs:
        if expected is None or set(map(_dtype, row)) != expected:
            return False
        if not (all(map(_is_cpu, row)) and all(map(Tensor.is_contiguous, row))):
            return False
    return True


def _fits(ps: list[Tensor], gs: list[Tensor], bufs: list[list[Tensor]], pcs: list, gcs: list,
          numels: list[int]) -> list[bool]:  # fmt: skip
    """Tensor by tensor: whether the kernels can take it (dtype, layout, device, state precision)."""
    ok = [
        pc is not None and gc is not None and pc[1] == gc[1] and n == g.numel()
        and g.is_cpu and p.is_contiguous() and g.is_contiguous()
        for p, g, pc, gc, n in zip(ps, gs, pcs, gcs, numels, strict=True)
    ]  # fmt: skip
    for row in bufs:
        ok = [
            good and b.dtype == STATE_DTYPES[pc[1] - 1] and b.is_cpu and b.is_contiguous()
            for good, b, pc in zip(ok, row, pcs, strict=True)
        ]
    return ok


def _by_step(steps: Sequence[float], indices: Sequence[int]) -> list[tuple[float, Sequence[int] | None]]:
    """``indices`` grouped by their step, in order of first appearance; ``None`` stands for every
    index when all tensors are at one step."""
    if len(indices) == len(steps) and len(set(steps)) == 1:
        return [(steps[0], None)]
    by_step: dict[float, list[int]] = {}
    for i in indices:
        by_step.setdefault(steps[i], []).append(i)
    return list(by_step.items())


def run_step(
    trace: Callable[[float], Program],
    params: Sequence[Tensor],
    grads: Sequence[Tensor],
    state: Sequence[Sequence[Tensor]],
    steps: Sequence[float],
    indices: Sequence[int],
    maximize: bool,
) -> list[int]:
    """Run ``trace(t)``'s program on the CPU tensors at ``indices`` (one kernel call per distinct
    step ``t``); returns the indices it cannot take (dtype, layout): the caller runs those."""
    rejected: list[int] = []
    for t, members in _by_step(steps, indices):
        if members is None:  # every tensor, at one step: the common case, without re-indexing
            members = range(len(params))
            ps, gs, bufs = list(params), list(grads), [list(s) for s in state]
        else:
            ps = [params[i] for i in members]
            gs = [grads[i] for i in members]
            bufs = [[s[i] for i in members] for s in state]
        pcs = list(map(DTYPE_CODES.get, map(_dtype, ps)))
        gcs = list(map(DTYPE_CODES.get, map(_dtype, gs)))
        numels = list(map(Tensor.numel, ps))
        if not _all_fit(ps, gs, bufs, pcs, gcs, numels):
            ok = _fits(ps, gs, bufs, pcs, gcs, numels)
            rejected += [i for i, good in zip(members, ok, strict=True) if not good]
            keep = [k for k, good in enumerate(ok) if good]
            ps, gs, pcs, gcs, numels = ([x[k] for k in keep] for x in (ps, gs, pcs, gcs, numels))
            bufs = [[row[k] for k in keep] for row in bufs]
            if not ps:
                continue
        batch = Batch(len(state))
        batch.params = ps
        batch.rows = [list(map(Tensor.data_ptr, row)) for row in (ps, gs, *bufs)]
        batch.numel = [n * pc[1] for n, pc in zip(numels, pcs, strict=True)]  # type: ignore[index]
        batch.p_dtype = [pc[0] for pc in pcs]  # type: ignore[index]
        batch.g_dtype = [gc[0] for gc in gcs]  # type: ignore[index]
        run(trace(t), batch, maximize)
    return rejected


def run(program: Program, batch: Batch, maximize: bool) -> None:
    """Execute ``program`` on the tensors of ``batch``."""
    lib = load()
    n = len(batch.numel)
    if n == 0:
        return
    scalars = array.array("d", program.scalars)
    ptrs = array.array("q", itertools.chain.from_iterable(batch.rows))
    numel = array.array("q", batch.numel)
    p_dtype = array.array("b", batch.p_dtype)
    g_dtype = array.array("b", batch.g_dtype)

    kernel = _specialized_kernel(program) if SPECIALIZE and batch.p_dtype == batch.g_dtype else None
    if kernel is not None:
        fixed: tuple = (ptrs.buffer_info()[0], numel.buffer_info()[0], p_dtype.buffer_info()[0],
                        scalars.buffer_info()[0], int(maximize), n)  # fmt: skip
    else:
        kernel = lib.lib.longmem_run
        code = array.array("i", [x for row in program.code for x in row])
        fixed = (code.buffer_info()[0], scalars.buffer_info()[0], len(program.code), program.n_mem,
                 program.n_temp, ptrs.buffer_info()[0], numel.buffer_info()[0], p_dtype.buffer_info()[0],
                 g_dtype.buffer_info()[0], int(maximize), n)  # fmt: skip

    def work(begin: int, end: int) -> None:
        if kernel(*fixed, begin, end) != 0:
            raise RuntimeError(f"longmem's CPU kernel rejected the program:\n{program}")

    kind = KIND_RUN if kernel is lib.lib.longmem_run else KIND_PROGRAM
    _in_threads(work, batch.numel, native=(lib, kind, kernel, fixed, 0.0))
    # The kernel wrote the parameters through raw pointers: tell autograd, as an in-place torch
    # operation would (state buffers take no part in autograd graphs).
    bump_versions(batch.params)


#: (library, kind, kernel, its arguments but (begin, end) and the double, the double): an entry point
#: that ``longmem_parallel`` can call
Native = tuple[Library, int, Callable[..., int], Sequence[int], float]


def _in_threads(
    work: Callable[[int, int], None],
    numels: Sequence[int],
    align: int = SPLIT_ALIGN,
    native: Native | None = None,
) -> None:
    """``work(begin, end)`` over the concatenation of tensors of ``numels`` elements, split over
    ``torch.get_num_threads()`` threads (cuts on multiples of ``align`` within a tensor).

    With ``native`` (the C entry point ``work`` calls) and an OpenMP build, one call runs the ranges
    on torch's OpenMP team (``longmem_parallel``); otherwise Python threads call ``work``."""
    total = sum(numels)
    threads = max(1, min(torch.get_num_threads(), total // PARALLEL_MIN_ELEMENTS))
    if threads == 1:
        work(0, total)
        return
    cuts = _split(numels, threads, align)
    if native is not None and native[0].openmp and not _forked:
        lib, kind, kernel, args, d = native
        words = array.array("q", args)
        bounds = array.array("q", cuts)
        address = ctypes.cast(kernel, ctypes.c_void_p).value
        if lib.lib.longmem_parallel(
            kind, address, words.buffer_info()[0], d, bounds.buffer_info()[0], threads
        ):
            work(0, 0)  # raises the entry point's error (an empty range runs the same checks)
            raise RuntimeError("longmem's CPU kernel failed on a range")
        return
    futures = [_executor(threads - 1).submit(work, cuts[k], cuts[k + 1]) for k in range(1, threads)]
    try:
        work(cuts[0], cuts[1])
    finally:
        for f in futures:
            f.result()


def bump_versions(tensors: Sequence[Tensor]) -> None:
    """Advance the autograd version counters of tensors modified through their data pointers."""
    try:
        torch.autograd.graph.increment_version(list(tensors))
    except TypeError:  # torch < 2.5 takes one tensor at a time
        for x in tensors:
            torch.autograd.graph.increment_version(x)


# ---- lean state and stochastic parameter rounding ------------------------------------------------

_LEAN_PARAM_CODES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}


def _lean_form(buf: object, numel: int) -> str | None:
    """The kernel form of one state buffer as handed to the fused step (a float32 tensor or a
    ``LeanBuffer``), or None if the lean kernels cannot take it."""
    if isinstance(buf, LeanBuffer):
        codes, scales = buf.codes, buf.scales
        if not (codes.is_cpu and codes.is_contiguous() and codes.numel() == numel):
            return None
        if scales is not None and not (scales.is_cpu and scales.is_contiguous()):
            return None
        return buf.form
    if isinstance(buf, Tensor) and buf.dtype == torch.float32 and buf.is_cpu and buf.is_contiguous():
        return "f32" if buf.numel() == numel else None
    return None


def takes(p: Tensor, g: Tensor, stored: Sequence[Tensor]) -> bool:
    """Whether the lean kernels can step ``p`` (gradient ``g``) with its state buffers ``stored``
    (as kept in the optimizer's state: float32, bfloat16 or 8-bit codes)."""
    return (
        p.dtype in _LEAN_PARAM_CODES
        and g.dtype in _LEAN_PARAM_CODES
        and p.is_cpu
        and g.is_cpu
        and p.is_contiguous()
        and g.is_contiguous()
        and g.numel() == p.numel()
        and all(b.is_cpu and b.is_contiguous() and b.numel() == p.numel() for b in stored)
    )


def run_lean_step(
    trace: Callable[[float], Program],
    params: Sequence[Tensor],
    grads: Sequence[Tensor],
    state: Sequence[Sequence[Tensor | LeanBuffer]],
    steps: Sequence[float],
    indices: Sequence[int],
    maximize: bool,
    param_streams: Sequence[int] | None,
) -> list[int]:
    """:func:`run_step` for state in lean forms (``LeanBuffer`` entries of ``state``) and for
    stochastically rounded parameters (``param_streams``: each parameter's noise stream, its
    position): one call of a lean kernel per distinct (step, forms); returns what it cannot take."""
    rejected: list[int] = []
    calls: dict[tuple[float, tuple[str | None, ...]], list[int]] = {}
    for i in indices:
        p, g = params[i], grads[i]
        forms = tuple(_lean_form(row[i], p.numel()) for row in state)
        if None in forms or not takes(p, g, ()):
            rejected.append(i)
        else:
            calls.setdefault((steps[i], forms), []).append(i)
    for (t, forms), members in calls.items():
        streams = None if param_streams is None else [param_streams[i] for i in members]
        rows = [[row[i] for i in members] for row in state]
        run_lean(trace(t), t, [params[i] for i in members], [grads[i] for i in members], rows,
                 forms, streams, maximize)  # type: ignore[arg-type]  # fmt: skip
    return rejected


def run_lean(
    program: Program,
    step: float,
    params: Sequence[Tensor],
    grads: Sequence[Tensor],
    state: Sequence[Sequence[Tensor | LeanBuffer]],
    forms: tuple[str, ...],
    param_streams: Sequence[int] | None,
    maximize: bool,
) -> None:
    """Execute ``program`` at ``step`` on parameters whose state buffers are in ``forms`` (a
    ``LeanBuffer`` for each lean form, a float32 tensor for ``"f32"``); each parameter's noise is
    keyed by its position (``param_streams``, else its lean buffers')."""
    lib = load()
    n = len(params)
    stochastic = param_streams is not None
    rows: list[list[int]] = [[x.data_ptr() for x in params], [x.data_ptr() for x in grads]]
    scale_rows: list[list[int]] = []
    streams: list[int] = []
    position = list(param_streams) if stochastic else [0] * n
    for k, row in enumerate(state):
        lean = [b for b in row if isinstance(b, LeanBuffer)]
        rows.append([(b.codes if isinstance(b, LeanBuffer) else b).data_ptr() for b in row])
        scale_rows.append([b.scales.data_ptr() if isinstance(b, LeanBuffer) and b.scales is not None else 0
                           for b in row])  # fmt: skip
        streams.append(lean[0].stream if lean else k)
        if lean and not stochastic:
            position = [
                b.position if isinstance(b, LeanBuffer) else q for b, q in zip(row, position, strict=True)
            ]
    streams.append(PARAM_STREAM)
    ptrs = array.array("q")
    for row in rows + scale_rows:
        ptrs.extend(row)
    numel = array.array("q", [p.numel() for p in params])
    p_dtype = array.array("b", [_LEAN_PARAM_CODES[p.dtype] for p in params])
    g_dtype = array.array("b", [_LEAN_PARAM_CODES[g.dtype] for g in grads])
    scalars = array.array("d", program.scalars)
    positions = array.array("q", position)
    stream_ids = array.array("i", streams)
    tail = (positions.buffer_info()[0], stream_ids.buffer_info()[0], float(step))
    kernel = _specialized_kernel(program, forms, stochastic) if SPECIALIZE and p_dtype == g_dtype else None
    if kernel is not None:
        fixed: tuple = (ptrs.buffer_info()[0], numel.buffer_info()[0], p_dtype.buffer_info()[0],
                        scalars.buffer_info()[0], int(maximize), n)  # fmt: skip
        after = tail
    else:
        kernel = lib.lib.longmem_run_lean
        code = array.array("i", [x for row in program.code for x in row])
        form_codes = array.array("b", [LEAN_FORMS[f] for f in forms])
        fixed = (code.buffer_info()[0], scalars.buffer_info()[0], len(program.code), program.n_mem,
                 program.n_temp, ptrs.buffer_info()[0], numel.buffer_info()[0], p_dtype.buffer_info()[0],
                 g_dtype.buffer_info()[0], int(maximize), n)  # fmt: skip
        after = (form_codes.buffer_info()[0], *tail, int(stochastic))

    def work(begin: int, end: int) -> None:
        if kernel(*fixed, begin, end, *after) != 0:
            raise RuntimeError(f"longmem's lean CPU kernel rejected the program ({forms}):\n{program}")

    if kernel is lib.lib.longmem_run_lean:
        native = (lib, KIND_RUN_LEAN, kernel, (*fixed, after[0], after[1], after[2], after[4]), after[3])
    else:
        native = (lib, KIND_LEAN_PROGRAM, kernel, (*fixed, after[0], after[1]), after[2])
    _in_threads(work, list(numel), LEAN_BLOCK, native=native)
    bump_versions(params)
