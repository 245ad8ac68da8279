"""Lean optimizer state: ``state_precision="bf16"`` or ``"8bit"`` on every longmem optimizer.

The state is *stored* compressed and *computed* in float32. Every encoding rounds **stochastically**:
up with probability (distance to the lower grid point) / (grid spacing), so the stored value is
unbiased. Round-to-nearest is not an option: with beta 0.9999 an EMA's increment
``(1 - beta) * (g - m)`` is far below one grid step, so it would be rounded away every step and the
slow EMA would stop moving (docs/algorithms.md).

Modes (``MODES``):

* ``"fp32"``: the default; state in float32 (the parameter's dtype for float64/complex), exactly as
  before this option existed. Groups in this mode never run this module's code.
* ``"bf16"``: each state buffer in bfloat16 (2 bytes per element), stochastically rounded from the
  float32 result (``round_bf16``).
* ``"8bit"``: each state buffer of a tensor with at least ``MIN_8BIT_NUMEL`` elements as one byte per
  element plus one float32 scale per ``BLOCK_SIZE`` elements (``quantize``): the block's absolute
  maximum ``absmax``, and a code ``c`` meaning ``absmax * g(c)``, ``g(c) = (c / L) ** P``. Signed
  buffers (first moments, the previous gradient) use int8 codes with ``L = 127, P = 3``; non-negative
  ones (second moments ``exp_avg_sq``, AdaMod's step-size average ``exp_avg_lr``) use uint8 codes with
  ``L = 255, P = 4``, i.e. ``sqrt(nu)`` on a quadratic grid. The power grids resolve entries far below
  their block's maximum (down to about 5e-7 of it for P = 3, 2e-10 for P = 4) where a linear grid
  would round them to zero. A positive second moment is never rounded to zero: below the smallest
  grid point it rounds up to it (a bias towards *smaller* steps, never a division by ``eps``).
  Smaller tensors (biases, norms) stay float32.

Only float32, bfloat16 and float16 parameters (plain tensors) get lean state; float64, complex and
DTensor parameters keep full-precision state in every mode.

Where the step runs:

* **Fused groups** (``fused=True``) whose state is already in the group's form run in the fused
  kernels (``_step_in_kernels``): the C kernels on CPU, the Triton ones on CUDA read the stored
  codes, decode, run the rule in float32 and encode with stochastic rounding in the same single
  pass, updating the codes in place; no float32 copy of the state exists. 8-bit state needs the
  absmax of a block's *new* values before any of them can be encoded; the kernels use a
  block-local scheme: each thread (CPU) or program instance (Triton) takes whole 256-element
  blocks; the loop over a block decodes it with its old scale, runs the rule, stores the
  parameter and keeps the block's new values (1 KiB per buffer, in L1 or registers) with their
  absmax (an integer max over the float bits), and a second loop over the same block encodes them
  with the new absmax. Every element still crosses the memory bus once per step.
* **Everything else** (the per-tensor and foreach paths, a step that changes the mode, tensors the
  kernels cannot take, no C compiler) decodes the state to float32 work tensors, runs the
  unchanged rule and encodes the result, a chunk of parameters (or a piece of one large tensor)
  at a time, so its float32 work memory is bounded.

Both compute the same codec operation for operation (``longmem_ops.h``: ``lm_enc_s8``, ``lm_enc_u8``,
``lm_f32_to_bf16_sr``): from the same float32 values every path stores the same bits. The 8-bit
encoder finds the cell ``g(k) <= y < g(k + 1)`` of ``y = |x| / absmax`` by comparison with the grid
itself (a root only proposes ``k`` or one below), and rounds up when 24 noise bits, as a fraction of
the cell, fall below ``y - g(k)``.

Rounding noise is counter-based (``longmem._rounding``): a fixed integer function of (seed, the
parameter's position in the optimizer, the buffer, the step, the element's index), computed alike
by torch, C and Triton. The step count is in every state dict, so a resumed run draws the same noise
and is bit-identical to one that never stopped; nothing else needs saving.

State dicts: ``param_groups`` record each group's ``state_precision``; 8-bit buffers are saved as
their codes (int8/uint8, the parameter's shape) under the buffer's name plus ``<name>_absmax``
(float32, one per block); bf16 buffers as bfloat16 tensors. Loading restores them exactly, in the
saved mode (as for every hyperparameter, the state dict's value replaces the optimizer's). To change
mode, set ``group["state_precision"]``: the next step converts the stored state: to ``"fp32"``
exactly, to a lean mode with stochastic rounding. A state dict saved before this option existed
keeps the loading optimizer's mode, its float32 state converted on the next step.

Checkpoints from before the counter-based noise (when the noise came from torch generators seeded
per parameter, buffer and step, and the kernels ran on decoded float32 copies) have the same format:
they load and continue. What differs for a run resumed from one: its rounding noise is not the one
the older code would have drawn, so it does not continue with the bits the older code would have
produced (it is as valid a continuation, and bit-identical from then on across further resumes); a
code now decodes as ``g(c) * absmax`` with ``g`` evaluated by products of ``c * float32(1 / L)``
(``_grid``) instead of ``(c / L) ** P`` with torch's division and pow, which can differ in the last
bit; and a block holding NaN or Inf now gets well-defined codes (its scale still decodes it to
non-finite values).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from . import _rounding

if TYPE_CHECKING:
    from ._base import LongMemOptimizer

__all__ = [
    "BLOCK_SIZE",
    "MIN_8BIT_NUMEL",
    "MODES",
    "check_mode",
    "dequantize",
    "quantize",
    "round_bf16",
    "state_bytes",
]

MODES = ("fp32", "bf16", "8bit")
DEFAULT = "fp32"
#: elements per 8-bit block (one float32 absmax each: 4 / 256 = 0.016 bytes per element)
BLOCK_SIZE = 256
#: tensors with fewer elements keep float32 state in "8bit" mode (as bitsandbytes' min_8bit_size)
MIN_8BIT_NUMEL = 4096
#: key of an 8-bit buffer's per-block scales: ``<buffer name> + SCALE_SUFFIX``
SCALE_SUFFIX = "_absmax"
#: buffers that are never negative: unsigned codes on a finer grid near zero
UNSIGNED_BUFFERS = frozenset({"exp_avg_sq", "exp_avg_lr"})
#: (levels L, power P): code c means absmax * (c / L) ** P
SIGNED_GRID = (127, 3)
UNSIGNED_GRID = (255, 4)
#: parameters are decoded, updated and encoded in chunks of about this many elements, which bounds
#: the float32 work memory of a step (a larger tensor is stepped in flat pieces of this size)
CHUNK_ELEMENTS = 1 << 22
#: on CPU a buffer is decoded and encoded in pieces of this many elements (a multiple of BLOCK_SIZE),
#: so that the codec's many elementwise passes run in cache; the rounding noise is drawn in the same
#: order either way (one draw per element, in sequence), so the result does not depend on it
CODEC_PIECE = 1 << 16

_LEAN_PARAM_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_CODE_DTYPES = (torch.int8, torch.uint8)
_NOISE_BITS = 24


def check_mode(value: Any) -> None:
    """``state_precision`` must be one of ``MODES``."""
    if not isinstance(value, str) or value not in MODES:
        allowed = ", ".join(repr(m) for m in MODES)
        raise ValueError(f"state_precision must be one of {allowed}, got {value!r}")


# ---- codecs ----------------------------------------------------------------------------------

#: float32(1 / L) of each grid: a code c is first turned into t = c * (1 / L), as the kernels do
_INV_LEVELS = {True: struct.unpack("f", struct.pack("f", 1 / SIGNED_GRID[0]))[0],
               False: struct.unpack("f", struct.pack("f", 1 / UNSIGNED_GRID[0]))[0]}  # fmt: skip


def round_bf16(x: Tensor, key: int, start: int = 0) -> Tensor:
    """float32 ``x`` as bfloat16, stochastically rounded with the noise of ``key`` (``_rounding``)."""
    return _rounding.round_bf16(x, key, start)


def num_blocks(numel: int) -> int:
    """Number of ``BLOCK_SIZE`` blocks (the last one may be partial) of a tensor of ``numel`` elements."""
    return -(-numel // BLOCK_SIZE)


def _blocks(flat: Tensor) -> Tensor:
    n = flat.numel()
    padded = num_blocks(n) * BLOCK_SIZE
    if padded != n:
        flat = torch.nn.functional.pad(flat, (0, padded - n))
    return flat.view(-1, BLOCK_SIZE)


def _grid(k: Tensor, signed: bool) -> Tensor:
    """The grid points g(k) = (k / L) ** P of integer codes ``k``, evaluated exactly as the kernels
    evaluate them (``lm_grid_s8``, ``lm_grid_u8``): t = k * float32(1 / L), then (t * t) * t for
    P = 3, (t * t) * (t * t) for P = 4."""
    t = k.float().mul_(_INV_LEVELS[signed])
    square = t * t
    return square.mul_(t) if signed else square.mul_(square)


def quantize(x: Tensor, signed: bool, key: int, start: int = 0) -> tuple[Tensor, Tensor]:
    """float32 ``x`` as 8-bit codes (int8 if ``signed`` else uint8, ``x``'s shape) and per-block
    scales (float32, ``num_blocks(x.numel())``), rounded stochastically between grid points with the
    noise of ``key`` for elements ``start ...`` (a multiple of ``BLOCK_SIZE``).

    The grid of a block is ``absmax * g(c)``, ``g(c) = (c / L) ** P`` (``SIGNED_GRID``,
    ``UNSIGNED_GRID``, evaluated as ``_grid``). With ``y = |x| / absmax`` in the cell
    ``g(k) <= y < g(k + 1)``, the code is ``k + 1`` with probability ``(y - g(k)) / (g(k + 1) - g(k))``
    (resolved to 2^-24), so the decoded value is unbiased and off by less than one grid spacing.
    Unsigned: a positive value below the first grid point rounds up to it (never to zero); ``x``
    must be >= 0. Operation for operation what the fused kernels do (``lm_enc_s8``, ``lm_enc_u8`` in
    longmem_ops.h), so every path gives the same codes. A block holding NaN gets a NaN scale (it
    decodes to NaN); one holding an infinity an infinite one.
    """
    levels, _ = SIGNED_GRID if signed else UNSIGNED_GRID
    blocks = _blocks(x.reshape(-1).float())
    bits = blocks.view(torch.int32)
    # the block's absmax as an integer max over |x|'s bits (the float max, NaN above inf)
    absmax = (bits & 0x7FFFFFFF).amax(dim=1).view(torch.float32)
    inv = torch.where(absmax > 0, absmax.reciprocal(), 0.0)
    # y = |x| / absmax, at most 1; NaN (of either sign) becomes 1 (lm_unit: an unsigned min on the bits)
    y = blocks.abs().mul_(inv[:, None]).nan_to_num_(nan=1.0).clamp_(max=1.0)
    positive = None if signed else y > 0
    # a proposal for the cell, its k or one below, then the cell by comparison with the grid itself
    root = y.pow(1.0 / 3.0) if signed else y.sqrt().sqrt_()
    k0 = root.mul_(levels).sub_(0.5).to(torch.int32).clamp_(0, levels - 1)
    k = k0.add_((y >= _grid(k0 + 1, signed)).logical_and_(k0 < levels - 1))
    lo = _grid(k, signed)  # the cell [lo, hi): the same values the kernels pick (LM_ENCODE)
    hi = _grid(k + 1, signed)
    # round up when the noise, as a fraction of the cell, falls below y - lo (lm_round_up)
    noise = (_rounding.noise(key, start, y.numel(), x.device) >> (32 - _NOISE_BITS)).to(torch.int32)
    fraction = noise.view(y.shape).to(torch.float32).mul_(2.0**-_NOISE_BITS).mul_(hi.sub_(lo))
    k = k.add_(fraction < y.sub_(lo))
    if signed:  # (k ^ s) - s, s = -1 for a negative x (its sign bit), else 0
        sign = bits >> 31
        k = k.bitwise_xor_(sign).sub_(sign)
    else:  # a positive value rounded to 0: up to the first grid point instead
        k = k.add_((k == 0).logical_and_(positive))
    codes = k.to(torch.int8 if signed else torch.uint8).view(-1)[: x.numel()].view(x.shape)
    return codes, absmax


def dequantize(codes: Tensor, absmax: Tensor, signed: bool) -> Tensor:
    """The float32 values of 8-bit ``codes`` with per-block scales ``absmax``: ``g(c) * absmax``
    (``_grid``; as ``lm_dec_s8``, ``lm_dec_u8``)."""
    flat = codes.reshape(-1)
    y = _grid(_blocks(flat), signed).mul_(absmax[:, None])
    return y.view(-1)[: flat.numel()].view(codes.shape)


def slow_ema_trace(
    mode: str, steps: int, n: int, beta: float = 0.9999, seed: int = 0
) -> tuple[Tensor, Tensor]:
    """An EMA with ``beta`` of ``0.5 + N(0, 1)`` over ``steps`` steps and ``n`` elements, kept in
    ``mode`` (``"bf16"``, ``"8bit"``: stochastic rounding; ``"bf16-nearest"``: round-to-nearest), and
    the same EMA kept exactly in float32: ``(kept, exact)``. The check behind docs/algorithms.md's
    warning that a slow EMA stalls under round-to-nearest (the tests and benchmarks/state_precision.py
    use it)."""
    gen = torch.Generator().manual_seed(seed)
    exact = torch.zeros(n)
    m = torch.zeros(n)
    stored: Any = quantize(m, True, 0) if mode == "8bit" else m.to(torch.bfloat16)
    for t in range(1, steps + 1):
        g = torch.randn(n, generator=gen).add_(0.5)
        exact.lerp_(g, 1 - beta)
        if mode == "bf16-nearest":
            m = m.lerp(g, 1 - beta).to(torch.bfloat16).float()
            continue
        m = dequantize(*stored, True) if mode == "8bit" else stored.float()
        m.lerp_(g, 1 - beta)
        key = _rounding.noise_key(t, 0, 0)
        stored = quantize(m, True, key) if mode == "8bit" else round_bf16(m, key)
    if mode != "bf16-nearest":
        m = dequantize(*stored, True) if mode == "8bit" else stored.float()
    return m, exact


# ---- state forms -----------------------------------------------------------------------------


def is_code(value: Any) -> bool:
    """Whether a saved state value is 8-bit codes."""
    return isinstance(value, Tensor) and value.dtype in _CODE_DTYPES


def holds_lean_state(state: Any) -> bool:
    """Whether an optimizer's ``state`` holds a buffer in a lean form (8-bit codes or bfloat16: in
    ``"fp32"`` mode the state of bf16 parameters is float32). Entries that are no parameter's
    (what hooks or tools store, ``opt.state["key"] = value``) are skipped."""
    return any(
        isinstance(v, Tensor) and v.dtype in (*_CODE_DTYPES, torch.bfloat16) and v.dim() > 0
        for per_param in state.values()
        if isinstance(per_param, dict)
        for v in per_param.values()
    )


def lean_capable(param: Tensor) -> bool:
    """Whether ``param`` can have lean state (float32/bf16/fp16 plain tensors)."""
    return type(param) in (Tensor, torch.nn.Parameter) and param.dtype in _LEAN_PARAM_DTYPES


def form_for(param: Tensor, mode: str) -> str:
    """How ``param``'s state buffers are stored in ``mode``: ``"full"``, ``"bf16"`` or ``"8bit"``."""
    if mode == "fp32" or not lean_capable(param):
        return "full"
    if mode == "8bit" and param.numel() < MIN_8BIT_NUMEL:
        return "full"
    return mode


