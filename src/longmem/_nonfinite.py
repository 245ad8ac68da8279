"""The ``nonfinite`` option: what a step does when a gradient holds NaN or Inf.

``"ignore"`` (the default) checks nothing, as ``torch.optim``; ``"skip"`` skips the whole step
(parameters, state and step counts untouched); ``"raise"`` raises :class:`NonFiniteGradientError`
naming the parameter, before anything changes. The check reads every gradient once per step and
synchronizes with the host once: GradScaler's multi-tensor kernel
``torch._amp_foreach_non_finite_check_and_unscale_`` (with scale 1: it writes every value back
unchanged) for contiguous gradients (on CPU only those of at most :data:`SMALL` elements), and one
read-only ``sum`` per tensor for the others (a NaN or Inf element makes the sum NaN or Inf). A
flagged step is confirmed exactly, element by element (a second read, only then), so that a sum
that overflows from finite values skips nothing.
With DTensor (FSDP2) gradients every verdict is all-reduced over each mesh, so every rank decides
alike. ``benchmarks/nonfinite_cost.py`` times the check against whole steps.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from ._elementwise import _is_dtensor

MODES = ("skip", "raise", "ignore")
DEFAULT = "ignore"


class NonFiniteGradientError(RuntimeError):
    """A gradient held NaN or Inf under ``nonfinite="raise"``; the optimizer was left unchanged."""


def check_mode(value: Any) -> None:
    """``nonfinite`` must be one of :data:`MODES`."""
    if not isinstance(value, str) or value not in MODES:
        raise ValueError(f"nonfinite must be one of 'skip', 'raise', 'ignore', got {value!r}")


def _real_grad(g: Tensor) -> Tensor | None:
    """The local, real view of a gradient worth checking (None: nothing to check)."""
    if _is_dtensor(g):
        g = g.to_local()
    if g.is_complex():
        g = torch.view_as_real(g)
    if not g.is_floating_point() or g.numel() == 0:
        return None
    return g


def _found_minmax(grads: Sequence[Tensor]) -> Tensor:
    """1 if any element of ``grads`` is NaN or Inf, else 0 (a 1-element float32 tensor, no sync): exact.

    ``aminmax`` reads each tensor once and propagates NaN; the per-tensor results are checked per
    dtype, so that no finite float64 value is rounded to Inf on the way.
    """
    by_dtype: dict[torch.dtype, list[Tensor]] = {}
    for g in grads:
        if g.numel():  # aminmax refuses empty tensors
            by_dtype.setdefault(g.dtype, []).extend(torch.aminmax(g))
    finite = [torch.stack(values).isfinite().all() for values in by_dtype.values()]
    if not finite:
        return torch.zeros(1, dtype=torch.float32, device=grads[0].device)
    return (~torch.stack(finite).all()).to(torch.float32).reshape(1)


def _found_sum(grads: Sequence[Tensor]) -> Tensor:
    """As :func:`_found_minmax`, from one ``sum`` per tensor (read only, vectorized, multithreaded; about
    twice as fast as ``aminmax`` on CPU). Never misses a NaN or Inf element (it makes the sum NaN or
    Inf), but also flags a sum that overflows from finite values: confirm a flag with
    :func:`_found_minmax`."""
    by_dtype: dict[torch.dtype, list[Tensor]] = {}
    for g in grads:
        by_dtype.setdefault(g.dtype, []).append(g.sum())
    finite = [torch.stack(values).isfinite().all() for values in by_dtype.values()]
    return (~torch.stack(finite).all()).to(torch.float32).reshape(1)


def _found_amp(grads: Sequence[Tensor]) -> Tensor:
    """As :func:`_found_minmax` (exact), with GradScaler's multi-tensor kernel (one per dtype); it
    rewrites each gradient as ``g * 1.0``, which leaves its values as they are (so: contiguous
    gradients only, never a view whose elements share memory)."""
    device = grads[0].device
    found = torch.zeros(1, dtype=torch.float32, device=device)
    one = torch.ones(1, dtype=torch.float32, device=device)
    by_dtype: dict[torch.dtype, list[Tensor]] = {}
    for g in grads:
        by_dtype.setdefault(g.dtype, []).append(g)
    for same in by_dtype.values():
        torch._amp_foreach_non_finite_check_and_unscale_(same, found, one)
    return found


#: on CPU, contiguous gradients of at most this many elements go to GradScaler's multi-tensor kernel
#: (one call for all of them: about 1.5 us a tensor, against about 6 us for a ``sum`` of its own)
SMALL = 1 << 16


def found_nonfinite(grads: Sequence[Tensor]) -> Tensor:
    """Whether any of ``grads`` (real, on one device) may hold NaN or Inf, as a device flag:
    0 means none does; 1 means one does, or a ``sum`` overflowed: :func:`_found_minmax` decides.

    Contiguous gradients (on CPU: small ones, where the per-tensor dispatch outweighs the bytes) go to
    :func:`_found_amp`, the rest to :func:`_found_sum` (read only; views are never written to).
    """
    cpu = grads[0].device.type == "cpu"
    multi: list[Tensor] = []
    rest: list[Tensor] = []
    for g in grads:
        (multi if g.is_contiguous() and (not cpu or g.numel() <= SMALL) else rest).append(g)
    flags: list[Tensor] = []
    if multi:
        try:
            flags.append(_found_amp(multi))
        except (RuntimeError, NotImplementedError):  # pragma: no cover - a device without the kernel
            rest = list(grads)
    if rest:
        flags.append(_found_sum(rest))
    return flags[0] if len(flags) == 1 else torch.maximum(flags[0], flags[1])


def _all_reduce_max(flag: Tensor, meshes: list[Any]) -> Tensor:
    import torch.distributed as dist

    for mesh in meshes:
        flag = flag.to(mesh.device_type)
        for dim in range(mesh.ndim):
            dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=mesh.get_group(dim))
    return flag


def _verdict(by_device: dict[torch.device, list[Tensor]], meshes: list[Any], find: Any) -> bool:
    """``find`` over each device's gradients, combined over devices and ranks: one host sync."""
    flags = [find(grads) for grads in by_device.values()]
    if not flags:
        flag = torch.zeros(1)
    elif len(flags) == 1:
        flag = flags[0]
    else:  # parameters on several devices: one synchronization each
        flag = torch.stack([f.cpu() for f in flags]).amax().reshape(1)
    if meshes:  # every rank must take the same decision, and take part in the collective
        flag = _all_reduce_max(flag, meshes)
    return bool(flag.item())


