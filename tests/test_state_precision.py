"""state_precision: the codecs' error bounds and unbiasedness, the slow EMA they keep right, every optimizer
in every lean mode and path tracking its float32 run, checkpoints (bit-identical resume, strict loading),
and fused steps that decode and encode the state in the kernels (generated and generic kernels bit for bit
alike, the fallbacks the foreach path's bits)."""

from __future__ import annotations

import functools
import io
import math
import pickle
import warnings

import pytest
import torch

import longmem
from longmem import _state_precision as sp
from longmem.kernels import FusedFallbackWarning

NAMES = ["AdEMAMix", "SimplifiedAdEMAMix", "AdaMod", "DiffGrad", "DiffMod"]
LEAN = ["bf16", "8bit"]
MODES = ["fp32", *LEAN]
PATHS = {"single": dict(foreach=False), "foreach": dict(foreach=True), "fused": dict(fused=True)}
HP = {
    "AdEMAMix": dict(lr=1e-2, alpha=5.0, alpha_warmup=100, beta3_warmup=100, weight_decay=0.01),
    "SimplifiedAdEMAMix": dict(lr=1e-3, alpha=1.0, beta1_warmup=100),
    "AdaMod": dict(lr=1e-2, weight_decay=0.01),
    "DiffGrad": dict(lr=1e-2),
    "DiffMod": dict(lr=1e-2, len_memory=100, weight_decay=0.01),
}


@pytest.fixture(autouse=True)
def _one_thread():
    # small tensors: threads only add synchronisation (and the machine may be shared)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FusedFallbackWarning)  # no C compiler: foreach
        yield
    torch.set_num_threads(threads)


# ---- options --------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("bad", ["fp16", "int8", "FP32", None, 8, True])
def test_bad_state_precision_is_rejected(name, bad):
    p = torch.nn.Parameter(torch.zeros(3))
    with pytest.raises(ValueError, match=r"state_precision must be one of 'fp32', 'bf16', '8bit'"):
        getattr(longmem, name)([p], state_precision=bad)
    opt = getattr(longmem, name)([p])
    with pytest.raises(ValueError, match="state_precision"):
        opt.add_param_group({"params": [torch.nn.Parameter(torch.zeros(2))], "state_precision": bad})
    assert len(opt.param_groups) == 1


@pytest.mark.parametrize("name", NAMES)
def test_default_is_fp32_and_recorded(name):
    opt = getattr(longmem, name)([torch.nn.Parameter(torch.zeros(3))])
    assert opt.param_groups[0]["state_precision"] == "fp32"
    assert opt.state_dict()["param_groups"][0]["state_precision"] == "fp32"


# ---- codecs ---------------------------------------------------------------------------------------


def _values(n=1 << 14, seed=0):
    g = torch.Generator().manual_seed(seed)
    # many magnitudes within each block, some exact zeros
    x = torch.randn(n, generator=g) * torch.exp(torch.randn(n, generator=g) * 3)
    x[::97] = 0.0
    return x


def test_bf16_rounding_is_to_a_neighbour():
    x = _values()
    r = sp.round_bf16(x, 1).double()
    down = x.to(torch.bfloat16).double()  # one of the two neighbours
    ulp = torch.ldexp(torch.ones_like(x.double()), torch.frexp(x.double()).exponent - 8)
    assert ((r - x.double()).abs() <= ulp).all()  # error below one bf16 ulp = 2^-7 relative at most
    assert ((r - x.double()).abs() <= x.double().abs() * 2.0**-7).all()
    assert ((r == down) | ((r - down).abs() <= ulp)).all()
    exact = x.to(torch.bfloat16).float()
    assert torch.equal(sp.round_bf16(exact, 0), exact.to(torch.bfloat16))  # representable: unchanged
    special = torch.tensor([math.inf, -math.inf, math.nan, 0.0, -0.0])
    out = sp.round_bf16(special, 0).float()
    assert out[0] == math.inf and out[1] == -math.inf and math.isnan(out[2]) and (out[3:] == 0).all()


