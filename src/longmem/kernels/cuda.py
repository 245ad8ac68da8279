"""The fused CUDA kernel: Triton code generated from a traced program.

The same traced program the CPU kernel runs (:mod:`.program`) is turned into a ``@triton.jit``
function (:func:`kernel_source`), one per program signature. One launch updates every tensor of a
step that shares the parameter and gradient dtypes: each program instance takes one block of one
tensor, found through a table of data pointers (multi-tensor apply, as torch's fused AdamW does),
so a step is a handful of launches rather than one per tensor. Values are float32 in registers;
bf16/fp16 parameters are rounded back to nearest even. Division and square root are the IEEE ones
(``div_rn``, ``sqrt_rn``), and fused multiply-adds are explicit where the CPU kernel has them: the
kernels are compiled with ``enable_fp_fusion=False``, so Triton contracts no other multiply and add
(its default contracts them, and Triton 3.10 changes that default; the C kernel builds with
``-ffp-contract=off``). ``sigmoid``'s ``tl.exp`` is the GPU's ``ex2.approx`` (a few ulps).

Memory access: a block that lies wholly inside its tensor is loaded and stored without a mask, and
when every pointer of a launch is 16-byte aligned the kernel is told so (``ALIGNED``), so that Triton
emits 128-bit loads and stores; a tensor's last, partial block takes the masked code
(``FULL_BLOCK_FAST_PATH``; without it, every access is a masked 32-bit one).

Triton is not a dependency of longmem (it comes with torch's CUDA wheels on Linux). Without it,
``fused=True`` on CUDA warns once and runs the foreach path.

Status: written for CUDA but verified only with Triton's CPU interpreter (``TRITON_INTERPRET=1``,
see tests/test_fused.py) and compiled ahead of time for sm_90 by Triton's own compiler
(:func:`compile_ahead`, no GPU needed); no GPU was available when it was written.
``benchmarks/gpu_acceptance.py`` checks and times it on a GPU in one command.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import os
import threading
import warnings
from collections.abc import Callable, Mapping, Sequence
from types import ModuleType
from typing import Any

import torch
from torch import Tensor

from .._rounding import PARAM_STREAM, noise_key
from .._state_precision import LeanBuffer, LeanBuffers
from .cpu import bump_versions, cache_dir
from .program import OP_NAMES, Program

#: elements per program instance
BLOCK = 1024
#: full blocks take unmasked (and, when aligned, vectorized) loads and stores; False: every access is
#: masked (the first version; kept switchable so that a GPU run can time both)
FULL_BLOCK_FAST_PATH = True
#: pointer alignment (bytes) that lets Triton use 128-bit accesses
ALIGNMENT = 16
#: options of every compilation: no contraction of multiplies and adds beyond the explicit tl.fma
COMPILE_OPTIONS = {"enable_fp_fusion": False}

# Triton expressions of the operations (codes as in program.py), float32 in and out.
_EXPR = {
    "mul_s": "{a} * {s}",
    "mul": "{a} * {b}",
    "add_s": "{a} + {s}",
    "axpy": "tl.fma({b}, {s}, {a})",
    "sub": "{a} - {b}",
    "addcmul": "tl.fma({s} * {b}, {c}, {a})",
    "addcdiv": "{a} + tl.div_rn({s} * {b}, {c})",
    "div_s": "tl.div_rn({a}, {s} + tl.zeros_like({a}))",
    "div": "tl.div_rn({a}, {b})",
    "sqrt": "tl.sqrt_rn({a})",
    "recip": "tl.div_rn(tl.full({a}.shape, 1.0, tl.float32), {a})",
    "abs": "tl.abs({a})",
    "sigmoid": "tl.div_rn(tl.full({a}.shape, 1.0, tl.float32), 1.0 + tl.exp(-{a}))",
    "min": "tl.where({a} != {a}, {a}, tl.where({b} != {b}, {b}, tl.minimum({a}, {b})))",
    "copy": "{a}",
    "neg": "-{a}",
    # torch's lerp (one fused multiply-add), the formula chosen by the tracer from |s| < 0.5
    "lerp_lo": "tl.fma({s} + tl.zeros_like({a}), {b} - {a}, {a})",
    "lerp_hi": "tl.fma({s} - 1.0 + tl.zeros_like({a}), {b} - {a}, {b})",
}

#: the Triton dtypes of the parameters and gradients, written into each kernel's source (a
#: ``tl.constexpr`` dtype argument cannot make a pointer type before Triton 3.1 or so)
_TRITON_DTYPES = {torch.float32: "tl.float32", torch.bfloat16: "tl.bfloat16", torch.float16: "tl.float16"}
#: parameter/gradient dtype -> (dtype the kernel sees, float values per element)
_VIEWS = {
    torch.float32: (torch.float32, 1),
    torch.bfloat16: (torch.bfloat16, 1),
    torch.float16: (torch.float16, 1),
    torch.complex64: (torch.float32, 2),
    torch.complex32: (torch.float16, 2),
}


def available() -> bool:
    """Whether Triton can be imported."""
    try:
        import triton
        import triton.language  # noqa: F401
    except ImportError:
        return False
    return True


def kernel_source(
    program: Program,
    p_dtype: torch.dtype = torch.float32,
    g_dtype: torch.dtype | None = None,
    *,
    fast_path: bool | None = None,
    forms: Sequence[str] | None = None,
    stochastic: bool = False,
) -> str:
    """Python source of the ``@triton.jit`` kernel that runs ``program`` on parameters of (the
    kernel's view of) ``p_dtype`` and gradients of ``g_dtype`` (default: ``p_dtype``); see the module
    docstring. ``fast_path`` defaults to ``FULL_BLOCK_FAST_PATH``. With ``forms`` or ``stochastic``,
    the lean kernel of :func:`lean_source`."""
    g_dtype = p_dtype if g_dtype is None else g_dtype
    if forms is not None or stochastic:
        forms = tuple(forms or ("f32",) * len(program.buffers))
        return lean_source(program, forms, stochastic, p_dtype, g_dtype)
    fast_path = FULL_BLOCK_FAST_PATH if fast_path is None else fast_path
    p_ty = _TRITON_DTYPES[p_dtype]
    g_ty = _TRITON_DTYPES[g_dtype]
    n_mem = program.n_mem
    scalars = [f"s{k}" for k in range(len(program.code))]
    lines = [
        '"""Generated by longmem.kernels.cuda.kernel_source for the program:',
        *("    " + line for line in str(program).splitlines()),
        '"""',
        "import triton",
        "import triton.language as tl",
        "",
        "",
        "@triton.jit",
        "def kernel(PTRS, NUMEL, BLOCK_TENSOR, BLOCK_START, n_tensors, "
        + "".join(f"{s}, " for s in scalars)
        + "MAXIMIZE: tl.constexpr, ALIGNED: tl.constexpr, BLOCK: tl.constexpr):",
        "    pid = tl.program_id(0)",
        "    t = tl.load(BLOCK_TENSOR + pid)",
        "    start = tl.multiple_of(tl.load(BLOCK_START + pid), BLOCK)",
        "    offs = start + tl.arange(0, BLOCK)",
        "    numel = tl.load(NUMEL + t)",
        f"    ptr0 = tl.load(PTRS + t).to(tl.pointer_type({p_ty}))",
        f"    ptr1 = tl.load(PTRS + n_tensors + t).to(tl.pointer_type({g_ty}))",
    ]
    lines += [
        f"    ptr{k} = tl.load(PTRS + {k} * n_tensors + t).to(tl.pointer_type(tl.float32))"
        for k in range(2, n_mem)
    ]
    lines.append("    if ALIGNED:")
    lines += [f"        ptr{k} = tl.multiple_of(ptr{k}, {ALIGNMENT})" for k in range(n_mem)]

    def body(indent: str, masked: bool) -> list[str]:
        load = ", mask=mask, other=0.0" if masked else ""
        store = ", mask=mask" if masked else ""
        out = [
            f"v0 = tl.load(ptr0 + offs{load}).to(tl.float32)",
            f"v1 = tl.load(ptr1 + offs{load}).to(tl.float32)",
            "if MAXIMIZE:",
            "    v1 = -v1",
        ]
        out += [f"v{k} = tl.load(ptr{k} + offs{load})" for k in range(2, n_mem)]
        for k, (op, d, a, b, c) in enumerate(program.code):
            expr = _EXPR[OP_NAMES[op]].format(a=f"v{a}", b=f"v{b}", c=f"v{c}", s=f"s{k}")
            out.append(f"v{d} = {expr}")
        for k in program.written():
            value = f'v0.to({p_ty}, fp_downcast_rounding="rtne")' if k == 0 else f"v{k}"
            out.append(f"tl.store(ptr{k} + offs, {value}{store})")
        return [indent + line for line in out]

    if fast_path:
        # a block wholly inside its tensor: no mask, so that accesses can be vectorized
        lines.append("    if start + BLOCK <= numel:")
        lines += body("        ", masked=False)
        lines.append("    else:")
        lines.append("        mask = offs < numel")
        lines += body("        ", masked=True)
    else:
        lines.append("    mask = offs < numel")
        lines += body("    ", masked=True)
    return "\n".join(lines) + "\n"


