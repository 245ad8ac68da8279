"""Analytic properties of the update rules (SPEC.md), checked against independent re-statements and
against torch.optim.AdamW."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

import longmem

F64 = torch.float64


def _grads(seed, steps, shape=(6,), scale=1.0):
    gen = torch.Generator().manual_seed(seed)
    return [scale * torch.randn(shape, generator=gen, dtype=F64) for _ in range(steps)]


class _Adam:
    """Adam with eps on the raw sqrt(v) and decoupled decay (SPEC's 'AdaMod with beta3 = 0')."""

    def __init__(self, p, lr, betas, eps, weight_decay=0.0):
        self.p, self.lr, self.betas, self.eps, self.wd = p.clone(), lr, betas, eps, weight_decay
        self.m = torch.zeros_like(p)
        self.v = torch.zeros_like(p)
        self.t = 0

    def step(self, g):
        b1, b2 = self.betas
        self.t += 1
        self.m = b1 * self.m + (1 - b1) * g
        self.v = b2 * self.v + (1 - b2) * g * g
        scale = self.lr * math.sqrt(1 - b2**self.t) / (1 - b1**self.t)
        self.p = self.p * (1 - self.lr * self.wd) - scale * self.m / (torch.sqrt(self.v) + self.eps)
        return self.p


# --------------------------------------------------------------------------- AdaMod


@pytest.mark.parametrize("foreach", [False, True])
@pytest.mark.parametrize(
    "hp",
    [
        dict(lr=1e-2),
        dict(lr=3e-2, betas=(0.8, 0.99), eps=1e-4),
        dict(lr=1e-2, weight_decay=0.1),
        dict(lr=1e-2, betas=(0.0, 0.9)),
    ],
)
def test_adamod_beta3_zero_is_adam(hp, foreach):
    p0 = torch.randn(6, generator=torch.Generator().manual_seed(0), dtype=F64)
    grads = _grads(1, 80)
    p = torch.nn.Parameter(p0.clone())
    opt = longmem.AdaMod([p], beta3=0.0, foreach=foreach, **hp)
    adam = _Adam(
        p0, hp["lr"], hp.get("betas", (0.9, 0.999)), hp.get("eps", 1e-8), hp.get("weight_decay", 0.0)
    )
    for t, g in enumerate(grads, 1):
        p.grad = g.clone()
        opt.step()
        want = adam.step(g)
        torch.testing.assert_close(p.detach(), want, rtol=1e-12, atol=1e-14, msg=lambda m, t=t: f"t={t}: {m}")


@pytest.mark.parametrize("weight_decay", [0.0, 0.05])
def test_adamod_beta3_zero_eps_zero_is_torch_adamw(weight_decay):
    """With eps = 0 the eps placement does not matter: AdaMod(beta3=0) is then exactly torch's AdamW."""
    p0 = torch.randn(5, 3, generator=torch.Generator().manual_seed(3), dtype=F64)
    grads = _grads(4, 60, shape=(5, 3))
    a = torch.nn.Parameter(p0.clone())
    b = torch.nn.Parameter(p0.clone())
    opt_a = longmem.AdaMod([a], lr=1e-2, beta3=0.0, eps=0.0, weight_decay=weight_decay)
    opt_b = torch.optim.AdamW([b], lr=1e-2, eps=0.0, weight_decay=weight_decay, foreach=False)
    for g in grads:
        a.grad, b.grad = g.clone(), g.clone()
        opt_a.step()
        opt_b.step()
        torch.testing.assert_close(a.detach(), b.detach(), rtol=1e-10, atol=1e-12)


_grad_seq = arrays(
    np.float64,
    st.tuples(st.integers(1, 40), st.just(4)),
    elements=st.floats(-1e3, 1e3, allow_nan=False, allow_infinity=False, allow_subnormal=False),
)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    grads=_grad_seq,
    beta3=st.sampled_from([0.0, 0.5, 0.9, 0.999]),
    beta1=st.sampled_from([0.0, 0.9]),
    lr=st.sampled_from([1e-3, 0.1]),
)
def test_adamod_step_never_larger_than_adam(grads, beta3, beta1, lr):
    """Every AdaMod step is elementwise no larger in magnitude than Adam's on the same gradients."""
    p = torch.nn.Parameter(torch.ones(4, dtype=F64))
    opt = longmem.AdaMod([p], lr=lr, betas=(beta1, 0.999), beta3=beta3)
    adam = _Adam(torch.ones(4, dtype=F64), lr, (beta1, 0.999), 1e-8)
    for row in grads:
        g = torch.from_numpy(row.copy())
        before = p.detach().clone()
        adam_before = adam.p.clone()
        p.grad = g.clone()
        opt.step()
        adam.step(g)
        step_adamod = (p.detach() - before).abs()
        step_adam = (adam.p - adam_before).abs()
        assert torch.all(step_adamod <= step_adam * (1 + 1e-9) + 1e-15), (step_adamod, step_adam)