def _grid_bounds(x: torch.Tensor, signed: bool) -> torch.Tensor:
    """The analytic bound: the spacing of the grid cell holding each value, computed in float64."""
    levels, power = sp.SIGNED_GRID if signed else sp.UNSIGNED_GRID
    blocks = sp._blocks(x.reshape(-1).double())
    absmax = blocks.abs().amax(dim=1, keepdim=True)
    y = torch.where(absmax > 0, blocks.abs() / absmax, 0.0)
    k = torch.clamp(torch.floor(y ** (1 / power) * levels), max=levels - 1)
    spacing = (((k + 1) / levels) ** power - (k / levels) ** power) * absmax
    return spacing.reshape(-1)[: x.numel()]


@pytest.mark.parametrize("signed", [True, False])
def test_8bit_round_trip_within_one_grid_spacing(signed):
    x = _values()
    x = x if signed else x.abs()
    codes, absmax = sp.quantize(x, signed, 2)
    assert codes.dtype == (torch.int8 if signed else torch.uint8) and codes.shape == x.shape
    assert absmax.shape == (sp.num_blocks(x.numel()),)
    y = sp.dequantize(codes, absmax, signed).double()
    err = (y - x.double()).abs()
    bound = _grid_bounds(x, signed)
    assert (err <= bound * (1 + 1e-5) + 1e-30).all()
    # the coarsest cell is the top one: at most P / L of the block's absmax
    levels, power = sp.SIGNED_GRID if signed else sp.UNSIGNED_GRID
    block_max = sp._blocks(x.abs().double()).amax(dim=1).repeat_interleave(sp.BLOCK_SIZE)[: x.numel()]
    assert (err <= block_max * power / levels * (1 + 1e-5)).all()
    assert (y[x == 0] == 0).all()  # zeros stay zero
    if not signed:
        assert (y[x > 0] > 0).all()  # a positive second moment never becomes zero
    # a block's largest element is exact (to float rounding)
    assert torch.allclose(sp._blocks(y.abs()).amax(dim=1), absmax.double(), rtol=1e-6, atol=0)


def test_8bit_partial_last_block_and_shapes():
    x = torch.randn(3, 7, 50)  # 1050 elements: 5 blocks, the last partial
    codes, absmax = sp.quantize(x, True, 0)
    assert codes.shape == x.shape and absmax.shape == (5,)
    y = sp.dequantize(codes, absmax, True)
    assert y.shape == x.shape and ((y - x).abs() <= _grid_bounds(x, True).view(x.shape) * (1 + 1e-5)).all()


@pytest.mark.parametrize("codec", ["bf16", "int8", "uint8"])
def test_stochastic_rounding_is_unbiased(codec):
    g = torch.Generator().manual_seed(3)
    n, draws = 512, 4000
    x = torch.rand(n, generator=g) * 2 - (0.0 if codec == "uint8" else 1.0)
    x[0] = 1.0  # sets the scale of the 8-bit block
    x[1:] *= 0.9
    rep = x.repeat(draws)  # one call: every copy is at other element indices, with its own noise
    if codec == "bf16":
        y = sp.round_bf16(rep, 3).float().view(draws, n)
        spacing = _bf16_spacing(x)
    else:
        signed = codec == "int8"
        # every copy in its own blocks: n is a multiple of the block size
        y = sp.dequantize(*sp.quantize(rep, signed, 3), signed).view(draws, n)
        spacing = _grid_bounds(x, signed).float()
    mean = y.double().mean(dim=0)
    # the rounding error of one draw has standard deviation <= spacing / 2
    tolerance = 5 * (spacing.double() / 2) / math.sqrt(draws) + 1e-7
    assert ((mean - x.double()).abs() <= tolerance).all()
    # and it really is random (not round-to-nearest): most values take both neighbours
    assert (y.std(dim=0) > 0).float().mean() > 0.9


def _bf16_spacing(x):
    return torch.ldexp(torch.ones_like(x), torch.frexp(x).exponent - 8)


# ---- the slow EMA -----------------------------------------------------------------------------------


SLOW_EMA_STEPS = 20_000


@functools.cache
def _slow_ema(mode):
    return sp.slow_ema_trace(mode, steps=SLOW_EMA_STEPS, n=2048)


