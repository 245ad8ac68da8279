"""Code paths: foreach vs per-tensor, dtypes, complex, missing grads, closures, param groups, lr schedulers,
tensor lr, sparse gradients."""

from __future__ import annotations

import math

import pytest
import torch

import longmem
import reference as ref

F64 = torch.float64
NAMES = ["AdEMAMix", "SimplifiedAdEMAMix", "AdaMod", "DiffGrad", "DiffMod"]

PATH_CONFIGS = [
    ("AdEMAMix", dict(lr=1e-2)),
    ("AdEMAMix", dict(lr=1e-2, alpha=5.0, weight_decay=0.1, maximize=True)),
    ("AdEMAMix", dict(lr=1e-2, alpha=5.0, alpha_warmup=4, beta3_warmup=6)),
    (
        "AdEMAMix",
        dict(lr=1e-2, betas=(0.0, 0.999, 0.9999), alpha_warmup=3, beta3_warmup=20, weight_decay=0.01),
    ),
    ("SimplifiedAdEMAMix", dict(lr=1e-3)),
    ("SimplifiedAdEMAMix", dict(lr=1e-3, alpha=2.0, beta1_warmup=5, weight_decay=0.1)),
    (
        "SimplifiedAdEMAMix",
        dict(lr=1e-3, alpha=1.0, bias_correction1=True, bias_correction2=False, maximize=True),
    ),
    ("SimplifiedAdEMAMix", dict(lr=1e-3, betas=(0.0, 0.95), beta1_warmup=4)),
    ("AdaMod", dict(lr=1e-2)),
    ("AdaMod", dict(lr=1e-2, weight_decay=0.1, maximize=True)),
    ("AdaMod", dict(lr=1e-2, beta3=0.0, betas=(0.0, 0.99))),
    ("DiffGrad", dict(lr=1e-2)),
    ("DiffGrad", dict(lr=1e-2, weight_decay=0.1, maximize=True)),
    ("DiffGrad", dict(lr=1e-2, betas=(0.0, 0.99))),
    ("DiffMod", dict(lr=1e-2)),
    ("DiffMod", dict(lr=1e-2, len_memory=10, weight_decay=0.1, maximize=True)),
    ("DiffMod", dict(lr=1e-2, beta3=0.5, betas=(0.0, 0.9))),
]
CONFIG_IDS = [f"{n}-{'-'.join(f'{k}={v}' for k, v in hp.items())}" for n, hp in PATH_CONFIGS]

# (group, shape, dtype); the first group mixes dtypes, the second has its own lr / weight decay
PARAM_SPECS = [
    (0, (4, 3), torch.float32),
    (0, (5,), torch.float64),
    (0, (6,), torch.bfloat16),
    (0, (3,), torch.complex64),
    (0, (2, 2), torch.float16),
    (1, (2, 2), torch.float32),
    (1, (), torch.float64),
    (1, (3,), torch.float32),  # never gets a gradient
]
STEPS = 8


def _grad_is_none(t, k):
    return (k == 1 and t in (3, 4)) or (k == 5 and t == 1) or k == 7


def _build(name, hp, foreach, seed=0):
    gen = torch.Generator().manual_seed(seed)
    params = [
        torch.nn.Parameter(torch.randn(shape, generator=gen, dtype=torch.float64).to(dtype))
        if not dtype.is_complex
        else torch.nn.Parameter(torch.randn(shape, generator=gen, dtype=torch.complex128).to(dtype))
        for _, shape, dtype in PARAM_SPECS
    ]
    groups = [
        {"params": [p for p, (g, _, _) in zip(params, PARAM_SPECS, strict=True) if g == 0]},
        {
            "params": [p for p, (g, _, _) in zip(params, PARAM_SPECS, strict=True) if g == 1],
            "lr": hp["lr"] * 0.5,
            "weight_decay": 0.02,
        },
    ]
    opt = getattr(longmem, name)(groups, foreach=foreach, **hp)
    return params, opt