@pytest.mark.parametrize("beta3", [0.0, 0.5, 0.9, 0.999])
def test_adamod_constant_gradient_warmup(beta3):
    """beta1 = 0, eps = 0, constant g: eta = lr/|g| every step, so s_t = (1 - beta3^t) * eta and the
    step is exactly (1 - beta3^t) * lr * sign(g) (Adam's step times 1 - beta3^t)."""
    g = torch.tensor([0.3, -2.0, 7.0, -1e-3], dtype=F64)
    lr = 1e-2
    p = torch.nn.Parameter(torch.zeros(4, dtype=F64))
    opt = longmem.AdaMod([p], lr=lr, betas=(0.0, 0.999), beta3=beta3, eps=0.0)
    for t in range(1, 30):
        before = p.detach().clone()
        p.grad = g.clone()
        opt.step()
        want = -(1 - beta3**t) * lr * torch.sign(g)
        torch.testing.assert_close(p.detach() - before, want, rtol=1e-9, atol=1e-18)


# ---------------------------------------------------------------- AdEMAMix / SimplifiedAdEMAMix vs AdamW


def _compare_to_adamw(make_ours, adamw_kwargs, lrs=None, maximize=False, steps=80, rtol=1e-10):
    gen = torch.Generator().manual_seed(7)
    p0 = [torch.randn(s, generator=gen, dtype=F64) for s in [(4, 3), (5,)]]
    grads = [[torch.randn(p.shape, generator=gen, dtype=F64) + 0.3 for p in p0] for _ in range(steps)]
    ours = [torch.nn.Parameter(p.clone()) for p in p0]
    theirs = [torch.nn.Parameter(p.clone()) for p in p0]
    opt_a = make_ours(ours)
    opt_b = torch.optim.AdamW(theirs, maximize=maximize, foreach=False, **adamw_kwargs)
    for t in range(steps):
        if lrs is not None:
            for opt in (opt_a, opt_b):
                for group in opt.param_groups:
                    group["lr"] = lrs[t]
        for a, b, g in zip(ours, theirs, grads[t], strict=True):
            a.grad, b.grad = g.clone(), g.clone()
        opt_a.step()
        opt_b.step()
        for a, b in zip(ours, theirs, strict=True):
            torch.testing.assert_close(
                a.detach(), b.detach(), rtol=rtol, atol=1e-12, msg=lambda m, t=t: f"step {t + 1}: {m}"
            )


ADAMW_CASES = [
    dict(lr=1e-2, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0),
    dict(lr=1e-2, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.1),
    dict(lr=3e-3, betas=(0.8, 0.95), eps=1e-3, weight_decay=0.01),
    dict(lr=1e-2, betas=(0.0, 0.99), eps=1e-8, weight_decay=0.05),
]


@pytest.mark.parametrize("foreach", [False, True])
@pytest.mark.parametrize("maximize", [False, True])
@pytest.mark.parametrize("case", ADAMW_CASES)
def test_ademamix_alpha_zero_is_adamw(case, maximize, foreach):
    def make(params):
        return longmem.AdEMAMix(
            params,
            lr=case["lr"],
            betas=(*case["betas"], 0.9999),
            alpha=0.0,
            eps=case["eps"],
            weight_decay=case["weight_decay"],
            maximize=maximize,
            foreach=foreach,
            alpha_warmup=10,
            beta3_warmup=10,
        )

    _compare_to_adamw(make, case, maximize=maximize)


def test_ademamix_alpha_zero_is_adamw_with_changing_lr():
    lrs = [1e-2 * (0.5 + 0.5 * math.cos(math.pi * t / 80)) for t in range(80)]
    case = ADAMW_CASES[1]

    def make(params):
        return longmem.AdEMAMix(
            params, lr=case["lr"], betas=(0.9, 0.999, 0.999), alpha=0.0, weight_decay=case["weight_decay"]
        )

    _compare_to_adamw(make, case, lrs=lrs)