def scale_keys(buffers: tuple[str, ...]) -> list[str]:
    return [name + SCALE_SUFFIX for name in buffers]


def _zeros(param: Tensor, name: str, form: str) -> tuple[Tensor, Tensor | None]:
    from ._base import state_dtype

    if form == "full":
        return torch.zeros_like(param, dtype=state_dtype(param), memory_format=torch.preserve_format), None
    if form == "bf16":
        return torch.zeros(param.shape, dtype=torch.bfloat16, device=param.device), None
    dtype = torch.uint8 if name in UNSIGNED_BUFFERS else torch.int8
    scale = torch.zeros(num_blocks(param.numel()), dtype=torch.float32, device=param.device)
    return torch.zeros(param.shape, dtype=dtype, device=param.device), scale


def _codec_pieces(flat: Tensor) -> list[tuple[int, Tensor]]:
    """``(start, view)`` pieces of a flat buffer for the codec: ``CODEC_PIECE`` elements on CPU, the
    whole buffer elsewhere."""
    step = CODEC_PIECE if flat.device.type == "cpu" else max(flat.numel(), 1)
    return [(start, flat[start : start + step]) for start in range(0, flat.numel(), step)]


def _decode(state: dict[str, Any], name: str, param: Tensor, span: slice | None = None) -> Tensor:
    """A state buffer (or the flat ``span`` of it) as the float32 (state dtype) tensor the rule works
    on; full-precision buffers are returned themselves (the rule updates them in place)."""
    from ._base import state_dtype

    stored = state[name]
    if span is not None:
        stored = stored.view(-1)[span]
    if stored.dtype in _CODE_DTYPES:
        absmax, signed = state[name + SCALE_SUFFIX], name not in UNSIGNED_BUFFERS
        offset = 0 if span is None else span.start
        work = torch.empty(stored.shape, dtype=torch.float32, device=stored.device)
        out = work.view(-1)
        for start, piece in _codec_pieces(stored.reshape(-1)):
            first = (offset + start) // BLOCK_SIZE
            out[start : start + piece.numel()] = dequantize(
                piece, absmax[first : first + num_blocks(piece.numel())], signed
            )
        return work
    dtype = state_dtype(param)
    return stored if stored.dtype == dtype else stored.to(dtype)


