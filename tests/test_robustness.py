"""Bad numbers and bad files: the ``nonfinite`` option (with GradScaler), extreme values against the
float64 reference, state-dict format versions, corrupt checkpoint files, malformed state dicts."""

from __future__ import annotations

import copy
import importlib.util
import io
import json
import os
import pickle
import re
import struct
import warnings
import zipfile
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import longmem
import reference as ref
from longmem import _nonfinite, checkpoint, kernels
from longmem._base import FORMAT_KEY, FORMAT_VERSION

NAMES = ["AdEMAMix", "SimplifiedAdEMAMix", "AdaMod", "DiffGrad", "DiffMod"]
PATHS = ["single", "foreach", "fused"]
F64 = torch.float64
NAN, INF = float("nan"), float("inf")


def _make(name, params, path="single", **kw):
    kw.setdefault("lr", 1e-2)
    if path == "fused":
        return getattr(longmem, name)(_fused_where_possible(params), **kw)
    return getattr(longmem, name)(params, foreach=path == "foreach", **kw)


def _fused_where_possible(params):
    """Parameter groups with fused=True where the kernels take every parameter, else None (an
    explicit fused=True raises on a float64 one)."""
    params = list(params)
    groups = [dict(g) for g in params] if params and isinstance(params[0], dict) else [{"params": params}]
    for group in groups:
        tensors = [p[1] if isinstance(p, tuple) else p for p in group["params"]]
        group["fused"] = True if all(p.dtype in kernels.FUSED_DTYPES for p in tensors) else None
    return groups


def _snapshot(params, opt):
    return [p.detach().clone() for p in params], copy.deepcopy(opt.state_dict())


def _assert_same(a, b):
    """Equal nested state dicts / lists (tensors bitwise, NaN equal to NaN)."""
    if isinstance(a, dict):
        assert isinstance(b, dict) and set(a) == set(b), (sorted(a), sorted(b))
        for key in a:
            _assert_same(a[key], b[key])
    elif isinstance(a, (list, tuple)):
        assert type(a) is type(b) and len(a) == len(b)
        for x, y in zip(a, b, strict=True):
            _assert_same(x, y)
    elif torch.is_tensor(a):
        assert torch.is_tensor(b) and a.dtype == b.dtype and a.shape == b.shape
        assert torch.equal(a, b) or (
            (a.isnan() == b.isnan()).all() and torch.equal(a.nan_to_num(), b.nan_to_num())
        )
    else:
        assert a == b or (a != a and b != b), (a, b)


def _assert_unchanged(params, opt, snap):
    before_params, before_sd = snap
    for p, q in zip(params, before_params, strict=True):
        assert torch.equal(p.detach(), q)
    _assert_same(opt.state_dict(), before_sd)


# ============================================================================ nonfinite


def _named_groups(dtype=torch.float32, seed=0):
    """Two groups of named parameters: a matrix, a vector, a 0-d, an empty and a complex tensor."""
    gen = torch.Generator().manual_seed(seed)

    def param(shape, dt=dtype):
        base = torch.complex128 if dt.is_complex else F64
        return torch.nn.Parameter(torch.randn(shape, generator=gen, dtype=base).to(dt))

    named = [
        ("enc.weight", param((3, 2))),
        ("enc.bias", param((4,), F64)),
        ("scale", param(())),
        ("empty", param((0,))),
        ("rot", param((2,), torch.complex64)),
    ]
    groups = [{"params": named[:2]}, {"params": named[2:], "lr": 5e-3}]
    return [p for _, p in named], groups


def _set_grads(params, seed):
    gen = torch.Generator().manual_seed(seed)
    for p in params:
        base = torch.complex128 if p.is_complex() else F64
        p.grad = torch.randn(p.shape, generator=gen, dtype=base).to(p.dtype)


POISONS = {"nan": NAN, "+inf": INF, "-inf": -INF}


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize(("where", "poison"), [(0, "nan"), (1, "+inf"), (2, "-inf"), (4, "nan")])
def test_skip_leaves_everything_untouched(name, path, where, poison):
    """A poisoned gradient anywhere skips the whole step; the next steps are those of a run that never
    saw it."""
    params, groups = _named_groups()
    opt = _make(name, groups, path, nonfinite="skip")
    twin_params, twin_groups = _named_groups()
    twin = _make(name, twin_groups, path, nonfinite="skip")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a fused fallback warning where no compiler exists
        for seed in range(2):
            _set_grads(params, seed)
            _set_grads(twin_params, seed)
            opt.step()
            twin.step()
        snap = _snapshot(params, opt)
        _set_grads(params, 10)
        g = params[where].grad
        g.view(-1)[-1] = complex(POISONS[poison], 0) if g.is_complex() else POISONS[poison]
        opt.step()
        _assert_unchanged(params, opt, snap)
        assert opt.skipped_steps == 1 and twin.skipped_steps == 0
        for seed in (2, 3):
            _set_grads(params, seed)
            _set_grads(twin_params, seed)
            opt.step()
            twin.step()
    for p, q in zip(params, twin_params, strict=True):
        assert torch.equal(p.detach(), q.detach())
    assert all(float(s["step"]) == 4 for s in opt.state.values())


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("path", ["single", "fused"])
def test_raise_names_the_parameter_and_changes_nothing(name, path):
    params, groups = _named_groups()
    opt = _make(name, groups, path, nonfinite="raise")
    _set_grads(params, 0)
    opt.step()
    snap = _snapshot(params, opt)
    _set_grads(params, 1)
    params[2].grad.fill_(INF)  # "scale", 0-d, group 1
    params[4].grad[1] = complex(NAN, 0)  # "rot", also bad: counted, not named
    with pytest.raises(longmem.NonFiniteGradientError) as info:
        opt.step()
    message = str(info.value)
    assert f"{name}.step" in message and "'scale'" in message and "group 1, index 0" in message
    assert "0 NaN and 1 Inf" in message and "1 more parameter" in message
    _assert_unchanged(params, opt, snap)
    assert isinstance(info.value, RuntimeError)


