"""The five optimizers held to torch's own optimizer test machinery.

``torch.testing._internal.common_optimizers`` (in the torch wheel) describes each torch optimizer
by an ``OptimizerInfo``: its optimizer inputs (constructor options), its error inputs (what must
raise, with which message) and what it supports. Here are such entries for longmem's five, and
tests written in the spirit of torch's ``TestOptimRenewed`` (test/test_optim.py) over them:
errors, the for-loop going the right direction (contiguous or not, with LR schedulers), tensor lr,
complex parameters against their real view, foreach and fused against the for-loop (with torch's
``TensorTracker``), param groups' lr and weight decay, no-op steps, state dicts (deterministic,
older formats, named parameters, ``weights_only`` loads, non-tensor steps), hooks, deepcopy.

torch runs its foreach variants only on devices with native foreach kernels; longmem's foreach
path is a real implementation on CPU too, so the variants here (``all_inputs``) are for-loop,
foreach and fused, on CPU.
"""

from __future__ import annotations

import functools
import tempfile
from copy import deepcopy
from typing import Any

import pytest
import torch
from torch.nn import Parameter
from torch.optim import SGD
from torch.optim.lr_scheduler import ReduceLROnPlateau, StepLR
from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook
from torch.testing._internal.common_optimizers import (
    ErrorOptimizerInput,
    OptimizerErrorEnum,
    OptimizerInfo,
    OptimizerInput,
    TensorTracker,
    get_error_inputs_for_all_optims,
)

import longmem
from longmem.kernels import cpu

DEVICE = "cpu"


# ---- the OptimizerInfo entries ------------------------------------------------------------------


def _inputs(*extra: tuple[dict[str, Any], str], lr: float = 0.01, maximize: dict[str, Any] | None = None):
    """Inputs every longmem optimizer takes, then its own; no global-cliquey flag (foreach, fused).

    ``lr``: the non-default lr (torch's 0.01 by default); ``maximize``: options beside torch's
    ``maximize=True, weight_decay=0.1`` so that 20 steps of ascent outpace the decay (AdaMod's step
    sizes start at zero and grow over about ``1 / (1 - beta3)`` steps)."""

    def inputs(device, dtype=None):
        common = [
            ({}, "default"),
            ({"lr": lr}, "non-default lr"),
            ({"weight_decay": 0.1}, "nonzero weight_decay"),
            ({"weight_decay": 0.1, "maximize": True, **(maximize or {})}, "maximize"),
            ({"lr": torch.tensor(0.001)}, "Tensor lr"),
        ]
        return [OptimizerInput(params=None, kwargs=deepcopy(kw), desc=desc) for kw, desc in (*common, *extra)]

    return inputs


def _error_inputs(*extra: tuple[dict[str, Any], type, str]):
    """torch's error inputs for every optimizer, the common longmem ones, then the optimizer's own."""

    def error_inputs(device, dtype):
        common = [
            ({"lr": -1.0}, ValueError, r"lr must be a finite number >= 0, got -1.0"),
            ({"lr": float("nan")}, ValueError, r"lr must be a finite number >= 0"),
            ({"eps": -1e-8}, ValueError, r"eps must be a finite number >= 0"),
            ({"weight_decay": -1}, ValueError, r"weight_decay must be a finite number >= 0, got -1"),
            ({"foreach": True, "fused": True}, ValueError, r"fused=True and foreach=True cannot both be set"),
            ({"fused": "yes"}, ValueError, r"fused must be None, True or False"),
            ({"maximize": 1}, ValueError, r"maximize must be True or False"),
            ({"nonfinite": "drop"}, ValueError, r"nonfinite must be one of"),
            ({"state_precision": "fp8"}, ValueError, r"state_precision must be one of"),
            ({"param_rounding": "up"}, ValueError, r"param_rounding must be one of 'nearest', 'stochastic'"),
        ]
        out = get_error_inputs_for_all_optims(device, dtype)
        for kwargs, error_type, regex in (*common, *extra):
            out.append(
                ErrorOptimizerInput(
                    OptimizerInput(params=None, kwargs=kwargs, desc=regex),
                    error_type=error_type,
                    error_regex=regex,
                )
            )
        # explicit fused=True on parameters the kernels cannot take: an error at the step, as torch's
        for params, desc in (
            ([Parameter(torch.randn(3, dtype=torch.float64))], "float64"),
            ([Parameter(torch.randn(3)), Parameter(torch.randn(3, device="meta"))], "meta device"),
        ):
            for p in params:
                p.grad = torch.ones_like(p)
            out.append(
                ErrorOptimizerInput(
                    OptimizerInput(params=params, kwargs={"fused": True}, desc=desc),
                    error_on=OptimizerErrorEnum.STEP_ERROR,
                    error_type=RuntimeError,
                    error_regex=r"`fused=True` requires all the params to be floating point Tensors",
                )
            )
        sparse = Parameter(torch.randn(3))
        sparse.grad = torch.randn(3).to_sparse()
        out.append(
            ErrorOptimizerInput(
                OptimizerInput(params=[sparse], kwargs={}, desc="sparse gradient"),
                error_on=OptimizerErrorEnum.STEP_ERROR,
                error_type=RuntimeError,
                error_regex=r"does not support sparse gradients",
            )
        )
        return out

    return error_inputs