def _new_stored(work: Tensor, name: str, form: str) -> dict[str, Tensor]:
    """Empty storage for a buffer of ``work``'s shape in ``form`` ("bf16" or "8bit")."""
    if form == "bf16":
        return {name: torch.empty(work.shape, dtype=torch.bfloat16, device=work.device)}
    dtype = torch.uint8 if name in UNSIGNED_BUFFERS else torch.int8
    return {
        name: torch.empty(work.shape, dtype=dtype, device=work.device),
        name + SCALE_SUFFIX: torch.empty(num_blocks(work.numel()), dtype=torch.float32, device=work.device),
    }


def _storage_for(stored: dict[str, Any], name: str, p: Tensor, form: str) -> dict[str, Tensor]:
    """Where a buffer's encoding goes when stepped in pieces: its own storage when that is already in
    ``form`` (each piece is decoded before its range is overwritten, and no piece reads another's
    range), else new storage (a mode change)."""
    current = stored[name]
    if form == "bf16" and current.dtype == torch.bfloat16:
        return {name: current}
    code_dtype = torch.uint8 if name in UNSIGNED_BUFFERS else torch.int8
    if form == "8bit" and current.dtype == code_dtype and name + SCALE_SUFFIX in stored:
        return {name: current, name + SCALE_SUFFIX: stored[name + SCALE_SUFFIX]}
    return _new_stored(p, name, form)