def test_raise_without_names_gives_group_index_and_shape():
    a, b = torch.nn.Parameter(torch.zeros(2)), torch.nn.Parameter(torch.zeros(3, 5))
    opt = longmem.AdEMAMix([{"params": [a]}, {"params": [b]}], nonfinite="raise")
    a.grad, b.grad = torch.zeros(2), torch.zeros(3, 5)
    b.grad[2, 4] = NAN
    with pytest.raises(longmem.NonFiniteGradientError, match=r"group 1, index 0, shape \(3, 5\)"):
        opt.step()
    assert not opt.state


@pytest.mark.parametrize("name", NAMES)
def test_ignore_is_the_default_and_checks_nothing(name):
    p = torch.nn.Parameter(torch.ones(3))
    opt = getattr(longmem, name)([p])
    assert opt.param_groups[0]["nonfinite"] == "ignore" == opt.defaults["nonfinite"]
    p.grad = torch.tensor([1.0, NAN, 1.0])
    opt.step()
    assert p.detach().isnan()[1] and float(opt.state[p]["step"]) == 1 and opt.skipped_steps == 0


def test_modes_per_group():
    """Only groups whose mode is not "ignore" are checked; a bad one among them skips every group."""
    a, b = torch.nn.Parameter(torch.ones(2)), torch.nn.Parameter(torch.ones(2))
    opt = longmem.AdaMod([{"params": [a], "nonfinite": "ignore"}, {"params": [b]}], nonfinite="skip")
    a.grad, b.grad = torch.tensor([NAN, 1.0]), torch.ones(2)
    opt.step()  # the NaN is in the unchecked group: the step is taken
    assert opt.skipped_steps == 0 and a.detach().isnan()[0] and float(opt.state[b]["step"]) == 1
    a.grad, b.grad = torch.ones(2), torch.tensor([1.0, INF])
    opt.step()  # the Inf is in the checked group: nothing moves, not even the "ignore" group
    assert opt.skipped_steps == 1 and float(opt.state[a]["step"]) == 1 == float(opt.state[b]["step"])
    raising = longmem.AdaMod([{"params": [a]}, {"params": [b], "nonfinite": "skip"}], nonfinite="raise")
    a.grad, b.grad = torch.ones(2), torch.tensor([1.0, INF])
    raising.step()  # a bad gradient in a "skip" group skips; the finite "raise" group does not raise
    assert raising.skipped_steps == 1 and not raising.state


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("value", ["Skip", "", None, True, 1, ("skip",)])
def test_nonfinite_validation(name, value):
    p = torch.nn.Parameter(torch.ones(2))
    with pytest.raises(ValueError, match=r"nonfinite must be one of 'skip', 'raise', 'ignore'"):
        getattr(longmem, name)([p], nonfinite=value)
    opt = getattr(longmem, name)([p])
    with pytest.raises(ValueError, match="nonfinite"):
        opt.add_param_group({"params": [torch.nn.Parameter(torch.ones(1))], "nonfinite": value})
    assert len(opt.param_groups) == 1


def test_closure_loss_returned_when_skipped_and_sparse_still_refused():
    p = torch.nn.Parameter(torch.ones(3))
    opt = longmem.AdEMAMix([p], nonfinite="skip")

    def closure():
        p.grad = torch.full((3,), NAN)
        return 7.0

    assert opt.step(closure) == 7.0 and opt.skipped_steps == 1 and not opt.state
    e = torch.nn.Embedding(4, 2, sparse=True)
    opt = longmem.AdEMAMix(e.parameters(), nonfinite="skip")
    e(torch.tensor([1])).sum().backward()
    with pytest.raises(RuntimeError, match="sparse"):
        opt.step()


@pytest.mark.parametrize("small", [0, 3, _nonfinite.SMALL])
def test_one_host_synchronization_per_step(monkeypatch, small):
    """The check reads all gradients and synchronizes once, however many tensors there are, whichever
    kernel (multi-tensor, per-tensor sums, both) reads them."""
    monkeypatch.setattr(_nonfinite, "SMALL", small)
    params = [torch.nn.Parameter(torch.randn(5)) for _ in range(40)] + [
        torch.nn.Parameter(torch.randn((), dtype=F64))
    ]
    for p in params:
        p.grad = torch.randn_like(p)
    groups = [{"params": params[:20]}, {"params": params[20:], "nonfinite": "raise"}]
    opt = longmem.AdEMAMix(groups, nonfinite="skip")
    calls = {"item": 0, "bool": 0}
    item, to_bool = torch.Tensor.item, torch.Tensor.__bool__

    def counted(kind, fn):
        def wrapper(self, *args):
            calls[kind] += 1
            return fn(self, *args)

        return wrapper

    monkeypatch.setattr(torch.Tensor, "item", counted("item", item))
    monkeypatch.setattr(torch.Tensor, "__bool__", counted("bool", to_bool))
    assert _nonfinite.grads_are_finite("AdEMAMix", opt.param_groups)
    assert calls == {"item": 1, "bool": 0}