def test_slow_ema_tracks_with_stochastic_rounding_and_fails_without():
    """SPEC.md: in bf16 with round-to-nearest 0.9999 * m rounds back to m and the EMA stops moving."""
    errors = {}
    for mode in ["bf16-nearest", "bf16", "8bit"]:
        m, exact = _slow_ema(mode)
        errors[mode] = abs(m.mean().item() / exact.mean().item() - 1)
    assert errors["bf16"] < 0.05 and errors["8bit"] < 0.05, errors
    assert errors["bf16-nearest"] > 0.5, errors  # stuck far below the true mean


def _grid_spacing(m, mode):
    """The spacing of the stored grid at each (decoded, positive) value of ``m``: one bf16 unit; for
    8-bit, absmax * (g(c + 1) - g(c)) with g(c) = (c / L)^P (``SIGNED_GRID``), c the element's code (the
    block's largest value has code L and decodes to absmax)."""
    if mode == "bf16":
        return _bf16_spacing(m).double()
    levels, power = sp.SIGNED_GRID
    blocks = m.double().view(-1, sp.BLOCK_SIZE)
    absmax = blocks.abs().amax(dim=1, keepdim=True)
    c = (levels * (blocks.abs() / absmax) ** (1 / power)).round().clamp(max=levels - 1)
    return (absmax * (((c + 1) / levels) ** power - (c / levels) ** power)).view(-1)


@pytest.mark.parametrize("mode", LEAN)
def test_slow_ema_error_is_the_random_walk_of_independent_unbiased_rounding(mode):
    """Analytic: a value resting on a grid point with an increment inc far below the spacing D rounds
    to a neighbour with probability |inc| / D: variance D |inc| per step, damped by the EMA to
    D E|inc| / (1 - beta^2) ~ D E|g - m| / 2. Independent, unbiased noise gives exactly that per-element
    RMS error (bf16 6%, 8-bit 16% here); noise correlated over steps or elements, or a bias, would not.
    g - m is N(0.5 - m, 1), m the exact EMA's value; the variance has built up to 1 - beta^(2 T)."""
    m, exact = _slow_ema(mode)
    assert (m > 0).all()
    mu = 0.5 - exact.double().mean().item()
    mean_abs = math.sqrt(2 / math.pi) * math.exp(-(mu**2) / 2) + mu * math.erf(mu / math.sqrt(2))
    built_up = 1 - 0.9999 ** (2 * SLOW_EMA_STEPS)
    predicted = math.sqrt(_grid_spacing(m, mode).mean().item() * mean_abs / 2 * built_up)
    rms = (m.double() - exact.double()).pow(2).mean().sqrt().item()
    assert abs(rms / predicted - 1) < 0.15, (rms, predicted)


# ---- optimizers -------------------------------------------------------------------------------------


def _problem_params(dtype=torch.float32):
    w = torch.nn.Parameter(torch.zeros(64, 96, dtype=dtype))  # 6144 elements: 8-bit state
    b = torch.nn.Parameter(torch.zeros(96, dtype=dtype))  # small: float32 state in every mode
    return [w, b]


