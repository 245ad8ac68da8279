"""Checkpointing: bit-identical resume, rejection of state dicts that do not fit, AdEMAMix.from_adamw."""

from __future__ import annotations

import copy

import pytest
import torch

import longmem

F64 = torch.float64

RESUME_CONFIGS = [
    ("AdEMAMix", dict(lr=1e-2, alpha=5.0, alpha_warmup=20, beta3_warmup=20, weight_decay=0.01)),
    ("AdEMAMix", dict(lr=1e-2, betas=(0.0, 0.999, 0.9999), alpha=5.0, alpha_warmup=30, beta3_warmup=12)),
    (
        "SimplifiedAdEMAMix",
        dict(lr=1e-3, alpha=2.0, beta1_warmup=20, bias_correction1=True, weight_decay=0.1),
    ),
    ("SimplifiedAdEMAMix", dict(lr=1e-3, beta1_warmup=9, bias_correction2=False)),
    ("AdaMod", dict(lr=1e-2, beta3=0.99, weight_decay=0.01)),
    ("DiffGrad", dict(lr=1e-2, weight_decay=0.01)),
    ("DiffMod", dict(lr=1e-2, len_memory=10, weight_decay=0.01)),
]
RESUME_IDS = [f"{n}-{i}" for i, (n, _) in enumerate(RESUME_CONFIGS)]
TOTAL = 16


def _model(dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.5)
    return model.to(dtype)


def _data():
    gen = torch.Generator().manual_seed(42)
    return torch.randn(TOTAL, 10, 6, generator=gen), torch.randn(TOTAL, 10, 3, generator=gen)


def _train(model, opt, sched, start, stop, data):
    xs, ys = data
    for t in range(start, stop):
        torch.manual_seed(1000 + t)  # same global RNG at every step in every run (in case it is used)
        opt.zero_grad()
        x, y = xs[t].to(model[0].weight.dtype), ys[t].to(model[0].weight.dtype)
        loss = ((model(x) - y) ** 2).mean()
        loss.backward()
        opt.step()
        sched.step()


def _make(name, hp, model, foreach):
    opt = getattr(longmem, name)(model.parameters(), foreach=foreach, **hp)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=TOTAL)
    return opt, sched


def _assert_same_state(opt_a, params_a, opt_b, params_b):
    for pa, pb in zip(params_a, params_b, strict=True):
        assert torch.equal(pa.detach(), pb.detach())
        sa, sb = opt_a.state[pa], opt_b.state[pb]
        assert set(sa) == set(sb)
        for key in sa:
            assert torch.is_tensor(sa[key]) == torch.is_tensor(sb[key]), key
            if torch.is_tensor(sa[key]):
                assert sa[key].dtype == sb[key].dtype, key
                assert torch.equal(sa[key], sb[key]), key
            else:
                assert sa[key] == sb[key], key
    for ga, gb in zip(opt_a.param_groups, opt_b.param_groups, strict=True):
        assert {k: v for k, v in ga.items() if k != "params"} == {
            k: v for k, v in gb.items() if k != "params"
        }


@pytest.mark.parametrize("foreach", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("k", [1, 5])
@pytest.mark.parametrize(("name", "hp"), RESUME_CONFIGS, ids=RESUME_IDS)
def test_bit_identical_resume(name, hp, k, dtype, foreach, tmp_path):
    data = _data()
    ref_model = _model(dtype)
    ref_opt, ref_sched = _make(name, hp, ref_model, foreach)
    _train(ref_model, ref_opt, ref_sched, 0, TOTAL, data)

    model = _model(dtype)
    opt, sched = _make(name, hp, model, foreach)
    _train(model, opt, sched, 0, k, data)
    path = tmp_path / "ckpt.pt"
    torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "sched": sched.state_dict()}, path)
    del model, opt, sched

    fresh = _model(dtype, seed=1)  # different initial values: everything must come from the checkpoint
    fresh_opt, fresh_sched = _make(name, hp, fresh, foreach)
    ckpt = torch.load(path)
    fresh.load_state_dict(ckpt["model"])
    fresh_opt.load_state_dict(ckpt["opt"])
    fresh_sched.load_state_dict(ckpt["sched"])
    for p in fresh.parameters():  # low-precision parameters keep float32 state after loading
        for key, value in fresh_opt.state[p].items():
            if key not in ("step", "num_sum"):
                assert value.dtype == torch.float32, key
        assert p.dtype == dtype
    _train(fresh, fresh_opt, fresh_sched, k, TOTAL, data)

    _assert_same_state(ref_opt, list(ref_model.parameters()), fresh_opt, list(fresh.parameters()))


# --------------------------------------------------------------------------- state dicts that do not fit

NAMES = ["AdEMAMix", "SimplifiedAdEMAMix", "AdaMod", "DiffGrad", "DiffMod"]