def _grads(seed=1):
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(STEPS):
        row = []
        for _, shape, dtype in PARAM_SPECS:
            base = torch.complex128 if dtype.is_complex else torch.float64
            row.append(torch.randn(shape, generator=gen, dtype=base).to(dtype))
        out.append(row)
    return out


def _run(name, hp, foreach):
    params, opt = _build(name, hp, foreach)
    grads = _grads()
    before = [p.detach().clone() for p in params]
    for t in range(1, STEPS + 1):
        for k, p in enumerate(params):
            p.grad = None if _grad_is_none(t, k) else grads[t - 1][k].clone()
        steps_before = {k: float(opt.state[p]["step"]) for k, p in enumerate(params) if p in opt.state}
        prev = [p.detach().clone() for p in params]
        opt.step()
        for k, p in enumerate(params):
            # no gradient: parameter untouched (even with weight decay), no step counted
            if _grad_is_none(t, k):
                assert torch.equal(p.detach(), prev[k]), (t, k)
                if k in steps_before:
                    assert float(opt.state[p]["step"]) == steps_before[k]
    return params, opt, before


@pytest.mark.parametrize(("name", "hp"), PATH_CONFIGS, ids=CONFIG_IDS)
def test_foreach_matches_single_tensor(name, hp):
    results = {fe: _run(name, hp, fe) for fe in (False, True, None)}
    base_params, base_opt, _ = results[False]
    for fe in (True, None):
        params, opt, _ = results[fe]
        for k, (a, b) in enumerate(zip(params, base_params, strict=True)):
            assert a.dtype == b.dtype == PARAM_SPECS[k][2]
            torch.testing.assert_close(a.detach(), b.detach(), msg=lambda m, k=k: f"param {k}: {m}")
            sa, sb = opt.state.get(a, {}), base_opt.state.get(b, {})
            assert set(sa) == set(sb), k
            for key in sa:
                torch.testing.assert_close(
                    torch.as_tensor(sa[key]),
                    torch.as_tensor(sb[key]),
                    msg=lambda m, k=k, key=key: f"param {k} state {key}: {m}",
                )


@pytest.mark.parametrize(("name", "hp"), PATH_CONFIGS, ids=CONFIG_IDS)
@pytest.mark.parametrize("foreach", [False, True])
def test_steps_dtypes_and_missing_grads(name, hp, foreach):
    params, opt, before = _run(name, hp, foreach)
    for k, p in enumerate(params):
        dtype = PARAM_SPECS[k][2]
        assert p.dtype == dtype
        expected_steps = sum(not _grad_is_none(t, k) for t in range(1, STEPS + 1))
        if expected_steps == 0:
            assert p not in opt.state or float(opt.state[p].get("step", 0)) == 0
            assert torch.equal(p.detach(), before[k])
            continue
        state = opt.state[p]
        step = state["step"]
        assert torch.is_tensor(step) and step.dim() == 0 and step.dtype == torch.float32
        assert step.device.type == "cpu"
        assert float(step) == expected_steps
        if dtype not in (torch.bfloat16, torch.float16):  # small steps may round away in 16 bits
            assert not torch.equal(p.detach(), before[k])
        want_state_dtype = torch.float32 if dtype in (torch.bfloat16, torch.float16) else dtype
        for key, value in state.items():
            if key == "step":
                continue
            if key == "num_sum":
                assert value.dim() == 0 and value.dtype == torch.float64
                continue
            assert value.shape == p.shape, key
            assert value.dtype == want_state_dtype, (key, value.dtype)
            assert torch.isfinite(torch.view_as_real(value) if value.is_complex() else value).all()


