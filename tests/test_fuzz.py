"""Property-based tests (hypothesis): random shapes (0-d and 0-element included), dtypes, in-range
hyperparameters and param-group layouts; the single-tensor, foreach and fused paths of every
optimizer against the float64 reference (tests/reference.py) and against each other.

The fused path runs the generic C kernel here (``SPECIALIZE = False``), so that random programs do not
each compile a specialized kernel; test_fused.py checks that both kernels agree bit for bit.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import longmem
import reference as ref
from longmem import kernels
from longmem.kernels import cpu

F64 = torch.float64
NAMES = ["AdEMAMix", "SimplifiedAdEMAMix", "AdaMod", "DiffGrad", "DiffMod"]
SHAPES = [(), (0,), (0, 3), (1,), (5,), (2, 3), (3, 1, 2)]
DTYPES = [torch.float32, F64, torch.bfloat16]
STEPS = 3
#: tolerance against the float64 reference, per parameter dtype (bf16: one ulp per step, see _close)
TOL = {F64: dict(rtol=1e-9, atol=1e-11), torch.float32: dict(rtol=2e-4, atol=2e-5)}
FUZZ = settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow])

beta = st.sampled_from([0.0, 0.5, 0.9, 0.99, 0.999]) | st.floats(0.0, 0.999)
warmup = st.none() | st.integers(1, 6)


def _common(draw):
    return dict(
        lr=draw(st.sampled_from([0.0, 1e-3, 1e-2]) | st.floats(0.0, 0.1)),
        eps=draw(st.sampled_from([0.0, 1e-8, 1e-6, 1e-3])),
        weight_decay=draw(st.sampled_from([0.0, 0.01]) | st.floats(0.0, 1.0)),
        maximize=draw(st.booleans()),
    )


@st.composite
def hyperparameters(draw, name):
    """One group's hyperparameters for optimizer ``name``, all in range."""
    hp = _common(draw)
    if name == "AdEMAMix":
        hp.update(
            betas=(draw(beta), draw(beta), draw(beta)),
            alpha=draw(st.floats(0.0, 10.0)),
            alpha_warmup=draw(warmup),
            beta3_warmup=draw(warmup),
        )
    elif name == "SimplifiedAdEMAMix":
        hp.update(
            lr=hp["lr"] / 10,
            betas=(draw(beta), draw(beta)),
            alpha=draw(st.floats(0.0, 10.0)),
            beta1_warmup=draw(warmup),
            min_beta1=draw(beta),
            bias_correction1=draw(st.booleans()),
            bias_correction2=draw(st.booleans()),
        )
    elif name == "AdaMod":
        hp.update(betas=(draw(beta), draw(beta)), beta3=draw(beta))
    elif name == "DiffGrad":
        hp.update(betas=(draw(beta), draw(beta)))
    else:
        hp.update(betas=(draw(beta), draw(beta)))
        if draw(st.booleans()):
            hp["len_memory"] = draw(st.floats(1.0, 1000.0))
        else:
            hp["beta3"] = draw(beta)
    return hp


@st.composite
def layouts(draw, name):
    """Parameters (shape, dtype, group), each group's hyperparameters, gradients (None: no gradient
    at that step) and the initial values."""
    n = draw(st.integers(1, 4))
    specs = [(draw(st.sampled_from(SHAPES)), draw(st.sampled_from(DTYPES))) for _ in range(n)]
    n_groups = draw(st.integers(1, n))
    groups = [draw(hyperparameters(name)) for _ in range(n_groups)]
    seed = draw(st.integers(0, 2**31 - 1))
    scale = draw(st.sampled_from([1e-3, 1.0, 1e3]))
    missing = draw(st.sets(st.tuples(st.integers(0, STEPS - 1), st.integers(0, n - 1)), max_size=2))
    gen = torch.Generator().manual_seed(seed)
    p0 = [torch.randn(shape, generator=gen, dtype=F64).to(dtype) for shape, dtype in specs]
    grads = [
        [
            None
            if (t, i) in missing
            else (scale * torch.randn(p.shape, generator=gen, dtype=F64)).to(p.dtype)
            for i, p in enumerate(p0)
        ]
        for t in range(STEPS)
    ]
    return [i % n_groups for i in range(n)], groups, p0, grads


def _run_path(name, path, layout):
    group_of, groups, p0, grads = layout
    params = [torch.nn.Parameter(p.clone()) for p in p0]
    param_groups = [
        {"params": [p for p, g in zip(params, group_of, strict=True) if g == k], **hp}
        for k, hp in enumerate(groups)
    ]
    for group in param_groups:
        # an explicit fused=True raises on what the kernels cannot take (float64): such groups None
        fusable = all(p.dtype in kernels.FUSED_DTYPES for p in group["params"])
        group["fused"] = True if path == "fused" and fusable else None
    opt = getattr(longmem, name)(param_groups, foreach=path == "foreach")
    for row in grads:
        for p, g in zip(params, row, strict=True):
            p.grad = None if g is None else g.clone()
        opt.step()
    return params, opt


