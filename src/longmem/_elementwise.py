"""Runs an elementwise update rule over parameters, one tensor at a time or as tensor lists.

Each optimizer states its math once, as a *rule* written against an ``ops`` object. ``TensorOps``
applies each operation to a single tensor; ``ListOps`` applies it to a list of tensors with one
``torch._foreach_*`` call. Both paths therefore execute the same operations in the same order, which
is what makes the single-tensor and multi-tensor (``foreach``) results agree.

The driver also does the bookkeeping every optimizer shares:

* advances each parameter's ``step`` (a 0-d CPU tensor, as in ``torch.optim``) and hands the rule
  the new value ``t`` as a Python number, so bias corrections and schedules are exact doubles;
* views complex tensors as pairs of reals (``torch.view_as_real``), as ``torch.optim`` does;
* negates the gradient for ``maximize``;
* when the state is kept in higher precision than the parameter (bf16/fp16 parameters, float32
  state), runs the rule on float32 copies of the parameter and gradient and rounds the result back
  into the parameter's own dtype once, at the end of the step;
* for ``foreach``, buckets tensors by device, dtypes and step count, so that every bucket shares
  the same scalar hyperparameters;
* on CPU, runs the rule over cache-sized blocks (large tensors cut into views, small ones grouped
  into short lists), so that its many elementwise passes hit the cache instead of main memory;
* for ``fused``, hands the rule to ``longmem.kernels``, which traces it into a program that one
  kernel runs in a single pass over memory (the same float32 operations in the same order).

Under ``torch.compile`` (``torch.compiler.is_compiling()``) the driver reads nothing back to the host:
step counts stay tensors and reach the rule as float64 0-d tensors, the rule runs tensor by tensor
with ``TracedOps`` (whose operations take those tensor scalars, rounded as eager kernels round), and
every path (single, foreach, fused) is this one traced path, which inductor fuses into one kernel
per tensor. See docs/API.md "torch.compile".
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Protocol

import torch
from torch import Tensor

from . import _rounding, _scalars, _state_precision

Buffers = Mapping[str, "Sequence[Tensor] | None"]


class Rule(Protocol):
    """An update rule: mutates ``p`` and the state buffers in place for the 1-based step ``t`` (a
    float, or under torch.compile a float64 0-d tensor)."""

    def __call__(self, ops: Any, t: Any, p: Any, g: Any, **buffers: Any) -> None: ...


class TensorOps:
    """The rule's operations on single tensors."""

    @staticmethod
    def mul_(x: Tensor, y: float | Tensor) -> None:
        x.mul_(y)

    @staticmethod
    def mul(x: Tensor, y: Tensor) -> Tensor:
        return torch.mul(x, y)

    @staticmethod
    def add_(x: Tensor, y: Tensor, alpha: float = 1.0) -> None:
        x.add_(y, alpha=alpha)

    @staticmethod
    def add(x: Tensor, y: Tensor, alpha: float = 1.0) -> Tensor:
        return torch.add(x, y, alpha=alpha)

    @staticmethod
    def add_scalar_(x: Tensor, value: float) -> None:
        x.add_(value)

    @staticmethod
    def sub(x: Tensor, y: Tensor) -> Tensor:
        return torch.sub(x, y)

    @staticmethod
    def sub_(x: Tensor, y: Tensor) -> None:
        x.sub_(y)

    @staticmethod
    def addcmul_(x: Tensor, a: Tensor, b: Tensor, value: float) -> None:
        x.addcmul_(a, b, value=value)

    @staticmethod
    def addcdiv_(x: Tensor, a: Tensor, b: Tensor, value: float) -> None:
        x.addcdiv_(a, b, value=value)

    @staticmethod
    def div_(x: Tensor, y: float | Tensor) -> None:
        x.div_(y)

    @staticmethod
    def div(x: Tensor, y: float) -> Tensor:
        return torch.div(x, y)

    @staticmethod
    def sqrt(x: Tensor) -> Tensor:
        return torch.sqrt(x)

    @staticmethod
    def reciprocal_(x: Tensor) -> None:
        x.reciprocal_()

    @staticmethod
    def abs_(x: Tensor) -> None:
        x.abs_()

    @staticmethod
    def sigmoid_(x: Tensor) -> None:
        x.sigmoid_()

    @staticmethod
    def minimum_(x: Tensor, y: Tensor) -> None:
        torch.minimum(x, y, out=x)

    @staticmethod
    def lerp_(x: Tensor, y: Tensor, weight: float) -> None:
        x.lerp_(y, weight)

    @staticmethod
    def copy_(x: Tensor, y: Tensor) -> None:
        x.copy_(y)

    @staticmethod
    def clone(x: Tensor) -> Tensor:
        return x.clone()


