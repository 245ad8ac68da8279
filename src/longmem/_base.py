"""What every longmem optimizer shares: lazy state, group validation, the step loop, checkpoints.

A subclass declares its state buffers (``_buffers``), how to validate a parameter group
(``_validate_group``) and how to apply its update to one group (``_update_group``); the math itself
lives in the subclass's module.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping
from copy import deepcopy
from typing import Any, ClassVar

import torch
from torch import Tensor
from torch.optim import Optimizer

from . import _nonfinite, _rounding, _state_precision
from ._elementwise import _is_dtensor, default_foreach

ParamsT = Iterable[Tensor] | Iterable[dict[str, Any]] | Iterable[tuple[str, Tensor]]

_LOW_PRECISION = (torch.float16, torch.bfloat16)


def state_dtype(param: Tensor) -> torch.dtype:
    """Optimizer state precision for ``param``: float32 for bf16/fp16 parameters (a bf16 EMA with
    beta 0.9999 stops moving, since ``0.9999 * m`` rounds back to ``m``), else the parameter's own."""
    if param.dtype in _LOW_PRECISION:
        return torch.float32
    if param.dtype == torch.complex32:
        return torch.complex64
    return param.dtype


def _new_step() -> Tensor:
    return torch.zeros((), dtype=torch.float32)


#: top-level key of every longmem state dict: ``{"format": FORMAT_VERSION, "optimizer": class name}``;
#: a state dict without it is format 0 (saved before formats existed, or by torch-style tools)
FORMAT_KEY = "longmem"
FORMAT_VERSION = 1


#: the keyword-only options every optimizer shares, put in place of ``{common_args}`` in each docstring
COMMON_ARGS_DOC = """foreach: multi-tensor implementation (default: where the device has native kernels).
        maximize: maximize the objective instead of minimizing it.
        fused: one pass over memory per step (``longmem.kernels``): a C kernel on CPU, built on
            first use, a Triton kernel on CUDA; the foreach path's numbers to float rounding. For
            float32, bfloat16, float16 and complex64 parameters on CPU or CUDA: ``True`` on others
            raises ``RuntimeError`` at the step (as torch.optim's); ``None`` picks foreach/single.
            Under ``torch.compile`` every path is the compiler's fused trace of the same rule.
        nonfinite: a step whose gradients hold NaN or Inf: ``"ignore"`` (default: no check, as
            torch.optim), ``"skip"`` (nothing changes) or ``"raise"`` (an error naming the parameter).
            The check reads every gradient once, one host sync per step; measured on CPU (2 threads,
            GPT-2 small's 124M parameters, ``benchmarks/nonfinite_cost.py``) at about 4% of a foreach
            step and 16-19% of a fused step (up to ~35% under load, or with many small tensors), hence
            off by default. Beside ``torch.amp.GradScaler``, which skips such steps itself, keep
            ``"ignore"``. See docs/robustness.md.
        state_precision: how the state is stored: ``"fp32"`` (default; float32 state, also for bf16/fp16
            parameters), ``"bf16"`` (bfloat16, stochastically rounded: 2 bytes per element) or ``"8bit"``
            (blockwise 8-bit codes with a float32 scale per 256 elements, stochastically rounded:
            about 1.02 bytes per element; tensors under 4096 elements stay float32). The update is
            computed in float32 either way; see README "Lean optimizer state".
        param_rounding: how bf16/fp16 parameters are written back from the float32 update:
            ``"nearest"`` (default, as ``tensor.copy_``) or ``"stochastic"`` (unbiased, so updates
            below the dtype's resolution still move the parameter on average: pure bf16 training
            without a float32 copy of the weights). Other dtypes are unaffected. See README."""


@torch.compiler.disable
def _step_group_eagerly(opt: LongMemOptimizer, group: dict[str, Any]) -> None:
    """A group whose step runs eagerly under torch.compile too: one with lean state (decode, the same
    update, encode: ``longmem._state_precision``) or with stochastic parameter rounding. Their
    rounding noise is keyed by host integers of the step count (``longmem._rounding``), which a
    compiled graph cannot compute without reading the step back; the rest of a compiled step stays
    compiled around it (one graph break per such group, no recompiles)."""
    if opt._lean_state or group.get("state_precision", "fp32") != "fp32":
        _state_precision.step_group(opt, group)
    else:
        opt._step_group(group)