# --------------------------------------------------------------------------- low precision


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("foreach", [False, True])
def test_low_precision_state_is_fp32_ema(name, dtype, foreach):
    """State of a bf16/fp16 parameter is float32 and is the same EMA an fp32 parameter gets from the same
    gradients (wd = 0, gradients independent of the parameter)."""
    gen = torch.Generator().manual_seed(3)
    p0 = torch.randn(64, generator=gen).to(dtype)
    grads = [(0.5 + torch.randn(64, generator=gen)).to(dtype) for _ in range(200)]
    hp = {"AdEMAMix": dict(betas=(0.9, 0.999, 0.9999), alpha=5.0)}.get(name, {})
    low = torch.nn.Parameter(p0.clone())
    high = torch.nn.Parameter(p0.float())
    opt_low = getattr(longmem, name)([low], foreach=foreach, **hp)
    opt_high = getattr(longmem, name)([high], foreach=foreach, **hp)
    for g in grads:
        low.grad = g.clone()
        high.grad = g.float()
        opt_low.step()
        opt_high.step()
    assert low.dtype == dtype
    for key, value in opt_high.state[high].items():
        got = opt_low.state[low][key]
        if key in ("step", "num_sum"):
            assert float(got) == float(value)
            continue
        assert got.dtype == torch.float32, key
        torch.testing.assert_close(got, value, rtol=1e-5, atol=1e-7, msg=lambda m, key=key: f"{key}: {m}")
    assert torch.isfinite(low.detach()).all()


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("foreach", [False, True])
def test_low_precision_param_is_fp32_update_rounded_once(name, dtype, foreach):
    """Each step of a bf16/fp16 parameter equals the float32 step from the same parameter value and state,
    rounded once into the parameter's dtype (round to nearest, as ``Tensor.to``)."""
    gen = torch.Generator().manual_seed(5)
    hp = {"AdEMAMix": dict(alpha=5.0, alpha_warmup=4, beta3_warmup=4)}.get(name, {})
    low = torch.nn.Parameter(torch.randn(257, generator=gen).to(dtype))
    opt_low = getattr(longmem, name)([low], lr=3e-2, weight_decay=0.1, foreach=foreach, **hp)
    for _ in range(6):
        g = torch.randn(257, generator=gen).to(dtype)
        twin = torch.nn.Parameter(low.detach().float())
        opt_twin = getattr(longmem, name)([twin], lr=3e-2, weight_decay=0.1, foreach=foreach, **hp)
        if opt_low.state[low]:
            opt_twin.load_state_dict(opt_low.state_dict())
        low.grad, twin.grad = g.clone(), g.float()
        opt_low.step()
        opt_twin.step()
        assert low.dtype == dtype
        assert torch.equal(low.detach(), twin.detach().to(dtype))


# --------------------------------------------------------------------------- complex


@pytest.mark.parametrize(("name", "hp"), PATH_CONFIGS, ids=CONFIG_IDS)
@pytest.mark.parametrize("foreach", [False, True])
def test_complex_equals_real_pairs(name, hp, foreach):
    gen = torch.Generator().manual_seed(5)
    p0 = torch.randn(3, 2, generator=gen, dtype=torch.complex64)
    grads = [torch.randn(3, 2, generator=gen, dtype=torch.complex64) for _ in range(10)]
    pc = torch.nn.Parameter(p0.clone())
    pr = torch.nn.Parameter(torch.view_as_real(p0).clone())
    opt_c = getattr(longmem, name)([pc], foreach=foreach, **hp)
    opt_r = getattr(longmem, name)([pr], foreach=foreach, **hp)
    for g in grads:
        pc.grad = g.clone()
        pr.grad = torch.view_as_real(g).clone()
        opt_c.step()
        opt_r.step()
        assert pc.dtype == torch.complex64
        torch.testing.assert_close(torch.view_as_real(pc.detach()), pr.detach(), rtol=1e-6, atol=1e-7)
    for key, value in opt_r.state[pr].items():
        got = opt_c.state[pc][key]
        if key in ("step", "num_sum"):
            assert float(got) == float(value)
            continue
        assert got.is_complex(), key
        torch.testing.assert_close(torch.view_as_real(got), value, rtol=1e-6, atol=1e-7)


# --------------------------------------------------------------------------- closure, zero_grad, groups