@pytest.mark.parametrize("case", ADAMW_CASES)
def test_simplified_bias_corrected_is_adamw(case):
    """alpha = 0, constant beta1, bias_correction1: m / W_t = (1 - b1) sum_k b1^(t-k) g_k / (1 - b1^t), i.e.
    Adam's bias-corrected first moment, so the optimizer is AdamW."""

    def make(params):
        return longmem.SimplifiedAdEMAMix(
            params,
            lr=case["lr"],
            betas=case["betas"],
            alpha=0.0,
            eps=case["eps"],
            weight_decay=case["weight_decay"],
            bias_correction1=True,
        )

    _compare_to_adamw(make, case)


@pytest.mark.parametrize("alpha", [0.0, 2.0])
def test_simplified_beta1_zero_is_scaled_adamw(alpha):
    """beta1 = 0: m = g, so the update is (1 + alpha) * g / denom: AdamW(beta1=0) with lr * (1 + alpha)
    (and weight decay wd / (1 + alpha) so that lr * wd is unchanged)."""
    lr, wd = 1e-2, 0.1

    def make(params):
        return longmem.SimplifiedAdEMAMix(params, lr=lr, betas=(0.0, 0.99), alpha=alpha, weight_decay=wd)

    _compare_to_adamw(
        make, dict(lr=lr * (1 + alpha), betas=(0.0, 0.99), eps=1e-8, weight_decay=wd / (1 + alpha))
    )


@pytest.mark.parametrize("foreach", [False, True])
def test_ademamix_beta1_zero_has_no_fast_ema(foreach):
    ps = [torch.nn.Parameter(torch.randn(3, 2, dtype=F64)), torch.nn.Parameter(torch.randn(4))]
    opt = longmem.AdEMAMix(ps, betas=(0.0, 0.999, 0.9999), foreach=foreach)
    for _ in range(3):
        for p in ps:
            p.grad = torch.randn_like(p)
        opt.step()
    for p in ps:
        state = opt.state[p]
        assert "exp_avg_fast" not in state
        assert {"step", "exp_avg_slow", "exp_avg_sq"} <= set(state)
    # and with beta1 > 0 it is there
    opt2 = longmem.AdEMAMix(ps, betas=(0.9, 0.999, 0.9999), foreach=foreach)
    for p in ps:
        p.grad = torch.randn_like(p)
    opt2.step()
    assert all("exp_avg_fast" in opt2.state[p] for p in ps)


# --------------------------------------------------------------------------- diffGrad friction


def _friction_sequence(name, grads, lr=1e-2, betas=(0.9, 0.999), eps=1e-8):
    """Recover xi from every diffGrad step: dp = -lr sqrt(1-b2^t)/(1-b1^t) * xi * m / (sqrt(v) + eps)."""
    b1, b2 = betas
    p = torch.nn.Parameter(torch.zeros(grads[0].shape, dtype=F64))
    opt = getattr(longmem, name)([p], lr=lr, betas=betas, eps=eps)
    xis = []
    for t, g in enumerate(grads, 1):
        before = p.detach().clone()
        p.grad = g.clone()
        opt.step()
        st_ = opt.state[p]
        m, v = st_["exp_avg"], st_["exp_avg_sq"]
        full = lr * math.sqrt(1 - b2**t) / (1 - b1**t) * m / (torch.sqrt(v) + eps)
        xis.append(-(p.detach() - before) / full)
    return xis


@pytest.mark.parametrize("scale", [0.1, 1.0, 5.0])
def test_diffgrad_friction_in_range_and_sigmoid(scale):
    grads = _grads(11, 40, shape=(8,), scale=scale)
    xis = _friction_sequence("DiffGrad", grads)
    prev = torch.zeros(8, dtype=F64)
    for t, (xi, g) in enumerate(zip(xis, grads, strict=True), 1):
        assert torch.all(xi >= 0.5 - 1e-9) and torch.all(xi < 1.0), (t, xi)
        torch.testing.assert_close(xi, torch.sigmoid((prev - g).abs()), rtol=1e-8, atol=1e-10)
        prev = g