def _encode_into(stored: dict[str, Tensor], name: str, work: Tensor, offset: int, key: int) -> None:
    """Encode float32 ``work`` into the flat range ``offset:`` of ``stored`` (``_new_stored`` or
    ``_storage_for``; ``offset`` a multiple of ``BLOCK_SIZE``), with the rounding noise of ``key``
    for those elements."""
    codes = stored[name].view(-1)
    for start, piece in _codec_pieces(work.reshape(-1)):
        at = offset + start
        if codes.dtype == torch.bfloat16:
            codes[at : at + piece.numel()] = round_bf16(piece, key, at)
            continue
        piece_codes, piece_absmax = quantize(piece, name not in UNSIGNED_BUFFERS, key, at)
        codes[at : at + piece.numel()] = piece_codes.view(-1)
        first = at // BLOCK_SIZE
        stored[name + SCALE_SUFFIX][first : first + piece_absmax.numel()] = piece_absmax


def _store(state: dict[str, Any], name: str, stored: dict[str, Tensor]) -> None:
    state.update(stored)
    if name + SCALE_SUFFIX not in stored:
        state.pop(name + SCALE_SUFFIX, None)


def _encode(state: dict[str, Any], name: str, work: Tensor, form: str, key: int) -> None:
    if form == "full":
        state[name] = work
        state.pop(name + SCALE_SUFFIX, None)
        return
    stored = _new_stored(work, name, form)
    _encode_into(stored, name, work, 0, key)
    _store(state, name, stored)