def _like(x: Tensor, y: float | Tensor) -> float | Tensor:
    """A 0-d tensor scalar in ``x``'s dtype, as eager kernels round a Python scalar (a double) to
    the dtype they compute in, and computed once per step; a Python number or a full tensor as it is.

    Inductor inlines a 0-d computation into the elementwise loop of each consumer, so a bias
    correction (``pow``, ``sqrt``, ``exp`` in float64) would be evaluated once per vector of
    elements: measured 2x slower steps. A two-element stack is materialized before the loop."""
    if not isinstance(y, Tensor) or y.dim() != 0:
        return y
    y = y.to(x.dtype)
    return torch.stack((y, y))[0]


def _fma(a: Any, b: Any, c: Tensor) -> Tensor:
    """``a * b + c`` rounded once: inductor lowers this prim to an FMA instruction (a private
    torch API; without it, rounded twice)."""
    try:
        from torch._inductor.inductor_prims import fma
    except ImportError:  # pragma: no cover - a torch without it
        return torch.add(torch.mul(a, b), c)
    return fma(a, b, c)


def _f32_like(x: Tensor, value: float) -> Tensor:
    """A Python number as the 0-d tensor of ``x``'s dtype that eager kernels round it to."""
    return torch.tensor(value, dtype=x.dtype)


class TracedOps(TensorOps):
    """``TensorOps`` whose scalars may also be 0-d tensors: what rules run under ``torch.compile``,
    where step-dependent scalars are tensors (``longmem._scalars``).

    Each operation is spelled out as torch's eager CPU kernels round it, so that the compiled step
    computes eager's numbers: ``addcdiv`` as ``x + (value * a) / b`` (inductor's own lowering
    computes ``value * (a / b)``), and the operations eager kernels fuse into FMAs as FMAs (inductor's
    C++ code contracts nothing by itself): ``add`` with ``alpha`` as ``fma(alpha, y, x)``,
    ``addcmul`` as ``fma(value * a, b, x)``, ``lerp`` as ``fma(w, y - x, x)`` for ``|w| < 0.5``, else
    ``fma(w - 1, y - x, y)``."""

    @staticmethod
    def mul_(x: Tensor, y: float | Tensor) -> None:
        x.mul_(_like(x, y))

    @staticmethod
    def add_(x: Tensor, y: Tensor, alpha: float | Tensor = 1.0) -> None:
        x.copy_(TracedOps.add(x, y, alpha))

    @staticmethod
    def add(x: Tensor, y: Tensor, alpha: float | Tensor = 1.0) -> Tensor:
        if not isinstance(alpha, Tensor) and alpha == 1.0:
            return torch.add(x, y)
        return _fma(_like(y, alpha), y, x)

    @staticmethod
    def add_scalar_(x: Tensor, value: float | Tensor) -> None:
        x.add_(_like(x, value))

    @staticmethod
    def addcmul_(x: Tensor, a: Tensor, b: Tensor, value: float | Tensor) -> None:
        x.copy_(_fma(torch.mul(a, _like(a, value)), b, x))

    @staticmethod
    def addcdiv_(x: Tensor, a: Tensor, b: Tensor, value: float | Tensor) -> None:
        x.add_(torch.mul(a, _like(a, value)).div_(b))

    @staticmethod
    def div_(x: Tensor, y: float | Tensor) -> None:
        x.div_(_like(x, y))

    @staticmethod
    def div(x: Tensor, y: float | Tensor) -> Tensor:
        return torch.div(x, _like(x, y))

    @staticmethod
    def lerp_(x: Tensor, y: Tensor, weight: float | Tensor) -> None:
        # the weight as eager rounds it, its branch taken in the graph (a constant folds away)
        w = _like(x, weight) if isinstance(weight, Tensor) else _f32_like(x, weight)
        small = w.abs() < 0.5
        x.copy_(_fma(torch.where(small, w, w - 1), torch.sub(y, x), torch.where(small, x, y)))