def _info(cls, inputs, error_inputs) -> OptimizerInfo:
    return OptimizerInfo(
        cls,
        optim_inputs_func=inputs,
        optim_error_inputs_func=error_inputs,
        supported_impls=("foreach", "fused"),
        supports_fused_on=("cpu", "cuda"),
        # options that older longmem state dicts lack (format 0 predates nonfinite, state_precision;
        # param_rounding came later)
        not_og_supported_flags=(
            "foreach",
            "maximize",
            "fused",
            "nonfinite",
            "state_precision",
            "param_rounding",
        ),
        scheduler_inputs=([lambda opt: StepLR(opt, gamma=0.9, step_size=10)], [ReduceLROnPlateau]),
    )


OPTIM_INFOS = [
    _info(
        longmem.AdEMAMix,
        _inputs(
            ({"alpha": 5.0, "alpha_warmup": 5, "beta3_warmup": 8}, "warm-ups"),
            ({"betas": (0.0, 0.999, 0.9999)}, "no fast EMA"),
            ({"alpha_warmup": 4.0}, "integral float warm-up"),
        ),
        _error_inputs(
            ({"betas": (0.9, 0.99)}, ValueError, r"add beta3 \(the paper's value: beta3=0.9999\)"),
            ({"betas": (1.0, 0.999, 0.9999)}, ValueError, r"betas\[0\] must be in \[0, 1\), got 1.0"),
            ({"alpha": -1.0}, ValueError, r"alpha must be a finite number >= 0"),
            ({"alpha_warmup": 2.5}, ValueError, r"alpha_warmup must be None or a whole number >= 1"),
            ({"beta3_warmup": 0}, ValueError, r"beta3_warmup must be None or a whole number >= 1"),
        ),
    ),
    _info(
        longmem.SimplifiedAdEMAMix,
        _inputs(
            ({"alpha": 2.0, "beta1_warmup": 6, "lr": 1e-3}, "warm-up"),
            ({"bias_correction1": True, "bias_correction2": False, "lr": 1e-3}, "bias corrections"),
            lr=3e-4,  # its momentum is a sum, about 1 / (1 - beta1) = 100 gradients: lr 0.01 overshoots
        ),
        _error_inputs(
            ({"betas": (0.99, 0.95, 0.9)}, ValueError, r"betas must be a tuple of 2 numbers"),
            ({"min_beta1": 1.0}, ValueError, r"min_beta1 must be in \[0, 1\)"),
            ({"bias_correction1": 1}, ValueError, r"bias_correction1 must be True or False"),
        ),
    ),
    _info(
        longmem.AdaMod,
        _inputs(
            ({"beta3": 0.9}, "short memory"),
            ({"beta3": 0.0, "betas": (0.0, 0.99)}, "Adam-like"),
            maximize={"beta3": 0.9},
        ),
        _error_inputs(({"beta3": 1.0}, ValueError, r"beta3 must be in \[0, 1\), got 1.0")),
    ),
    _info(
        longmem.DiffGrad,
        _inputs(({"betas": (0.5, 0.9)}, "low betas")),
        _error_inputs(({"betas": (0.9, -0.1)}, ValueError, r"betas\[1\] must be in \[0, 1\)")),
    ),
    _info(
        longmem.DiffMod,
        _inputs(({"len_memory": 10}, "len_memory"), ({"beta3": 0.5}, "beta3"), maximize={"len_memory": 10}),
        _error_inputs(
            ({"len_memory": 0.5}, ValueError, r"len_memory must be a number >= 1"),
            ({"len_memory": 10, "beta3": 0.5}, ValueError, r"or both only with beta3 = 1 - 1 / len_memory"),
        ),
    ),
]
IDS = [info.name for info in OPTIM_INFOS]
optims = pytest.mark.parametrize("optim_info", OPTIM_INFOS, ids=IDS)


def all_inputs(optim_info, dtype=torch.float32, skip=()) -> list[OptimizerInput]:
    """Every optimizer input with foreach=False and fused=False (the for-loop), then with foreach=True
    and with fused=True (torch's ``_get_optim_inputs_including_global_cliquey_kwargs``, without
    dropping foreach on CPU)."""
    out = []
    for optim_input in optim_info.optim_inputs_func(device=DEVICE, dtype=dtype):
        base = {**deepcopy(optim_input.kwargs), "foreach": False, "fused": False}
        out.append(OptimizerInput(params=None, kwargs=base, desc=optim_input.desc))
        for flag in ("foreach", "fused"):
            if flag not in skip:
                kwargs = {**deepcopy(base), flag: True}
                out.append(OptimizerInput(params=None, kwargs=kwargs, desc=f"{optim_input.desc} & {flag}"))
    return out


