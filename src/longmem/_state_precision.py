"""Lean optimizer state: ``state_precision="bf16"`` or ``"8bit"`` on every longmem optimizer.

The state is *stored* compressed and *computed* in float32: each step decodes a chunk of parameters'
state (or a piece of one large tensor) to float32 work tensors, runs the optimizer's unchanged
update rule on them (per tensor, foreach or fused, exactly as with ``"fp32"``), and encodes the
result back. Every encoding rounds **stochastically**: rounded up with probability (distance to the
lower grid point) / (grid spacing), so the stored value is unbiased. Round-to-nearest is not an
option: with beta 0.9999 an EMA's increment ``(1 - beta) * (g - m)`` is far below one grid step, so
it would be rounded away every step and the slow EMA would stop moving (docs/algorithms.md).

Modes (``MODES``):

* ``"fp32"``: the default; state in float32 (the parameter's dtype for float64/complex), exactly as
  before this option existed. Groups in this mode never run this module's code.
* ``"bf16"``: each state buffer in bfloat16 (2 bytes per element), stochastically rounded from the
  float32 result (``round_bf16``).
* ``"8bit"``: each state buffer of a tensor with at least ``MIN_8BIT_NUMEL`` elements as one byte per
  element plus one float32 scale per ``BLOCK_SIZE`` elements (``quantize``): the block's absolute
  maximum ``absmax``, and a code ``c`` meaning ``absmax * (c / L) ** P``. Signed buffers (first
  moments, the previous gradient) use int8 codes with ``L = 127, P = 3``; non-negative ones (second
  moments ``exp_avg_sq``, AdaMod's step-size average ``exp_avg_lr``) use uint8 codes with
  ``L = 255, P = 4``, i.e. ``sqrt(nu)`` on a quadratic grid. The power grids resolve entries far below
  their block's maximum (down to about 5e-7 of it for P = 3, 2e-10 for P = 4) where a linear grid
  would round them to zero. A positive second moment is never rounded to zero: below the smallest
  grid point it rounds up to it (a bias towards *smaller* steps, never a division by ``eps``).
  Smaller tensors (biases, norms) stay float32.

Only float32, bfloat16 and float16 parameters (plain tensors) get lean state; float64, complex and
DTensor parameters keep full-precision state in every mode.

Rounding noise is counter-based: the generator of each (parameter, buffer, step) is seeded from the
parameter's position in the optimizer, the buffer and the step count (``rounding_seed``). The step
count is in every state dict, so a resumed run draws the same noise and is bit-identical to one that
never stopped; nothing else needs saving.

State dicts: ``param_groups`` record each group's ``state_precision``; 8-bit buffers are saved as
their codes (int8/uint8, the parameter's shape) under the buffer's name plus ``<name>_absmax``
(float32, one per block); bf16 buffers as bfloat16 tensors. Loading restores them exactly, in the
saved mode (as for every hyperparameter, the state dict's value replaces the optimizer's). To change
mode, set ``group["state_precision"]``: the next step converts the stored state: to ``"fp32"``
exactly, to a lean mode with stochastic rounding. A state dict saved before this option existed
keeps the loading optimizer's mode, its float32 state converted on the next step.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

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
    "rounding_seed",
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
_MASK64 = (1 << 64) - 1


def check_mode(value: Any) -> None:
    """``state_precision`` must be one of ``MODES``."""
    if not isinstance(value, str) or value not in MODES:
        allowed = ", ".join(repr(m) for m in MODES)
        raise ValueError(f"state_precision must be one of {allowed}, got {value!r}")


# ---- rounding noise --------------------------------------------------------------------------


def _splitmix64(z: int) -> int:
    z = (z + 0x9E3779B97F4A7C15) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return z ^ (z >> 31)


def rounding_seed(step: float, index: int, buffer: int) -> int:
    """The seed of the rounding noise for parameter ``index`` (its position in the optimizer),
    state buffer ``buffer`` (position in the optimizer's ``_buffers``) at step ``step``."""
    return _splitmix64(_splitmix64(_splitmix64(int(step)) ^ index) ^ buffer)


def _generator(seed: int, device: torch.device) -> torch.Generator:
    return torch.Generator(device=device).manual_seed(seed)


# ---- codecs ----------------------------------------------------------------------------------


def round_bf16(x: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """float32 ``x`` as bfloat16, rounded stochastically (unbiased; error below one bf16 ulp).

    bfloat16 is float32 without its low 16 bits: a uniform 16-bit integer is added to the bit
    pattern, carrying into bit 16 with probability (low bits) / 2^16, and the low bits are dropped.
    Infinities stay infinite and the usual NaNs stay NaN.
    """
    x = x.contiguous()
    noise = torch.randint(0, 1 << 16, x.shape, dtype=torch.int32, device=x.device, generator=generator)
    noise.add_(x.view(torch.int32)).bitwise_and_(-65536)
    return noise.view(torch.float32).to(torch.bfloat16)


def num_blocks(numel: int) -> int:
    """Number of ``BLOCK_SIZE`` blocks (the last one may be partial) of a tensor of ``numel`` elements."""
    return -(-numel // BLOCK_SIZE)


def _blocks(flat: Tensor) -> Tensor:
    n = flat.numel()
    padded = num_blocks(n) * BLOCK_SIZE
    if padded != n:
        flat = torch.nn.functional.pad(flat, (0, padded - n))
    return flat.view(-1, BLOCK_SIZE)


def quantize(x: Tensor, signed: bool, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
    """float32 ``x`` as 8-bit codes (int8 if ``signed`` else uint8, ``x``'s shape) and per-block
    scales (float32, ``num_blocks(x.numel())``), rounded stochastically between grid points.

    The grid of a block is ``absmax * (c / L) ** P`` (``SIGNED_GRID``, ``UNSIGNED_GRID``); a value
    between grid points ``lo < x < hi`` becomes ``hi`` with probability ``(x - lo) / (hi - lo)``, so
    the decoded value is unbiased and off by less than one grid spacing. Unsigned: a positive value
    below the first grid point rounds up to it (never to zero); ``x`` must be >= 0.
    """
    levels, power = SIGNED_GRID if signed else UNSIGNED_GRID
    blocks = _blocks(x.reshape(-1).float())
    magnitude = blocks.abs()
    absmax = magnitude.amax(dim=1)
    inv = torch.where(absmax > 0, absmax.reciprocal(), torch.zeros_like(absmax))
    y = magnitude.mul_(inv[:, None])  # |x| / absmax, in [0, 1]
    u = y.pow(1.0 / power) if power != 4 else y.sqrt().sqrt_()
    # the grid point below (u >= 0, so truncation is floor; also much cheaper than floor on CPU)
    k = u.mul_(levels).to(torch.int32).clamp_(max=levels - 1).float()
    lo = torch.div(k, levels).pow_(power)
    hi = torch.add(k, 1).div_(levels).pow_(power)
    # round up with probability (y - lo) / (hi - lo), resolved to 2^-24: noise < threshold
    scaled = y.sub_(lo).div_(hi.sub_(lo)).mul_(float(1 << _NOISE_BITS))
    threshold = scaled.to(torch.int32)
    noise = torch.randint(
        0, 1 << _NOISE_BITS, y.shape, dtype=torch.int32, device=x.device, generator=generator
    )
    k.add_(noise.lt_(threshold))
    if signed:
        k.copysign_(blocks)
    else:  # a positive value rounded to 0: up to the first grid point instead
        k.masked_fill_((k == 0) & (scaled > 0), 1)
    codes = k.to(torch.int8 if signed else torch.uint8).view(-1)[: x.numel()].view(x.shape)
    return codes, absmax


def dequantize(codes: Tensor, absmax: Tensor, signed: bool) -> Tensor:
    """The float32 values of 8-bit ``codes`` with per-block scales ``absmax`` (as ``quantize``)."""
    levels, power = SIGNED_GRID if signed else UNSIGNED_GRID
    flat = codes.reshape(-1)
    y = _blocks(flat.float()).div_(levels).pow_(power).mul_(absmax[:, None])
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
    noise = torch.Generator()
    exact = torch.zeros(n)
    m = torch.zeros(n)
    stored: Any = quantize(m, True) if mode == "8bit" else m.to(torch.bfloat16)
    for t in range(1, steps + 1):
        g = torch.randn(n, generator=gen).add_(0.5)
        exact.lerp_(g, 1 - beta)
        if mode == "bf16-nearest":
            m = m.lerp(g, 1 - beta).to(torch.bfloat16).float()
            continue
        m = dequantize(*stored, True) if mode == "8bit" else stored.float()
        m.lerp_(g, 1 - beta)
        noise.manual_seed(t)
        stored = quantize(m, True, noise) if mode == "8bit" else round_bf16(m, noise)
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


def _encode_into(
    stored: dict[str, Tensor], name: str, work: Tensor, offset: int, generator: torch.Generator
) -> None:
    """Encode float32 ``work`` into the flat range ``offset:`` of ``stored`` (``_new_stored`` or
    ``_storage_for``; ``offset`` a multiple of ``BLOCK_SIZE``), drawing its rounding noise from
    ``generator`` in order."""
    codes = stored[name].view(-1)
    for start, piece in _codec_pieces(work.reshape(-1)):
        at = offset + start
        if codes.dtype == torch.bfloat16:
            codes[at : at + piece.numel()] = round_bf16(piece, generator)
            continue
        piece_codes, piece_absmax = quantize(piece, name not in UNSIGNED_BUFFERS, generator)
        codes[at : at + piece.numel()] = piece_codes.view(-1)
        first = at // BLOCK_SIZE
        stored[name + SCALE_SUFFIX][first : first + piece_absmax.numel()] = piece_absmax


def _store(state: dict[str, Any], name: str, stored: dict[str, Tensor]) -> None:
    state.update(stored)
    if name + SCALE_SUFFIX not in stored:
        state.pop(name + SCALE_SUFFIX, None)


def _encode(state: dict[str, Any], name: str, work: Tensor, form: str, seed: int) -> None:
    if form == "full":
        state[name] = work
        state.pop(name + SCALE_SUFFIX, None)
        return
    stored = _new_stored(work, name, form)
    _encode_into(stored, name, work, 0, _generator(seed, work.device))
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
    its state stored in ``form``, seeded by its ``position``), a flat piece of ``CHUNK_ELEMENTS`` at
    a time: each piece's state decoded, updated by the unchanged rule and encoded back in place (into
    new storage on a mode change), so that the float32 work memory is one piece, not the whole
    tensor. Each buffer's noise comes from one generator in element order, so the result is that of
    one piece. Every piece's update advances a copy of the step counter and of the scalar state
    (functions of the step alone) except the last one's, which advances the optimizer's own."""
    p, g, step = tensors
    stored = opt.state[p]
    t = (step + 1).item()  # the step the rule runs at: the counter's float32 increment
    fresh = {name: _storage_for(stored, name, p, form) for _, name in names}
    generators = {name: _generator(rounding_seed(t, position, b), p.device) for b, name in names}
    buffer_names = {name for _, name in names}
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
        opt._update_group(group, [p.view(-1)[span]], [g.view(-1)[span]], work, [counter], *paths)
        for _, name in names:
            _encode_into(fresh[name], name, work[name][0], start, generators[name])
    for _, name in names:
        _store(stored, name, fresh[name])


def step_group(opt: LongMemOptimizer, group: dict[str, Any]) -> None:
    """One step of ``group`` with its state decoded to float32 work tensors and encoded back in the
    group's ``state_precision`` (any stored form is read: this is also how the mode changes)."""
    mode = group.get("state_precision", DEFAULT)
    if mode != DEFAULT:
        opt._lean_state = True
    _create_state(opt, group, mode)
    params, grads, state, steps = opt._collect(group)
    if not params:
        return
    fused = bool(group.get("fused"))
    foreach = False if fused else opt._use_foreach(group, params)
    first = 0
    for g in opt.param_groups:
        if g is group:
            break
        first += len(g["params"])
    position = {id(p): first + i for i, p in enumerate(group["params"])}
    names = [(b, name) for b, name in enumerate(opt._buffers) if state.get(name) is not None]
    buffer_names = [name for _, name in names]
    large = [
        i
        for i, p in enumerate(params)
        if _in_pieces(p, grads[i], opt.state[p], buffer_names, form_for(p, mode))
    ]
    for i in large:
        p = params[i]
        tensors = (p, grads[i], steps[i])
        _step_in_pieces(
            opt, group, i, tensors, state, names, form_for(p, mode), position[id(p)], (foreach, fused)
        )
    rest = sorted(set(range(len(params))) - set(large))
    for chunk in _chunks(params, rest):
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
                _encode(opt.state[p], name, work[name][j], form, rounding_seed(t, position[id(p)], b))


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