#: elements per program instance of a lean kernel: one 8-bit block (its absmax is a reduction)
LEAN_BLOCK = 256
_CODE_TY = {"bf16": "tl.uint16", "s8": "tl.int8", "u8": "tl.uint8"}
#: float32(1 / L) of the 8-bit grids, as the CPU kernels' LM_INV127 / LM_INV255
_INV_LEVELS = {"s8": "0.007874015718698502", "u8": "0.0039215688593685627"}

# The codec, stated as in longmem_ops.h (and longmem/_state_precision.py) operation for operation,
# on blocks: the same bits as the CPU kernels (Triton may contract a multiply and an add into an
# FMA, so no such pair appears where the result is compared or stored).
_CODEC = """
@triton.jit
def _mix32(x):
    x = x ^ (x >> 16)
    x = x * 0x21F0AAAD
    x = x ^ (x >> 15)
    x = x * 0x735A2D97
    return x ^ (x >> 15)


@triton.jit
def _noise(offs, start, K, j, n_streams, t):
    # lm_block_key, lm_noise: a Weyl sequence over the index, offset by the (stream, tensor) key
    k0 = tl.load(K + (t * n_streams + j) * 2).to(tl.uint32)
    k1 = tl.load(K + (t * n_streams + j) * 2 + 1).to(tl.uint32)
    block_key = k0 ^ _mix32((start >> 32).to(tl.uint32) ^ k1)
    return offs.to(tl.uint32) * 0x61C88647 + block_key


@triton.jit
def _bf16_sr(v, h):
    return ((v.to(tl.uint32, bitcast=True) + (h >> 16)) >> 16).to(tl.uint16)


@triton.jit
def _f16_sr(v, h):
    u = v.to(tl.uint32, bitcast=True)
    sign = (u >> 16) & 0x8000
    a = u & 0x7FFFFFFF
    truncated = (a + (h >> 19)) & 0xFFFFE000
    normal = tl.where(truncated >= (143 << 23), 0x7C00, (truncated - (112 << 23)) >> 13)
    sub_range = a < (113 << 23)
    scaled = tl.where(sub_range, tl.abs(v) * 16777216.0, 0.0)
    whole = scaled.to(tl.int32)
    threshold = ((scaled - whole.to(tl.float32)) * 16777216.0).to(tl.int32)
    sub = whole.to(tl.uint32) + ((h >> 8).to(tl.int32) < threshold).to(tl.uint32)
    mag = tl.where(a > 0x7F800000, 0x7E00, tl.where(sub_range, sub, normal))
    return (mag | sign).to(tl.uint16)


@triton.jit
def _grid(k, INV, SIGNED: tl.constexpr):
    t = k.to(tl.float32) * INV
    if SIGNED:
        return (t * t) * t
    s = t * t
    return s * s


@triton.jit
def _encode(v, mask, h, INV, LEVELS: tl.constexpr, SIGNED: tl.constexpr):
    # the block's absmax (an integer max over |v|'s bits), then each code; returns (codes, absmax)
    absmax = tl.max(tl.where(mask, v.to(tl.uint32, bitcast=True) & 0x7FFFFFFF, 0), axis=0)
    absmax = absmax.to(tl.float32, bitcast=True)
    inv = tl.where(absmax > 0.0, tl.div_rn(1.0, absmax), 0.0)
    y = (tl.abs(v) * inv).to(tl.uint32, bitcast=True)
    y = tl.minimum(y, 0x3F800000).to(tl.float32, bitcast=True)
    if SIGNED:
        root = tl.exp2(tl.log2(y) * (1.0 / 3.0))
    else:
        root = tl.sqrt_rn(tl.sqrt_rn(y))
    k0 = tl.minimum(tl.maximum((root * LEVELS - 0.5).to(tl.int32), 0), LEVELS - 1)
    g1 = _grid(k0 + 1, INV, SIGNED)
    up = (y >= g1) & (k0 < LEVELS - 1)
    other = _grid(k0 + 2 * up.to(tl.int32), INV, SIGNED)
    lo = tl.where(up, g1, other)
    hi = tl.where(up, other, g1)
    fraction = ((h >> 8).to(tl.int32).to(tl.float32) * 5.9604644775390625e-08) * (hi - lo)
    k = k0 + up.to(tl.int32) + (fraction < y - lo).to(tl.int32)
    if SIGNED:
        k = tl.where(v.to(tl.int32, bitcast=True) < 0, -k, k)
    else:
        k = tl.where((k == 0) & (y > 0.0), 1, k)
    return k, absmax
"""