def _stepped(factory, shapes=((4, 3), (5,)), steps=3, seed=0):
    gen = torch.Generator().manual_seed(seed)
    params = [torch.nn.Parameter(torch.randn(s, generator=gen)) for s in shapes]
    opt = factory(params)
    for _ in range(steps):
        for p in params:
            p.grad = torch.randn(p.shape, generator=gen)
        opt.step()
    return params, opt


def _snapshot(opt):
    return copy.deepcopy(opt.state_dict())


def _assert_unchanged(opt, snap):
    now = opt.state_dict()
    assert len(now["param_groups"]) == len(snap["param_groups"])
    for ga, gb in zip(now["param_groups"], snap["param_groups"], strict=True):
        assert ga == gb
    assert set(now["state"]) == set(snap["state"])
    for idx, st in now["state"].items():
        assert set(st) == set(snap["state"][idx])
        for key, value in st.items():
            want = snap["state"][idx][key]
            if torch.is_tensor(value):
                assert value.dtype == want.dtype and value.shape == want.shape, key
                assert torch.equal(value, want), key
            else:
                assert value == want, key


def _check_rejected(name, bad_state_dict):
    """Loading ``bad_state_dict`` into a stepped optimizer raises ValueError and changes nothing."""
    target_params, target = _stepped(_factory(name))
    snap = _snapshot(target)
    with pytest.raises(ValueError):
        target.load_state_dict(bad_state_dict)
    _assert_unchanged(target, snap)
    # and it keeps working exactly like an untouched twin
    twin_params, twin = _stepped(_factory(name))
    gen = torch.Generator().manual_seed(77)
    for p, q in zip(target_params, twin_params, strict=True):
        g = torch.randn(p.shape, generator=gen)
        p.grad, q.grad = g.clone(), g.clone()
    target.step()
    twin.step()
    for p, q in zip(target_params, twin_params, strict=True):
        assert torch.equal(p.detach(), q.detach())


def _factory(name):
    return lambda ps: getattr(longmem, name)(ps, lr=1e-2)


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize(
    "shapes", [((3, 4), (5,)), ((4, 3), (6,)), ((12,), (5,))], ids=["transposed", "numel", "flat"]
)
def test_rejects_wrong_shapes(name, shapes):
    _, other = _stepped(_factory(name), shapes=shapes, seed=1)
    _check_rejected(name, other.state_dict())


@pytest.mark.parametrize("name", NAMES)
def test_rejects_missing_state_key(name):
    _, other = _stepped(_factory(name), seed=1)
    keys = [k for k in other.state_dict()["state"][0] if k != "step"]
    for key in [*keys, "step"]:
        bad = copy.deepcopy(other.state_dict())
        del bad["state"][1][key]
        _check_rejected(name, bad)


@pytest.mark.parametrize("name", NAMES)
def test_rejects_adamw_state_dict(name):
    _, adamw = _stepped(lambda ps: torch.optim.AdamW(ps, lr=1e-2), seed=1)
    _check_rejected(name, adamw.state_dict())


@pytest.mark.parametrize(
    ("target", "source"),
    [
        ("AdEMAMix", "AdaMod"),
        ("AdEMAMix", "SimplifiedAdEMAMix"),
        ("SimplifiedAdEMAMix", "AdEMAMix"),
        ("AdaMod", "DiffGrad"),
        ("DiffGrad", "AdaMod"),
        ("DiffMod", "AdaMod"),
        ("DiffMod", "DiffGrad"),
        ("SimplifiedAdEMAMix", "DiffGrad"),
        ("AdaMod", "DiffMod"),
        ("DiffGrad", "DiffMod"),
    ],
)
def test_rejects_other_longmem_state_dict(target, source):
    _, other = _stepped(_factory(source), seed=1)
    _check_rejected(target, other.state_dict())


@pytest.mark.parametrize("name", NAMES)
def test_rejects_wrong_group_structure(name):
    # two groups instead of one
    gen = torch.Generator().manual_seed(3)
    ps = [torch.nn.Parameter(torch.randn(s, generator=gen)) for s in ((4, 3), (5,))]
    two = getattr(longmem, name)([{"params": [ps[0]]}, {"params": [ps[1]]}], lr=1e-2)
    _check_rejected(name, two.state_dict())
    # one group with a different number of parameters
    _, three = _stepped(_factory(name), shapes=((4, 3), (5,), (2,)))
    _check_rejected(name, three.state_dict())


@pytest.mark.parametrize("name", NAMES)
def test_accepts_own_state_dict(name):
    """Control for the rejection tests: a fitting state dict loads."""
    params, opt = _stepped(_factory(name))
    _, other = _stepped(_factory(name), seed=1)
    opt.load_state_dict(other.state_dict())
    for p in params:
        assert float(opt.state[p]["step"]) == 3