def _quadratic_problem(seed=0):
    gen = torch.Generator().manual_seed(seed)
    a = torch.randn(10, 4, generator=gen, dtype=F64)
    b = torch.randn(10, generator=gen, dtype=F64)
    w0 = torch.randn(4, generator=gen, dtype=F64)
    return a, b, w0


@pytest.mark.parametrize("name", NAMES)
def test_closure(name):
    a, b, w0 = _quadratic_problem()
    w = torch.nn.Parameter(w0.clone())
    v = torch.nn.Parameter(w0.clone())
    opt_w = getattr(longmem, name)([w], lr=1e-2)
    opt_v = getattr(longmem, name)([v], lr=1e-2)
    calls = []

    def closure():
        calls.append(torch.is_grad_enabled())
        opt_w.zero_grad()
        loss = ((a @ w - b) ** 2).mean()
        loss.backward()
        return loss

    for _ in range(5):
        expected_loss = ((a @ w.detach() - b) ** 2).mean()
        with torch.no_grad():  # the closure must still run with gradients enabled
            loss = opt_w.step(closure)
        assert torch.is_tensor(loss) and torch.equal(loss.detach(), expected_loss)
        opt_v.zero_grad()
        ((a @ v - b) ** 2).mean().backward()
        assert opt_v.step() is None
        assert torch.equal(w.detach(), v.detach())
    assert calls == [True] * 5


@pytest.mark.parametrize("name", NAMES)
def test_zero_grad(name):
    p = torch.nn.Parameter(torch.randn(3))
    opt = getattr(longmem, name)([p])
    p.grad = torch.ones(3)
    opt.zero_grad(set_to_none=False)
    assert p.grad is not None and torch.equal(p.grad, torch.zeros(3))
    opt.zero_grad()
    assert p.grad is None
    opt.step()  # no gradient anywhere: nothing happens
    assert p not in opt.state or float(opt.state[p].get("step", 0)) == 0


DEFAULTS = {
    "AdEMAMix": dict(
        lr=1e-3,
        betas=(0.9, 0.999, 0.9999),
        alpha=2.0,
        beta3_warmup=None,
        alpha_warmup=None,
        eps=1e-8,
        weight_decay=0.0,
        maximize=False,
    ),
    "SimplifiedAdEMAMix": dict(
        lr=1e-4,
        betas=(0.99, 0.95),
        alpha=0.0,
        beta1_warmup=None,
        min_beta1=0.9,
        eps=1e-8,
        weight_decay=0.0,
        bias_correction1=False,
        bias_correction2=True,
        maximize=False,
    ),
    "AdaMod": dict(lr=1e-3, betas=(0.9, 0.999), beta3=0.999, eps=1e-8, weight_decay=0.0, maximize=False),
    "DiffGrad": dict(lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, maximize=False),
    "DiffMod": dict(lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, maximize=False),
}

GROUP_OVERRIDES = {
    "AdEMAMix": dict(lr=0.05, alpha=4.0, alpha_warmup=5, beta3_warmup=5, weight_decay=0.1),
    "SimplifiedAdEMAMix": dict(lr=0.01, alpha=1.0, min_beta1=0.5, bias_correction1=True),
    "AdaMod": dict(lr=0.05, beta3=0.9, weight_decay=0.1),
    "DiffGrad": dict(lr=0.05, weight_decay=0.1),
    "DiffMod": dict(lr=0.05, len_memory=5, weight_decay=0.1),
}


@pytest.mark.parametrize("name", NAMES)
def test_defaults_recorded_in_groups(name):
    p = torch.nn.Parameter(torch.randn(3))
    group = getattr(longmem, name)([p]).param_groups[0]
    for key, value in DEFAULTS[name].items():
        assert group[key] == value, key