@pytest.fixture(autouse=True)
def generic_fused_kernel_one_thread(monkeypatch):
    """The generic fused kernel only: a specialized one is built per traced program (about a second
    each), and test_fused.py already checks that the two agree bit for bit. One thread: these tensors
    are tiny, and on a loaded machine every parallel region of torch's waits for a busy core."""
    monkeypatch.setattr(cpu, "SPECIALIZE", False)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def assert_equal(actual, expected, path="") -> None:
    """torch's ``TestCase.assertEqual`` for state dicts: containers item by item, tensors with
    torch's tolerances (and equal dtypes), anything else with ``==``."""
    if isinstance(expected, dict):
        assert isinstance(actual, dict) and actual.keys() == expected.keys(), path
        for key in expected:
            assert_equal(actual[key], expected[key], f"{path}[{key!r}]")
    elif isinstance(expected, (list, tuple)):
        assert isinstance(actual, (list, tuple)) and len(actual) == len(expected), path
        for i, (a, e) in enumerate(zip(actual, expected, strict=True)):
            assert_equal(a, e, f"{path}[{i}]")
    elif isinstance(expected, torch.Tensor):
        torch.testing.assert_close(actual, expected, msg=lambda m: f"{path}: {m}")
    else:
        assert actual == expected, f"{path}: {actual!r} != {expected!r}"


class _Case:
    """The ``testcase`` argument of torch's TensorTracker."""

    def assertEqual(self, actual, expected, **kwargs):
        torch.testing.assert_close(actual, expected, **kwargs)

    def assertGreater(self, a, b, msg=None):
        assert a > b, msg

    def assertTrue(self, x, msg=None):
        assert x, msg


# ---- errors ----------------------------------------------------------------------------------------


@optims
def test_errors(optim_info):
    cls = optim_info.optim_cls
    for error_input in optim_info.optim_error_inputs_func(device=DEVICE, dtype=torch.float32):
        optim_input = error_input.optimizer_error_input
        params = optim_input.params
        if params is None:  # torch's error inputs pass None for "any parameters"
            params = [Parameter(torch.randn(2, 2))]
        expect = (
            pytest.warns(error_input.error_type, match=error_input.error_regex)
            if issubclass(error_input.error_type, Warning)
            else pytest.raises(error_input.error_type, match=error_input.error_regex)
        )
        if error_input.error_on == OptimizerErrorEnum.CONSTRUCTION_ERROR:
            with expect:
                cls(params, **optim_input.kwargs)
        else:
            opt = cls(params, **optim_input.kwargs)
            before = [p.detach().clone() for p in params if p.device.type != "meta"]
            with expect:
                opt.step()
            # nothing changed: no state, the parameters as they were
            assert not any(opt.state[p] for p in params)
            after = [p.detach() for p in params if p.device.type != "meta"]
            assert all(torch.equal(a, b) for a, b in zip(before, after, strict=True))


@optims
def test_fused_error_on_params_on_meta(optim_info):
    """As torch's: a model built on the meta device errors at its first fused step (and nothing
    changes), and the optimizer goes on once the model is materialized."""
    with torch.device("meta"):
        model = torch.nn.Sequential(torch.nn.Linear(2, 3), torch.nn.Sigmoid(), torch.nn.Linear(3, 1))
    opt = optim_info.optim_cls(model.parameters(), fused=True)
    with torch.device("meta"):
        for p in model.parameters():
            p.grad = torch.rand_like(p)
    with pytest.raises(
        RuntimeError, match="`fused=True` requires all the params to be floating point Tensors"
    ):
        opt.step()
    opt.zero_grad(set_to_none=True)
    model.to_empty(device=DEVICE)
    for p in model.parameters():
        p.grad = torch.rand_like(p)
    opt.step()  # (to_empty made new parameters: the optimizer's meta ones have no gradient now)


@optims
def test_fused_none_takes_every_dtype(optim_info):
    """fused=None (the default) is never an error: float64 takes the best path there is."""
    p = Parameter(torch.randn(3, dtype=torch.float64))
    p.grad = torch.ones_like(p)
    optim_info.optim_cls([p]).step()
    assert optim_info.optim_cls([p]).defaults["fused"] is None


# ---- the update goes the right way --------------------------------------------------------------


def _weight_bias(contiguous: bool, dtype=torch.float32):
    if contiguous:
        return Parameter(torch.randn(10, 5, dtype=dtype)), Parameter(torch.randn(10, dtype=dtype))
    return Parameter(torch.randn(10, 5, 2, dtype=dtype)[..., 0]), Parameter(
        torch.randn(10, 2, dtype=dtype)[..., 0]
    )


def _train(optimizer, schedulers, weight, bias, inpt, steps=20):
    """``steps`` steps on ``(weight @ inpt + bias)^2`` with the LR schedulers; (first, last) loss."""
    closure = functools.partial(_fwd_bwd, optimizer, weight, bias, inpt)
    initial = closure().item()
    for _ in range(steps):
        loss = optimizer.step(closure)
        for scheduler in schedulers:
            scheduler.step(loss) if isinstance(scheduler, ReduceLROnPlateau) else scheduler.step()
    return initial, closure().item()