@pytest.mark.parametrize("check", [_nonfinite._found_minmax, _nonfinite._found_sum, _nonfinite._found_amp])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, F64])
def test_check_kernels(check, dtype):
    """Both checks find NaN and +-Inf anywhere, never flag the largest finite values, and leave the
    gradients exactly as they were."""
    big = torch.finfo(dtype).max
    clean = [
        torch.tensor([big, -big, 0.0, -0.0, torch.finfo(dtype).tiny], dtype=dtype),
        torch.tensor(1.0, dtype=dtype),
        torch.randn(3, 70).to(dtype),
    ]
    kept = [g.clone() for g in clean]
    assert float(check(clean)) == 0.0
    for g, k in zip(clean, kept, strict=True):
        assert torch.equal(g, k)
    for value in (NAN, INF, -INF):
        for i in range(len(clean)):
            grads = [g.clone() for g in clean]
            grads[i].view(-1)[-1] = value
            assert float(check(grads)) == 1.0, (value, i)
    mixed = [torch.ones(2, dtype=torch.float16), torch.tensor([1e300, NAN], dtype=F64)]
    assert float(check(mixed)) == 1.0


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, F64])
def test_overflowing_sums_are_confirmed_not_skipped(dtype, monkeypatch):
    """The CPU check sums each large gradient; finite gradients whose sum overflows are flagged by the
    sum, then cleared by the exact confirmation: nothing is skipped. A real Inf beside them still is."""
    monkeypatch.setattr(_nonfinite, "SMALL", 0)  # every gradient is "large": summed
    big = torch.finfo(dtype).max
    p = torch.nn.Parameter(torch.zeros(4, dtype=dtype))
    opt = longmem.AdEMAMix([p], lr=1e-3, nonfinite="skip")
    p.grad = torch.full((4,), big, dtype=dtype)
    assert float(_nonfinite._found_sum([p.grad])) == 1.0  # the sum overflows ...
    assert float(_nonfinite._found_minmax([p.grad])) == 0.0  # ... though every element is finite
    opt.step()
    assert opt.skipped_steps == 0 and float(opt.state[p]["step"]) == 1
    p.grad = torch.tensor([big, big, -big, INF], dtype=dtype)
    opt.step()
    assert opt.skipped_steps == 1 and float(opt.state[p]["step"]) == 1


def test_noncontiguous_and_expanded_gradients_are_checked_read_only():
    """Gradients that are views (transposed, expanded: elements sharing memory) are checked without
    writing to them."""
    a, b = torch.nn.Parameter(torch.zeros(3, 4)), torch.nn.Parameter(torch.zeros(5))
    opt = longmem.DiffGrad([a, b], nonfinite="skip")
    a.grad = torch.randn(4, 3).t()
    b.grad = torch.tensor(2.0).expand(5)
    opt.step()
    assert opt.skipped_steps == 0
    b.grad = torch.tensor(NAN).expand(5)
    opt.step()
    assert opt.skipped_steps == 1 and float(opt.state[a]["step"]) == 1


@pytest.mark.parametrize("mode", ["skip", "raise", "ignore"])
@pytest.mark.parametrize("name", ["AdEMAMix", "AdaMod"])
def test_gradscaler_skips_once(name, mode):
    """GradScaler finds the Inf and does not call step(): the step is skipped once, by the scaler,
    whatever ``nonfinite`` says; the run matches one that never had that iteration."""
    gen = torch.Generator().manual_seed(0)
    xs, ys = torch.randn(6, 8, 4, generator=gen), torch.randn(6, 8, 2, generator=gen)

    def model():
        torch.manual_seed(0)
        return torch.nn.Linear(4, 2)

    scaled, plain = model(), model()
    opt = getattr(longmem, name)(scaled.parameters(), lr=1e-2, nonfinite=mode)
    ref_opt = getattr(longmem, name)(plain.parameters(), lr=1e-2)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    for t in range(6):
        opt.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = scaled(xs[t])
        loss = (out.float() - ys[t]).square().mean()
        scaler.scale(loss).backward()
        if t == 2:
            scaled.weight.grad[0, 1] = INF
        scaler.step(opt)
        scaler.update()
        if t == 2:
            assert scaler.get_scale() == 2.0**9
            continue
        ref_opt.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = plain(xs[t])
        (out.float() - ys[t]).square().mean().backward()
        ref_opt.step()
    assert opt.skipped_steps == 0
    for p, q in zip(scaled.parameters(), plain.parameters(), strict=True):
        assert float(opt.state[p]["step"]) == 5
        assert torch.equal(p.detach(), q.detach())