class ListOps:
    """The same operations on lists of tensors, one ``torch._foreach_*`` call each."""

    @staticmethod
    def mul_(x: list[Tensor], y: float | list[Tensor]) -> None:
        torch._foreach_mul_(x, y)

    @staticmethod
    def mul(x: list[Tensor], y: list[Tensor]) -> list[Tensor]:
        return list(torch._foreach_mul(x, y))

    @staticmethod
    def add_(x: list[Tensor], y: list[Tensor], alpha: float = 1.0) -> None:
        torch._foreach_add_(x, y, alpha=alpha)

    @staticmethod
    def add(x: list[Tensor], y: list[Tensor], alpha: float = 1.0) -> list[Tensor]:
        return list(torch._foreach_add(x, y, alpha=alpha))

    @staticmethod
    def add_scalar_(x: list[Tensor], value: float) -> None:
        torch._foreach_add_(x, value)

    @staticmethod
    def sub(x: list[Tensor], y: list[Tensor]) -> list[Tensor]:
        return list(torch._foreach_sub(x, y))

    @staticmethod
    def sub_(x: list[Tensor], y: list[Tensor]) -> None:
        torch._foreach_sub_(x, y)

    @staticmethod
    def addcmul_(x: list[Tensor], a: list[Tensor], b: list[Tensor], value: float) -> None:
        torch._foreach_addcmul_(x, a, b, value=value)

    @staticmethod
    def addcdiv_(x: list[Tensor], a: list[Tensor], b: list[Tensor], value: float) -> None:
        torch._foreach_addcdiv_(x, a, b, value=value)

    @staticmethod
    def div_(x: list[Tensor], y: float | list[Tensor]) -> None:
        torch._foreach_div_(x, y)

    @staticmethod
    def div(x: list[Tensor], y: float) -> list[Tensor]:
        return list(torch._foreach_div(x, y))

    @staticmethod
    def sqrt(x: list[Tensor]) -> list[Tensor]:
        return list(torch._foreach_sqrt(x))

    @staticmethod
    def reciprocal_(x: list[Tensor]) -> None:
        torch._foreach_reciprocal_(x)

    @staticmethod
    def abs_(x: list[Tensor]) -> None:
        torch._foreach_abs_(x)

    @staticmethod
    def sigmoid_(x: list[Tensor]) -> None:
        torch._foreach_sigmoid_(x)

    @staticmethod
    def minimum_(x: list[Tensor], y: list[Tensor]) -> None:
        torch._foreach_minimum_(x, y)

    @staticmethod
    def lerp_(x: list[Tensor], y: list[Tensor], weight: float) -> None:
        torch._foreach_lerp_(x, y, weight)

    @staticmethod
    def copy_(x: list[Tensor], y: list[Tensor]) -> None:
        torch._foreach_copy_(x, y)

    @staticmethod
    def clone(x: list[Tensor]) -> list[Tensor]:
        return [t.clone() for t in x]


def mutable(t: Tensor) -> Tensor:
    """``t``, or under ``torch.compile`` a one-element view of a 0-d ``t``, to update in place.

    torch 2.13's compiler loses in-place updates made on a 0-d float64 graph input itself (its
    value stays, and reads after the update see garbage; torch's own compiled AdamW leaves a 0-d
    float64 parameter unchanged); updates through a view are kept."""
    if t.dim() == 0 and torch.compiler.is_compiling():
        return t.unsqueeze(0)
    return t


def _real(t: Tensor) -> Tensor:
    """The tensor a rule updates: a complex one as pairs of reals (``torch.view_as_real``, as
    torch.optim), a 0-d one under compile as a view (``mutable``)."""
    return torch.view_as_real(t) if t.is_complex() else mutable(t)


def _is_dtensor(t: Tensor) -> bool:
    # No DTensor can exist unless torch.distributed.tensor was imported: no import cost otherwise.
    module = sys.modules.get("torch.distributed.tensor")
    return module is not None and isinstance(t, module.DTensor)


def _any_dtensor(tensors: Sequence[Tensor]) -> bool:
    """Whether any of ``tensors`` is a DTensor: one dictionary look-up when none can be."""
    module = sys.modules.get("torch.distributed.tensor")
    if module is None:
        return False
    dtensor = module.DTensor
    return any(isinstance(t, dtensor) for t in tensors)