@pytest.mark.parametrize("contiguous", [True, False])
@pytest.mark.parametrize("with_lrsched", [True, False])
@optims
def test_forloop_goes_right_direction(optim_info, contiguous, with_lrsched):
    torch.manual_seed(0)
    schedulers_constructors = optim_info.scheduler_inputs if with_lrsched else [None]
    for schedulers_constructor in schedulers_constructors:
        for optim_input in all_inputs(optim_info):
            weight, bias = _weight_bias(contiguous)
            inpt = torch.randn(5)
            optimizer = optim_info.optim_cls([weight, bias], **optim_input.kwargs)
            schedulers = [s(optimizer) for s in (schedulers_constructor or [])]
            initial, final = _train(optimizer, schedulers, weight, bias, inpt)
            if optim_input.kwargs.get("maximize", False):
                assert final > initial, optim_input.desc
            else:
                assert final < initial, optim_input.desc


@optims
def test_param_group_with_lrscheduler_goes_right_direction(optim_info):
    torch.manual_seed(0)
    for schedulers_c in optim_info.scheduler_inputs:
        weight, bias = _weight_bias(True)
        inpt = torch.randn(5)
        optimizer = optim_info.optim_cls([{"params": [weight]}, {"params": [bias], "lr": 0.01}])
        schedulers = [scheduler_c(optimizer) for scheduler_c in schedulers_c]
        initial, final = _train(optimizer, schedulers, weight, bias, inpt)
        assert final < initial


@optims
def test_tensor_lr(optim_info):
    """A 0-d tensor lr computes what the same float lr does, on every path (torch's tolerance)."""
    torch.manual_seed(0)
    for optim_input in all_inputs(optim_info):
        weight, bias = _weight_bias(True)
        weight_c, bias_c = (Parameter(x.detach().clone()) for x in (weight, bias))
        inpt = torch.randn(5)
        kwargs = optim_input.kwargs
        kwargs["lr"] = 1e-3
        optimizer_r = optim_info.optim_cls([weight, bias], **kwargs)
        kwargs["lr"] = torch.tensor(1e-3)
        optimizer = optim_info.optim_cls([weight_c, bias_c], **kwargs)
        for _ in range(5):
            for opt, w, b in ((optimizer_r, weight, bias), (optimizer, weight_c, bias_c)):
                opt.zero_grad()
                (w.mv(inpt) + b).pow(2).sum().backward()
                opt.step()
            # (a float32 tensor holds 1e-3 to float32 precision: not the same number as the float)
            torch.testing.assert_close(weight, weight_c)
            torch.testing.assert_close(bias, bias_c)


# ---- complex parameters -------------------------------------------------------------------------


def _rosenbrock(tensor):
    x, y = tensor
    return (1 - x) ** 2 + 100 * (y - x**2) ** 2


@optims
def test_complex(optim_info):
    """A complex parameter steps as its real view, bit for bit (a real one mixed in)."""
    torch.manual_seed(0)
    for optim_input in all_inputs(optim_info):
        complex_params = [
            torch.randn(10, 5, dtype=torch.complex64, requires_grad=True),
            torch.randn(10, dtype=torch.complex64, requires_grad=True),
            torch.randn(10, 5, dtype=torch.float32, requires_grad=True),
        ]
        real_params = [
            (torch.view_as_real(p) if p.is_complex() else p).detach().clone().requires_grad_()
            for p in complex_params
        ]
        complex_opt = optim_info.optim_cls(complex_params, **optim_input.kwargs)
        real_opt = optim_info.optim_cls(real_params, **optim_input.kwargs)
        for _ in range(3):
            for p, q in zip(complex_params, real_params, strict=True):
                q.grad = torch.randn_like(q)
                p.grad = torch.view_as_complex(q.grad.clone()) if p.is_complex() else q.grad.clone()
            real_opt.step()
            complex_opt.step()
        for p, q in zip(complex_params, real_params, strict=True):
            as_real = torch.view_as_real(p) if p.is_complex() else p
            torch.testing.assert_close(as_real, q, rtol=0, atol=0, msg=optim_input.desc)


@optims
def test_complex_2d(optim_info):
    """A complex pair steps as its real and imaginary parts as two real parameters (torch's
    convention), with torch's TensorTracker keeping the two runs' inputs aligned step by step."""
    check = _Case()
    for optim_input in all_inputs(optim_info):
        for seed in range(2):
            torch.manual_seed(seed)
            a1 = torch.randn(2, dtype=torch.complex64, requires_grad=True)
            a1_real = a1.real.detach().clone().requires_grad_()
            a1_imag = a1.imag.detach().clone().requires_grad_()
            optim1 = optim_info.optim_cls([a1], **optim_input.kwargs)
            optim2 = optim_info.optim_cls([a1_real, a1_imag], **optim_input.kwargs)
            reals, imags, grad_reals, grad_imags, losses = (TensorTracker() for _ in range(5))
            for _ in range(10):
                optim1.zero_grad()
                loss = _rosenbrock(a1).abs()
                loss.backward()
                for tracker, value in zip(
                    (reals, imags, grad_reals, grad_imags, losses),
                    (a1.real, a1.imag, a1.grad.real, a1.grad.imag, loss),
                    strict=True,
                ):
                    tracker.add(value)
                optim2.zero_grad()
                reals.pop_check_set(a1_real, check)
                imags.pop_check_set(a1_imag, check)
                loss2 = _rosenbrock(torch.complex(a1_real, a1_imag)).abs()
                losses.pop_check_set(loss2, check)
                loss2.backward()
                grad_reals.pop_check_set(a1_real.grad, check)
                grad_imags.pop_check_set(a1_imag.grad, check)
                optim1.step()
                optim2.step()
                torch.testing.assert_close(a1.real, a1_real, msg=f"{optim_input.desc}, seed {seed}")
                torch.testing.assert_close(a1.imag, a1_imag, msg=f"{optim_input.desc}, seed {seed}")