def lean_source(
    program: Program,
    forms: tuple[str, ...],
    stochastic: bool,
    p_dtype: torch.dtype = torch.float32,
    g_dtype: torch.dtype | None = None,
) -> str:
    """Python source of the Triton kernel that runs ``program`` on state stored in ``forms`` (one
    per buffer: ``"f32"``, ``"bf16"``, ``"s8"``, ``"u8"``), decoding, updating and encoding it in
    one pass with the counter-based noise of the CPU kernels; ``stochastic``: bf16/fp16 parameters
    are written back with stochastic rounding. Each program instance takes one 8-bit block of
    ``LEAN_BLOCK`` elements of one tensor, so a block's absmax is a reduction in registers.
    ``PTRS`` rows: parameters, gradients, each buffer, then each buffer's scales (0 where none);
    ``K``: per tensor and noise stream (each buffer, then the parameter) the key's two halves.
    Parameters are ``p_dtype``, gradients ``g_dtype`` (default: ``p_dtype``), written into the source
    as :func:`kernel_source` does."""
    p_ty = _TRITON_DTYPES[p_dtype]
    g_ty = _TRITON_DTYPES[p_dtype if g_dtype is None else g_dtype]
    n_mem = program.n_mem
    n_streams = n_mem - 1
    scalars = [f"s{k}" for k in range(len(program.code))]
    written = program.written()
    lines = [
        '"""Generated by longmem.kernels.cuda.lean_source for state forms '
        + ", ".join(forms)
        + (", parameters stochastically rounded" if stochastic else "")
        + ", the program:",
        *("    " + line for line in str(program).splitlines()),
        '"""',
        "import triton",
        "import triton.language as tl",
        _CODEC,
        "",
        "@triton.jit",
        "def kernel(PTRS, NUMEL, BLOCK_TENSOR, BLOCK_START, n_tensors, K, "
        + "".join(f"{s}, " for s in scalars)
        + "MAXIMIZE: tl.constexpr, BLOCK: tl.constexpr):",
        "    pid = tl.program_id(0)",
        "    t = tl.load(BLOCK_TENSOR + pid)",
        "    start = tl.load(BLOCK_START + pid)",
        "    offs = start + tl.arange(0, BLOCK)",
        "    mask = offs < tl.load(NUMEL + t)",
        f"    ptr0 = tl.load(PTRS + t).to(tl.pointer_type({p_ty}))",
        f"    ptr1 = tl.load(PTRS + n_tensors + t).to(tl.pointer_type({g_ty}))",
        "    v0 = tl.load(ptr0 + offs, mask=mask, other=0.0).to(tl.float32)",
        "    v1 = tl.load(ptr1 + offs, mask=mask, other=0.0).to(tl.float32)",
        "    if MAXIMIZE:",
        "        v1 = -v1",
    ]
    for k in range(2, n_mem):
        form = forms[k - 2]
        ty = "tl.float32" if form == "f32" else _CODE_TY[form]
        lines.append(f"    ptr{k} = tl.load(PTRS + {k} * n_tensors + t).to(tl.pointer_type({ty}))")
        if form == "f32":
            lines.append(f"    v{k} = tl.load(ptr{k} + offs, mask=mask, other=0.0)")
        elif form == "bf16":
            code = f"tl.load(ptr{k} + offs, mask=mask, other=0).to(tl.uint32)"
            lines.append(f"    v{k} = ({code} << 16).to(tl.float32, bitcast=True)")
        else:
            row = f"PTRS + {n_mem + k - 2} * n_tensors + t"
            lines.append(f"    scale{k} = tl.load({row}).to(tl.pointer_type(tl.float32))")
            lines.append(f"    block{k} = start // BLOCK")
            code = f"tl.load(ptr{k} + offs, mask=mask, other=0).to(tl.int32)"
            signed = form == "s8"
            grid = f"_grid({code}, {_INV_LEVELS[form]}, {signed})"
            lines.append(f"    v{k} = {grid} * tl.load(scale{k} + block{k})")
    for k, (op, d, a, b, c) in enumerate(program.code):
        expr = _EXPR[OP_NAMES[op]].format(a=f"v{a}", b=f"v{b}", c=f"v{c}", s=f"s{k}")
        lines.append(f"    v{d} = {expr}")
    for k in written:
        if k == 0:
            nearest = f'v0.to({p_ty}, fp_downcast_rounding="rtne")'
            rounding = {torch.bfloat16: "_bf16_sr", torch.float16: "_f16_sr"}.get(p_dtype)
            if stochastic and rounding is not None:
                bits = "ptr0.to(tl.pointer_type(tl.uint16)) + offs"
                lines.append(f"    h = _noise(offs, start, K, {n_streams - 1}, {n_streams}, t)")
                lines.append(f"    tl.store({bits}, {rounding}(v0, h), mask=mask)")
            else:
                lines.append(f"    tl.store(ptr0 + offs, {nearest}, mask=mask)")
            continue
        form = forms[k - 2]
        if form == "f32":
            lines.append(f"    tl.store(ptr{k} + offs, v{k}, mask=mask)")
            continue
        lines.append(f"    h = _noise(offs, start, K, {k - 2}, {n_streams}, t)")
        if form == "bf16":
            lines.append(f"    tl.store(ptr{k} + offs, _bf16_sr(v{k}, h), mask=mask)")
        else:
            levels, signed = (127, True) if form == "s8" else (255, False)
            ty = _CODE_TY[form]
            encode = f"_encode(v{k}, mask, h, {_INV_LEVELS[form]}, {levels}, {signed})"
            lines.append(f"    codes, absmax = {encode}")
            lines.append(f"    tl.store(ptr{k} + offs, codes.to({ty}), mask=mask)")
            lines.append(f"    tl.store(scale{k} + block{k}, absmax)")
    return "\n".join(lines) + "\n"