def _local_shards(p: Tensor, g: Tensor, state: dict[str, Tensor]) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
    """The local shards of a DTensor parameter, its gradient and its state (FSDP2, tensor parallel).

    The rules are elementwise, so each rank updates its own shard; the gradient is first laid out
    as the parameter if it is not (for example a ``Partial`` gradient: a collective, as DTensor's own
    dispatch would do). State is created (and loaded) with the parameter's layout; anything else is
    an error rather than a silent mix-up of shards.
    """
    spec = (p.device_mesh, tuple(p.placements))
    if not _is_dtensor(g):
        raise RuntimeError("a DTensor parameter has a plain-tensor gradient; expected a DTensor gradient")
    if (g.device_mesh, tuple(g.placements)) != spec:
        g = g.redistribute(p.device_mesh, p.placements)
    for name, buf in state.items():
        if not _is_dtensor(buf) or (buf.device_mesh, tuple(buf.placements)) != spec:
            raise RuntimeError(
                f"optimizer state '{name}' is not laid out as its DTensor parameter ({spec[1]}); load "
                "sharded checkpoints with torch.distributed.checkpoint.state_dict.set_optimizer_state_dict"
            )
    return p.to_local(), g.to_local(), {name: buf.to_local() for name, buf in state.items()}


def _to_local(
    params: Sequence[Tensor], grads: Sequence[Tensor], buffers: Buffers
) -> tuple[list[Tensor], list[Tensor], dict[str, list[Tensor] | None]]:
    """Every DTensor parameter, with its gradient and state, replaced by its local shard: all paths
    (per tensor, foreach, fused) then update each rank's shard in place."""
    names = [name for name, tensors in buffers.items() if tensors is not None]
    local_params: list[Tensor] = []
    local_grads: list[Tensor] = []
    local_buffers: dict[str, list[Tensor] | None] = {
        name: (None if tensors is None else []) for name, tensors in buffers.items()
    }
    for i, p in enumerate(params):
        g, state = grads[i], {name: buffers[name][i] for name in names}  # type: ignore[index]
        if _is_dtensor(p):
            p, g, state = _local_shards(p, g, state)
        local_params.append(p)
        local_grads.append(g)
        for name in names:
            local_buffers[name].append(state[name])  # type: ignore[union-attr]
    return local_params, local_grads, local_buffers


def default_foreach(params: Sequence[Tensor]) -> bool:
    """``torch.optim``'s rule: multi-tensor where every parameter is on a device with native
    ``_foreach`` kernels (CUDA and friends); on CPU the single-tensor path is as fast."""
    try:
        from torch.utils._foreach_utils import _get_foreach_kernels_supported_devices

        devices = set(_get_foreach_kernels_supported_devices())
    except ImportError:  # pragma: no cover - private API moved
        devices = {"cuda"}
    return bool(params) and all(
        (type(p) in (Tensor, torch.nn.Parameter) or _is_dtensor(p)) and p.device.type in devices
        for p in params
    )


def advance_steps(state_steps: Sequence[Tensor]) -> list[float]:
    """Increment every step counter and return the new values as Python numbers."""
    values = []
    for step in state_steps:
        step.add_(1)
        values.append(step.item())
    return values


def traced_steps(state_steps: Sequence[Tensor]) -> list[Tensor]:
    """Under ``torch.compile``: increment every step counter and return the new values as float64
    0-d tensors, never read back to the host (see ``longmem._scalars``)."""
    values = []
    for step in state_steps:
        mutable(step).add_(1)
        values.append(_scalars.step_scalar(step))
    return values


