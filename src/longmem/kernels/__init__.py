"""Fused optimizer steps: each rule, traced once per step, runs in one pass over memory.

``fused=True`` on an optimizer routes its parameters here. The rule is traced into a program of
elementwise instructions (:mod:`.program`), which one kernel runs over every tensor:

* CPU tensors: a C kernel built on first use and cached (:mod:`.cpu`);
* CUDA tensors: a Triton kernel generated from the program (:mod:`.cuda`), when Triton is installed.

Parameters of a dtype or on a device the kernels do not take (float64, integer, ``meta``, ...)
make ``fused=True`` raise a ``RuntimeError`` before anything changes, as torch.optim's
``fused=True`` does (``check_fused_params``); ``fused=None``, the default, never does. What a kernel
takes only in another layout (non-contiguous tensors, a gradient of another dtype, state loaded in
another precision) runs the foreach path inside the fused step, which computes the same numbers;
so does everything when a kernel cannot be built (no C compiler, no Triton), reported once per
process with a warning.

Under ``torch.compile`` none of this runs: the compiler traces the rule itself and fuses it
(``longmem._elementwise.run_rule``).
"""

from __future__ import annotations

import operator
import warnings
from collections.abc import Callable, Mapping, Sequence

import torch
from torch import Tensor

from .._rounding import ROUNDED_DTYPES
from .._state_precision import LeanBuffers
from . import cpu, program

__all__ = [
    "FUSED_DEVICES",
    "FUSED_DTYPES",
    "FusedFallbackWarning",
    "advance_steps",
    "check_fused_params",
    "prepare",
    "run_fused",
    "takes_lean",
]


class FusedFallbackWarning(UserWarning):
    """``fused=True`` could not use a fused kernel and ran the foreach path instead."""


_warned: set[str] = set()
_dtype = operator.attrgetter("dtype")
_is_cpu = operator.attrgetter("is_cpu")

#: parameter dtypes the fused kernels take, on CPU and CUDA alike (``cpu.DTYPE_CODES``,
#: ``cuda._VIEWS``); complex ones as pairs of reals
FUSED_DTYPES = frozenset({torch.float32, torch.bfloat16, torch.float16, torch.complex64, torch.complex32})
#: devices with a fused kernel: C on CPU, Triton on CUDA
FUSED_DEVICES = frozenset({"cpu", "cuda"})


def check_fused_params(params: Sequence[Tensor]) -> None:
    """Raise ``RuntimeError`` unless every parameter has a dtype and device the fused kernels take
    (torch.optim's ``fused=True`` raises the same way, with the same opening words)."""
    # a plain loop: torch.compile traces it (attrgetter maps would break its graph), ~0.2 us a tensor
    bad = next((p for p in params if p.dtype not in FUSED_DTYPES or p.device.type not in FUSED_DEVICES), None)
    if bad is None:
        return
    dtypes = ", ".join(sorted(str(d).removeprefix("torch.") for d in FUSED_DTYPES))
    raise RuntimeError(
        "`fused=True` requires all the params to be floating point Tensors of supported devices: "
        f"{sorted(FUSED_DEVICES)} and dtypes ({dtypes}), but got a {bad.dtype} parameter of shape "
        f"{tuple(bad.shape)} on {bad.device.type}. Leave fused=None (the default) for the foreach or "
        "single-tensor path, which takes every floating-point dtype and device"
    )


def _warn_once(kind: str, message: str) -> None:
    if kind not in _warned:
        _warned.add(kind)
        warnings.warn(message, FusedFallbackWarning, stacklevel=4)


def reset() -> None:
    """Forget loaded kernels, build failures and warnings already given (for tests)."""
    _warned.clear()
    cpu.reset()


def _cpu_library() -> cpu.Library | None:
    try:
        return cpu.load()
    except cpu.BuildError as err:
        _warn_once(
            "cpu",
            "longmem: fused=True could not build its CPU kernel, so it runs the (slower) foreach path, "
            f"with the same results. Install a C compiler or set LONGMEM_CC to one. Reason: {err}",
        )
        return None


