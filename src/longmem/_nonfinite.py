"""The ``nonfinite`` option: what a step does when a gradient holds NaN or Inf.

``"ignore"`` (the default) checks nothing, as ``torch.optim``; ``"skip"`` skips the whole step
(parameters, state and step counts untouched); ``"raise"`` raises :class:`NonFiniteGradientError`
naming the parameter, before anything changes. The check reads every gradient once per step, with
one host synchronization per step: on CPU a min/max reduction per tensor (read only), elsewhere
``torch._amp_foreach_non_finite_check_and_unscale_`` (GradScaler's multi-tensor kernel). With
DTensor (FSDP2) gradients the verdict is all-reduced over each mesh, so every rank decides alike.
"""

from __future__ import annotations

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
    """1 if any element of ``grads`` is NaN or Inf, else 0 (a 1-element float32 tensor, no sync).

    ``aminmax`` reads each tensor once and propagates NaN; the per-tensor results are checked per
    dtype, so that no finite float64 value is rounded to Inf on the way.
    """
    by_dtype: dict[torch.dtype, list[Tensor]] = {}
    for g in grads:
        by_dtype.setdefault(g.dtype, []).extend(torch.aminmax(g))
    finite = [torch.stack(values).isfinite().all() for values in by_dtype.values()]
    return (~torch.stack(finite).all()).to(torch.float32).reshape(1)


def _found_amp(grads: Sequence[Tensor]) -> Tensor:
    """As :func:`_found_minmax`, with GradScaler's multi-tensor kernel (one per dtype); it rewrites
    each gradient as ``g * 1.0``, which leaves its values as they are."""
    device = grads[0].device
    found = torch.zeros(1, dtype=torch.float32, device=device)
    one = torch.ones(1, dtype=torch.float32, device=device)
    by_dtype: dict[torch.dtype, list[Tensor]] = {}
    for g in grads:
        by_dtype.setdefault(g.dtype, []).append(g)
    for same in by_dtype.values():
        torch._amp_foreach_non_finite_check_and_unscale_(same, found, one)
    return found


def found_nonfinite(grads: Sequence[Tensor]) -> Tensor:
    """Whether any of ``grads`` (real, non-empty, on one device) holds NaN or Inf, as a device flag."""
    if grads[0].device.type != "cpu":
        try:
            return _found_amp(grads)
        except (RuntimeError, NotImplementedError):  # pragma: no cover - device without the kernel
            pass
    return _found_minmax(grads)


def _all_reduce_max(flag: Tensor, meshes: list[Any]) -> Tensor:
    import torch.distributed as dist

    for mesh in meshes:
        flag = flag.to(mesh.device_type)
        for dim in range(mesh.ndim):
            dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=mesh.get_group(dim))
    return flag


def grads_are_finite(owner: str, param_groups: Sequence[dict[str, Any]]) -> bool:
    """The check of one step, over every group whose ``nonfinite`` is not ``"ignore"``.

    Returns True when the step should go on, False when it should be skipped; raises
    :class:`NonFiniteGradientError` when a ``"raise"`` group holds a non-finite gradient.
    """
    checked = [(i, g) for i, g in enumerate(param_groups) if g.get("nonfinite", DEFAULT) != "ignore"]
    if not checked:
        return True
    by_device: dict[torch.device, list[Tensor]] = {}
    meshes: dict[int, Any] = {}
    for _, group in checked:
        for p in group["params"]:
            if p.grad is None or p.grad.is_sparse:  # sparse gradients are refused by the step itself
                continue
            if _is_dtensor(p.grad):
                meshes.setdefault(id(p.grad.device_mesh), p.grad.device_mesh)
            g = _real_grad(p.grad)
            if g is not None:
                by_device.setdefault(g.device, []).append(g)
    flags = [found_nonfinite(grads) for grads in by_device.values()]
    if not flags:
        flag = torch.zeros(1)
    elif len(flags) == 1:
        flag = flags[0]
    else:  # parameters on several devices: one synchronization each
        flag = torch.stack([f.cpu() for f in flags]).amax().reshape(1)
    if meshes:  # every rank must take the same decision, and take part in the collective
        flag = _all_reduce_max(flag, list(meshes.values()))
    if not flag.item():  # the one host synchronization of the step
        return True
    for index, group in checked:
        if group.get("nonfinite") == "raise":
            culprit = _first_nonfinite(group)
            if culprit is not None:
                raise NonFiniteGradientError(f"{owner}.step: {_describe(index, group, *culprit)}")
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