@pytest.mark.parametrize("foreach", [False, True])
@pytest.mark.parametrize("name", NAMES)
def test_add_param_group_follows_reference(name, foreach):
    gen = torch.Generator().manual_seed(9)
    p0, q0 = torch.randn(4, generator=gen, dtype=F64), torch.randn(3, generator=gen, dtype=F64)
    grads = [
        (torch.randn(4, generator=gen, dtype=F64), torch.randn(3, generator=gen, dtype=F64))
        for _ in range(12)
    ]
    p, q = torch.nn.Parameter(p0.clone()), torch.nn.Parameter(q0.clone())
    base = dict(lr=0.02)
    opt = getattr(longmem, name)([p], foreach=foreach, **base)
    override = GROUP_OVERRIDES[name]
    opt.add_param_group({"params": [q], **override})
    assert len(opt.param_groups) == 2
    group = opt.param_groups[1]
    for key, value in DEFAULTS[name].items():  # defaults filled in, overrides kept
        assert group[key] == override.get(key, value), key
    for gp, gq in grads:
        p.grad, q.grad = gp.clone(), gq.clone()
        opt.step()
    want_p, _ = ref.run_reference(name, p0, lambda t, _p: grads[t - 1][0], len(grads), **base)
    want_q, _ = ref.run_reference(name, q0, lambda t, _p: grads[t - 1][1], len(grads), **override)
    torch.testing.assert_close(p.detach(), want_p[-1], rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(q.detach(), want_q[-1], rtol=1e-12, atol=1e-14)


# --------------------------------------------------------------------------- lr schedulers, tensor lr

SCHED_HP = {
    "AdEMAMix": dict(lr=1e-2, alpha=5.0, alpha_warmup=10, beta3_warmup=10, weight_decay=0.1),
    "SimplifiedAdEMAMix": dict(lr=1e-3, alpha=1.0, betas=(0.9, 0.99), weight_decay=0.1),
    "AdaMod": dict(lr=1e-2, weight_decay=0.1),
    "DiffGrad": dict(lr=1e-2, weight_decay=0.1),
    "DiffMod": dict(lr=1e-2, len_memory=10, weight_decay=0.1),
}


@pytest.mark.parametrize("sched", ["lambda", "cosine"])
@pytest.mark.parametrize("name", NAMES)
def test_lr_scheduler_drives_lr(name, sched):
    steps = 25
    hp = SCHED_HP[name]
    gen = torch.Generator().manual_seed(2)
    p0 = torch.randn(5, generator=gen, dtype=F64)
    grads = [torch.randn(5, generator=gen, dtype=F64) for _ in range(steps)]
    p = torch.nn.Parameter(p0.clone())
    opt = getattr(longmem, name)([p], **hp)
    if sched == "lambda":
        scheduler = torch.optim.lr_scheduler.LambdaLR(opt, lambda e: 1.0 / (1.0 + e))
        expected_lrs = [hp["lr"] / (1.0 + e) for e in range(steps)]
    else:
        scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=steps)
        expected_lrs = [hp["lr"] * (1 + math.cos(math.pi * e / steps)) / 2 for e in range(steps)]
    seen = []
    for g in grads:
        seen.append(float(opt.param_groups[0]["lr"]))
        p.grad = g.clone()
        opt.step()
        scheduler.step()
    assert seen == pytest.approx(expected_lrs, rel=1e-9, abs=1e-15)
    want, _ = ref.run_reference(name, p0, lambda t, _p: grads[t - 1], steps, lrs=seen, **hp)
    torch.testing.assert_close(p.detach(), want[-1], rtol=1e-12, atol=1e-14)
    # and the lr schedule really changed the trajectory
    const, _ = ref.run_reference(name, p0, lambda t, _p: grads[t - 1], steps, **hp)
    assert not torch.allclose(p.detach(), const[-1], rtol=1e-6, atol=0)