_lock = threading.Lock()
_modules: dict[tuple, ModuleType] = {}


def _kernel(
    program: Program,
    p_dtype: torch.dtype,
    g_dtype: torch.dtype,
    forms: tuple[str, ...] | None = None,
    stochastic: bool = False,
) -> Any:
    """The generated Triton kernel for ``program``'s signature and the dtypes (a lean one for
    ``forms`` or ``stochastic``), written to a file: Triton reads a kernel's source."""
    key = (program.signature(), p_dtype, g_dtype, FULL_BLOCK_FAST_PATH, forms, stochastic)
    module = _modules.get(key)
    if module is None:
        with _lock:
            module = _modules.get(key)
            if module is None:
                source = kernel_source(
                    program,
                    p_dtype,
                    g_dtype,
                    fast_path=FULL_BLOCK_FAST_PATH,
                    forms=forms,
                    stochastic=stochastic,
                )
                digest = hashlib.sha256(source.encode()).hexdigest()[:20]
                path = cache_dir() / "triton" / f"longmem_prog_{digest}.py"
                if not path.exists():
                    path.parent.mkdir(parents=True, exist_ok=True)
                    tmp = path.with_suffix(f".{os.getpid()}.tmp")
                    tmp.write_text(source)
                    os.replace(tmp, path)
                spec = importlib.util.spec_from_file_location(path.stem, path)
                assert spec is not None and spec.loader is not None
                module = importlib.util.module_from_spec(spec)
                spec.loader.exec_module(module)
                _modules[key] = module
    return module.kernel