def run_rule(
    rule: Callable[..., None],
    params: Sequence[Tensor],
    grads: Sequence[Tensor],
    buffers: Buffers,
    state_steps: Sequence[Tensor],
    *,
    foreach: bool,
    maximize: bool,
    fused: bool = False,
    param_rounding: str = "nearest",
    rounding_streams: Sequence[int] | None = None,
) -> None:
    """Advance the steps and apply ``rule`` to every parameter, single-tensor, multi-tensor or fused.

    ``buffers`` maps each state name the rule takes to a list aligned with ``params`` (or to
    ``None`` for a buffer this configuration does not keep). The working precision of each
    parameter is the dtype of its state buffers. ``fused`` runs the rule in one pass over memory
    (``longmem.kernels``); what the fused kernels cannot take runs the foreach path.
    ``param_rounding="stochastic"`` writes bf16/fp16 parameters back from the float32 result with
    stochastic rounding (``longmem._rounding``), the noise of parameter ``i`` keyed by
    ``rounding_streams[i]`` (default: ``i``). A buffer list may be a ``LeanBuffers`` (lean state
    as stored) only with ``fused``.

    Under ``torch.compile`` every path traces the rule tensor by tensor with step-dependent scalars
    as tensors (no host reads, no ctypes calls, so no graph breaks), and the compiler fuses each
    tensor's operations into one kernel: ``fused`` and ``foreach`` choose eager implementations only.
    (The optimizers run groups with stochastic parameter rounding eagerly: its keys are host
    integers of the step count.)
    """
    if not params:
        return
    _rounding.check_mode(param_rounding)
    streams = None
    if param_rounding == "stochastic":
        streams = list(range(len(params))) if rounding_streams is None else list(rounding_streams)
    if fused:
        from . import kernels  # imported on first use: plain optimizers never load it

        kernels.check_fused_params(params)
    if _any_dtensor(params):
        params, grads, buffers = _to_local(params, grads, buffers)
    indices: Sequence[int] = range(len(params))
    if torch.compiler.is_compiling():
        steps: Sequence[Any] = traced_steps(state_steps)
        _apply(
            rule,
            params,
            grads,
            buffers,
            steps,
            indices,
            foreach=False,
            maximize=maximize,
            streams=streams,
            ops=TracedOps,
        )
        return
    if fused:
        steps = kernels.advance_steps(state_steps, params) or advance_steps(state_steps)
        indices = kernels.run_fused(
            rule, params, grads, buffers, steps, maximize=maximize, param_streams=streams
        )
        foreach = True
        if indices and any(isinstance(row, _state_precision.LeanBuffers) for row in buffers.values()):
            buffers = _decoded(buffers, indices)  # what the kernels left: decoded, updated, encoded
            _apply(
                rule, params, grads, buffers, steps, indices, foreach=True, maximize=maximize, streams=streams
            )
            _encoded(buffers, steps)
            return
    else:
        steps = advance_steps(state_steps)
    _apply(rule, params, grads, buffers, steps, indices, foreach=foreach, maximize=maximize, streams=streams)


class _Decoded(list):  # type: ignore[type-arg]
    """A buffer list whose lean entries were replaced by float32 work tensors (``originals``)."""

    originals: list[Any]


