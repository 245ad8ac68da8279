"""Counter-based rounding noise and the stochastic roundings that use it, in torch.

Every stochastic rounding in longmem (lean optimizer state, ``state_precision``; bf16/fp16 parameters
with ``param_rounding="stochastic"``) draws its noise from one fixed integer function, so that the
per-tensor, foreach and fused paths (C on CPU, Triton on CUDA) give the same bits and a resumed run
is bit-identical to one that never stopped, with nothing but the step count saved:

* a 64-bit **key** per (parameter, stream, step): ``noise_key`` chains splitmix64 over the library's
  fixed ``SEED``, the step, the parameter's position in its optimizer (across all groups) and the
  stream (a state buffer's index in the optimizer's ``_buffers``, or ``PARAM_STREAM`` for the
  parameter itself);
* a 32-bit **noise** value per element: a Weyl sequence over the element's flat index in its tensor,
  ``index * WEYL + key`` mod 2^32 (the key's high half first folded with the index's high half by
  a multiply-xorshift mixer, ``_mix``; ``noise``). Keys of different steps, buffers and parameters
  are independent, so each element's noise is uniform and independent from step to step and
  from buffer to buffer, which is what unbiased rounding needs; within a step the noise of
  neighbouring elements is spread evenly (the golden-ratio lattice). A kernel loop carries it
  with one add per element (a hash round per element cost more than the rest of a bf16 step).

The C kernels (``longmem_ops.h``: ``lm_hash``) and the Triton kernels compute the same function with
uint32 arithmetic; torch has no unsigned 32-bit arithmetic on every device, so here the values live in
int64 tensors: the mixer's constants are below 2^31, so no product of a 32-bit value overflows.

Which bits are used: the top 16 for bf16 (added below the bits bf16 keeps), the top 24 for the 8-bit
codes' rounding threshold, the top 13 for fp16 normals and the top 24 for fp16 subnormals.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

if TYPE_CHECKING:
    from collections.abc import Sequence

    from ._base import LongMemOptimizer

__all__ = ["MODES", "PARAM_STREAM", "check_mode", "noise", "noise_key", "round_bf16", "round_f16"]

#: ``param_rounding`` values; "nearest" is what torch's ``.to()`` and ``copy_`` do
MODES = ("nearest", "stochastic")
DEFAULT = "nearest"
#: the noise stream of a parameter's own rounding (state buffers use their index in ``_buffers``)
PARAM_STREAM = 0xFFFF
#: the fixed seed every key starts from ("longmem" in ASCII)
SEED = 0x6C6F6E676D656D
_MASK64 = (1 << 64) - 1
_MASK32 = (1 << 32) - 1
#: the mixer: x ^= x >> 16; x *= C1; x ^= x >> 15; x *= C2; x ^= x >> 15 (mod 2^32). Both constants are
#: odd (each step is a bijection) and below 2^31 (see the module docstring)
MIX_C1 = 0x21F0AAAD
MIX_C2 = 0x735A2D97
#: the Weyl step over element indices: 2^32 (2 - golden ratio), odd and below 2^31
WEYL = 0x61C88647


def check_mode(value: Any) -> None:
    """``param_rounding`` must be one of ``MODES``."""
    if not isinstance(value, str) or value not in MODES:
        allowed = ", ".join(repr(m) for m in MODES)
        raise ValueError(f"param_rounding must be one of {allowed}, got {value!r}")


def _splitmix64(z: int) -> int:
    z = (z + 0x9E3779B97F4A7C15) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return z ^ (z >> 31)


def noise_key(step: float, position: int, stream: int) -> int:
    """The 64-bit key of the noise of parameter ``position`` (its index in the optimizer, counted
    over all groups), ``stream`` (a state buffer's index in ``_buffers``, or ``PARAM_STREAM``) at
    step ``step`` (the 1-based step the update runs at)."""
    z = _splitmix64(SEED ^ int(step))
    return _splitmix64(_splitmix64(z ^ position) ^ stream)


def _mix(x: int) -> int:
    """One round of the mixer on a 32-bit value."""
    x ^= x >> 16
    x = (x * MIX_C1) & _MASK32
    x ^= x >> 15
    x = (x * MIX_C2) & _MASK32
    return x ^ (x >> 15)


#: (n, device) -> (arange(n) * WEYL) mod 2^32: the noise of a run of n elements up to its offset
_WEYL_RUNS: dict[tuple[int, torch.device], Tensor] = {}


def _weyl_run(n: int, device: torch.device) -> Tensor:
    run = _WEYL_RUNS.get((n, device))
    if run is None:
        run = torch.arange(n, dtype=torch.int64, device=device).mul_(WEYL).bitwise_and_(_MASK32)
        if len(_WEYL_RUNS) > 16:
            _WEYL_RUNS.clear()
        _WEYL_RUNS[(n, device)] = run
    return run


def noise(key: int, start: int, n: int, device: torch.device | str = "cpu") -> Tensor:
    """The 32-bit noise of elements ``start .. start + n - 1`` under ``key`` (int64, in [0, 2^32)):
    ``index_lo * WEYL + block_key`` (mod 2^32), the block key ``key_lo ^ mix(index_hi ^ key_hi)``,
    constant over each aligned run of 2^32 elements (``lm_noise``, ``lm_block_key``)."""
    device = torch.device(device)
    pieces = []
    while n > 0:  # one piece per run of 2^32 elements: one block key each
        take = min(n, (1 << 32) - (start & _MASK32))
        block_key = (key & _MASK32) ^ _mix((start >> 32) ^ (key >> 32))
        offset = ((start & _MASK32) * WEYL + block_key) & _MASK32
        pieces.append(_weyl_run(take, device).add(offset).bitwise_and_(_MASK32))
        start, n = start + take, n - take
    return pieces[0] if len(pieces) == 1 else torch.cat(pieces)


def _bits(x: Tensor) -> Tensor:
    """The float32 bit patterns of ``x`` as int64 values in [0, 2^32)."""
    return x.contiguous().view(torch.int32).to(torch.int64) & _MASK32


def _as_int16(bits16: Tensor) -> Tensor:
    """int64 values in [0, 2^16) as the int16 tensor with those bits (in place)."""
    return bits16.bitwise_xor_(1 << 15).sub_(1 << 15).to(torch.int16)


def round_bf16(x: Tensor, key: int, start: int = 0) -> Tensor:
    """float32 ``x`` as bfloat16, rounded stochastically with the noise of ``key`` for elements
    ``start ...`` (``x`` flattened): unbiased, off by less than one bf16 ulp.

    bfloat16 is float32 without its low 16 bits: a 16-bit noise value is added to the bit pattern
    (mod 2^32), carrying into bit 16 with probability (low bits) / 2^16, and the low bits are
    dropped (``lm_f32_to_bf16_sr``). Infinities stay infinite (a carry past the largest finite
    value gives one, as it should), the usual NaNs (quiet, a payload in the top bits) stay NaN.
    """
    bits = _bits(x).view(-1)
    rounded = bits.add_(noise(key, start, bits.numel(), x.device) >> 16).bitwise_right_shift_(16)
    return _as_int16(rounded.bitwise_and_(0xFFFF)).view(torch.bfloat16).view(x.shape)


#: float32 bit patterns: |x| >= 2^-14 (fp16's smallest normal), |x| >= 2^16 (fp16 overflow)
_F16_NORMAL = 113 << 23
_F16_OVERFLOW = 143 << 23


def round_f16(x: Tensor, key: int, start: int = 0) -> Tensor:
    """float32 ``x`` as float16, rounded stochastically (as ``lm_f32_to_f16_sr``).

    Normal results: 13 noise bits added below the 10 mantissa bits fp16 keeps, then truncated (a
    carry past 65504 gives inf). Subnormal results (|x| < 2^-14, multiples of 2^-24): |x| * 2^24 is
    split into its integer part and fraction, rounded up with probability (fraction), resolved to
    2^-24. NaN stays NaN (0x7e00 with x's sign), infinities stay infinite.
    """
    h = noise(key, start, x.numel(), x.device)
    u = _bits(x).view(-1)
    sign = (u >> 16) & 0x8000
    a = u & 0x7FFFFFFF
    truncated = (a + (h >> 19)) & ~0x1FFF
    normal = torch.where(truncated >= _F16_OVERFLOW, 0x7C00, (truncated - (112 << 23)) >> 13)
    subnormal_range = a < _F16_NORMAL
    scaled = torch.where(subnormal_range, x.reshape(-1).abs() * 2.0**24, 0.0)  # exact: a power of two
    whole = scaled.to(torch.int32)
    threshold = (scaled - whole).mul_(2.0**24).to(torch.int64)
    subnormal = whole.to(torch.int64) + ((h >> 8) < threshold)
    mag = torch.where(subnormal_range, subnormal, normal)
    mag = torch.where(a > 0x7F800000, 0x7E00, mag)
    return _as_int16(mag | sign).view(torch.float16).view(x.shape)


def round_to(x: Tensor, dtype: torch.dtype, key: int, start: int = 0) -> Tensor:
    """float32 ``x`` in ``dtype`` (bfloat16, float16), stochastically rounded; other dtypes: ``x``
    converted as torch does (float32 and wider lose nothing to round)."""
    if dtype == torch.bfloat16:
        return round_bf16(x, key, start)
    if dtype == torch.float16:
        return round_f16(x, key, start)
    return x.to(dtype)


#: parameter dtypes that ``param_rounding`` applies to (wider ones lose nothing to round)
ROUNDED_DTYPES = (torch.bfloat16, torch.float16)


def write_back(p: Tensor, work: Tensor, key: int, start: int = 0) -> None:
    """``p.copy_(work)`` with stochastic rounding: ``work`` is the float32 result of the step for
    ``p`` (bf16 or fp16: elements ``start ...`` of its flat view)."""
    p.copy_(round_to(work, p.dtype, key, start).view(p.shape))


def positions(opt: LongMemOptimizer, group: dict[str, Any]) -> dict[int, int]:
    """``id(param) -> position`` for the parameters of ``group``: their index in the optimizer,
    counted over all groups in order (the noise stream of each parameter)."""
    first = 0
    for g in opt.param_groups:
        if g is group:
            break
        first += len(g["params"])
    return {id(p): first + i for i, p in enumerate(group["params"])}


def streams_for(opt: LongMemOptimizer, group: dict[str, Any], params: Sequence[Tensor]) -> list[int] | None:
    """The rounding streams of ``params`` (parameters of ``group``) when the group rounds them
    stochastically, else None."""
    if group.get("param_rounding", DEFAULT) != "stochastic":
        return None
    where = positions(opt, group)
    return [where[id(p)] for p in params]