def _fits(p: Tensor, g: Tensor, bufs: Sequence[Tensor]) -> bool:
    """Whether the Triton kernel can update ``p`` (dtype, layout, device, state precision)."""
    pv, gv = _VIEWS.get(p.dtype), _VIEWS.get(g.dtype)
    if pv is None or gv is None or pv[1] != gv[1] or not (p.is_contiguous() and g.is_contiguous()):
        return False
    device = p.get_device()
    if g.get_device() != device or g.numel() != p.numel():
        return False
    state_dtype = torch.complex64 if pv[1] == 2 else torch.float32
    return all(b.dtype == state_dtype and b.get_device() == device and b.is_contiguous() for b in bufs)


_tables: dict[tuple, tuple[Tensor, Tensor, Tensor]] = {}


def _block_tables(
    numels: tuple[int, ...], device: torch.device, block: int = BLOCK
) -> tuple[Tensor, Tensor, Tensor]:
    """(numel per tensor, tensor of each block, first element of each block) for blocks of
    ``block`` elements, on ``device``; they depend only on the sizes, so they are kept between steps."""
    key = (numels, device, block)
    tables = _tables.get(key)
    if tables is None:
        numel = torch.tensor(numels, dtype=torch.int64)
        blocks = (numel + block - 1) // block
        block_tensor = torch.repeat_interleave(torch.arange(len(numels)), blocks)
        first_block = torch.cumsum(blocks, 0) - blocks
        block_start = (torch.arange(len(block_tensor)) - first_block[block_tensor]) * block
        tables = (numel.to(device), block_tensor.to(torch.int32).to(device), block_start.to(device))
        if len(_tables) > 64:
            _tables.clear()
        _tables[key] = tables
    return tables