# ---- foreach and fused against the for-loop -----------------------------------------------------


def _compare_between(inpt, models, optimizers, assert_eq_kwargs=None):
    """torch's ``TestOptimRenewed._compare_between``: 7 steps of both, a layer frozen for two of them
    and one step without gradients; parameters and state compared (and resynchronized) each step."""
    tracker = TensorTracker(assert_eq_kwargs or {})
    check = _Case()
    for i in range(7):
        for model, optimizer in zip(models, optimizers, strict=True):
            optimizer.zero_grad()
            if i == 3:
                model[2].requires_grad_(False)
            if i == 5:
                model[2].requires_grad_(True)
            if i != 2:
                model(inpt).sum().backward()
            optimizer.step()
        for og_p, new_p in zip(models[0].parameters(), models[1].parameters(), strict=True):
            tracker.add(og_p)
            tracker.pop_check_set(new_p, check)
            og_state, new_state = optimizers[0].state[og_p], optimizers[1].state[new_p]
            assert og_state.keys() == new_state.keys()
            for key in og_state:
                tracker.add(og_state[key])
                tracker.pop_check_set(new_state[key], check)
    assert tracker.all_popped()


def _derived(optim_info, flag, dtype):
    for optim_input in optim_info.optim_inputs_func(device=DEVICE, dtype=dtype):
        models, optimizers = [], []
        kwargs = deepcopy(optim_input.kwargs)
        for flag_value in (False, True):
            kwargs[flag] = flag_value
            inpt = torch.tensor([0.1, 0.2, 0.3, 0.4, 0.5, 0.6], dtype=dtype).reshape(3, 2)
            torch.manual_seed(1)
            model = torch.nn.Sequential(
                torch.nn.Linear(2, 3), torch.nn.Sigmoid(), torch.nn.Linear(3, 1), torch.nn.Sigmoid()
            ).to(dtype)
            # a 0-d parameter last (pytorch/pytorch#100701)
            empty_param = torch.empty((), dtype=dtype, requires_grad=True)
            empty_param.grad = torch.rand_like(empty_param)
            models.append(model)
            optimizers.append(optim_info.optim_cls([*model.parameters(), empty_param], **deepcopy(kwargs)))
        _compare_between(inpt, models, optimizers)


@optims
def test_foreach_matches_forloop(optim_info):
    _derived(optim_info, "foreach", torch.float64)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@optims
def test_fused_matches_forloop(optim_info, dtype):
    _derived(optim_info, "fused", dtype)


# ---- param groups ---------------------------------------------------------------------------------


@optims
def test_param_groups_weight_decay(optim_info):
    torch.manual_seed(0)
    for optim_input in all_inputs(optim_info):
        weight_kwargs = optim_input.kwargs
        bias_kwargs = {**deepcopy(weight_kwargs), "weight_decay": 0.0}
        weight, bias = _weight_bias(True)
        inpt = torch.randn(5)
        optimizer = optim_info.optim_cls(
            [dict(params=[weight], **weight_kwargs), dict(params=[bias], **bias_kwargs)]
        )
        initial = (weight.mv(inpt) + bias).pow(2).sum().item()
        for _ in range(20):
            optimizer.zero_grad()
            loss = (weight.mv(inpt) + bias).pow(2).sum()
            loss.backward()
            optimizer.step()
        if weight_kwargs.get("maximize", False):
            assert loss.item() > initial
        else:
            assert loss.item() < initial


@optims
def test_param_groups_lr(optim_info):
    """A group's own lr overrides the optimizer's: the group at lr 1e-28 does not move."""
    torch.manual_seed(0)
    for optim_input in all_inputs(optim_info):
        if not optim_input.kwargs.get("lr"):
            optim_input.kwargs["lr"] = 1e-3
        weight, bias = _weight_bias(True)
        irrelevant = Parameter(torch.randn(2))
        irrelevant_clone = irrelevant.detach().clone()
        inpt = torch.randn(5)
        optimizer = optim_info.optim_cls(
            [dict(params=[weight, bias], **optim_input.kwargs), dict(params=[irrelevant])], lr=1e-28
        )
        initial = (weight.mv(inpt) + bias).pow(2).sum().item()
        for _ in range(20):
            optimizer.zero_grad()
            loss = (weight.mv(inpt) + bias).pow(2).sum()
            loss.backward()
            irrelevant.grad = torch.rand_like(irrelevant)
            optimizer.step()
        if optim_input.kwargs.get("maximize", False):
            assert loss.item() > initial
        else:
            assert loss.item() < initial
        torch.testing.assert_close(irrelevant.detach(), irrelevant_clone)