def test_diffgrad_friction_extremes():
    g = torch.tensor([1.0, -3.0, 40.0], dtype=F64)
    # constant gradient: after the first step g_prev == g, so xi = 1/2 exactly
    xis = _friction_sequence("DiffGrad", [g] * 5)
    torch.testing.assert_close(xis[0], torch.sigmoid(g.abs()), rtol=1e-8, atol=1e-10)
    for xi in xis[1:]:
        torch.testing.assert_close(xi, torch.full_like(xi, 0.5), rtol=1e-8, atol=1e-10)
    # a huge jump saturates towards (never above) 1
    xis = _friction_sequence("DiffGrad", [g, -g])
    assert torch.all(xis[1] <= 1.0 + 1e-9) and torch.all(xis[1] >= 0.5)


@pytest.mark.parametrize("name", ["DiffGrad", "DiffMod"])
def test_previous_grad_is_copied_not_aliased(name):
    """backward() after zero_grad(set_to_none=False) writes into the same .grad tensor in place; an aliased
    previous gradient would then equal the current one (xi = 1/2 forever)."""
    torch.manual_seed(0)
    x = torch.randn(16, 3, dtype=F64)
    w = torch.nn.Parameter(torch.randn(3, dtype=F64))
    opt = getattr(longmem, name)([w], lr=0.05)
    seen = []
    for t in range(6):
        opt.zero_grad(set_to_none=False)
        loss = ((x @ w - torch.sin(torch.arange(16, dtype=F64) + t)) ** 2).mean()
        loss.backward()
        grad_tensor = w.grad
        g = w.grad.detach().clone()
        opt.step()
        seen.append(g)
        torch.testing.assert_close(opt.state[w]["previous_grad"], g, rtol=0, atol=0)
        assert opt.state[w]["previous_grad"].data_ptr() != grad_tensor.data_ptr()
    opt.zero_grad(set_to_none=False)
    assert w.grad is not None and torch.count_nonzero(w.grad) == 0
    torch.testing.assert_close(opt.state[w]["previous_grad"], seen[-1], rtol=0, atol=0)


# --------------------------------------------------------------------------- DiffMod


@pytest.mark.parametrize("foreach", [False, True])
@pytest.mark.parametrize("length", [1, 2, 10, 1000])
def test_diffmod_len_memory_equals_beta3(length, foreach):
    p0 = torch.randn(9, generator=torch.Generator().manual_seed(5), dtype=F64)
    grads = _grads(6, 50, shape=(9,))
    a = torch.nn.Parameter(p0.clone())
    b = torch.nn.Parameter(p0.clone())
    opt_a = longmem.DiffMod([a], lr=1e-2, len_memory=length, weight_decay=0.01, foreach=foreach)
    opt_b = longmem.DiffMod([b], lr=1e-2, beta3=1 - 1 / length, weight_decay=0.01, foreach=foreach)
    for g in grads:
        a.grad, b.grad = g.clone(), g.clone()
        opt_a.step()
        opt_b.step()
        torch.testing.assert_close(a.detach(), b.detach(), rtol=1e-14, atol=0)
    if length == 1000:  # the default
        c = torch.nn.Parameter(p0.clone())
        opt_c = longmem.DiffMod([c], lr=1e-2, weight_decay=0.01, foreach=foreach)
        for g in grads:
            c.grad = g.clone()
            opt_c.step()
        torch.testing.assert_close(c.detach(), b.detach(), rtol=1e-14, atol=0)


def test_diffmod_step_never_larger_than_diffgrad_without_friction():
    """DiffMod's step min(eta, s) * xi * m is never larger than eta * xi * m (diffGrad's, with decoupled
    decay and eps on raw sqrt(v)), and never larger than Adam's eta * m."""
    grads = _grads(8, 60, shape=(10,), scale=2.0)
    p = torch.nn.Parameter(torch.zeros(10, dtype=F64))
    opt = longmem.DiffMod([p], lr=1e-2, len_memory=10)
    adam = _Adam(torch.zeros(10, dtype=F64), 1e-2, (0.9, 0.999), 1e-8)
    for g in grads:
        before, adam_before = p.detach().clone(), adam.p.clone()
        p.grad = g.clone()
        opt.step()
        adam.step(g)
        assert torch.all((p.detach() - before).abs() <= (adam.p - adam_before).abs() * (1 + 1e-9))