def _fsdp2_rank(rank, port, out):
    """One rank of test_fsdp2_ranks_skip_together: rank 1 alone sees a NaN in its shard at step 2."""
    import torch.distributed as dist
    from torch.distributed.fsdp import fully_shard

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.Tanh(), torch.nn.Linear(6, 2))
        fully_shard(model)
        opt = longmem.AdEMAMix(model.parameters(), lr=1e-2, nonfinite="skip")
        x = torch.randn(3, 4, generator=torch.Generator().manual_seed(rank))
        for t in range(3):
            opt.zero_grad()
            model(x).square().sum().backward()
            if t == 1 and rank == 1:
                with torch.no_grad():
                    model[0].weight.grad.to_local().view(-1)[0] = NAN
            opt.step()
        steps = sorted({float(s["step"]) for s in opt.state.values()})
        for group in opt.param_groups:
            group["nonfinite"] = "raise"
        opt.zero_grad()
        model(x).square().sum().backward()
        if rank == 0:
            with torch.no_grad():
                model[2].bias.grad.to_local().view(-1)[0] = INF
        try:
            opt.step()
            raised = ""
        except longmem.NonFiniteGradientError as err:
            raised = str(err)
        result = {"skipped": opt.skipped_steps, "steps": steps, "raised": raised}
        torch.save(result, Path(out) / f"{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_fsdp2_ranks_skip_together(tmp_path):
    """Under FSDP2 the verdict is all-reduced: a NaN in one rank's shard skips the step on every rank
    (no rank steps alone, none waits in a collective the other never enters); under "raise" every
    rank raises."""
    import socket

    import torch.distributed as dist
    import torch.multiprocessing as mp

    if not (dist.is_available() and dist.is_gloo_available()):
        pytest.skip("torch.distributed with gloo is not available")
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    ctx = mp.start_processes(
        _fsdp2_rank, args=(port, str(tmp_path)), nprocs=2, join=False, start_method="spawn"
    )
    for _ in range(300):  # seconds
        if ctx.join(timeout=1):
            break
    else:
        for process in ctx.processes:
            process.kill()
        pytest.fail("the 2-process job did not finish in 300 s")
    for rank in (0, 1):
        got = torch.load(tmp_path / f"{rank}.pt", weights_only=True)
        assert {k: got[k] for k in ("skipped", "steps")} == {"skipped": 1, "steps": [2.0]}, (rank, got)
        # nonfinite="raise": both ranks raise, the one holding the Inf with its details
        assert ("0 NaN and 1 Inf" in got["raised"]) == (rank == 0), (rank, got["raised"])
        assert "another rank" in got["raised"] or rank == 0, (rank, got["raised"])


def test_state_dict_keeps_nonfinite():
    p = torch.nn.Parameter(torch.ones(2))
    opt = longmem.DiffGrad([{"params": [p], "nonfinite": "raise"}], nonfinite="skip")
    p.grad = torch.ones(2)
    opt.step()
    sd = opt.state_dict()
    assert sd["param_groups"][0]["nonfinite"] == "raise"
    other = longmem.DiffGrad([torch.nn.Parameter(torch.ones(2))])
    other.load_state_dict(sd)
    assert other.param_groups[0]["nonfinite"] == "raise"
    del sd["param_groups"][0]["nonfinite"]  # as saved before the option existed
    other = longmem.DiffGrad([torch.nn.Parameter(torch.ones(2))], nonfinite="skip")
    other.load_state_dict(sd)
    assert other.param_groups[0]["nonfinite"] == "skip"  # the optimizer's own choice stays
    sd["param_groups"][0]["nonfinite"] = "never"
    with pytest.raises(ValueError, match="nonfinite"):
        other.load_state_dict(sd)


# ============================================================================ extreme values

EXTREME_STEPS = 2000


def _extreme_grads(t, big, tiny, dtype):
    """One gradient per element: zero throughout, huge, tiny, alternating huge, zero until the last
    steps, switching huge/tiny every 100 steps, alternating tiny, a few ones then zero forever."""
    last = t > EXTREME_STEPS - 5
    return torch.tensor(
        [
            0.0,
            big,
            tiny,
            big * (-1) ** t,
            1.0 if last else 0.0,
            tiny if (t // 100) % 2 else big,
            tiny * (-1) ** t,
            1.0 if t <= 5 else 0.0,
        ],
        dtype=dtype,
    )


#: per optimizer, the hyperparameters of each parameter group (one group per configuration)
EXTREME_GROUPS = {
    "AdEMAMix": [
        dict(),
        dict(eps=0.0),
        dict(lr=0.0),
        dict(lr=0.0, eps=0.0),
        dict(alpha=1e20),
        dict(betas=(0.0, 0.999, 0.9999), alpha_warmup=100, beta3_warmup=100, weight_decay=0.1, eps=0.0),
    ],
    "SimplifiedAdEMAMix": [
        dict(lr=1e-4),
        dict(lr=1e-4, eps=0.0),
        dict(lr=0.0, eps=0.0),
        dict(lr=1e-4, alpha=1e20, bias_correction1=True, beta1_warmup=50),
    ],
    "AdaMod": [dict(), dict(eps=0.0), dict(lr=0.0, eps=0.0), dict(beta3=0.0, eps=0.0, weight_decay=0.1)],
    "DiffGrad": [dict(), dict(eps=0.0), dict(lr=0.0, eps=0.0, weight_decay=0.1)],
    "DiffMod": [dict(), dict(eps=0.0), dict(lr=0.0, eps=0.0), dict(len_memory=1, weight_decay=0.1)],
}


def _kind(x):
    """0 finite, 1 NaN, 2 +Inf, -2 -Inf, elementwise."""
    return torch.where(x.isnan(), 1, torch.where(x.isinf(), 2 * torch.sign(x).to(torch.int64), 0))


def _compare_extreme(where, got, want, close):
    got = got.to(F64)
    assert torch.equal(_kind(got), _kind(want)), f"{where}: got {got.tolist()}, formula {want.tolist()}"
    if close is not None:
        fin = want.isfinite()
        torch.testing.assert_close(got[fin], want[fin], **close, msg=lambda m: f"{where}: {m}")


def _run_extreme(name, dtype, paths, big, tiny, close):
    configs = EXTREME_GROUPS[name]
    p0 = torch.linspace(-1.0, 1.0, 8, dtype=F64)
    runs = []
    for path in paths:
        params = [torch.nn.Parameter(p0.to(dtype).clone()) for _ in configs]
        groups = [{"params": [p], **{"lr": 1e-3, **hp}} for p, hp in zip(params, configs, strict=True)]
        runs.append((path, params, _make(name, groups, path)))
    init, step = ref.REFERENCE[name]
    want = [p0.to(dtype).to(F64) for _ in configs]
    states = [init(w) for w in want]
    for t in range(1, EXTREME_STEPS + 1):
        g = _extreme_grads(t, big, tiny, dtype)
        for _path, params, opt in runs:
            for p in params:
                p.grad = g.clone()
            opt.step()
        for k, hp in enumerate(configs):
            want[k] = step(want[k], g.to(F64), states[k], **{"lr": 1e-3, **hp})
        if t % 500 and t != EXTREME_STEPS:
            continue
        for path, params, opt in runs:
            for k, (p, hp) in enumerate(zip(params, configs, strict=True)):
                where = f"{name} {path} {hp} t={t}"
                tol = close if hp.get("eps", 1.0) != 0.0 or dtype == F64 else None
                _compare_extreme(where, p.detach(), want[k], tol)
                for key, buf in opt.state[p].items():
                    if key in states[k] and key != "step" and torch.is_tensor(states[k][key]):
                        _compare_extreme(f"{where} {key}", buf, states[k][key], tol)


@pytest.mark.parametrize("name", NAMES)
def test_extreme_values_float64(name):
    """Gradients of 1e30, 1e-30, 0 for thousands of steps, eps = 0, lr = 0, alpha = 1e20: NaN and Inf
    exactly where the float64 formula has them, the formula's values elsewhere."""
    _run_extreme(name, F64, ["single", "foreach"], 1e30, 1e-30, dict(rtol=1e-9, atol=1e-300))


@pytest.mark.parametrize("name", NAMES)
def test_extreme_values_float32(name):
    """The same in float32, on every path, with gradients of 1e15 and 1e-15 (whose squares float32
    holds; 1e30 squared is Inf in float32: see docs/robustness.md). With eps = 0 only the pattern
    of NaN and Inf is compared: float32's subnormals end nu's decay earlier than float64's."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _run_extreme(name, torch.float32, PATHS, 1e15, 1e-15, dict(rtol=2e-4, atol=1e-5))


# ============================================================================ state dict format


def _stepped(name, seed=0, path="single", **kw):
    gen = torch.Generator().manual_seed(seed)
    params = [torch.nn.Parameter(torch.randn(s, generator=gen)) for s in ((4, 3), (5,))]
    opt = _make(name, params, path, **kw)
    for _ in range(2):
        for p in params:
            p.grad = torch.randn(p.shape, generator=gen)
        opt.step()
    return params, opt


def _check_rejected(name, bad, match=None):
    """Loading ``bad`` raises ValueError, changes nothing, and the optimizer steps on as its twin."""
    params, opt = _stepped(name)
    snap = _snapshot(params, opt)
    with pytest.raises(ValueError, match=match):
        opt.load_state_dict(bad)
    _assert_unchanged(params, opt, snap)
    twin_params, twin = _stepped(name)
    for p, q in zip(params, twin_params, strict=True):
        p.grad = torch.ones_like(p)
        q.grad = torch.ones_like(q)
    opt.step()
    twin.step()
    for p, q in zip(params, twin_params, strict=True):
        assert torch.equal(p.detach(), q.detach())


@pytest.mark.parametrize("name", NAMES)
def test_state_dict_has_format(name):
    _, opt = _stepped(name)
    sd = opt.state_dict()
    assert sd[FORMAT_KEY] == {"format": FORMAT_VERSION, "optimizer": name}
    assert FORMAT_VERSION == 1

    class Custom(getattr(longmem, name)):
        pass

    params, custom = _stepped(name)
    assert Custom(params).state_dict()[FORMAT_KEY]["optimizer"] == name
    custom.load_state_dict(sd)


@pytest.mark.parametrize("target", NAMES)
@pytest.mark.parametrize("source", NAMES)
def test_other_optimizers_state_dict_names_both(target, source):
    if target == source:
        pytest.skip("same optimizer")
    _, other = _stepped(source, seed=1)
    _check_rejected(
        target, other.state_dict(), match=rf"saved by longmem\.{source}, not by longmem\.{target}"
    )


@pytest.mark.parametrize(
    ("meta", "match"),
    [
        ({"format": FORMAT_VERSION + 1, "optimizer": "AdEMAMix"}, "newer longmem.*Upgrade"),
        ({"format": 99, "optimizer": "AdaMod"}, "newer longmem"),
        ({"format": "1", "optimizer": "AdEMAMix"}, "malformed"),
        ({"format": True, "optimizer": "AdEMAMix"}, "malformed"),
        ({"format": 0, "optimizer": "AdEMAMix"}, "malformed"),
        ({"format": 1}, "malformed"),
        ("v1", "malformed"),
        ([1], "malformed"),
    ],
)
def test_format_entry_checked(meta, match):
    _, other = _stepped("AdEMAMix", seed=1)
    sd = other.state_dict()
    sd[FORMAT_KEY] = meta
    _check_rejected("AdEMAMix", sd, match=match)


def _format0_module():
    path = Path(__file__).parent / "data" / "format0" / "make_format0.py"
    spec = importlib.util.spec_from_file_location("make_format0", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module, path.parent


@pytest.mark.parametrize("name", NAMES)
def test_format0_files_keep_loading(name):
    """State dicts written by longmem before formats existed (tests/data/format0) load and resume as
    an uninterrupted run of today's code."""
    make, folder = _format0_module()
    saved = checkpoint.load(folder / f"{name}.pt")
    assert FORMAT_KEY not in saved["optimizer"] and "nonfinite" not in saved["optimizer"]["param_groups"][0]
    straight = make.params()
    straight_opt = make.make(name, straight)
    resumed = [torch.nn.Parameter(p.clone()) for p in saved["params"]]
    resumed_opt = make.make(name, resumed)
    resumed_opt.param_groups[0]["nonfinite"] = "skip"
    resumed_opt.load_state_dict(saved["optimizer"])
    assert [g["nonfinite"] for g in resumed_opt.param_groups] == ["skip", "ignore"]
    for t in range(6):
        for ps in [straight] if t < 3 else [straight, resumed]:
            for p, g in zip(ps, make.grads(t), strict=True):
                p.grad = g
        straight_opt.step()
        if t == 2:
            for p, q in zip(straight, resumed, strict=True):
                torch.testing.assert_close(p.detach(), q.detach(), rtol=1e-13, atol=0)
        if t >= 3:
            resumed_opt.step()
    for p, q in zip(straight, resumed, strict=True):
        torch.testing.assert_close(q.detach(), p.detach(), rtol=1e-13, atol=0)
    assert resumed_opt.state_dict()[FORMAT_KEY]["format"] == FORMAT_VERSION


@pytest.mark.parametrize("name", NAMES)
def test_format0_variants_load(name):
    """Without the format entry, with torch-style extra keys, or with steps kept as Python numbers or
    shape-(1,) tensors (older torch), a state dict loads; steps come back as 0-d float32 tensors."""
    params, opt = _stepped(name)
    _, other = _stepped(name, seed=1)
    sd = other.state_dict()
    del sd[FORMAT_KEY]
    sd["step"] = 12  # e.g. PostLocalSGDOptimizer's own entry
    sd["state"][0]["step"] = 2
    sd["state"][1]["step"] = torch.tensor([2.0])
    if "num_sum" in sd["state"][0]:
        sd["state"][0]["num_sum"] = float(sd["state"][0]["num_sum"])
    opt.load_state_dict(sd)
    for p in params:
        for key in ("step", "num_sum"):
            if key in opt.state[p]:
                value = opt.state[p][key]
                assert value.dim() == 0 and value.dtype == (torch.float32 if key == "step" else F64)
        p.grad = torch.ones_like(p)
    opt.step()
    assert all(float(opt.state[p]["step"]) == 3 for p in params)


# ============================================================================ malformed state dicts


def _mutations(name):
    """(description, function editing a state dict in place or returning a replacement)."""
    buffer = {"AdEMAMix": "exp_avg_slow", "SimplifiedAdEMAMix": "exp_avg"}.get(name, "exp_avg_sq")

    def group(key, value):
        return lambda sd: sd["param_groups"][0].__setitem__(key, value)

    def entry(key, value, pid=0):
        return lambda sd: sd["state"][pid].__setitem__(key, value)

    out = [
        ("not a dict", lambda sd: None),
        ("a list", lambda sd: [sd]),
        ("a string", lambda sd: "state"),
        ("state is a list", lambda sd: sd.__setitem__("state", [])),
        ("state is None", lambda sd: sd.__setitem__("state", None)),
        ("param_groups is a dict", lambda sd: sd.__setitem__("param_groups", {})),
        ("param_groups is a string", lambda sd: sd.__setitem__("param_groups", "groups")),
        ("a group is a string", lambda sd: sd["param_groups"].__setitem__(0, "group")),
        ("a group without params", lambda sd: sd["param_groups"][0].pop("params")),
        ("params is a number", group("params", 3)),
        ("params unhashable", group("params", [[0], [1]])),
        ("params repeated", group("params", [0, 0])),
        ("params too few", group("params", [0])),
        ("no groups", lambda sd: sd.__setitem__("param_groups", [])),
        ("lr a string", group("lr", "fast")),
        ("lr NaN", group("lr", NAN)),
        ("lr negative", group("lr", -1.0)),
        ("lr a 2-element tensor", group("lr", torch.ones(2))),
        ("lr None", group("lr", None)),
        ("betas a tensor", group("betas", torch.tensor([0.9, 0.99]))),
        ("betas short", group("betas", (0.9,))),
        ("beta 1", group("betas", (1.0, 0.999, 0.999)[: 3 if name == "AdEMAMix" else 2])),
        ("eps None", group("eps", None)),
        ("eps inf", group("eps", INF)),
        ("weight_decay a list", group("weight_decay", [0.1])),
        ("nonfinite unknown", group("nonfinite", "sometimes")),
        ("foreach a string", group("foreach", "yes")),
        ("maximize 1", group("maximize", 1)),
        ("fused a string", group("fused", "yes")),
        ("entry a list", lambda sd: sd["state"].__setitem__(0, [1, 2])),
        ("step NaN", entry("step", torch.tensor(NAN))),
        ("step -1", entry("step", torch.tensor(-1.0))),
        ("step 1.5", entry("step", torch.tensor(1.5))),
        ("step inf", entry("step", INF)),
        ("step a string", entry("step", "3")),
        ("step True", entry("step", True)),
        ("step 2 elements", entry("step", torch.ones(2))),
        ("step None", entry("step", None)),
        ("buffer a list", lambda sd: sd["state"][0].__setitem__(buffer, sd["state"][0][buffer].tolist())),
        ("buffer wrong shape", entry(buffer, torch.zeros(5))),
        ("buffer transposed", entry(buffer, torch.zeros(3, 4))),
        ("buffer int", entry(buffer, torch.zeros(4, 3, dtype=torch.int64))),
        ("buffer bool", entry(buffer, torch.zeros(4, 3, dtype=torch.bool))),
        ("buffer complex", entry(buffer, torch.zeros(4, 3, dtype=torch.complex64))),
        ("buffer None", entry(buffer, None)),
        ("unknown key", entry("momentum_buffer", torch.zeros(4, 3))),
        ("missing buffer", lambda sd: sd["state"][1].pop(buffer)),
    ]
    if name == "SimplifiedAdEMAMix":
        out += [
            ("num_sum a string", entry("num_sum", "x")),
            ("num_sum NaN", entry("num_sum", torch.tensor(NAN))),
            ("num_sum negative", entry("num_sum", -1.0)),
            ("num_sum 3 elements", entry("num_sum", torch.ones(3))),
        ]
    if name == "DiffMod":
        out += [("len_memory 0.5", group("len_memory", 0.5)), ("beta3 2", group("beta3", 2.0))]
    if name == "AdEMAMix":
        out += [
            ("alpha NaN", group("alpha", NAN)),
            ("warmup 0", group("alpha_warmup", 0)),
            ("warmup 2.5", group("beta3_warmup", 2.5)),
        ]
    return out


@pytest.mark.parametrize("name", NAMES)
def test_malformed_state_dicts_are_refused(name):
    """Wrong types, NaN or negative steps, tensors where numbers belong, lists where tensors belong:
    a clear ValueError, the optimizer as it was."""
    for description, mutate in _mutations(name):
        _, other = _stepped(name, seed=1)
        sd = copy.deepcopy(other.state_dict())
        replaced = mutate(sd)
        bad = replaced if description in ("not a dict", "a list", "a string") else sd
        try:
            _check_rejected(name, bad)
        except BaseException as err:
            raise AssertionError(f"{name}: {description}: {err!r}") from err


_JUNK = st.sampled_from(
    [
        None,
        "x",
        True,
        -1,
        0,
        3,
        1.5,
        NAN,
        INF,
        -INF,
        [],
        {},
        (0.9,),
        [0],
        torch.tensor(NAN),
        torch.tensor(-2.0),
        torch.ones(2),
        torch.zeros(4, 3),
        torch.zeros(5),
        torch.zeros(4, 3, dtype=torch.int32),
        torch.tensor([3.0]),
    ]
)


def _leaves(obj, path=()):
    if isinstance(obj, dict):
        for key, value in obj.items():
            yield (*path, key)
            yield from _leaves(value, (*path, key))
    elif isinstance(obj, (list, tuple)):
        for i, value in enumerate(obj):
            yield (*path, i)
            yield from _leaves(value, (*path, i))


def _replace(obj, path, value):
    if len(path) == 1:
        if isinstance(obj, tuple):
            return tuple(value if i == path[0] else v for i, v in enumerate(obj))
        obj[path[0]] = value
        return obj
    obj_child = _replace(obj[path[0]], path[1:], value)
    if isinstance(obj, tuple):
        return tuple(obj_child if i == path[0] else v for i, v in enumerate(obj))
    obj[path[0]] = obj_child
    return obj


@pytest.mark.parametrize("name", NAMES)
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_fuzzed_state_dicts_refused_or_usable(name, data):
    """Any one entry of a valid state dict replaced by junk: either a ValueError that changes nothing,
    or a state dict that loads and steps."""
    _, other = _stepped(name, seed=1)
    sd = copy.deepcopy(other.state_dict())
    paths = sorted(_leaves(sd), key=repr)
    path = data.draw(st.sampled_from(paths), label="path")
    sd = _replace(sd, path, data.draw(_JUNK, label="value"))
    params, opt = _stepped(name)
    snap = _snapshot(params, opt)
    try:
        opt.load_state_dict(sd)
    except ValueError:
        _assert_unchanged(params, opt, snap)
        return
    for p in params:
        p.grad = torch.ones_like(p)
    opt.step()  # whatever loaded must be usable
    opt.load_state_dict(opt.state_dict())


# ============================================================================ checkpoint files


def _payload(name="AdEMAMix"):
    params, opt = _stepped(name)
    return {"model": [p.detach() for p in params], "optimizer": opt.state_dict(), "epoch": 3}


def test_save_load_round_trip(tmp_path):
    path = tmp_path / "ckpt.pt"
    obj = _payload()
    checkpoint.save(path, obj)
    _assert_same(checkpoint.load(path), obj)
    _assert_same(torch.load(path, weights_only=True), obj)  # an ordinary torch.save file
    checkpoint.save(str(path), {"epoch": 4})  # replaces the old file
    assert checkpoint.load(path) == {"epoch": 4}
    assert sorted(os.listdir(tmp_path)) == ["ckpt.pt"]  # no temporary files left


def test_truncated_files_are_refused(tmp_path):
    path = tmp_path / "ckpt.pt"
    checkpoint.save(path, _payload())
    data = path.read_bytes()
    cut = tmp_path / "cut.pt"
    for size in sorted(
        {0, 1, 4, 30, 100, len(data) // 3, len(data) // 2, len(data) - 100, len(data) - 22, len(data) - 1}
    ):
        cut.write_bytes(data[:size])
        with pytest.raises(checkpoint.CheckpointError, match=r"cut\.pt") as info:
            checkpoint.load(cut)
        assert isinstance(info.value, ValueError)
        if size == 0:
            assert "empty" in str(info.value)


def test_bit_flips_are_refused_or_harmless(tmp_path):
    """A single flipped bit anywhere: either CheckpointError, or (a flip in a field no reader uses) the
    same contents. Flips inside tensor data are always caught (torch.load alone would not)."""
    path = tmp_path / "ckpt.pt"
    obj = _payload()
    checkpoint.save(path, obj)
    data = path.read_bytes()
    with zipfile.ZipFile(path) as archive:
        info = next(i for i in archive.infolist() if "/data/" in i.filename and i.file_size > 16)
    name_len, extra_len = struct.unpack("<HH", data[info.header_offset + 26 : info.header_offset + 30])
    start = info.header_offset + 30 + name_len + extra_len  # the record's first byte
    in_data = set(range(start, start + info.file_size, 3))
    flipped = tmp_path / "flipped.pt"
    caught = 0
    for offset in sorted(set(range(0, len(data), 11)) | in_data):
        bad = bytearray(data)
        bad[offset] ^= 1 << (offset % 8)
        flipped.write_bytes(bytes(bad))
        try:
            got = checkpoint.load(flipped)
        except checkpoint.CheckpointError as err:
            assert "flipped.pt" in str(err)
            caught += 1
            continue
        assert offset not in in_data, f"a flip at byte {offset} of tensor data went unnoticed"
        _assert_same(got, obj)
    assert caught > len(in_data)
    # torch.load by itself reads a flip in tensor data as a different number
    bad = bytearray(data)
    bad[start + 1] ^= 1
    flipped.write_bytes(bytes(bad))
    silently = torch.load(flipped, weights_only=True)
    with pytest.raises(AssertionError):
        _assert_same(silently, obj)


def test_wrong_files_are_refused(tmp_path):
    def write(name, data):
        path = tmp_path / name
        path.write_bytes(data)
        return path

    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr("notes.txt", "hello")
    legacy = io.BytesIO()
    torch.save({"a": 1}, legacy, _use_new_zipfile_serialization=False)
    files = [
        write("text.pt", b"this is not a checkpoint\n"),
        write("json.pt", json.dumps({"state": {}}).encode()),
        write("pickle.pt", pickle.dumps({"state": {}, "param_groups": []})),
        write("zip.pt", buffer.getvalue()),
        write("random.pt", bytes(range(256)) * 8),
        write("legacy.pt", legacy.getvalue()),
        tmp_path / "missing.pt",
        tmp_path,
    ]
    for path in files:
        with pytest.raises(checkpoint.CheckpointError, match=re.escape(path.name)):
            checkpoint.load(path)
    # a torch.save file with an arbitrary object: refused by weights_only loading, loadable when trusted
    exotic = tmp_path / "exotic.pt"
    checkpoint.save(exotic, {"when": __import__("datetime").date(2024, 1, 1)})
    with pytest.raises(checkpoint.CheckpointError, match=r"exotic\.pt"):
        checkpoint.load(exotic)
    assert checkpoint.load(exotic, weights_only=False)["when"].year == 2024


def test_valid_file_with_wrong_contents(tmp_path):
    path = tmp_path / "tensor.pt"
    checkpoint.save(path, torch.ones(3))
    _check_rejected("AdEMAMix", checkpoint.load(path))


def test_saved_file_has_the_umask_permissions(tmp_path):
    """As a file written by open() or torch.save: the temporary file is not left owner-only."""
    umask = os.umask(0o022)
    os.umask(umask)
    path = tmp_path / "ckpt.pt"
    checkpoint.save(path, {"epoch": 1})
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask


def test_interrupted_save_keeps_the_old_file(tmp_path, monkeypatch):
    path = tmp_path / "ckpt.pt"
    checkpoint.save(path, {"epoch": 1})

    def dies_halfway(obj, f):
        f.write(b"PK\x03\x04 partial")
        raise KeyboardInterrupt

    monkeypatch.setattr(checkpoint.torch, "save", dies_halfway)
    with pytest.raises(KeyboardInterrupt):
        checkpoint.save(path, {"epoch": 2})
    assert sorted(os.listdir(tmp_path)) == ["ckpt.pt"]
    assert checkpoint.load(path) == {"epoch": 1}