# ---- no-op steps ----------------------------------------------------------------------------------


@optims
def test_step_is_noop_when_params_have_no_grad(optim_info):
    params = [torch.randn(2, 3) for _ in range(2)]
    old = [p.clone() for p in params]
    for optim_input in all_inputs(optim_info):
        optimizer = optim_info.optim_cls(params, **optim_input.kwargs)
        assert optimizer.step(lambda: torch.tensor([1.0])).item() == 1.0
        assert all(torch.equal(p, q) for p, q in zip(params, old, strict=True)) and not optimizer.state


@optims
def test_step_is_noop_for_zero_grads(optim_info):
    param = torch.randn((5, 1), requires_grad=True)
    old = param.detach().clone()
    for optim_input in all_inputs(optim_info):
        if optim_input.kwargs.get("weight_decay", 0) != 0:
            continue  # decay moves the parameters whatever the gradient
        optimizer = optim_info.optim_cls([param], **optim_input.kwargs)
        param.grad = torch.zeros_like(param)
        optimizer.step()
        torch.testing.assert_close(param.detach(), old, rtol=0, atol=0, msg=optim_input.desc)


@optims
def test_optimizer_can_be_printed(optim_info):
    params = [Parameter(torch.randn(2, 3)) for _ in range(2)]
    for optim_input in all_inputs(optim_info):
        text = repr(optim_info.optim_cls(params, **optim_input.kwargs))
        assert text.startswith(optim_info.name) and "lr" in text


@optims
def test_non_empty_state(optim_info):
    model = torch.nn.Linear(5, 5)
    for optim_input in optim_info.optim_inputs_func(device=DEVICE):
        optim = optim_info.optim_cls(model.parameters(), **optim_input.kwargs)
        optim.zero_grad()
        model(torch.rand(2, 5)).sum().backward()
        optim.step()
        assert optim.state and all(len(state) > 0 for state in optim.state.values())


# ---- state dicts ----------------------------------------------------------------------------------


def _named(params, is_named):
    return [(f"name{i}", p) for i, p in enumerate(params)] if is_named else params


def _without_param_names(state_dict):
    state_dict = deepcopy(state_dict)
    for group in state_dict["param_groups"]:
        group.pop("param_names", None)
    return state_dict


def _fwd_bwd(optim, w, b, i):
    optim.zero_grad()
    loss = (w.mv(i) + b).pow(2).sum()
    loss.backward()
    return loss


@pytest.mark.parametrize("is_named_optim0", [True, False])
@pytest.mark.parametrize("is_named_optim1", [True, False])
@optims
def test_state_dict_deterministic(optim_info, is_named_optim0, is_named_optim1):
    torch.manual_seed(0)
    weight = Parameter(torch.randn(2, 3))
    bias = Parameter(torch.randn(2))
    inpt = torch.randn(3)
    for optim_input in all_inputs(optim_info):
        optimizer = optim_info.optim_cls(_named([weight, bias], is_named_optim0), **optim_input.kwargs)
        for _ in range(5):
            _fwd_bwd(optimizer, weight, bias, inpt)
            optimizer.step()
        with torch.no_grad():
            weight_c, bias_c = Parameter(weight.clone()), Parameter(bias.clone())
        optimizer_c = optim_info.optim_cls(_named([weight_c, bias_c], is_named_optim1), **optim_input.kwargs)
        optimizer_c.load_state_dict(deepcopy(optimizer.state_dict()))
        for _ in range(5):
            _fwd_bwd(optimizer, weight, bias, inpt)
            _fwd_bwd(optimizer_c, weight_c, bias_c, inpt)
            optimizer.step()
            optimizer_c.step()
            torch.testing.assert_close(weight, weight_c, rtol=0, atol=0)
            torch.testing.assert_close(bias, bias_c, rtol=0, atol=0)
        assert_equal(
            _without_param_names(optimizer.state_dict()), _without_param_names(optimizer_c.state_dict())
        )
        # repeated parameter groups are represented identically (pytorch/pytorch#36831)
        optimizer_c.param_groups.extend(optimizer_c.param_groups)
        assert_equal(
            _without_param_names(optimizer.state_dict())["param_groups"][-1],
            _without_param_names(optimizer_c.state_dict())["param_groups"][-1],
        )


def _conv_model():
    torch.manual_seed(1)
    return torch.nn.Sequential(
        torch.nn.Conv2d(4, 2, 1, stride=2), torch.nn.BatchNorm2d(2, eps=1e-05, momentum=0.1)
    )