# ---- the step ----------------------------------------------------------------------------------


def _create_state(opt: LongMemOptimizer, group: dict[str, Any], mode: str) -> None:
    """What ``_collect`` would create for a new parameter, with buffers in ``mode``'s form."""
    kept = opt._buffers_for(group)
    for p in group["params"]:
        if p.grad is None or p.grad.is_sparse:
            continue  # _collect raises for sparse gradients
        state = opt.state[p]
        if not state:
            state["step"] = torch.zeros((), dtype=torch.float32)
            for s, factory in opt._scalars.items():
                state[s] = factory()
        form = form_for(p, mode)
        for b in kept:
            if b not in state:
                state[b], scale = _zeros(p, b, form)
                if scale is not None:
                    state[b + SCALE_SUFFIX] = scale


def _chunks(params: list[Tensor], indices: list[int]) -> list[list[int]]:
    chunks: list[list[int]] = [[]]
    size = 0
    for i in indices:
        if size >= CHUNK_ELEMENTS:
            chunks.append([])
            size = 0
        chunks[-1].append(i)
        size += params[i].numel()
    return [chunk for chunk in chunks if chunk]


def _in_pieces(p: Tensor, g: Tensor, stored: dict[str, Any], names: list[str], form: str) -> bool:
    """Whether ``p`` is stepped in pieces of ``CHUNK_ELEMENTS``: a tensor larger than a chunk whose
    state stays lean, all of it contiguous (flat views)."""
    return (
        form != "full"
        and p.numel() > CHUNK_ELEMENTS
        and p.is_contiguous()
        and g.is_contiguous()
        and all(stored[name].is_contiguous() for name in names)
    )