class LongMemOptimizer(Optimizer):
    """Base class: subclasses set ``_buffers`` and implement ``_validate_group``/``_update_group``."""

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if cls.__doc__ and "{common_args}" in cls.__doc__:
            cls.__doc__ = cls.__doc__.replace("{common_args}", COMMON_ARGS_DOC)

    #: state buffers with the parameter's shape, in the order the update rule takes them
    _buffers: ClassVar[tuple[str, ...]] = ()
    #: 0-d scalar state beside ``step``: name -> factory of its initial value
    _scalars: ClassVar[dict[str, Callable[[], Tensor]]] = {}
    #: steps skipped by ``nonfinite="skip"`` since this optimizer was made (not saved in state dicts)
    skipped_steps: int = 0
    #: set once this optimizer holds lean (``state_precision``) state: its steps then check each form
    _lean_state: bool = False

    def __init__(self, params: ParamsT, defaults: dict[str, Any]) -> None:
        if isinstance(defaults.get("betas"), list):
            defaults["betas"] = tuple(defaults["betas"])
        self._validate_group(dict(defaults))
        super().__init__(params, defaults)

    # ---- parameter groups -------------------------------------------------------------------
    def _validate_group(self, group: dict[str, Any]) -> None:
        raise NotImplementedError

    def _prepare_group(self, group: dict[str, Any], given: dict[str, Any]) -> None:
        """Derive entries of ``group`` from those the user ``given`` (DiffMod's ``len_memory``)."""

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        # Validate the group as it will be (defaults filled in) before it is added, so a bad
        # group leaves the optimizer untouched.
        given = {k: v for k, v in param_group.items() if k != "params"}
        group = {**self.defaults, **given}
        self._prepare_group(group, given)
        self._validate_group(group)
        super().add_param_group({**param_group, **group})

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        for group in self.param_groups:
            group.setdefault("foreach", None)
            group.setdefault("maximize", False)
            group.setdefault("fused", None)
            group.setdefault("nonfinite", _nonfinite.DEFAULT)
            group.setdefault("state_precision", _state_precision.DEFAULT)
            group.setdefault("param_rounding", _rounding.DEFAULT)
        # unpickled or loaded (load_state_dict ends here): lean buffers in the state must be decoded even
        # by a group now in "fp32"
        self._lean_state = self._lean_state or _state_precision.holds_lean_state(self.state)

    # ---- state --------------------------------------------------------------------------------
    def _buffers_for(self, group: dict[str, Any]) -> tuple[str, ...]:
        """The buffers this group's configuration keeps (a subclass may drop some)."""
        return self._buffers

    def _collect(self, group: dict[str, Any]) -> tuple[list[Tensor], list[Tensor], dict[str, Any], list]:
        """Parameters with a gradient, their gradients, state buffers (created lazily) and steps;
        a buffer this group's configuration does not keep maps to None."""
        params: list[Tensor] = []
        grads: list[Tensor] = []
        steps: list[Tensor] = []
        names = (*self._buffers, *self._scalars)
        lists: list[list[Tensor]] = [[] for _ in names]
        self._init_group(group, params, grads, steps, *lists)
        kept = (*self._buffers_for(group), *self._scalars)
        return (
            params,
            grads,
            {name: (x if name in kept else None) for name, x in zip(names, lists, strict=True)},
            steps,
        )

    def _init_group(
        self, group: dict[str, Any], params: list, grads: list, steps: list, *buffers: list
    ) -> None:
        """Fill the empty lists ``params``, ``grads``, ``steps`` and one per ``_buffers`` then
        ``_scalars`` name (empty for a buffer the group does not keep) from the parameters of
        ``group`` that have a gradient, creating their state on first use.

        torch.optim's name and protocol: under torch.compile, dynamo runs this method eagerly
        instead of tracing it (its ``OptimizerVariable``) and guards on the state it leaves, so the
        first compiled graph is already the steady one (no recompile once the state exists)."""
        name = type(self).__name__
        kept = self._buffers_for(group)
        by_name = dict(zip((*self._buffers, *self._scalars), buffers, strict=True))
        for p in group["params"]:
            if p.grad is None:
                continue
            if p.grad.is_sparse:
                raise RuntimeError(f"{name} does not support sparse gradients; use dense gradients")
            state = self.state[p]
            if not state:
                state["step"] = _new_step()
                for s, factory in self._scalars.items():
                    state[s] = factory()
            for b in kept:
                if b not in state:  # new, or a buffer this group's settings started to need
                    state[b] = torch.zeros_like(p, dtype=state_dtype(p), memory_format=torch.preserve_format)
                by_name[b].append(state[b])
            params.append(p)
            grads.append(p.grad)
            steps.append(state["step"])
            for s in self._scalars:
                by_name[s].append(state[s])

    def _use_foreach(self, group: dict[str, Any], params: list[Tensor]) -> bool:
        return default_foreach(params) if group["foreach"] is None else group["foreach"]

    def _update_group(
        self,
        group: dict[str, Any],
        params: list[Tensor],
        grads: list[Tensor],
        state: dict[str, Any],
        steps: list[Tensor],
        foreach: bool,
        fused: bool,
    ) -> None:
        raise NotImplementedError

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        """Perform one optimization step; ``closure`` re-evaluates the model and returns the loss."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        # fused=True on parameters the kernels cannot take: an error before anything changes
        for group in self.param_groups:
            if group.get("fused"):
                from . import kernels  # imported on first use: plain optimizers never load it

                kernels.check_fused_params([p for p in group["params"] if p.grad is not None])
        # nonfinite="skip"/"raise": one check over every gradient before anything changes
        if not _nonfinite.grads_are_finite(type(self).__name__, self.param_groups):
            self.skipped_steps += 1
            return loss
        for group in self.param_groups:
            lean = self._lean_state or group.get("state_precision", "fp32") != "fp32"
            # (decided without torch.compiler.is_compiling(): where dynamo gives up on this frame it
            # runs it eagerly and compiles the calls it makes, _step_group among them)
            stochastic = group.get("param_rounding") == "stochastic" and any(
                p.dtype in _rounding.ROUNDED_DTYPES for p in group["params"]
            )
            if lean or stochastic:
                _step_group_eagerly(self, group)
            else:
                self._step_group(group)
        return loss

    def _step_group(self, group: dict[str, Any]) -> None:
        """One step of a group whose state is float32 (not lean)."""
        params, grads, state, steps = self._collect(group)
        if not params:
            return
        # fused groups run longmem.kernels (one pass over memory); the rest foreach or per tensor
        fused = bool(group.get("fused"))
        foreach = False if fused else self._use_foreach(group, params)
        self._update_group(group, params, grads, state, steps, foreach, fused)

    # ---- checkpoints ------------------------------------------------------------------------
    def _format_name(self) -> str:
        """The longmem optimizer this is (a user's subclass of AdEMAMix saves as ``AdEMAMix``)."""
        for cls in type(self).__mro__:
            if cls.__module__.startswith("longmem.") and cls is not LongMemOptimizer:
                return cls.__name__
        return type(self).__name__

    def state_dict(self) -> dict[str, Any]:
        """``torch.optim``'s state dict, plus ``"longmem": {"format": 1, "optimizer": name}``."""
        state_dict = super().state_dict()
        state_dict[FORMAT_KEY] = {"format": FORMAT_VERSION, "optimizer": self._format_name()}
        return state_dict

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a state dict saved by the same optimizer class, exactly.

        Everything is checked before anything changes, so a state dict that does not fit raises
        ``ValueError`` and leaves the optimizer as it was. Unlike ``torch.optim``'s loader, state
        buffers keep their saved precision (float32 for bf16 parameters) instead of being cast to
        the parameter's dtype, and are copied, never aliased with the loaded dict.
        """
        if not isinstance(state_dict, Mapping):
            raise ValueError(f"{type(self).__name__}.load_state_dict: not a dict: {type(state_dict)}")
        state_dict = dict(state_dict)
        for pre_hook in self._optimizer_load_state_dict_pre_hooks.values():
            result = pre_hook(self, state_dict)
            if result is not None:
                state_dict = result
        try:
            saved_groups, id_map = self._check_state_dict(state_dict)
        except (TypeError, KeyError, AttributeError, IndexError) as err:  # a structure no check foresaw
            raise ValueError(
                f"{type(self).__name__}.load_state_dict: malformed state dict ({type(err).__name__}: {err})"
            ) from err

        state: defaultdict[Tensor, dict[str, Any]] = defaultdict(dict)
        for key, value in state_dict["state"].items():
            if key not in id_map:
                continue
            param = id_map[key]
            state[param] = {name: self._restore_state_value(param, name, v) for name, v in value.items()}
        # keep state that belongs to no parameter, as torch does
        for key, value in state_dict["state"].items():
            if key not in id_map:
                state[key] = deepcopy(value)

        _state_precision.keep_bf16_state(self, state_dict["state"], saved_groups, id_map, state)
        new_groups = []
        for group, saved in zip(self.param_groups, saved_groups, strict=True):
            saved["params"] = group["params"]
            if "state_precision" not in saved:  # saved before the option: keep this optimizer's choice
                saved["state_precision"] = group.get("state_precision", _state_precision.DEFAULT)
            if "param_rounding" not in saved:  # saved before the option: keep this optimizer's choice
                saved["param_rounding"] = group.get("param_rounding", _rounding.DEFAULT)
            if "nonfinite" not in saved:  # format 0: keep this optimizer's own choice
                saved["nonfinite"] = group.get("nonfinite", _nonfinite.DEFAULT)
            if "param_names" in group and "param_names" not in saved:
                saved["param_names"] = group["param_names"]
            new_groups.append(saved)
        self.__setstate__({"state": state, "param_groups": new_groups})
        for post_hook in self._optimizer_load_state_dict_post_hooks.values():
            post_hook(self)

    def _restore_state_value(self, param: Tensor, name: str, value: Any) -> Any:
        if name == "step" and not (isinstance(value, Tensor) and value.dim() == 0):
            return torch.tensor(float(value), dtype=torch.float32)  # a number, or shape (1,) (torch < 1.12)
        if name in self._scalars and not (isinstance(value, Tensor) and value.dim() == 0):
            return torch.tensor(float(value), dtype=self._scalars[name]().dtype)
        if not isinstance(value, Tensor):
            return deepcopy(value)
        if name == "step" or name in self._scalars:
            return value.detach().to(device="cpu", copy=True)
        if _state_precision.is_code(value):  # 8-bit state_precision codes stay codes
            return value.detach().to(device=param.device, copy=True)
        return value.detach().to(device=param.device, dtype=state_dtype(param), copy=True)

    def _check_state_dict(self, state_dict: dict[str, Any]) -> tuple[list[dict[str, Any]], dict[Any, Tensor]]:
        name = type(self).__name__
        if not isinstance(state_dict, dict) or "state" not in state_dict or "param_groups" not in state_dict:
            raise ValueError(f"{name}.load_state_dict: expected a dict with 'state' and 'param_groups'")
        self._check_format(state_dict.get(FORMAT_KEY))
        where = f"{name}.load_state_dict"
        groups = state_dict["param_groups"]
        if not isinstance(state_dict["state"], Mapping):
            raise ValueError(f"{where}: 'state' must be a dict, not {type(state_dict['state'])}")
        if not isinstance(groups, (list, tuple)) or not all(
            isinstance(g, Mapping) and isinstance(g.get("params"), (list, tuple)) for g in groups
        ):
            raise ValueError(f"{where}: 'param_groups' must be a list of dicts with 'params' lists")
        pids = [pid for g in groups for pid in g["params"]]
        if len(set(pids)) != len(pids):
            raise ValueError(f"{where}: a parameter id appears twice in 'param_groups': {pids}")
        saved_groups = [dict(g) for g in deepcopy(groups)]
        if len(saved_groups) != len(self.param_groups):
            raise ValueError(
                f"{name}.load_state_dict: the state dict has {len(saved_groups)} parameter groups, "
                f"this optimizer has {len(self.param_groups)}"
            )
        for i, (group, saved) in enumerate(zip(self.param_groups, saved_groups, strict=True)):
            if len(group["params"]) != len(saved["params"]):
                raise ValueError(
                    f"{name}.load_state_dict: parameter group {i} has {len(saved['params'])} parameters "
                    f"in the state dict and {len(group['params'])} in this optimizer"
                )
            # torch's __setstate__ (run by every load) adds "differentiable" to the defaults
            optional = ("foreach", "maximize", "fused", "differentiable", "nonfinite", "state_precision",
                        "param_rounding")  # fmt: skip
            missing = sorted(k for k in self.defaults if k not in saved and k not in optional)
            if missing:
                raise ValueError(
                    f"{name}.load_state_dict: parameter group {i} lacks {missing}; "
                    f"is this state dict from another optimizer?"
                )
            try:
                self._validate_group({**self.defaults, **saved})
            except ValueError as err:
                raise ValueError(f"{name}.load_state_dict: parameter group {i}: {err}") from err
        id_map: dict[Any, Tensor] = {}
        group_of: dict[Any, dict[str, Any]] = {}
        for group, saved in zip(self.param_groups, saved_groups, strict=True):
            for pid, p in zip(saved["params"], group["params"], strict=True):
                id_map[pid] = p
                group_of[pid] = saved
        for pid, value in state_dict["state"].items():
            if pid not in id_map:
                continue
            self._check_param_state(pid, id_map[pid], value, {**self.defaults, **group_of[pid]})
        return saved_groups, id_map

    def _check_format(self, meta: Any) -> None:
        """The ``"longmem"`` entry: absent (format 0), or this optimizer's, in a format this version reads."""
        name = type(self).__name__
        if meta is None:
            return
        fmt = meta.get("format") if isinstance(meta, Mapping) else None
        saved_by = meta.get("optimizer") if isinstance(meta, Mapping) else None
        if isinstance(fmt, bool) or not isinstance(fmt, int) or fmt < 1 or not isinstance(saved_by, str):
            raise ValueError(f"{name}.load_state_dict: malformed {FORMAT_KEY!r} entry {meta!r}")
        if fmt > FORMAT_VERSION:
            raise ValueError(
                f"{name}.load_state_dict: the state dict has format {fmt}, written by a newer longmem; this "
                f"version reads formats up to {FORMAT_VERSION}. Upgrade longmem to load it"
            )
        if saved_by != self._format_name():
            raise ValueError(
                f"{name}.load_state_dict: the state dict was saved by longmem.{saved_by}, not by "
                f"longmem.{self._format_name()}; load it into a {saved_by}"
            )

    def _check_param_state(self, pid: Any, param: Tensor, value: Any, group: dict[str, Any]) -> None:
        name = type(self).__name__
        where = f"{name}.load_state_dict: state of parameter {pid}"
        if not isinstance(value, dict):
            raise ValueError(f"{where} is not a dict")
        required = {"step", *self._buffers_for(group), *self._scalars}
        allowed = {"step", *self._buffers, *self._scalars, *_state_precision.scale_keys(self._buffers)}
        if not value:
            return  # a parameter that has not been stepped yet
        missing, unknown = sorted(required - value.keys()), sorted(value.keys() - allowed)
        if missing or unknown:
            raise ValueError(
                f"{where}: missing {missing}, unexpected {unknown}; expected keys {sorted(required)} "
                f"(is this state dict from another optimizer?)"
            )
        step = value["step"]
        step_value = step.item() if isinstance(step, Tensor) and step.numel() == 1 else step
        if (
            isinstance(step_value, bool)
            or not isinstance(step_value, (int, float))
            or not (math.isfinite(step_value) and step_value >= 0 and float(step_value).is_integer())
        ):
            raise ValueError(f"{where}: 'step' must be a whole number >= 0, got {step!r}")
        for key in self._scalars:
            scalar = value[key]
            x = scalar.item() if isinstance(scalar, Tensor) and scalar.numel() == 1 else scalar
            if isinstance(x, bool) or not isinstance(x, (int, float)) or not (math.isfinite(x) and x >= 0):
                raise ValueError(f"{where}: {key!r} must be a finite number >= 0, got {scalar!r}")
        codes = _state_precision.check_saved_state(where, param, value, self._buffers)
        for key in value.keys() & set(self._buffers) - codes:
            buf = value[key]
            if not isinstance(buf, Tensor) or buf.shape != param.shape:
                shape = tuple(buf.shape) if isinstance(buf, Tensor) else type(buf).__name__
                raise ValueError(f"{where}: '{key}' has shape {shape}, the parameter {tuple(param.shape)}")
            if buf.is_complex() != param.is_complex() or not (buf.is_floating_point() or buf.is_complex()):
                raise ValueError(f"{where}: '{key}' has dtype {buf.dtype}, incompatible with {param.dtype}")
            if _is_dtensor(buf) != _is_dtensor(param):
                kind = {True: "a DTensor", False: "a plain tensor"}
                raise ValueError(
                    f"{where}: '{key}' is {kind[_is_dtensor(buf)]}, the parameter "
                    f"{kind[_is_dtensor(param)]}; load sharded (FSDP2) state with "
                    "torch.distributed.checkpoint.state_dict.set_optimizer_state_dict"
                )