@optims
def test_can_load_older_state_dict(optim_info):
    """A state dict without the options added since (and without the "longmem" format entry, as
    saved before it existed) loads, steps, and continues exactly as the optimizer it came from."""
    for optim_input in all_inputs(optim_info):
        model, inpt = _conv_model(), torch.rand(1, 4, 16, 16)
        optimizer = optim_info.optim_cls(model.parameters(), **optim_input.kwargs)

        def fwd_bwd(optimizer, model=model, inpt=inpt):
            optimizer.zero_grad()
            model(inpt).sum().backward()

        for _ in range(3):
            fwd_bwd(optimizer)
            optimizer.step()
        old = deepcopy(optimizer.state_dict())
        old.pop("longmem")
        for group in old["param_groups"]:
            for flag in optim_info.not_og_supported_flags:
                group.pop(flag, None)
        twin_model = _conv_model()
        twin_model.load_state_dict(model.state_dict())
        twin = optim_info.optim_cls(twin_model.parameters(), **optim_input.kwargs)
        twin.load_state_dict(old)
        optimizer.load_state_dict(old)
        for _ in range(2):
            fwd_bwd(optimizer)
            optimizer.step()
            fwd_bwd(twin, twin_model)
            twin.step()
        for p, q in zip(model.parameters(), twin_model.parameters(), strict=True):
            torch.testing.assert_close(p, q, rtol=0, atol=0)


@pytest.mark.parametrize("is_named_optim0", [True, False])
@pytest.mark.parametrize("is_named_optim1", [True, False])
@optims
def test_can_load_from_to_named_state_dict(optim_info, is_named_optim0, is_named_optim1):
    for optim_input in all_inputs(optim_info, skip=("fused",)):
        model, inpt = _conv_model(), torch.rand(1, 4, 16, 16)
        params = model.named_parameters() if is_named_optim0 else model.parameters()
        optimizer = optim_info.optim_cls(params, **optim_input.kwargs)
        for _ in range(3):
            optimizer.zero_grad()
            model(inpt).sum().backward()
            optimizer.step()
        old = deepcopy(optimizer.state_dict())
        params2 = model.named_parameters() if is_named_optim1 else model.parameters()
        optimizer2 = optim_info.optim_cls(params2, **optim_input.kwargs)
        optimizer2.load_state_dict(old)
        optimizer2.zero_grad()
        model(inpt).sum().backward()
        optimizer2.step()
        if is_named_optim0 or is_named_optim1:
            names = optimizer2.state_dict()["param_groups"][0]["param_names"]
            assert names == ["0.weight", "0.bias", "1.weight", "1.bias"]


@optims
def test_save_load_equality_with_weights_only(optim_info):
    """A saved state dict loads back equal, also with ``torch.load(weights_only=True)`` (no pickled
    Python objects beyond what torch allows), and a run resumed from it continues exactly."""
    torch.manual_seed(0)
    weight, bias = Parameter(torch.randn(2, 3)), Parameter(torch.randn(2))
    inpt = torch.randn(3)
    for optim_input in all_inputs(optim_info):
        optimizer = optim_info.optim_cls([weight, bias], **optim_input.kwargs)
        closure = functools.partial(_fwd_bwd, optimizer, weight, bias, inpt)
        for _ in range(3):
            optimizer.step(closure)
        sd = optimizer.state_dict()
        with tempfile.TemporaryFile() as f:
            torch.save(sd, f)
            f.seek(0)
            assert_equal(torch.load(f), sd)
            f.seek(0)
            sd_wo = torch.load(f, weights_only=True)
        assert_equal(sd_wo, sd)
        with torch.no_grad():
            weight_c, bias_c = Parameter(weight.clone()), Parameter(bias.clone())
        resumed = optim_info.optim_cls([weight_c, bias_c], **optim_input.kwargs)
        resumed.load_state_dict(sd_wo)
        optimizer.step(closure)
        resumed.step(functools.partial(_fwd_bwd, resumed, weight_c, bias_c, inpt))
        torch.testing.assert_close(weight_c, weight, rtol=0, atol=0)


def _stepped(optim_info, optim_input, params, steps=3):
    """The optimizer of ``optim_input`` after ``steps`` steps on the gradients ``params`` hold."""
    optimizer = optim_info.optim_cls(params, **optim_input.kwargs)
    for _ in range(steps):
        optimizer.step()
    return optimizer


def _params_with_grads():
    params = [Parameter(torch.randn(2, 3)) for _ in range(2)]
    for p in params:
        p.grad = torch.rand_like(p)
    return params


@optims
def test_load_nontensor_step(optim_info):
    """Steps saved as Python numbers (torch < 1.12) load as the 0-d float32 tensors the optimizer keeps."""
    params = _params_with_grads()
    for optim_input in all_inputs(optim_info):
        optimizer = _stepped(optim_info, optim_input, params)
        state_dict = deepcopy(optimizer.state_dict())
        for p_state in state_dict["state"].values():
            p_state["step"] = p_state["step"].item()
        optimizer.load_state_dict(state_dict)
        optimizer.step()
        for p in params:
            step = optimizer.state[p]["step"]
            assert step.dtype == torch.float32 and step.dim() == 0 and step.item() == 4


# ---- hooks ----------------------------------------------------------------------------------------