_pointers: dict[tuple, Tensor] = {}


def _pointer_table(addresses: list[int], device: torch.device) -> Tensor:
    """The tensors' data pointers as an int64 tensor on ``device``, kept while they stay the same (a
    step's tensors usually do). A new table is copied from pinned memory without blocking: a copy
    from pageable memory would synchronize the host with the GPU at every launch."""
    key = (device, tuple(addresses))
    table = _pointers.get(key)
    if table is None:
        host = torch.tensor(addresses, dtype=torch.int64, pin_memory=device.type == "cuda")
        table = host.to(device, non_blocking=True)
        if len(_pointers) > 64:
            _pointers.clear()
        _pointers[key] = table
    return table


def run_step(
    trace: Callable[[float], Program],
    params: Sequence[Tensor],
    grads: Sequence[Tensor],
    state: Sequence[Sequence[Tensor]],
    steps: Sequence[float],
    indices: Sequence[int],
    maximize: bool,
    *,
    warn: Callable[[str, str], None],
    param_streams: Sequence[int] | None = None,
) -> list[int]:
    """Run ``trace(t)``'s program on the tensors at ``indices`` (CUDA tensors; CPU tensors only
    under Triton's interpreter), one launch per (device, step, dtypes); returns those it cannot take."""
    if not available():
        warn(
            "cuda",
            "longmem: fused=True on CUDA needs Triton (it comes with torch's CUDA wheels; "
            "pip install triton); running the foreach path, with the same results",
        )
        return list(indices)
    if param_streams is not None or any(isinstance(row, LeanBuffers) for row in state):
        return run_lean_step(trace, params, grads, state, steps, indices, maximize, param_streams)
    rejected: list[int] = []
    groups: dict[tuple, list[int]] = {}
    for i in indices:
        p, g = params[i], grads[i]
        if _fits(p, g, [s[i] for s in state]):
            key = (p.device, steps[i], _VIEWS[p.dtype][0], _VIEWS[g.dtype][0])
            groups.setdefault(key, []).append(i)
        else:
            rejected.append(i)
    programs: dict[float, Program] = {}
    for (device, t, p_dtype, g_dtype), members in groups.items():
        if t not in programs:
            programs[t] = trace(t)
        rows = [[x[i] for i in members] for x in (params, grads, *state)]
        launch(programs[t], rows, device, p_dtype, g_dtype, maximize)
    return rejected


def run_all(
    rule: Callable[..., None],
    params: Sequence[Tensor],
    grads: Sequence[Tensor],
    buffers: Mapping[str, Sequence[Tensor] | None],
    steps: Sequence[float],
    *,
    maximize: bool,
    param_streams: Sequence[int] | None = None,
) -> list[int]:
    """``longmem.kernels.run_fused`` with every tensor sent to the Triton kernel, CPU tensors included:
    put in its place under Triton's interpreter (``TRITON_INTERPRET=1``), it runs the CUDA kernel's
    code on CPU (tests/test_fused.py, benchmarks/gpu_acceptance.py). Returns what it left."""
    from . import prepare  # (the package imports this module lazily)

    traced, state = prepare(rule, buffers)

    def warn(kind: str, message: str) -> None:
        warnings.warn(message, RuntimeWarning, stacklevel=3)

    indices = range(len(params))
    return run_step(
        traced, params, grads, state, steps, indices, maximize, warn=warn, param_streams=param_streams
    )