def _step_in_pieces(
    opt: LongMemOptimizer,
    group: dict[str, Any],
    i: int,
    tensors: tuple[Tensor, Tensor, Tensor],
    state: dict[str, Any],
    names: list[tuple[int, str]],
    form: str,
    position: int,
    paths: tuple[bool, bool],
) -> None:
    """One step of the group's parameter ``i`` (``tensors``: it, its gradient, its step counter;
    its state stored in ``form``, its noise keyed by its ``position``), a flat piece of
    ``CHUNK_ELEMENTS`` at a time: each piece's state decoded, updated by the unchanged rule and
    encoded back in place (into new storage on a mode change), so that the float32 work memory is
    one piece, not the whole tensor. The noise of an element depends on its index in the tensor
    alone, so the result is that of one piece. Every piece's update advances a copy of the step
    counter and of the scalar state (functions of the step alone) except the last one's, which
    advances the optimizer's own. A stochastically rounded bf16/fp16 parameter is updated in a
    float32 copy of each piece and rounded here, at the piece's offset."""
    p, g, step = tensors
    stored = opt.state[p]
    t = (step + 1).item()  # the step the rule runs at: the counter's float32 increment
    fresh = {name: _storage_for(stored, name, p, form) for _, name in names}
    keys = {name: _rounding.noise_key(t, position, b) for b, name in names}
    buffer_names = {name for _, name in names}
    stochastic = group.get("param_rounding") == "stochastic" and p.dtype in _rounding.ROUNDED_DTYPES
    nearest = {**group, "param_rounding": "nearest"}  # the pieces are views: rounded below instead
    n = p.numel()
    for start in range(0, n, CHUNK_ELEMENTS):
        span = slice(start, start + CHUNK_ELEMENTS)
        last = start + CHUNK_ELEMENTS >= n
        work: dict[str, Any] = {}
        for key, per_param in state.items():
            if per_param is None:
                work[key] = None
            elif key in buffer_names:
                work[key] = [_decode(stored, key, p, span)]
            else:
                work[key] = [per_param[i] if last else per_param[i].clone()]
        counter = step if last else step.clone()
        piece = p.view(-1)[span]
        target = piece.float() if stochastic else piece
        opt._update_group(nearest, [target], [g.view(-1)[span]], work, [counter], *paths)
        if stochastic:
            _rounding.write_back(
                piece, target, _rounding.noise_key(t, position, _rounding.PARAM_STREAM), start
            )
        for _, name in names:
            _encode_into(fresh[name], name, work[name][0], start, keys[name])
    for _, name in names:
        _store(stored, name, fresh[name])


# ---- in the fused kernels -----------------------------------------------------------------------