def _gradients(checked: list[tuple[int, dict[str, Any]]]) -> tuple[dict[torch.device, list[Tensor]], list]:
    """The checked groups' gradients as real local tensors, per device, and their DTensor meshes.

    Per tensor this costs a few attribute reads (about 1 us): the loop is written for that.
    """
    module = sys.modules.get("torch.distributed.tensor")  # no DTensor exists unless it was imported
    dtensor = module.DTensor if module is not None else None
    by_device: dict[torch.device, list[Tensor]] = {}
    meshes: list[Any] = []
    for _, group in checked:
        for p in group["params"]:
            g = p.grad
            if g is None or g.is_sparse:  # sparse gradients are refused by the step itself
                continue
            if dtensor is not None and isinstance(g, dtensor):
                if g.device_mesh not in meshes:
                    meshes.append(g.device_mesh)
                g = g.to_local()
            if g.is_complex():
                g = torch.view_as_real(g)
            elif not g.is_floating_point():
                continue
            by_device.setdefault(g.device, []).append(g)
    return by_device, meshes


def grads_are_finite(owner: str, param_groups: Sequence[dict[str, Any]]) -> bool:
    """The check of one step, over every group whose ``nonfinite`` is not ``"ignore"``.

    Returns True when the step should go on, False when it should be skipped; raises
    :class:`NonFiniteGradientError` when a ``"raise"`` group holds a non-finite gradient.
    """
    checked = [(i, g) for i, g in enumerate(param_groups) if g.get("nonfinite", DEFAULT) != "ignore"]
    if not checked:
        return True
    return _check(owner, checked)


# The verdict is a host read whichever way it is taken; under torch.compile the check runs eagerly
# (one graph break, only where a group checks) and the step stays compiled around it.
@torch.compiler.disable
def _check(owner: str, checked: list[tuple[int, dict[str, Any]]]) -> bool:
    by_device, meshes = _gradients(checked)
    # the one host synchronization of a step whose gradients are finite
    if not _verdict(by_device, meshes, found_nonfinite):
        return True
    # flagged: confirm element by element (a sum may overflow from finite values); a second read
    if not _verdict(by_device, meshes, _found_minmax):
        return True
    for index, group in checked:
        if group.get("nonfinite") == "raise":
            culprit = _first_nonfinite(group)
            if culprit is not None:
                raise NonFiniteGradientError(f"{owner}.step: {_describe(index, group, *culprit)}")
    if meshes and all(group.get("nonfinite") == "raise" for _, group in checked):
        # the bad gradient is in another rank's shard; that rank raises with the details, this one too
        raise NonFiniteGradientError(
            f"{owner}.step: a gradient shard on another rank holds NaN or Inf (that rank names the "
            "parameter). Nothing was changed."
        )
    return False


def _first_nonfinite(group: dict[str, Any]) -> tuple[int, Tensor, int] | None:
    """(index, parameter, number of such parameters) of the first non-finite gradient in ``group``."""
    found = []
    for i, p in enumerate(group["params"]):
        g = None if p.grad is None or p.grad.is_sparse else _real_grad(p.grad)
        if g is not None and not bool(g.isfinite().all()):
            found.append((i, p))
    return (*found[0], len(found)) if found else None


def _describe(group_index: int, group: dict[str, Any], index: int, param: Tensor, count: int) -> str:
    g = _real_grad(param.grad)  # type: ignore[arg-type]
    assert g is not None
    nan, inf = int(g.isnan().sum()), int(g.isinf().sum())
    names = group.get("param_names")
    name = f"'{names[index]}' " if names and index < len(names) else ""
    others = f"; {count - 1} more parameter(s) of the group too" if count > 1 else ""
    return (
        f"the gradient of parameter {name}(group {group_index}, index {index}, shape "
        f"{tuple(param.shape)}, {param.dtype}) holds {nan} NaN and {inf} Inf of {g.numel()} "
        f"values{others}. Nothing was changed. nonfinite='skip' skips such steps instead; "
        "nonfinite='ignore' does not check."
    )