def advance_steps(state_steps: Sequence[Tensor], params: Sequence[Tensor]) -> list[float] | None:
    """Increment the step counters in one CPU kernel call; None where that kernel is not wanted
    (no CPU parameters) or not available, or a counter is not a 0-d float32 CPU tensor: the caller
    then does it with torch."""
    if not any(map(_is_cpu, params)):
        return None
    if set(map(_dtype, state_steps)) != {torch.float32} or not all(map(_is_cpu, state_steps)):
        return None
    if any(map(Tensor.dim, state_steps)):
        return None
    lib = _cpu_library()
    if lib is None:
        return None
    return cpu.advance_steps(lib, state_steps)


def prepare(
    rule: Callable[..., None], buffers: Mapping[str, Sequence[Tensor] | None]
) -> tuple[Callable[[float], program.Program], list[Sequence[Tensor]]]:
    """The step's tracer (step ``t`` -> the program ``rule`` runs) and the state buffers it keeps, in
    the program's slot order."""
    names = [name for name, tensors in buffers.items() if tensors is not None]
    absent = [name for name, tensors in buffers.items() if tensors is None]
    state: list[Sequence[Tensor]] = [buffers[name] for name in names]  # type: ignore[misc]

    def trace(t: float) -> program.Program:
        return program.trace(rule, t, names, absent)

    return trace, state


def takes_lean(p: Tensor, g: Tensor, stored: Sequence[Tensor]) -> bool:
    """Whether a fused step can run ``p`` with its state buffers as they are ``stored`` (float32,
    bfloat16 or 8-bit codes), decoding and encoding them in the kernel (``LeanBuffer``)."""
    if p.is_cpu:
        return cpu.takes(p, g, stored) and _cpu_library() is not None
    if p.is_cuda:
        from . import cuda

        return cuda.available() and cuda.takes_lean(p, g, stored)
    return False


def run_fused(
    rule: Callable[..., None],
    params: Sequence[Tensor],
    grads: Sequence[Tensor],
    buffers: Mapping[str, Sequence[Tensor] | None],
    steps: Sequence[float],
    *,
    maximize: bool,
    param_streams: Sequence[int] | None = None,
) -> list[int]:
    """Apply ``rule`` at each parameter's step with the fused kernels; steps are already advanced.
    A buffer list may be a ``LeanBuffers`` (lean state as stored: decoded, updated and encoded in
    the kernels); ``param_streams`` (each parameter's noise stream) asks for bf16/fp16 parameters
    to be written back with stochastic rounding.

    Returns the indices of the parameters it left for the caller's foreach path.
    """
    trace, state = prepare(rule, buffers)
    if param_streams is not None and not any(p.dtype in ROUNDED_DTYPES for p in params):
        param_streams = None  # nothing to round: the plain kernels
    lean = param_streams is not None or any(type(row) is LeanBuffers for row in state)
    on_cpu: list[int] = []
    on_cuda: list[int] = []
    left: list[int] = []
    if all(map(_is_cpu, params)):
        on_cpu = list(range(len(params)))
    else:
        for i, p in enumerate(params):
            if p.is_cpu:
                on_cpu.append(i)
            elif p.is_cuda:
                on_cuda.append(i)
            else:
                left.append(i)
    if on_cpu:
        if _cpu_library() is None:
            left += on_cpu
        elif lean:
            left += cpu.run_lean_step(trace, params, grads, state, steps, on_cpu, maximize, param_streams)
        else:
            left += cpu.run_step(trace, params, grads, state, steps, on_cpu, maximize)
    if on_cuda:
        from . import cuda

        left += cuda.run_step(
            trace,
            params,
            grads,
            state,
            steps,
            on_cuda,
            maximize,
            warn=_warn_once,
            param_streams=param_streams,
        )
    return sorted(left)