def _decoded(buffers: Buffers, indices: Sequence[int]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name, row in buffers.items():
        if not isinstance(row, _state_precision.LeanBuffers):
            out[name] = row
            continue
        decoded = _Decoded(row)
        decoded.originals = list(row)
        for i in indices:
            if isinstance(row[i], _state_precision.LeanBuffer):
                decoded[i] = row[i].decode()
        out[name] = decoded
    return out


def _encoded(buffers: dict[str, Any], steps: Sequence[float]) -> None:
    for row in buffers.values():
        if isinstance(row, _Decoded):
            for i, original in enumerate(row.originals):
                if isinstance(original, _state_precision.LeanBuffer) and row[i] is not original:
                    original.encode(row[i], steps[i])


# On CPU each operation of a rule is its own pass over the tensors it touches; over a whole model
# every pass streams from main memory and every temporary is a fresh allocation (page faults).
# Running the rule over blocks keeps a block's buffers and temporaries in cache from one operation
# to the next, so main memory is read and written about once per step. 2**17 elements is 512 KiB
# per float32 buffer: a rule's 5-10 buffers and temporaries fit in L2/L3 (2**16 and 2**18 timed
# about the same; benchmarks/step_speed.py). Blocks are views; every path (single, foreach, the
# fused path's fallback) cuts a tensor the same way, so they still compute identical numbers.
CPU_BLOCK_NUMEL = 1 << 17


def _blocked(device: torch.device) -> bool:
    # Under torch.compile the compiler fuses the rule's operations itself; blocks would only
    # unroll into a graph with a slice per block.
    return device.type == "cpu" and not torch.compiler.is_compiling()


Piece = tuple[Tensor, Tensor, dict[str, Tensor], int]


def _pieces(p: Tensor, g: Tensor, state: dict[str, Tensor]) -> list[Piece]:
    """``(p, g, state, 0)`` whole, or cut into aligned flat blocks of ``CPU_BLOCK_NUMEL`` elements
    when they are large contiguous CPU tensors, each with the flat index of its first element."""
    n = p.numel()
    tensors = (p, g, *state.values())
    if n <= CPU_BLOCK_NUMEL or not _blocked(p.device) or not all(t.is_contiguous() for t in tensors):
        return [(p, g, state, 0)]
    flat_p, flat_g = p.view(-1), g.view(-1)
    flat_state = {name: buf.view(-1) for name, buf in state.items()}
    return [
        (
            flat_p[start : start + CPU_BLOCK_NUMEL],
            flat_g[start : start + CPU_BLOCK_NUMEL],
            {name: buf[start : start + CPU_BLOCK_NUMEL] for name, buf in flat_state.items()},
            start,
        )
        for start in range(0, n, CPU_BLOCK_NUMEL)
    ]


def _batches(pieces: list[Any], numels: list[int], device: torch.device) -> list[list[Any]]:
    """Consecutive pieces grouped into lists of at most ``CPU_BLOCK_NUMEL`` elements on CPU (so that
    a list's operations stay in cache); one list elsewhere (native multi-tensor kernels)."""
    if not _blocked(device):
        return [pieces]
    batches: list[list[Any]] = []
    size = 0
    for piece, numel in zip(pieces, numels, strict=True):
        if not batches or size + numel > CPU_BLOCK_NUMEL:
            batches.append([])
            size = 0
        batches[-1].append(piece)
        size += numel
    return batches


def _apply(
    rule: Callable[..., None],
    params: Sequence[Tensor],
    grads: Sequence[Tensor],
    buffers: Buffers,
    steps: Sequence[Any],
    indices: Sequence[int],
    *,
    foreach: bool,
    maximize: bool,
    streams: Sequence[int] | None = None,
    ops: type[TensorOps] = TensorOps,
) -> None:
    """Apply ``rule`` at the (already advanced) ``steps`` to the parameters at ``indices``; with
    ``streams``, low-precision parameters are written back with stochastic rounding; ``ops`` runs
    the single-tensor path (``TracedOps`` under torch.compile)."""
    names = [name for name, tensors in buffers.items() if tensors is not None]
    absent = {name: None for name, tensors in buffers.items() if tensors is None}
    reference = names[0]  # every rule keeps at least one full-size buffer

    def pieces_of(i: int) -> list[Piece]:
        state = {name: _real(buffers[name][i]) for name in names}  # type: ignore[index]
        return _pieces(_real(params[i]), _real(grads[i]), state)

    def work_tensors(piece: Piece) -> tuple[Tensor, Tensor, Tensor, dict[str, Tensor]]:
        p, g, state, _ = piece
        dtype = state[reference].dtype
        g = g.to(dtype) if g.dtype != dtype else g
        pw = p.to(dtype) if p.dtype != dtype else p
        return p, pw, g, state

    def write_back(i: int, p: Tensor, pw: Tensor, offset: int) -> None:
        if streams is None or p.dtype not in _rounding.ROUNDED_DTYPES:
            p.copy_(pw)
        else:
            key = _rounding.noise_key(steps[i], streams[i], _rounding.PARAM_STREAM)
            _rounding.write_back(p, pw, key, offset)

    if not foreach:
        for i in indices:
            for piece in pieces_of(i):
                p, pw, g, state = work_tensors(piece)
                if maximize:
                    g = torch.neg(g)
                rule(ops, steps[i], pw, g, **state, **absent)
                if pw is not p:
                    write_back(i, p, pw, piece[3])
        return

    buckets: dict[tuple[Any, ...], list[int]] = {}
    for i in indices:
        p = params[i]
        key = (p.device, p.dtype, buffers[reference][i].dtype, steps[i])  # type: ignore[index]
        buckets.setdefault(key, []).append(i)
    for (device, _, _, t), bucket in buckets.items():
        pieces = [(i, piece) for i in bucket for piece in pieces_of(i)]
        numels = [piece[0].numel() for _, piece in pieces]
        for batch in _batches(pieces, numels, device):
            prepared = [work_tensors(piece) for _, piece in batch]
            originals = [item[0] for item in prepared]
            pw = [item[1] for item in prepared]
            g = [item[2] for item in prepared]
            state = {name: [item[3][name] for item in prepared] for name in names}
            if maximize:
                g = list(torch._foreach_neg(g))
            rule(ListOps, t, pw, g, **state, **absent)
            if pw[0] is not originals[0]:
                if streams is None:
                    torch._foreach_copy_(originals, pw)
                    continue
                for (i, piece), p, w in zip(batch, originals, pw, strict=True):
                    write_back(i, p, w, piece[3])