def launch(
    program: Program,
    rows: Sequence[Sequence[Tensor]],
    device: torch.device,
    p_dtype: torch.dtype,
    g_dtype: torch.dtype,
    maximize: bool,
) -> None:
    """One launch of ``program``'s kernel over the tensors in ``rows`` (parameters, gradients, then
    each state buffer), all on ``device``, the parameters ``p_dtype`` and the gradients ``g_dtype``."""
    kernel = _kernel(program, p_dtype, g_dtype)
    params = rows[0]
    numels = tuple(p.numel() * _VIEWS[p.dtype][1] for p in params)
    numel, block_tensor, block_start = _block_tables(numels, device)
    if not len(block_tensor):  # only empty tensors: nothing to do (and a CUDA grid cannot be empty)
        return
    addresses = [x.data_ptr() for row in rows for x in row]
    ptrs = _pointer_table(addresses, device)
    # (a CPU device only under Triton's interpreter, TRITON_INTERPRET=1, which the tests use)
    with torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext():
        kernel[(len(block_tensor),)](
            ptrs,
            numel,
            block_tensor,
            block_start,
            len(params),
            *program.scalars,
            MAXIMIZE=bool(maximize),
            ALIGNED=all(address % ALIGNMENT == 0 for address in addresses),
            BLOCK=BLOCK,
            **COMPILE_OPTIONS,
        )
    # written through raw pointers: tell autograd, as an in-place torch operation would
    bump_versions(params)


def compile_ahead(
    program: Program,
    p_dtype: torch.dtype = torch.float32,
    g_dtype: torch.dtype | None = None,
    *,
    maximize: bool = False,
    aligned: bool = True,
    capability: int = 90,
    forms: tuple[str, ...] | None = None,
    stochastic: bool = False,
) -> dict[str, Any]:
    """Compile ``program``'s kernel with Triton's own compiler for CUDA compute capability
    ``capability`` (90: H100/H200), as a launch would, and return its code by stage (``"ttir"``,
    ``"ptx"``, ``"cubin"``, ...). Needs no GPU (Triton ships ``ptxas``): it checks what the
    interpreter cannot (the real lowering, the instructions chosen). ``forms``/``stochastic``: the lean
    kernel (:func:`lean_source`)."""
    import inspect

    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from triton.compiler import compile as triton_compile
    from triton.runtime.jit import JITFunction

    p_view = _VIEWS[p_dtype][0]
    g_view = _VIEWS[p_dtype if g_dtype is None else g_dtype][0]
    lean = forms is not None or stochastic
    if lean:
        forms = tuple(forms or ("f32",) * len(program.buffers))
    kernel = _kernel(program, p_view, g_view, forms, stochastic)
    if not isinstance(kernel, JITFunction):  # under TRITON_INTERPRET=1: the function it interprets
        kernel = JITFunction(kernel.fn)
    types = {
        "PTRS": "*i64",
        "NUMEL": "*i64",
        "BLOCK_TENSOR": "*i32",
        "BLOCK_START": "*i64",
        "n_tensors": "i32",
        "K": "*i64",
    }
    constants: dict[str, Any] = {"MAXIMIZE": bool(maximize), "BLOCK": LEAN_BLOCK if lean else BLOCK}
    if not lean:
        constants["ALIGNED"] = bool(aligned)
    names = list(kernel.arg_names)
    if "constexprs" in inspect.signature(ASTSource).parameters:  # Triton >= 3.3: arguments by name
        signature = {name: "constexpr" if name in constants else types.get(name, "fp32") for name in names}
        source = ASTSource(fn=kernel, signature=signature, constexprs=constants)
    else:  # older: by position, constants apart
        signature = {i: types.get(name, "fp32") for i, name in enumerate(names) if name not in constants}
        by_index = {names.index(name): value for name, value in constants.items()}
        source = ASTSource(fn=kernel, signature=signature, constants=by_index)
    compiled = triton_compile(source, target=GPUTarget("cuda", capability, 32), options=dict(COMPILE_OPTIONS))
    return dict(compiled.asm)


# ---- lean state and stochastic parameter rounding ------------------------------------------------


def _lean_form(buf: object, device: int, numel: int) -> str | None:
    if isinstance(buf, LeanBuffer):
        ok = buf.codes.get_device() == device and buf.codes.is_contiguous() and buf.codes.numel() == numel
        return buf.form if ok else None
    if isinstance(buf, Tensor) and buf.dtype == torch.float32 and buf.get_device() == device:
        return "f32" if buf.is_contiguous() and buf.numel() == numel else None
    return None