@pytest.mark.parametrize("foreach", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("name", NAMES)
def test_tensor_lr_matches_float(name, dtype, foreach):
    lr_tensor = torch.tensor(3e-3, dtype=dtype)
    gen = torch.Generator().manual_seed(4)
    p0 = torch.randn(6, generator=gen, dtype=dtype)
    grads = [torch.randn(6, generator=gen, dtype=dtype) for _ in range(10)]
    a, b = torch.nn.Parameter(p0.clone()), torch.nn.Parameter(p0.clone())
    opt_a = getattr(longmem, name)([a], lr=lr_tensor, weight_decay=0.1, foreach=foreach)
    opt_b = getattr(longmem, name)([b], lr=float(lr_tensor), weight_decay=0.1, foreach=foreach)
    for g in grads:
        a.grad, b.grad = g.clone(), g.clone()
        opt_a.step()
        opt_b.step()
    assert a.dtype == dtype
    torch.testing.assert_close(a.detach(), b.detach())
    assert not torch.equal(a.detach(), p0)


@pytest.mark.parametrize("foreach", [False, True])
@pytest.mark.parametrize("name", NAMES)
def test_sparse_gradient_raises(name, foreach):
    p = torch.nn.Parameter(torch.zeros(5, 3))
    opt = getattr(longmem, name)([p], foreach=foreach)
    p.grad = torch.sparse_coo_tensor(torch.tensor([[0, 2]]), torch.ones(2, 3), (5, 3), check_invariants=True)
    with pytest.raises(RuntimeError, match=r"(?i)sparse"):
        opt.step()
    assert torch.equal(p.detach(), torch.zeros(5, 3))


BLOCK_SPECS = [
    ((37, 29), torch.float32),
    ((500,), torch.bfloat16),
    ((300,), torch.complex64),
    ((40, 7), torch.float64),
]


def _run_blocks(name, hp, foreach, block, monkeypatch):
    """Eight steps on tensors larger than ``block``; the CPU paths then cut them into blocks."""
    monkeypatch.setattr(longmem._elementwise, "CPU_BLOCK_NUMEL", block)
    gen = torch.Generator().manual_seed(3)
    params = [
        torch.nn.Parameter(torch.randn(shape, generator=gen, dtype=dtype)) for shape, dtype in BLOCK_SPECS
    ]
    params.append(torch.nn.Parameter(torch.randn(30, 20, generator=gen).t()))  # not contiguous: whole
    opt = getattr(longmem, name)(params, foreach=foreach, **hp)
    for _ in range(STEPS):
        for p in params:
            p.grad = torch.randn(p.shape, generator=gen, dtype=p.dtype)
        opt.step()
    return params, opt


@pytest.mark.parametrize(("name", "hp"), PATH_CONFIGS, ids=CONFIG_IDS)
def test_cpu_blocks_compute_the_same_numbers(name, hp, monkeypatch):
    """Cutting large CPU tensors into cache-sized blocks (both paths) changes no bit of the result."""
    whole, _ = _run_blocks(name, hp, False, 10**9, monkeypatch)
    for foreach in (False, True):
        blocked, opt = _run_blocks(name, hp, foreach, 256, monkeypatch)
        for k, (a, b) in enumerate(zip(blocked, whole, strict=True)):
            assert torch.equal(a.detach(), b.detach()), (foreach, k)
            for key, buf in opt.state[a].items():  # low-precision parameters keep float32 state
                if buf.shape == a.shape:
                    assert buf.dtype == (a.dtype if a.dtype in (F64, torch.complex64) else torch.float32), key


def test_cpu_pieces_are_views_of_large_contiguous_tensors(monkeypatch):
    from longmem._elementwise import _pieces

    monkeypatch.setattr(longmem._elementwise, "CPU_BLOCK_NUMEL", 256)
    p, g, m = torch.zeros(1000), torch.ones(1000), torch.zeros(1000)
    pieces = _pieces(p, g, {"exp_avg": m})
    assert [piece[0].numel() for piece in pieces] == [256, 256, 256, 232]
    for piece in pieces:
        piece[2]["exp_avg"].add_(piece[1])  # a view: writes land in the state itself
    assert torch.equal(m, torch.ones(1000))
    assert len(_pieces(p.view(40, 25).t(), g.view(40, 25).t(), {"exp_avg": m.view(40, 25).t()})) == 1
    assert len(_pieces(torch.zeros(256), torch.zeros(256), {"exp_avg": torch.zeros(256)})) == 1