def _train(opt, params, start, stop):
    """Noisy linear regression; batch ``t`` depends only on ``t``."""
    gen = torch.Generator().manual_seed(0)
    A = torch.randn(128, 64, generator=gen) / 8
    target = torch.randn(64, 96, generator=gen)
    w, b = params
    for t in range(start, stop):
        gen.manual_seed(1000 + t)
        h = torch.randn(32, 128, generator=gen) @ A
        y = h @ target + 0.1 * torch.randn(32, 96, generator=gen)
        loss = ((h.to(w.dtype) @ w + b - y.to(w.dtype)).float() ** 2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        return ((w.float() - target) ** 2).mean().item()


@pytest.mark.parametrize("name", NAMES)
def test_every_mode_and_path_tracks_fp32(name):
    steps = 120
    ref_params = _problem_params()
    ref_opt = getattr(longmem, name)(ref_params, foreach=False, **HP[name])
    ref_loss = _train(ref_opt, ref_params, 0, steps)
    ref_w = ref_params[0].detach()
    for mode in LEAN:
        results = {}
        for path, kw in PATHS.items():
            params = _problem_params()
            opt = getattr(longmem, name)(params, state_precision=mode, **kw, **HP[name])
            loss = _train(opt, params, 0, steps)
            w = params[0].detach()
            rel = ((w - ref_w).norm() / ref_w.norm()).item()
            assert abs(loss / ref_loss - 1) < 0.05, (mode, path, loss, ref_loss)
            assert rel < (0.03 if mode == "bf16" else 0.12), (mode, path, rel)
            state = opt.state[params[0]]
            for buf in opt._buffers_for(opt.param_groups[0]):
                want = {"bf16": (torch.bfloat16,), "8bit": (torch.int8, torch.uint8)}[mode]
                assert state[buf].dtype in want and state[buf].shape == params[0].shape
                assert (buf + sp.SCALE_SUFFIX in state) == (mode == "8bit")
                assert opt.state[params[1]][buf].dtype == (
                    torch.bfloat16 if mode == "bf16" else torch.float32
                )
            results[path] = w.clone()
        # single-tensor and foreach run the same operations, and draw the same rounding noise; fused
        # agrees with them to float rounding, enough to flip some stochastic roundings: only tracking
        assert torch.equal(results["single"], results["foreach"]), mode


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_parameters(name, dtype):
    params = _problem_params(dtype)
    opt = getattr(longmem, name)(params, state_precision="8bit", **HP[name])
    loss = _train(opt, params, 0, 20)
    assert math.isfinite(loss) and params[0].dtype == dtype
    assert opt.state[params[0]][opt._buffers_for(opt.param_groups[0])[0]].dtype in (torch.int8, torch.uint8)


def test_float64_and_complex_keep_full_state():
    p = torch.nn.Parameter(torch.randn(80, 80, dtype=torch.float64))
    c = torch.nn.Parameter(torch.randn(80, 80, dtype=torch.complex64))
    for mode in LEAN:
        opt = longmem.AdEMAMix([p, c], state_precision=mode)
        p.grad, c.grad = torch.randn_like(p), torch.randn_like(c)
        opt.step()
        assert opt.state[p]["exp_avg_slow"].dtype == torch.float64
        assert opt.state[c]["exp_avg_slow"].dtype == torch.complex64


def test_state_bytes_per_parameter():
    """AdEMAMix keeps three buffers: 12 bytes per parameter in float32, 6 in bf16, ~3.05 in 8 bits."""
    per_param = {}
    for mode in MODES:
        p = torch.nn.Parameter(torch.zeros(256, 256))
        opt = longmem.AdEMAMix([p], state_precision=mode)
        p.grad = torch.randn_like(p)
        opt.step()
        per_param[mode] = sp.state_bytes(opt) / p.numel()
    assert per_param["fp32"] == pytest.approx(12, abs=1e-3)
    assert per_param["bf16"] == pytest.approx(6, abs=1e-3)
    assert (
        per_param["8bit"] == pytest.approx(3 + 3 * 4 / sp.BLOCK_SIZE, abs=1e-3) and per_param["8bit"] <= 3.5
    )


def test_fp32_mode_is_unchanged_bit_for_bit():
    """An explicit "fp32" runs the very code path of before; the same numbers as the default."""
    a, b = _problem_params(), _problem_params()
    _train(longmem.AdEMAMix(a, **HP["AdEMAMix"]), a, 0, 20)
    _train(longmem.AdEMAMix(b, state_precision="fp32", **HP["AdEMAMix"]), b, 0, 20)
    assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("mode", LEAN)
def test_codec_pieces_change_no_bit(name, mode, monkeypatch):
    """On CPU the codec runs over pieces of ``CODEC_PIECE`` elements (partial last blocks included):
    the rounding noise is drawn in the same order, so codes, scales and parameters are those of one
    piece."""

    def run(piece):
        monkeypatch.setattr(sp, "CODEC_PIECE", piece)
        gen = torch.Generator().manual_seed(0)
        params = [torch.nn.Parameter(torch.randn(n, generator=gen)) for n in (5000, 4396)]
        opt = getattr(longmem, name)(params, state_precision=mode, **HP[name])
        for _ in range(6):
            for p in params:
                p.grad = torch.randn(p.shape, generator=gen)
            opt.step()
        return opt, params

    assert sp.CODEC_PIECE % sp.BLOCK_SIZE == 0
    _assert_same(*run(10**9), *run(1280))


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("path", list(PATHS))
def test_large_tensors_step_in_pieces_change_no_bit(name, path, monkeypatch):
    """A tensor larger than ``CHUNK_ELEMENTS`` is stepped a piece at a time (its float32 work memory
    one piece): the same parameters, codes and scales as one piece, through mode changes (float32
    state encoded, 8-bit codes and bf16 decoded in pieces) and scalar state (SimplifiedAdEMAMix)."""
    calls = []
    step_in_pieces = sp._step_in_pieces

    def spy(*args, **kwargs):
        calls.append(args[2])
        return step_in_pieces(*args, **kwargs)

    def run(chunk):
        monkeypatch.setattr(sp, "CHUNK_ELEMENTS", chunk)
        gen = torch.Generator().manual_seed(0)
        params = [torch.nn.Parameter(torch.randn(n, generator=gen)) for n in (5000, 300, 4396)]
        opt = getattr(longmem, name)(params, **PATHS[path], **HP[name])
        for mode in ("fp32", "fp32", "8bit", "8bit", "8bit", "bf16", "bf16", "8bit"):
            opt.param_groups[0]["state_precision"] = mode
            for p in params:
                p.grad = torch.randn(p.shape, generator=gen)
            opt.step()
        return opt, params

    monkeypatch.setattr(sp, "_step_in_pieces", spy)
    whole = run(10**9)
    assert calls == []
    pieces = run(1024)
    assert calls and set(calls) == {0, 2}  # the two large tensors, at every lean step
    _assert_same(*whole, *pieces)


# ---- checkpoints --------------------------------------------------------------------------------------


def _roundtrip(state_dict):
    buffer = io.BytesIO()
    torch.save(state_dict, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


def _assert_same(opt_a, params_a, opt_b, params_b):
    for pa, pb in zip(params_a, params_b, strict=True):
        assert torch.equal(pa, pb)
        sa, sb = opt_a.state[pa], opt_b.state[pb]
        assert sa.keys() == sb.keys()
        for key in sa:
            assert sa[key].dtype == sb[key].dtype and torch.equal(sa[key], sb[key]), key


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("path", ["foreach", "fused"])
def test_bit_identical_resume(name, mode, path):
    total, cut = 24, 11
    ref_params = _problem_params()
    ref_opt = getattr(longmem, name)(ref_params, state_precision=mode, **PATHS[path], **HP[name])
    _train(ref_opt, ref_params, 0, total)

    params = _problem_params()
    opt = getattr(longmem, name)(params, state_precision=mode, **PATHS[path], **HP[name])
    _train(opt, params, 0, cut)
    saved = _roundtrip({"params": [p.detach().clone() for p in params], "opt": opt.state_dict()})
    assert saved["opt"]["param_groups"][0]["state_precision"] == mode

    resumed = _problem_params()
    with torch.no_grad():
        for p, q in zip(resumed, saved["params"], strict=True):
            p.copy_(q)
    # built in another mode: the checkpoint's mode and exact state win, as every saved hyperparameter
    other = "fp32" if mode != "fp32" else "8bit"
    new_opt = getattr(longmem, name)(resumed, state_precision=other, **PATHS[path], **HP[name])
    new_opt.load_state_dict(saved["opt"])
    assert new_opt.param_groups[0]["state_precision"] == mode
    _assert_same(opt, params, new_opt, resumed)  # the state as it was saved: codes, scales, bf16
    _train(new_opt, resumed, cut, total)
    _assert_same(ref_opt, ref_params, new_opt, resumed)


def test_changing_mode_converts_on_the_next_step():
    params = _problem_params()
    opt = longmem.AdEMAMix(params, state_precision="8bit", **HP["AdEMAMix"])
    _train(opt, params, 0, 5)
    w = params[0]
    decoded = {b: sp._decode(opt.state[w], b, w) for b in opt._buffers}
    opt.param_groups[0]["state_precision"] = "fp32"
    # what the next step starts from is the decoded 8-bit state, exactly
    probe = _problem_params()
    with torch.no_grad():
        for p, q in zip(probe, params, strict=True):
            p.copy_(q)
    ref = longmem.AdEMAMix(probe, **HP["AdEMAMix"])
    ref.state[probe[0]] = {"step": opt.state[w]["step"].clone(), **{b: v.clone() for b, v in decoded.items()}}
    ref.state[probe[1]] = {k: v.clone() for k, v in opt.state[params[1]].items()}
    _train(opt, params, 5, 6)
    _train(ref, probe, 5, 6)
    _assert_same(ref, probe, opt, params)
    assert all(opt.state[w][b].dtype == torch.float32 for b in opt._buffers)
    assert not any(k.endswith(sp.SCALE_SUFFIX) for k in opt.state[w])
    opt.param_groups[0]["state_precision"] = "bf16"
    _train(opt, params, 6, 7)
    assert all(opt.state[w][b].dtype == torch.bfloat16 for b in opt._buffers)


def test_switch_to_fp32_then_pickle_still_decodes_the_codes():
    """A group switched back to "fp32" and pickled before its next step: the codes are decoded, not
    read as numbers (pickling keeps only defaults, state and groups)."""
    params = _problem_params()
    opt = longmem.AdEMAMix(params, state_precision="8bit", **HP["AdEMAMix"])
    _train(opt, params, 0, 5)
    opt.param_groups[0]["state_precision"] = "fp32"
    copy = pickle.loads(pickle.dumps((opt, params)))
    _train(opt, params, 5, 6)
    _train(copy[0], copy[1], 5, 6)
    _assert_same(opt, params, copy[0], copy[1])
    assert copy[0].state[copy[1][0]]["exp_avg_sq"].dtype == torch.float32


def test_checkpoint_without_state_precision_keeps_the_optimizers_choice():
    """A state dict saved before the option existed: its float32 state, this optimizer's mode."""
    params = _problem_params()
    opt = longmem.AdaMod(params, **HP["AdaMod"])
    _train(opt, params, 0, 4)
    old = opt.state_dict()
    for group in old["param_groups"]:
        del group["state_precision"]
    new = longmem.AdaMod(params, state_precision="8bit", **HP["AdaMod"])
    new.load_state_dict(old)
    assert new.param_groups[0]["state_precision"] == "8bit"
    assert new.state[params[0]]["exp_avg"].dtype == torch.float32  # converted on the next step
    _train(new, params, 4, 5)
    assert new.state[params[0]]["exp_avg"].dtype == torch.int8


def _saved_8bit():
    params = _problem_params()
    opt = longmem.AdEMAMix(params, state_precision="8bit", **HP["AdEMAMix"])
    _train(opt, params, 0, 3)
    return params, opt


@pytest.mark.parametrize(
    "corrupt, message",
    [
        (lambda s: s.pop("exp_avg_sq_absmax"), "unexpected|needs 'exp_avg_sq_absmax'"),
        (lambda s: s.__setitem__("exp_avg_sq_absmax", torch.zeros(3)), r"shape \(24,\)"),
        (lambda s: s.__setitem__("exp_avg_sq_absmax", -torch.ones(24)), "negative"),
        (lambda s: s.__setitem__("exp_avg_sq", s["exp_avg_sq"].to(torch.int8)), "codes"),
        (lambda s: s.__setitem__("exp_avg_slow", s["exp_avg_slow"][:3]), "shape"),
        (lambda s: s.__setitem__("exp_avg_slow", torch.zeros(64, 96)), "is not 8-bit codes"),
        (lambda s: s.__setitem__("bogus_absmax", torch.zeros(24)), "unexpected"),
    ],
)
def test_bad_8bit_state_is_rejected_and_nothing_changes(corrupt, message):
    params, opt = _saved_8bit()
    saved = opt.state_dict()
    before = {k: v.clone() for k, v in opt.state[params[0]].items()}
    bad = _roundtrip(saved)
    corrupt(bad["state"][0])
    with pytest.raises(ValueError, match=message):
        opt.load_state_dict(bad)
    assert all(torch.equal(before[k], v) for k, v in opt.state[params[0]].items())


def test_8bit_state_needs_a_capable_parameter():
    _, opt = _saved_8bit()
    saved = opt.state_dict()
    p64 = [torch.nn.Parameter(torch.zeros(64, 96, dtype=torch.float64)), torch.nn.Parameter(torch.zeros(96))]
    other = longmem.AdEMAMix(p64, **HP["AdEMAMix"])
    with pytest.raises(ValueError, match="cannot have"):
        other.load_state_dict(saved)


# ---- in the fused kernels ---------------------------------------------------------------------------


def _steps(name, mode, kw, steps=6, dtype=torch.float32, seed=0, after_step=None):
    gen = torch.Generator().manual_seed(seed)
    params = [torch.nn.Parameter(torch.randn(n, generator=gen).to(dtype)) for n in (5000, 300, 70_000)]
    opt = getattr(longmem, name)(params, state_precision=mode, **kw, **HP[name])
    for _ in range(steps):
        for p in params:
            p.grad = torch.randn(p.shape, generator=gen).to(dtype)
        opt.step()
        if after_step is not None:
            after_step(opt, params)
    return opt, params


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("mode", LEAN)
def test_fused_lean_steps_decode_and_encode_in_the_kernels(name, mode, monkeypatch):
    """A fused step with its state in the group's form never makes a float32 copy of it: no torch
    decode or encode runs, the codes are updated in place, and the result tracks the foreach path."""
    calls = []
    for fn in ("_decode", "_encode", "_encode_into"):
        original = getattr(sp, fn)
        monkeypatch.setattr(sp, fn, lambda *a, _f=original, _n=fn, **k: calls.append(_n) or _f(*a, **k))
    storage = []

    def record(opt, params):
        state = opt.state[params[2]]
        kept = (*opt._buffers, *sp.scale_keys(opt._buffers))
        storage.append({k: (v.dtype, v.data_ptr()) for k, v in state.items() if k in kept})

    _, fused = _steps(name, mode, dict(fused=True), after_step=record)
    assert calls == []
    assert all(s == storage[0] for s in storage)  # the same tensors, step after step
    lean = (torch.bfloat16,) if mode == "bf16" else (torch.int8, torch.uint8, torch.float32)
    assert all(dtype in lean for dtype, _ in storage[0].values())
    monkeypatch.undo()
    _, ref = _steps(name, mode, dict(foreach=True))
    for p, q in zip(fused, ref, strict=True):
        torch.testing.assert_close(p, q, atol=2e-3, rtol=0)


@pytest.mark.parametrize("mode", LEAN)
def test_lean_kernels_generic_and_specialized_agree_bitwise(mode, monkeypatch):
    from longmem.kernels import cpu

    results = []
    for specialize in (False, True):
        monkeypatch.setattr(cpu, "SPECIALIZE", specialize)
        for name in NAMES:
            for dtype in (torch.float32, torch.bfloat16, torch.float16):
                opt, params = _steps(name, mode, dict(fused=True, param_rounding="stochastic"), 3, dtype)
                results.append((specialize, name, dtype, opt, params))
    half = len(results) // 2
    for (_, _, _, opt_a, a), (_, _, _, opt_b, b) in zip(results[:half], results[half:], strict=True):
        _assert_same(opt_a, a, opt_b, b)


@pytest.mark.parametrize("mode", LEAN)
def test_what_the_kernels_leave_is_decoded_and_encoded_as_the_foreach_path_does(mode, monkeypatch):
    """Lean buffers the fused kernels hand back (here all of them) are decoded, updated by the
    foreach path and encoded with the same noise: the foreach path's bits."""
    from longmem import kernels

    monkeypatch.setattr(kernels, "run_fused", lambda rule, params, *a, **k: list(range(len(params))))
    fallback = _steps("AdEMAMix", mode, dict(fused=True), 4)
    monkeypatch.undo()
    _assert_same(*fallback, *_steps("AdEMAMix", mode, dict(foreach=True), 4))


@pytest.mark.parametrize("mode", LEAN)
def test_fused_lean_without_a_compiler_runs_the_foreach_path(mode, monkeypatch, tmp_path):
    from longmem import kernels

    monkeypatch.setenv("LONGMEM_CC", str(tmp_path / "no-such-compiler"))
    kernels.reset()
    try:
        fused = _steps("DiffMod", mode, dict(fused=True), 4)
    finally:
        monkeypatch.delenv("LONGMEM_CC")
        kernels.reset()
    _assert_same(*fused, *_steps("DiffMod", mode, dict(foreach=True), 4))