def _run_reference(name, layout):
    """The float64 formula per parameter, rounded to the parameter's dtype after each step (as the
    library stores it)."""
    group_of, groups, p0, grads = layout
    init, step = ref.REFERENCE[name]
    out = []
    for i, p in enumerate(p0):
        value, state = p.to(F64), init(p)
        for row in grads:
            if row[i] is not None:
                value = step(value, row[i].to(F64), state, **groups[group_of[i]]).to(p.dtype).to(F64)
        out.append((value, state))
    return out


def _close(got, want, dtype, where):
    if dtype == torch.bfloat16:  # one bf16 ulp (2^-8 relative) of rounding per step, at most
        tol = dict(
            rtol=STEPS * 2.0**-8,
            atol=STEPS * 2.0**-8 * max([1.0, *want.abs().nan_to_num().flatten().tolist()]),
        )
    else:
        tol = TOL[dtype]
    torch.testing.assert_close(got.to(F64), want, **tol, equal_nan=True, msg=lambda m: f"{where}: {m}")


@pytest.mark.parametrize("name", NAMES)
@FUZZ
@given(data=st.data())
def test_paths_match_reference(name, data):
    layout = data.draw(layouts(name), label="layout")
    with pytest.MonkeyPatch.context() as patch, warnings.catch_warnings():
        patch.setattr(cpu, "SPECIALIZE", False)
        warnings.simplefilter("ignore")  # a fused fallback warning, where no C compiler exists
        runs = {path: _run_path(name, path, layout) for path in ("single", "foreach", "fused")}
    expected = _run_reference(name, layout)
    _, _, p0, grads = layout
    for i, (want_p, want_state) in enumerate(expected):
        dtype = p0[i].dtype
        stepped = sum(row[i] is not None for row in grads)
        for path, (params, opt) in runs.items():
            p = params[i]
            assert p.dtype == dtype and p.shape == p0[i].shape
            where = f"{path} param {i} {tuple(p.shape)} {dtype}"
            _close(p.detach(), want_p, dtype, where)
            state = opt.state.get(p, {})
            assert float(state["step"]) == stepped if stepped else not state, where
            for key, buf in state.items():
                if key == "step" or key not in want_state or not torch.is_tensor(want_state[key]):
                    continue
                assert buf.dtype == (torch.float32 if dtype == torch.bfloat16 else dtype), where
                if dtype != torch.bfloat16:
                    _close(buf, want_state[key], dtype, f"{where} {key}")
        # the single-tensor and foreach paths run the same kernels in the same order
        single, foreach = runs["single"][0][i].detach(), runs["foreach"][0][i].detach()
        assert torch.equal(single.isnan(), foreach.isnan()), f"param {i}: foreach differs from single-tensor"
        assert torch.equal(single.nan_to_num(), foreach.nan_to_num()), f"param {i}: foreach differs"


@pytest.mark.parametrize("name", NAMES)
@FUZZ
@given(hp=st.data())
def test_fused_takes_every_layout(name, hp):
    """Every dtype the kernels take (complex included) and every shape in one fused group: no
    crash, the same numbers as foreach to float rounding. With a float64 parameter among them, the
    explicit fused=True raises before anything changes; the rest then run as before."""
    config = hp.draw(hyperparameters(name), label="hp")
    specs = hp.draw(
        st.lists(
            st.tuples(st.sampled_from(SHAPES), st.sampled_from([*DTYPES, torch.complex64, torch.float16])),
            min_size=1,
            max_size=5,
        ),
        label="specs",
    )
    gen = torch.Generator().manual_seed(0)
    p0 = [
        torch.randn(shape, generator=gen, dtype=torch.complex128 if dt.is_complex else F64).to(dt)
        for shape, dt in specs
    ]
    if any(p.dtype not in kernels.FUSED_DTYPES for p in p0):
        params = [torch.nn.Parameter(p.clone()) for p in p0]
        for p in params:
            p.grad = torch.ones_like(p)
        opt = getattr(longmem, name)(params, fused=True, **config)
        with pytest.raises(RuntimeError, match="`fused=True` requires all the params"):
            opt.step()
        assert all(torch.equal(p, q) for p, q in zip(params, p0, strict=True)) and not any(opt.state.values())
        p0 = [p for p in p0 if p.dtype in kernels.FUSED_DTYPES]
        if not p0:
            return
    results = []
    for fused in (True, False):
        params = [torch.nn.Parameter(p.clone()) for p in p0]
        with pytest.MonkeyPatch.context() as patch, warnings.catch_warnings():
            patch.setattr(cpu, "SPECIALIZE", False)
            warnings.simplefilter("ignore")
            opt = getattr(longmem, name)(params, fused=fused or None, foreach=not fused, **config)
            for t in range(2):
                g = torch.Generator().manual_seed(t)
                for p in params:
                    base = torch.complex128 if p.is_complex() else F64
                    p.grad = torch.randn(p.shape, generator=g, dtype=base).to(p.dtype)
                opt.step()
        results.append(params)
    for a, b in zip(*results, strict=True):
        assert a.dtype == b.dtype and a.shape == b.shape
        if a.dtype in (torch.bfloat16, torch.float16):
            tol = dict(rtol=2 * 2.0**-8, atol=1e-3)
        else:
            tol = dict(rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(a.detach(), b.detach(), **tol, equal_nan=True)