@dataclass(frozen=True)
class LeanBuffer:
    """A state buffer as it is stored (bf16, or 8-bit codes and their scales), handed to the fused
    kernels, which decode it, run the rule and encode it back in the same pass (in place)."""

    codes: Tensor  # bfloat16, or int8/uint8 codes: the parameter's shape
    scales: Tensor | None  # 8-bit: the float32 absmax of each block
    stream: int  # the buffer's index in the optimizer's _buffers (its noise stream)
    position: int  # the parameter's position in the optimizer

    @property
    def form(self) -> str:
        """``"bf16"``, ``"s8"`` (int8 codes) or ``"u8"`` (uint8 codes)."""
        return _KERNEL_FORMS[self.codes.dtype]

    def decode(self) -> Tensor:
        """The float32 values (for a path that cannot take the stored form)."""
        if self.scales is None:
            return self.codes.float()
        return dequantize(self.codes, self.scales, self.form == "s8")

    def encode(self, work: Tensor, step: float) -> None:
        """Store float32 ``work`` back into the codes (and scales), as the kernels would."""
        key = _rounding.noise_key(step, self.position, self.stream)
        if self.scales is None:
            self.codes.copy_(round_bf16(work, key))
            return
        codes, scales = quantize(work, self.form == "s8", key)
        self.codes.copy_(codes)
        self.scales.copy_(scales)


_KERNEL_FORMS = {torch.bfloat16: "bf16", torch.int8: "s8", torch.uint8: "u8"}


class LeanBuffers(list):  # type: ignore[type-arg]
    """A list of a state buffer's tensors, some of them ``LeanBuffer``: only the fused kernels take
    it (the kernels tell it from a plain list by its type, without looking at each element)."""


def _in_form(stored: dict[str, Any], name: str, p: Tensor, form: str) -> bool:
    """Whether buffer ``name`` of ``p`` is stored in ``form`` already (no conversion this step)."""
    buf = stored[name]
    if form == "full":
        return buf.dtype == _full_dtype(p)
    if form == "bf16":
        return buf.dtype == torch.bfloat16
    want = torch.uint8 if name in UNSIGNED_BUFFERS else torch.int8
    return buf.dtype == want and name + SCALE_SUFFIX in stored


def _full_dtype(p: Tensor) -> torch.dtype:
    from ._base import state_dtype

    return state_dtype(p)


def _for_kernel(stored: dict[str, Any], name: str, stream: int, position: int) -> Tensor | LeanBuffer:
    buf = stored[name]
    if buf.dtype not in _KERNEL_FORMS:
        return buf
    return LeanBuffer(buf, stored.get(name + SCALE_SUFFIX), stream, position)


def _step_in_kernels(
    opt: LongMemOptimizer,
    group: dict[str, Any],
    chosen: list[int],
    collected: tuple[list[Tensor], list[Tensor], dict[str, Any], list[Tensor]],
    names: list[tuple[int, str]],
    position: dict[int, int],
) -> None:
    """The fused step of the parameters at ``chosen``, their state in the stored forms: the kernels
    decode, update and encode it in one pass, in place, with no float32 copy of it."""
    params, grads, state, steps = collected
    ps = [params[i] for i in chosen]
    work: dict[str, Any] = {k: (None if v is None else [v[i] for i in chosen]) for k, v in state.items()}
    for b, name in names:
        work[name] = LeanBuffers(_for_kernel(opt.state[p], name, b, position[id(p)]) for p in ps)
    opt._update_group(group, ps, [grads[i] for i in chosen], work, [steps[i] for i in chosen], False, True)


def step_group(opt: LongMemOptimizer, group: dict[str, Any]) -> None:
    """One step of ``group`` with its state in the group's ``state_precision``. Fused groups whose
    state is in that form already run in the kernels, codes and all (``_step_in_kernels``); the
    rest (other paths, a mode change, what the kernels cannot take) decode the state to float32
    work tensors, run the update and encode it back, a chunk at a time (any stored form is read:
    this is also how the mode changes)."""
    from . import kernels

    mode = group.get("state_precision", DEFAULT)
    if mode != DEFAULT:
        opt._lean_state = True
    _create_state(opt, group, mode)
    params, grads, state, steps = opt._collect(group)
    if not params:
        return
    fused = bool(group.get("fused"))
    foreach = False if fused else opt._use_foreach(group, params)
    position = _rounding.positions(opt, group)
    names = [(b, name) for b, name in enumerate(opt._buffers) if state.get(name) is not None]
    buffer_names = [name for _, name in names]
    in_kernels = [
        i
        for i, p in enumerate(params)
        if fused
        and all(_in_form(opt.state[p], name, p, form_for(p, mode)) for name in buffer_names)
        and kernels.takes_lean(p, grads[i], [opt.state[p][name] for name in buffer_names])
    ]
    if in_kernels:
        _step_in_kernels(opt, group, in_kernels, (params, grads, state, steps), names, position)
    rest = sorted(set(range(len(params))) - set(in_kernels))
    large = [
        i
        for i in rest
        if _in_pieces(params[i], grads[i], opt.state[params[i]], buffer_names, form_for(params[i], mode))
    ]
    for i in large:
        p = params[i]
        tensors = (p, grads[i], steps[i])
        _step_in_pieces(
            opt, group, i, tensors, state, names, form_for(p, mode), position[id(p)], (foreach, fused)
        )
    for chunk in _chunks(params, sorted(set(rest) - set(large))):
        ps = [params[i] for i in chunk]
        work: dict[str, Any] = {k: (None if v is None else [v[i] for i in chunk]) for k, v in state.items()}
        for _, name in names:
            work[name] = [_decode(opt.state[p], name, p) for p in ps]
        opt._update_group(
            group, ps, [grads[i] for i in chunk], work, [steps[i] for i in chunk], foreach, fused
        )
        for j, p in enumerate(ps):
            form = form_for(p, mode)
            t = steps[chunk[j]].item()
            for b, name in names:
                _encode(opt.state[p], name, work[name][j], form, _rounding.noise_key(t, position[id(p)], b))