def _state_dict_pre_hook(optimizer):
    optimizer.state["test"] = 1


def _state_dict_post_hook(optimizer, state_dict):
    if "test" in state_dict["state"]:
        state_dict["state"].pop("test")
        state_dict["ran_state_dict_pre_hook"] = True
    else:
        state_dict["ran_state_dict_pre_hook"] = False
    return state_dict


def _load_state_dict_pre_hook1(optimizer, state_dict):
    state_dict["param_groups"][0]["lr"] = 0.002


def _load_state_dict_pre_hook2(optimizer, state_dict):
    my_state_dict = deepcopy(state_dict)
    my_state_dict["param_groups"][0]["lr"] = 0.003
    return my_state_dict


def _load_state_dict_post_hook(optimizer):
    optimizer.state["ran_load_state_dict_pre_hook2"] = optimizer.param_groups[0]["lr"] == 0.003
    optimizer.state["ran_load_state_dict_post_hook"] = True


@optims
def test_state_dict_hooks(optim_info):
    for optim_input in all_inputs(optim_info):
        param = torch.rand(2, 3, requires_grad=True)
        optim = optim_info.optim_cls([param], **optim_input.kwargs)
        optim.register_state_dict_pre_hook(_state_dict_pre_hook)
        assert optim.state_dict()["state"]["test"] == 1
        optim.register_state_dict_post_hook(_state_dict_post_hook)
        state_dict = optim.state_dict()
        assert "test" not in state_dict["state"] and state_dict["ran_state_dict_pre_hook"]
        plain = optim_info.optim_cls([param], **optim_input.kwargs)
        plain.register_state_dict_post_hook(_state_dict_post_hook)
        assert not plain.state_dict()["ran_state_dict_pre_hook"]


@optims
def test_load_state_dict_hooks(optim_info):
    for optim_input in all_inputs(optim_info):
        param = torch.rand(2, 3, requires_grad=True)
        optim = optim_info.optim_cls([param], **optim_input.kwargs)
        state_dict = optim.state_dict()
        optim.register_load_state_dict_pre_hook(_load_state_dict_pre_hook1)
        optim.load_state_dict(state_dict)
        assert optim.param_groups[0]["lr"] == 0.002
        optim.register_load_state_dict_pre_hook(_load_state_dict_pre_hook2, prepend=True)
        optim.load_state_dict(state_dict)
        assert optim.param_groups[0]["lr"] == 0.002  # prepended: the other hook has the last word

        optim = optim_info.optim_cls([param], **optim_input.kwargs)
        optim.register_load_state_dict_post_hook(_load_state_dict_post_hook)
        optim.load_state_dict(optim.state_dict())
        assert (
            not optim.state["ran_load_state_dict_pre_hook2"] and optim.state["ran_load_state_dict_post_hook"]
        )

        optim = optim_info.optim_cls([param], **optim_input.kwargs)
        optim.register_load_state_dict_pre_hook(_load_state_dict_pre_hook2)
        optim.register_load_state_dict_post_hook(_load_state_dict_post_hook)
        optim.load_state_dict(optim.state_dict())
        assert optim.state["ran_load_state_dict_pre_hook2"] and optim.state["ran_load_state_dict_post_hook"]
        # non-parameter entries in the state (as these hooks leave) survive a save and a load
        optim.load_state_dict(optim.state_dict())
        param.grad = torch.ones_like(param)
        optim.step()


@optims
def test_step_hooks(optim_info):
    data: list[int] = []
    params = [torch.tensor([1.0, 1.0])]
    for optim_input in all_inputs(optim_info):
        optim = optim_info.optim_cls(params, **optim_input.kwargs)
        optim2 = SGD(params)
        data.clear()
        handles = [
            register_optimizer_step_pre_hook(lambda *_: data.append(0)),
            register_optimizer_step_post_hook(lambda *_: data.append(5)),
            optim.register_step_pre_hook(lambda *_: data.append(1)),
            optim.register_step_post_hook(lambda *_: data.append(2)),
            optim2.register_step_pre_hook(lambda *_: data.append(1)),
            optim2.register_step_post_hook(lambda *_: data.append(2)),
        ]
        optim.step()
        assert data == [0, 1, 2, 5]
        optim2.step()
        optim.step()
        assert data == [0, 1, 2, 5] * 3
        for handle in handles:
            handle.remove()
        optim.step()
        optim2.step()
        assert data == [0, 1, 2, 5] * 3


@optims
def test_deepcopy_copies_all_public_attrs(optim_info):
    params = _params_with_grads()
    for optim_input in all_inputs(optim_info):
        optimizer = _stepped(optim_info, optim_input, params)

        def public(obj):
            return {k for k in obj.__dict__ if not k.startswith("_")}

        copy = deepcopy(optimizer)
        assert public(optimizer) == public(copy)
        assert copy.skipped_steps == optimizer.skipped_steps
        for p, q in zip(optimizer.param_groups[0]["params"], copy.param_groups[0]["params"], strict=True):
            assert_equal(copy.state[q], optimizer.state[p])