@pytest.mark.parametrize("name", NAMES)
def test_loaded_state_is_a_copy(name):
    """Changing the loaded dict (or its source optimizer) afterwards does not reach the loaded optimizer."""
    _, opt = _stepped(_factory(name))
    _, other = _stepped(_factory(name), seed=1)
    source = other.state_dict()
    opt.load_state_dict(source)
    want = _snapshot(opt)
    for st in source["state"].values():
        for value in st.values():
            if torch.is_tensor(value):
                value.add_(1.0)
    _assert_unchanged(opt, want)


# --------------------------------------------------------------------------- from_adamw


ADAMW_KW = [
    dict(lr=3e-3, betas=(0.8, 0.99), eps=1e-6, weight_decay=0.05),
    dict(lr=1e-2, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0),
]


def _twin_adamw(kw, steps, seed=0):
    gen = torch.Generator().manual_seed(seed)
    p0 = [torch.randn(s, generator=gen, dtype=F64) for s in ((4, 3), (5,))]
    grads = [[torch.randn(p.shape, generator=gen, dtype=F64) for p in p0] for _ in range(steps)]
    params = [torch.nn.Parameter(p.clone()) for p in p0]
    groups = [{"params": [params[0]]}, {"params": [params[1]], "lr": kw["lr"] * 2, "weight_decay": 0.1}]
    return params, torch.optim.AdamW(groups, foreach=False, **kw), grads


def _feed(opt, params, grads):
    for p, g in zip(params, grads, strict=True):
        p.grad = g.clone()
    opt.step()


@pytest.mark.parametrize("kw", ADAMW_KW)
def test_from_adamw_state_and_hyperparameters(kw):
    params, adamw, grads = _twin_adamw(kw, 5)
    for row in grads:
        _feed(adamw, params, row)
    ade = longmem.AdEMAMix.from_adamw(adamw, alpha=0.0)
    assert isinstance(ade, longmem.AdEMAMix)
    assert len(ade.param_groups) == len(adamw.param_groups)
    for g_new, g_old in zip(ade.param_groups, adamw.param_groups, strict=True):
        assert [id(p) for p in g_new["params"]] == [id(p) for p in g_old["params"]]
        assert float(g_new["lr"]) == float(g_old["lr"])
        assert g_new["eps"] == g_old["eps"]
        assert g_new["weight_decay"] == g_old["weight_decay"]
        assert tuple(g_new["betas"][:2]) == tuple(g_old["betas"])
        assert len(g_new["betas"]) == 3
        assert g_new["alpha"] == 0.0
    for p in params:
        new, old = ade.state[p], adamw.state[p]
        assert torch.equal(new["exp_avg_fast"], old["exp_avg"])
        assert torch.equal(new["exp_avg_sq"], old["exp_avg_sq"])
        assert torch.equal(new["exp_avg_slow"], torch.zeros_like(p))
        assert new["exp_avg_slow"].dtype == p.dtype
        assert float(new["step"]) == float(old["step"]) == 5
        assert new["step"].dim() == 0 and new["step"].dtype == torch.float32


def test_from_adamw_overrides_and_defaults():
    params, adamw, grads = _twin_adamw(ADAMW_KW[0], 2)
    for row in grads:
        _feed(adamw, params, row)
    ade = longmem.AdEMAMix.from_adamw(adamw, alpha=6.0, beta3_warmup=100, alpha_warmup=100)
    for g in ade.param_groups:
        assert g["alpha"] == 6.0 and g["beta3_warmup"] == 100 and g["alpha_warmup"] == 100
        assert g["betas"][2] == 0.9999  # AdEMAMix's default beta3
    ade2 = longmem.AdEMAMix.from_adamw(adamw, lr=1e-5)
    assert all(float(g["lr"]) == 1e-5 for g in ade2.param_groups)


@pytest.mark.parametrize("kw", ADAMW_KW)
@pytest.mark.parametrize("k", [0, 1, 6])
def test_from_adamw_alpha_zero_continues_adamw_trajectory(kw, k):
    steps = 20
    params_a, adamw_a, grads = _twin_adamw(kw, steps)
    params_b, adamw_b, _ = _twin_adamw(kw, steps)
    for row in grads[:k]:
        _feed(adamw_a, params_a, row)
        _feed(adamw_b, params_b, row)
    ade = longmem.AdEMAMix.from_adamw(adamw_b, alpha=0.0)
    for t, row in enumerate(grads[k:], k + 1):
        _feed(adamw_a, params_a, row)
        _feed(ade, params_b, row)
        for pa, pb in zip(params_a, params_b, strict=True):
            torch.testing.assert_close(
                pb.detach(), pa.detach(), rtol=1e-10, atol=1e-12, msg=lambda m, t=t: f"step {t}: {m}"
            )