# ---- checkpoints -------------------------------------------------------------------------------


def check_saved_state(where: str, param: Tensor, value: dict[str, Any], buffers: tuple[str, ...]) -> set[str]:
    """Check the 8-bit buffers of one parameter's saved state; returns their names (the caller's
    generic checks, written for floating-point buffers, skip them)."""
    codes: set[str] = set()
    for key in buffers:
        buf, scale = value.get(key), value.get(key + SCALE_SUFFIX)
        if is_code(buf):
            want = torch.uint8 if key in UNSIGNED_BUFFERS else torch.int8
            if buf.dtype != want:
                raise ValueError(f"{where}: '{key}' holds {buf.dtype} codes; 8-bit state stores it as {want}")
            if not lean_capable(param):
                raise ValueError(
                    f"{where}: '{key}' is 8-bit state, which a {param.dtype} parameter cannot have"
                )
            if buf.shape != param.shape:
                raise ValueError(
                    f"{where}: '{key}' has shape {tuple(buf.shape)}, the parameter {tuple(param.shape)}"
                )
            blocks = num_blocks(param.numel())
            if not (isinstance(scale, Tensor) and scale.dtype == torch.float32 and scale.shape == (blocks,)):
                got = f"{scale.dtype} {tuple(scale.shape)}" if isinstance(scale, Tensor) else repr(scale)
                raise ValueError(
                    f"{where}: 8-bit '{key}' needs '{key}{SCALE_SUFFIX}', a float32 tensor of shape "
                    f"({blocks},); got {got}"
                )
            if bool((scale < 0).any()):
                raise ValueError(f"{where}: '{key}{SCALE_SUFFIX}' has negative block scales")
            codes.add(key)
        elif scale is not None:
            raise ValueError(
                f"{where}: '{key}{SCALE_SUFFIX}' is there but '{key}' is not 8-bit codes (int8/uint8)"
            )
    return codes


def keep_bf16_state(
    opt: LongMemOptimizer,
    saved_state: dict[Any, Any],
    saved_groups: list[dict[str, Any]],
    id_map: dict[Any, Tensor],
    state: dict[Tensor, dict[str, Any]],
) -> None:
    """After loading: bf16 buffers of groups saved in a lean mode stay bf16 (the generic restore
    made them float32, exactly); 8-bit codes were kept as they are."""
    for saved in saved_groups:
        lean = saved.get("state_precision", DEFAULT) != DEFAULT
        for pid in saved["params"]:
            if pid not in saved_state or pid not in id_map:
                continue
            param, value = id_map[pid], saved_state[pid]
            restored = state[param]
            for name in opt._buffers:
                saved_buf = value.get(name)
                if lean and isinstance(saved_buf, Tensor) and saved_buf.dtype == torch.bfloat16:
                    if lean_capable(param):
                        restored[name] = restored[name].to(torch.bfloat16)


def state_bytes(opt: torch.optim.Optimizer) -> int:
    """Bytes of every tensor in ``opt.state`` (buffers, scales, step counters)."""
    total = 0
    for value in opt.state.values():
        for x in value.values() if isinstance(value, dict) else ():
            if isinstance(x, Tensor):
                total += x.numel() * x.element_size()
    return total