def takes_lean(p: Tensor, g: Tensor, stored: Sequence[Tensor]) -> bool:
    """Whether the lean Triton kernels can step ``p`` with its state buffers as ``stored``."""
    if p.dtype not in _TRITON_DTYPES or g.dtype not in _TRITON_DTYPES:
        return False
    device = p.get_device()
    return (
        p.is_contiguous()
        and g.is_contiguous()
        and g.get_device() == device
        and g.numel() == p.numel()
        and all(b.get_device() == device and b.is_contiguous() and b.numel() == p.numel() for b in stored)
    )


def run_lean_step(
    trace: Callable[[float], Program],
    params: Sequence[Tensor],
    grads: Sequence[Tensor],
    state: Sequence[Sequence[Any]],
    steps: Sequence[float],
    indices: Sequence[int],
    maximize: bool,
    param_streams: Sequence[int] | None,
) -> list[int]:
    """:func:`run_step` for lean state (``LeanBuffer`` entries) and stochastically rounded
    parameters: one launch per (device, step, dtypes, forms); returns the indices it cannot take."""
    rejected: list[int] = []
    groups: dict[tuple, list[int]] = {}
    for i in indices:
        p, g = params[i], grads[i]
        forms = tuple(_lean_form(row[i], p.get_device(), p.numel()) for row in state)
        if None in forms or not takes_lean(p, g, ()):
            rejected.append(i)
            continue
        groups.setdefault((p.device, steps[i], p.dtype, g.dtype, forms), []).append(i)
    programs: dict[float, Program] = {}
    stochastic = param_streams is not None
    for (device, t, p_dtype, g_dtype, forms), members in groups.items():
        if t not in programs:
            programs[t] = trace(t)
        prog = programs[t]
        rows = [[params[i] for i in members], [grads[i] for i in members]]
        buffers = [[row[i] for i in members] for row in state]
        rows += [[b.codes if isinstance(b, LeanBuffer) else b for b in row] for row in buffers]
        scales = [[b.scales if isinstance(b, LeanBuffer) else None for b in row] for row in buffers]
        keys = []
        for i in members:
            lean = [row[i] for row in state if isinstance(row[i], LeanBuffer)]
            position = param_streams[i] if stochastic else (lean[0].position if lean else 0)
            streams = [row[i].stream if isinstance(row[i], LeanBuffer) else k for k, row in enumerate(state)]
            for stream in [*streams, PARAM_STREAM]:
                key = noise_key(t, position, stream)
                keys += [key & 0xFFFFFFFF, key >> 32]
        launch_lean(prog, rows, scales, keys, device, p_dtype, g_dtype, maximize, forms, stochastic)
    return rejected


def launch_lean(
    program: Program,
    rows: Sequence[Sequence[Tensor]],
    scales: Sequence[Sequence[Tensor | None]],
    keys: Sequence[int],
    device: torch.device,
    p_dtype: torch.dtype,
    g_dtype: torch.dtype,
    maximize: bool,
    forms: tuple[str, ...],
    stochastic: bool,
) -> None:
    """One launch of the lean kernel over the tensors in ``rows`` (parameters, gradients, each
    buffer's tensors or codes), with each buffer's ``scales`` and the noise ``keys`` (per tensor and
    stream, the two halves)."""
    kernel = _kernel(program, p_dtype, g_dtype, forms, stochastic)
    params = rows[0]
    numels = tuple(p.numel() for p in params)
    numel, block_tensor, block_start = _block_tables(numels, device, LEAN_BLOCK)
    if not len(block_tensor):  # only empty tensors: nothing to do (and a CUDA grid cannot be empty)
        return
    pointers = [x.data_ptr() for row in rows for x in row]
    pointers += [0 if x is None else x.data_ptr() for row in scales for x in row]
    ptrs = _pointer_table(pointers, device)
    # the keys change every step: copied from pinned memory without blocking, as a new pointer table
    key_table = torch.tensor(keys, dtype=torch.int64, pin_memory=device.type == "cuda").to(
        device, non_blocking=True
    )
    with torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext():
        kernel[(len(block_tensor),)](
            ptrs,
            numel,
            block_tensor,
            block_start,
            len(params),
            key_table,
            *program.scalars,
            MAXIMIZE=bool(maximize),
            BLOCK=LEAN_BLOCK,
            **COMPILE_OPTIONS,
        )
    bump_versions(params)
