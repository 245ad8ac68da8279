"""fused=True: the foreach path's numbers to float rounding, for every optimizer and option.

The fused CPU kernels (longmem.kernels) run the same traced rule in one pass over memory. These
tests compare them with the foreach path step by step, check the kernels' own pieces (dtype
conversions, sigmoid, the thread split, the code generator against the generic kernel), checkpoint
interchange, and the fallback when the kernel cannot be built. No timing here: see
benchmarks/step_speed.py.
"""

from __future__ import annotations

import copy
import math
import os
import shutil
import sys
import warnings
from pathlib import Path

import pytest
import torch

import longmem
from longmem import kernels
from longmem.kernels import cpu, program

SIZES = [(1,), (7,), (1_000_003,), (33, 65)]
STEPS = 10

# (optimizer, options): every option that changes the traced program or its scalars
CASES = [
    ("AdEMAMix", {}),
    ("AdEMAMix", {"weight_decay": 0.1}),
    ("AdEMAMix", {"maximize": True}),
    ("AdEMAMix", {"alpha_warmup": 20, "beta3_warmup": 20}),  # mid-warm-up for all 10 steps
    ("AdEMAMix", {"betas": (0.0, 0.999, 0.9999), "alpha": 5.0}),
    (
        "AdEMAMix",
        dict(betas=(0.0, 0.99, 0.999), alpha_warmup=4, beta3_warmup=6, weight_decay=0.1, maximize=True),
    ),
    ("SimplifiedAdEMAMix", {}),
    ("SimplifiedAdEMAMix", {"weight_decay": 0.1, "alpha": 2.0}),
    ("SimplifiedAdEMAMix", {"maximize": True, "beta1_warmup": 20}),
    ("SimplifiedAdEMAMix", {"bias_correction1": True}),
    ("SimplifiedAdEMAMix", {"bias_correction2": False, "betas": (0.9, 0.99)}),
    ("AdaMod", {}),
    ("AdaMod", {"weight_decay": 0.1}),
    ("AdaMod", {"maximize": True, "beta3": 0.0}),
    ("AdaMod", {"betas": (0.0, 0.999), "beta3": 0.9}),
    ("DiffGrad", {}),
    ("DiffGrad", {"weight_decay": 0.1}),
    ("DiffGrad", {"maximize": True, "betas": (0.5, 0.9)}),
    ("DiffMod", {}),
    ("DiffMod", {"weight_decay": 0.1, "len_memory": 10}),
    ("DiffMod", {"maximize": True, "beta3": 0.5}),
]
LR = {"SimplifiedAdEMAMix": 1e-3}


def _ids(case):
    name, options = case
    return name + "-" + ("-".join(f"{k}={v}" for k, v in options.items()) or "default")


def _pair(name, options, shapes, dtype=torch.float32, seed=0, **extra):
    """Two identical parameter lists, one with a fused optimizer, one with a foreach optimizer."""
    gen = torch.Generator().manual_seed(seed)
    base = [torch.randn(s, generator=gen).to(dtype) for s in shapes]
    a = [torch.nn.Parameter(x.clone()) for x in base]
    b = [torch.nn.Parameter(x.clone()) for x in base]
    hp = {"lr": LR.get(name, 1e-2), **options}
    cls = getattr(longmem, name)
    return a, cls(a, fused=True, **hp, **extra), b, cls(b, foreach=True, **hp)


def _step_both(a, opt_a, b, opt_b, steps=STEPS, seed=1, grad_every=None):
    gen = torch.Generator().manual_seed(seed)
    for t in range(steps):
        for i, (p, q) in enumerate(zip(a, b, strict=True)):
            if grad_every is not None and t % grad_every[i]:
                p.grad = q.grad = None
                continue
            g = torch.randn(p.shape, generator=gen, dtype=torch.float32).to(p.dtype) * 0.1
            p.grad, q.grad = g.clone(), g.clone()
        opt_a.step()
        opt_b.step()


def _state_close(opt_a, opt_b, a, b):
    for p, q in zip(a, b, strict=True):
        sa, sb = opt_a.state[p], opt_b.state[q]
        assert sa.keys() == sb.keys()
        for key in sa:
            assert sa[key].dtype == sb[key].dtype, key
            torch.testing.assert_close(sa[key], sb[key], msg=lambda m, key=key: f"state {key!r}: {m}")


def _ulps(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Distance in units in the last place of ``x``'s dtype (bf16/fp16), via the ordered bit patterns."""

    def ordered(t):
        bits = t.view(torch.int16).to(torch.int32)
        return torch.where(bits < 0, -(bits & 0x7FFF), bits)

    return (ordered(x) - ordered(y)).abs()


@pytest.mark.parametrize("case", CASES, ids=_ids)
def test_fused_matches_foreach_fp32(case):
    name, options = case
    a, opt_a, b, opt_b = _pair(name, options, SIZES)
    _step_both(a, opt_a, b, opt_b)
    for p, q in zip(a, b, strict=True):
        torch.testing.assert_close(p, q)
    _state_close(opt_a, opt_b, a, b)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("case", CASES[::2], ids=_ids)
def test_fused_matches_foreach_low_precision(case, dtype):
    """Each step lands within one ulp of the parameter's dtype of the foreach step (the float32
    working values agree to float32 rounding; rounding them can then differ by one ulp). The
    parameters are re-synchronized after each step so that such ulps cannot compound."""
    name, options = case
    a, opt_a, b, opt_b = _pair(name, options, [(1,), (7,), (100_003,)], dtype=dtype)
    for t in range(STEPS):
        _step_both(a, opt_a, b, opt_b, steps=1, seed=t)
        for p, q in zip(a, b, strict=True):
            assert p.dtype == dtype
            assert _ulps(p.detach(), q.detach()).max().item() <= 1
            with torch.no_grad():
                p.copy_(q)
    _state_close(opt_a, opt_b, a, b)  # float32 state


def test_mixed_dtypes_complex_and_leftovers_in_one_group():
    """float32, bfloat16, float16 and complex64 parameters share a kernel call; a non-contiguous
    parameter takes the foreach path inside the fused step."""
    shapes = [(1000,), (513,), (77,), (300,), (20, 30)]
    dtypes = [torch.float32, torch.bfloat16, torch.float16, torch.complex64, torch.float32]
    gen = torch.Generator().manual_seed(3)
    base = [torch.randn(s, generator=gen).to(dt) for s, dt in zip(shapes, dtypes, strict=True)]
    base[-1] = base[-1].t()  # non-contiguous
    a = [torch.nn.Parameter(x.clone()) for x in base]
    b = [torch.nn.Parameter(x.clone()) for x in base]
    for name in ("AdEMAMix", "DiffMod"):
        opt_a = getattr(longmem, name)(a, lr=1e-2, weight_decay=0.1, fused=True)
        opt_b = getattr(longmem, name)(b, lr=1e-2, weight_decay=0.1, foreach=True)
        gen = torch.Generator().manual_seed(4)
        for _ in range(5):
            for p, q in zip(a, b, strict=True):
                g = torch.randn(p.shape, generator=gen, dtype=torch.float32).to(p.dtype)
                if not p.is_contiguous():
                    g = g.t().contiguous().t()
                p.grad, q.grad = g.clone(), g.clone()
            opt_a.step()
            opt_b.step()
        for p, q in zip(a, b, strict=True):
            if p.dtype in (torch.bfloat16, torch.float16):
                assert _ulps(p.detach(), q.detach()).max().item() <= 1
            else:
                torch.testing.assert_close(p, q)
        _state_close(opt_a, opt_b, a, b)


@pytest.mark.parametrize(
    ("dtype", "device"), [(torch.float64, "cpu"), (torch.int64, "cpu"), (torch.float32, "meta")], ids=str
)
def test_explicit_fused_on_what_the_kernels_cannot_take_raises(dtype, device):
    """As torch.optim's fused=True: a RuntimeError naming what fused supports, raised before anything
    changes (no state, no parameter moved, no other group stepped); fused=None takes the best path."""
    good = torch.nn.Parameter(torch.ones(4))
    bad = torch.zeros(4, dtype=dtype, device=device)
    bad.grad = torch.ones_like(bad)
    good.grad = torch.ones_like(good)
    opt = longmem.AdEMAMix([{"params": [good]}, {"params": [bad]}], fused=True)
    with pytest.raises(
        RuntimeError, match=r"`fused=True` requires all the params to be floating point Tensors"
    ) as info:
        opt.step()
    assert str(dtype) in str(info.value) and "float32" in str(info.value) and device in str(info.value)
    assert not opt.state[good] and not opt.state[bad] and torch.equal(good.detach(), torch.ones(4))
    if dtype.is_floating_point and device == "cpu":
        longmem.AdEMAMix([bad], fused=None).step()
        assert not torch.equal(bad, torch.zeros(4, dtype=dtype))


def test_fused_dtypes_are_the_kernels():
    from longmem.kernels import cuda

    assert set(cpu.DTYPE_CODES) == set(cuda._VIEWS) == kernels.FUSED_DTYPES


def test_several_groups_tensor_lr_and_uneven_steps():
    """Groups with their own hyperparameters, lr as a 0-d tensor, and parameters that skip steps
    (no gradient: their step count stays behind, so one fused call sees several values of t)."""
    gen = torch.Generator().manual_seed(5)
    base = [torch.randn(n, generator=gen) for n in (100, 2000, 70_000, 9)]
    a = [torch.nn.Parameter(x.clone()) for x in base]
    b = [torch.nn.Parameter(x.clone()) for x in base]

    def groups(ps):
        return [
            {"params": ps[:2], "lr": torch.tensor(1e-2), "weight_decay": 0.1},
            {"params": ps[2:], "lr": 3e-3, "alpha_warmup": 8, "beta3_warmup": 8},
        ]

    opt_a = longmem.AdEMAMix(groups(a), fused=True)
    opt_b = longmem.AdEMAMix(groups(b), foreach=True)
    _step_both(a, opt_a, b, opt_b, grad_every=[1, 2, 3, 1])
    for p, q in zip(a, b, strict=True):
        torch.testing.assert_close(p, q)
    _state_close(opt_a, opt_b, a, b)
    assert [opt_a.state[p]["step"].item() for p in a] == [10, 5, 4, 10]


def test_param_without_grad_is_untouched():
    a = [torch.nn.Parameter(torch.ones(10)), torch.nn.Parameter(torch.ones(10))]
    opt = longmem.AdaMod(a, fused=True)
    a[0].grad = torch.ones(10)
    opt.step()
    assert opt.state[a[0]]["step"].item() == 1
    assert a[1] not in opt.state
    assert torch.equal(a[1], torch.ones(10))


def test_generic_and_specialized_kernels_agree_bitwise(monkeypatch):
    """The generated kernel and the generic interpreter compute through the same C operations."""
    results = {}
    for specialize in (False, True):
        monkeypatch.setattr(cpu, "SPECIALIZE", specialize)
        out = []
        for name, options in CASES[::3]:
            for dtype in (torch.float32, torch.bfloat16, torch.float16):
                a, opt_a, _, _ = _pair(name, options, [(7,), (4099,)], dtype=dtype)
                gen = torch.Generator().manual_seed(2)
                for _ in range(4):
                    for p in a:
                        p.grad = torch.randn(p.shape, generator=gen).to(dtype)
                    opt_a.step()
                out.append([p.detach().clone() for p in a])
        results[specialize] = out
    for x, y in zip(results[False], results[True], strict=True):
        for p, q in zip(x, y, strict=True):
            assert torch.equal(p, q)


def test_state_dicts_interchange_with_non_fused():
    """A fused run's checkpoint continues in a foreach optimizer and vice versa; the state dicts
    have the same keys, dtypes and shapes either way."""
    gen = torch.Generator().manual_seed(6)
    base = [torch.randn(n, generator=gen) for n in (5, 3000)]
    grads = [[torch.randn(n, generator=gen) for n in (5, 3000)] for _ in range(8)]

    def run(fused_first: bool):
        ps = [torch.nn.Parameter(x.clone()) for x in base]
        first = longmem.DiffMod(ps, lr=1e-2, weight_decay=0.1, fused=fused_first, foreach=not fused_first)
        for g in grads[:4]:
            for p, gi in zip(ps, g, strict=True):
                p.grad = gi.clone()
            first.step()
        saved = copy.deepcopy(first.state_dict())
        qs = [torch.nn.Parameter(p.detach().clone()) for p in ps]
        second = longmem.DiffMod(qs, lr=1e-2, weight_decay=0.1, fused=not fused_first, foreach=fused_first)
        second.load_state_dict(saved)
        for g in grads[4:]:
            for p, q, gi in zip(ps, qs, g, strict=True):
                p.grad, q.grad = gi.clone(), gi.clone()
            first.step()
            second.step()
        return saved, ps, qs, first, second

    saved_fused, ps, qs, first, second = run(True)
    for p, q in zip(ps, qs, strict=True):
        torch.testing.assert_close(p, q)
    _state_close(first, second, ps, qs)
    saved_foreach, ps, qs, first, second = run(False)
    for p, q in zip(ps, qs, strict=True):
        torch.testing.assert_close(p, q)

    # same layout from either path; the groups differ only in the flags
    def layout(state):
        return {k: (v.dtype, v.shape) for k, v in state.items()}

    for sa, sb in zip(saved_fused["state"].values(), saved_foreach["state"].values(), strict=True):
        assert layout(sa) == layout(sb)
    assert saved_fused["param_groups"][0]["fused"] is True


def test_fused_checkpoint_resumes_bitwise():
    ps = [torch.nn.Parameter(torch.randn(1000))]
    opt = longmem.AdEMAMix(ps, fused=True, alpha_warmup=10, beta3_warmup=10)
    for _ in range(3):
        ps[0].grad = torch.randn(1000)
        opt.step()
    qs = [torch.nn.Parameter(ps[0].detach().clone())]
    clone = longmem.AdEMAMix(qs, fused=True, alpha_warmup=10, beta3_warmup=10)
    clone.load_state_dict(copy.deepcopy(opt.state_dict()))
    g = torch.randn(1000)
    ps[0].grad, qs[0].grad = g.clone(), g.clone()
    opt.step()
    clone.step()
    assert torch.equal(ps[0], qs[0])


def test_functional_api_fused():
    from longmem.adamod import adamod

    gen = torch.Generator().manual_seed(7)
    outs = []
    for fused in (True, False):
        p = torch.randn(5000, generator=torch.Generator().manual_seed(0))
        bufs = [torch.zeros(5000) for _ in range(3)]
        step = torch.zeros(())
        for _ in range(3):
            g = torch.randn(5000, generator=gen)
            adamod([p], [g], [bufs[0]], [bufs[1]], [bufs[2]], [step], fused=fused, foreach=not fused,
                   lr=1e-2, beta1=0.9, beta2=0.999, beta3=0.999, eps=1e-8, weight_decay=0.0)  # fmt: skip
        outs.append(p)
        gen = torch.Generator().manual_seed(7)
    torch.testing.assert_close(outs[0], outs[1])


def test_version_counter_bumped():
    p = torch.nn.Parameter(torch.randn(100))
    opt = longmem.AdEMAMix([p], fused=True)
    p.grad = torch.randn(100)
    before = p._version
    opt.step()
    assert p._version > before


# ---- validation -----------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["AdEMAMix", "SimplifiedAdEMAMix", "AdaMod", "DiffGrad", "DiffMod"])
def test_fused_validation(name):
    cls = getattr(longmem, name)
    p = [torch.nn.Parameter(torch.zeros(3))]
    with pytest.raises(ValueError, match="fused"):
        cls(p, fused="yes")
    with pytest.raises(ValueError, match=r"fused.*foreach"):
        cls(p, fused=True, foreach=True)
    assert cls(p).param_groups[0]["fused"] is None
    opt = cls(p, fused=False, foreach=True)
    state = opt.state_dict()
    del state["param_groups"][0]["fused"]  # a checkpoint from before fused existed
    opt2 = cls([torch.nn.Parameter(torch.zeros(3))])
    opt2.load_state_dict(state)
    assert opt2.param_groups[0]["fused"] is None
    opt3 = cls(p)
    opt3.__setstate__({"state": {}, "param_groups": [{"params": p, **{k: v for k, v in opt3.defaults.items()
                                                                       if k != "fused"}}]})  # fmt: skip
    assert opt3.param_groups[0]["fused"] is None


def test_tracer_rejects_writing_the_gradient():
    def bad_rule(ops, t, p, g, buf):
        ops.mul_(g, 2.0)

    with pytest.raises(program.TraceError, match="gradient"):
        program.trace(bad_rule, 1.0, ["buf"], [])


# ---- the kernel's pieces ----------------------------------------------------------------------


def _run_on_buffer(op: int, values: torch.Tensor, scalar: float = 0.0) -> torch.Tensor:
    """Run the one-instruction program ``buf = op(buf, scalar)`` on float32 ``values``."""
    prog = program.Program(("buf",))
    prog.code.append((op, 2, 2, 2, 2))
    prog.scalars.append(scalar)
    buf = values.clone()
    cpu.run(prog, cpu.Batch.of([torch.zeros(buf.numel())], [torch.zeros(buf.numel())], [[buf]]), False)
    return buf


@pytest.mark.parametrize("specialize", [False, True])
def test_sigmoid_close_to_torch(monkeypatch, specialize):
    """The kernels' vectorizable exp: sigmoid within 3 float32 ulps of torch's own float32 sigmoid
    over the whole range (including where exp overflows, as torch's does), and within 2 ulps of
    the exactly rounded value wherever the result is normal."""
    monkeypatch.setattr(cpu, "SPECIALIZE", specialize)
    x = torch.cat([
        torch.linspace(-110, 110, 400_001),
        torch.tensor([0.0, -0.0, 1e-30, -1e-30, 88.0, -88.0, 104.0, -104.0, math.inf, -math.inf, math.nan]),
    ])  # fmt: skip
    got = _run_on_buffer(program.SIGMOID, x)
    torch_f32 = torch.sigmoid(x)
    assert torch.equal(got.isnan(), torch_f32.isnan())
    finite = ~torch_f32.isnan()
    assert (got[finite].view(torch.int32) - torch_f32[finite].view(torch.int32)).abs().max().item() <= 3
    exact = torch.sigmoid(x.double()).float()
    normal = finite & (exact.abs() >= torch.finfo(torch.float32).tiny)
    assert (got[normal].view(torch.int32) - exact[normal].view(torch.int32)).abs().max().item() <= 2


@pytest.mark.parametrize("specialize", [False, True])
def test_lerp_matches_torch_on_both_sides_of_one_half(monkeypatch, specialize):
    """The tracer picks lerp's formula from the float32 weight as torch's kernel does per element:
    bit for bit torch.lerp's result, for weights either side of 0.5, at 0.5, and for a double
    that only rounds to 0.5 in float32."""
    monkeypatch.setattr(cpu, "SPECIALIZE", specialize)
    gen = torch.Generator().manual_seed(0)
    start, end = torch.randn(4099, generator=gen), torch.randn(4099, generator=gen) * 3
    for weight in (0.0, 1e-8, 0.1, 0.4999999, 0.5 - 1e-12, 0.5, 0.5000001, 0.9, 0.9999, 1.0, -0.3, 1.7):

        def rule(ops, t, p, g, buf, weight=weight):
            ops.lerp_(buf, g, weight)

        prog = program.trace(rule, 1.0, ["buf"], [])
        small = abs(torch.tensor(weight, dtype=torch.float32).item()) < 0.5
        assert prog.code[0][0] == (program.LERP_LO if small else program.LERP_HI), weight
        buf = start.clone()
        cpu.run(prog, cpu.Batch.of([torch.zeros_like(buf)], [end], [[buf]]), False)
        want = torch.lerp(start, end, weight)
        assert torch.equal(buf, want), (weight, (buf - want).abs().max().item())


@pytest.mark.parametrize("specialize", [False, True])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_round_trip_and_rounding(monkeypatch, specialize, dtype):
    """Parameters are widened exactly and narrowed to nearest even, as torch's .to()."""
    monkeypatch.setattr(cpu, "SPECIALIZE", specialize)
    every = torch.arange(-(2**15), 2**15, dtype=torch.int32).to(torch.int16).view(dtype)  # all bit patterns
    # random factors in [0.5, 2): products land anywhere between representable values, and the
    # largest values overflow to inf; the exact values 1 and 2 check the plain round trip
    factor = torch.rand(every.numel(), generator=torch.Generator().manual_seed(0)) * 1.5 + 0.5
    factor[:1000] = 1.0
    factor[1000:2000] = 2.0
    prog = program.Program(("factor",))
    prog.code.append((program.MUL, 0, 0, 2, 2))
    prog.scalars.append(0.0)
    p = every.clone()
    cpu.run(prog, cpu.Batch.of([p], [torch.zeros_like(p)], [[factor.clone()]]), False)
    want = (every.float() * factor).to(dtype)
    same = (p.view(torch.int16) == want.view(torch.int16)) | (p.isnan() & want.isnan())
    assert bool(same.all()), (every[~same][:10], p[~same][:10], want[~same][:10])


def test_thread_split_covers_everything():
    numels = [1, 7, 1_000_003, 4096, 64, 3]
    for parts in (1, 2, 3, 5):
        cuts = cpu._split(numels, parts)
        assert cuts[0] == 0 and cuts[-1] == sum(numels) and len(cuts) == parts + 1
        assert cuts == sorted(cuts)


@pytest.mark.parametrize("openmp", [True, False], ids=["openmp", "python-threads"])
@pytest.mark.parametrize("specialize", [True, False], ids=["generated", "generic"])
def test_three_threads_match_one(monkeypatch, openmp, specialize):
    """A step split over three threads, on torch's OpenMP team (one ``longmem_parallel`` call) or
    on Python threads, gives one thread's bits, with the generated and the generic kernel."""
    lib = cpu.load()
    if openmp and not lib.openmp:
        pytest.skip("the kernel library is not an OpenMP build here")
    monkeypatch.setattr(lib, "openmp", openmp)
    monkeypatch.setattr(cpu, "SPECIALIZE", specialize)
    parallel_calls = []
    native = lib.lib.longmem_parallel

    def counted(*args):
        parallel_calls.append(args[0])
        return native(*args)

    monkeypatch.setattr(lib.lib, "longmem_parallel", counted)
    threads = torch.get_num_threads()
    outs = []
    try:
        for n in (1, 3):
            torch.set_num_threads(n)
            a, opt_a, _, _ = _pair("AdEMAMix", {"weight_decay": 0.1}, [(300_007,), (5,), (200_000,)])
            gen = torch.Generator().manual_seed(2)
            for _ in range(3):
                for p in a:
                    p.grad = torch.randn(p.shape, generator=gen)
                opt_a.step()
            outs.append(a)
    finally:
        torch.set_num_threads(threads)
    for p, q in zip(*outs, strict=True):
        assert torch.equal(p, q)
    kind = cpu.KIND_PROGRAM if specialize else cpu.KIND_RUN
    assert parallel_calls == ([kind] * 3 if openmp else []), parallel_calls


FORK_SCRIPT = r"""
import os, sys, torch, longmem
torch.set_num_threads(2)
ps = [torch.nn.Parameter(torch.randn(1 << 18, generator=torch.Generator().manual_seed(k))) for k in range(2)]
for p in ps:
    p.grad = torch.ones_like(p)
opt = longmem.AdEMAMix(ps, fused=True)
opt.step()  # the parent has run its thread team
pid = os.fork()
if pid == 0:
    opt.step()
    torch.save([p.detach() for p in ps], sys.argv[1])
    os._exit(0)
os.waitpid(pid, 0)
opt.step()
child = torch.load(sys.argv[1])
assert all(torch.equal(p.detach(), q) for p, q in zip(ps, child)), "the child's step differs"
print("ok")
"""


@pytest.mark.skipif(not hasattr(os, "fork"), reason="no fork")
def test_fused_step_in_a_forked_child(tmp_path):
    """A child forked after the parent's fused steps ran on threads steps too (GNU OpenMP would hang
    starting a team there: the child uses Python threads), with the parent's numbers."""
    import subprocess

    script = tmp_path / "fork.py"
    script.write_text(FORK_SCRIPT)
    result = subprocess.run(
        [sys.executable, str(script), str(tmp_path / "child.pt")], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0 and result.stdout.strip().endswith("ok"), result.stdout + result.stderr


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="OpenMP builds are checked on Linux")
def test_kernels_share_torchs_openmp_runtime():
    """On Linux the generic library is built with -fopenmp and its OpenMP calls go to torch's
    runtime (the libgomp in torch's lib folder where the wheel ships one), also when another
    package has loaded a runtime of its own, so a step's threads are the team torch keeps warm."""
    lib = cpu.load()
    if "clang" in Path(cpu._builder.compiler).name:  # clang's -fopenmp is libomp, a second runtime
        pytest.skip("clang")
    assert lib.openmp, lib.openmp_library
    shipped = sorted((Path(torch.__file__).parent / "lib").glob("libgomp*"))
    if shipped:
        assert os.path.realpath(lib.openmp_library) in {os.path.realpath(p) for p in shipped}
    with open("/proc/self/maps") as f:
        assert any(os.path.realpath(line.split()[-1]) == os.path.realpath(lib.openmp_library) for line in f)


# ---- fallback ---------------------------------------------------------------------------------


@pytest.fixture
def broken_compiler(monkeypatch, tmp_path):
    monkeypatch.setenv("LONGMEM_CC", str(tmp_path / "no-such-compiler"))
    kernels.reset()
    yield
    monkeypatch.delenv("LONGMEM_CC")
    kernels.reset()


def test_compiler_without_openmp_builds_once_without_it(monkeypatch, tmp_path):
    """A compiler that refuses -fopenmp: the generic library is built without it (Python threads,
    the same numbers), and the refusal is remembered, so later processes do not ask again."""
    log = tmp_path / "calls.txt"
    wrapper = tmp_path / "cc-no-openmp"
    real = shutil.which("cc") or shutil.which("gcc")
    if real is None:
        pytest.skip("no C compiler")
    wrapper.write_text(
        "#!/bin/sh\n"
        f'echo "$*" >> {log}\n'
        'case " $* " in *" -fopenmp "*) echo "no OpenMP here" >&2; exit 1;; esac\n'
        f'exec {real} "$@"\n'
    )
    wrapper.chmod(0o755)
    monkeypatch.setenv("LONGMEM_CC", str(wrapper))
    monkeypatch.setenv("LONGMEM_CACHE_DIR", str(tmp_path / "cache"))
    try:
        asked = []
        for _ in range(2):
            kernels.reset()
            lib = cpu.load()
            assert not lib.openmp and lib.openmp_library == ""
            asked.append(sum("-fopenmp" in line for line in log.read_text().splitlines()))
        assert asked[0] >= 1 and asked[1] == asked[0], asked  # asked by the first load only
        a, opt_a, b, opt_b = _pair("AdEMAMix", {"weight_decay": 0.1}, [(7,), (300_007,)])
        _step_both(a, opt_a, b, opt_b, steps=2)
        for p, q in zip(a, b, strict=True):
            torch.testing.assert_close(p, q)
    finally:
        monkeypatch.delenv("LONGMEM_CC")
        monkeypatch.delenv("LONGMEM_CACHE_DIR")
        kernels.reset()


def test_failed_build_warns_once_and_runs_foreach(broken_compiler):
    a, opt_a, b, opt_b = _pair("AdEMAMix", {"weight_decay": 0.1}, [(7,), (100_003,)])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _step_both(a, opt_a, b, opt_b, steps=3)
    fallback = [w for w in caught if issubclass(w.category, kernels.FusedFallbackWarning)]
    assert len(fallback) == 1
    assert "foreach" in str(fallback[0].message) and "LONGMEM_CC" in str(fallback[0].message)
    for p, q in zip(a, b, strict=True):
        assert torch.equal(p, q)  # the foreach path itself


# ---- CUDA (Triton) ----------------------------------------------------------------------------

TRITON_INTERPRETER_SCRIPT = r"""
import torch
import longmem
from longmem import kernels
from longmem.kernels import cuda

kernels.run_fused = cuda.run_all  # the CPU tensors go to the Triton kernel, run by the interpreter
cases = [
    ("AdEMAMix", dict(weight_decay=0.1, alpha_warmup=5, beta3_warmup=5, maximize=True)),
    ("AdEMAMix", dict(betas=(0.0, 0.999, 0.9999))),
    ("SimplifiedAdEMAMix", dict(bias_correction1=True, alpha=2.0)),
    ("AdaMod", dict(weight_decay=0.1)),
    ("DiffGrad", dict(weight_decay=0.1, maximize=True)),
    ("DiffMod", dict(weight_decay=0.1)),
]
# bfloat16 is left out: the interpreter truncates float32 -> bfloat16 (the GPU rounds to nearest even)
for dtype in (torch.float32, torch.float16, torch.complex64):
    for name, options in cases:
        gen = torch.Generator().manual_seed(0)
        base = [torch.randn(s, generator=gen).to(dtype) for s in [(1,), (7,), (3000,), (5, 13)]]
        a = [torch.nn.Parameter(x.clone()) for x in base]
        b = [torch.nn.Parameter(x.clone()) for x in base]
        opt_a = getattr(longmem, name)(a, lr=1e-2, fused=True, **options)
        opt_b = getattr(longmem, name)(b, lr=1e-2, foreach=True, **options)
        for _ in range(4):
            for p, q in zip(a, b):
                g = torch.randn(p.shape, generator=gen).to(dtype)
                p.grad, q.grad = g.clone(), g.clone()
            opt_a.step()
            opt_b.step()
        for p, q in zip(a, b):
            torch.testing.assert_close(p, q, msg=lambda m: f"{name} {options} {dtype}: {m}")
# lean state, decoded and encoded in the kernel, and stochastically rounded bf16/fp16 parameters:
# the same codec and noise as the foreach path, so the runs agree to the rounding of a few codes
for mode in ("bf16", "8bit"):
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        for name, options in cases[::2] if dtype != torch.float16 else cases[:1]:
            gen = torch.Generator().manual_seed(1)
            base = [torch.randn(s, generator=gen).to(dtype) for s in [(5000,), (300,)]]
            a = [torch.nn.Parameter(x.clone()) for x in base]
            b = [torch.nn.Parameter(x.clone()) for x in base]
            kw = dict(lr=1e-2, state_precision=mode, param_rounding="stochastic", **options)
            opt_a = getattr(longmem, name)(a, fused=True, **kw)
            opt_b = getattr(longmem, name)(b, foreach=True, **kw)
            for _ in range(3):
                for p, q in zip(a, b):
                    g = torch.randn(p.shape, generator=gen).to(dtype)
                    p.grad, q.grad = g.clone(), g.clone()
                opt_a.step()
                opt_b.step()
            codes = opt_a.state[a[0]][opt_a._buffers_for(opt_a.param_groups[0])[-1]]
            assert codes.dtype in (torch.bfloat16, torch.int8, torch.uint8), (mode, codes.dtype)
            for p, q in zip(a, b):
                torch.testing.assert_close(p.float(), q.float(), atol=2e-2, rtol=0,
                                           msg=lambda m: f"{name} {mode} {dtype}: {m}")
                assert (p != q).float().mean() < 0.05, (name, mode, dtype)
print("ok")
"""


def test_triton_source_compiles_for_every_case():
    """The generated Triton kernels are valid Python for every optimizer and option (no Triton needed)."""
    from longmem.kernels import cuda, vectorization

    for name, options in CASES:
        a, opt_a, _, _ = _pair(name, options, [(3,)])
        a[0].grad = torch.ones(3)
        with vectorization.recorded_programs() as programs:
            opt_a.step()
        assert opt_a.param_groups[0]["fused"] and len(programs) == 1
        compile(cuda.kernel_source(programs[0]), f"<{name}>", "exec")


def test_triton_kernel_in_interpreter(tmp_path):
    """The Triton kernel (as it would run on CUDA), executed by Triton's CPU interpreter."""
    pytest.importorskip("triton")
    import os
    import subprocess
    import sys

    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": os.pathsep.join(sys.path),
           "LONGMEM_CACHE_DIR": str(tmp_path)}  # fmt: skip
    result = subprocess.run([sys.executable, "-c", TRITON_INTERPRETER_SCRIPT], env=env, capture_output=True,
                            text=True, timeout=600)  # fmt: skip
    assert result.returncode == 0 and result.stdout.strip().endswith("ok"), result.stderr[-3000:]


def test_triton_kernels_compile_for_sm90():
    """Triton's own compiler (it needs no GPU) takes every optimizer's generated kernel for sm_90
    (H100/H200) to a cubin, with IEEE division and square root, no multiply-add contracted beyond
    the explicit fma, and 128-bit loads and stores on aligned full blocks: what the interpreter
    cannot check. The same checks as benchmarks/gpu_acceptance.py's pieces section."""
    pytest.importorskip("triton")
    import os
    import sys

    if os.environ.get("TRITON_INTERPRET") == "1":
        pytest.skip("TRITON_INTERPRET=1: Triton's language is the interpreter's")
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
    try:
        import gpu_acceptance
    finally:
        sys.path.pop(0)
    ok, detail = gpu_acceptance.aot_checks(list(gpu_acceptance.NAMES))
    assert ok, detail


def test_lean_triton_kernels_compile_for_sm90():
    """The lean Triton kernels (bf16 and 8-bit state decoded and encoded in the kernel; bf16
    parameters stochastically rounded) compile to sm_90 cubins with Triton's own compiler, with IEEE
    division and square root in the rule: the interpreter runs their code, only this compiles it."""
    pytest.importorskip("triton")
    import os

    from longmem.kernels import cuda
    from longmem.kernels.vectorization import recorded_programs

    if os.environ.get("TRITON_INTERPRET") == "1":
        pytest.skip("TRITON_INTERPRET=1: Triton's language is the interpreter's")
    p = torch.nn.Parameter(torch.zeros(3))
    p.grad = torch.ones(3)
    with recorded_programs() as programs:
        longmem.AdEMAMix([p], fused=True).step()
    prog = programs[0]
    n = len(prog.buffers)
    for forms, dtype, stochastic in (
        (("bf16",) * n, torch.float32, False),
        (("s8",) * (n - 1) + ("u8",), torch.bfloat16, True),
        (("f32",) * n, torch.float16, True),
    ):
        asm = cuda.compile_ahead(prog, dtype, forms=forms, stochastic=stochastic)
        assert asm.get("cubin"), (forms, dtype)
        ptx = asm["ptx"]
        assert "div.rn.f32" in ptx and "sqrt.rn.f32" in ptx, (forms, dtype)
        assert "div.approx" not in ptx and "div.full" not in ptx, (forms, dtype)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("case", CASES, ids=_ids)
def test_fused_matches_foreach_on_cuda(case, dtype):
    name, options = case
    gen = torch.Generator().manual_seed(0)
    base = [torch.randn(s, generator=gen).to(dtype).cuda() for s in SIZES]
    a = [torch.nn.Parameter(x.clone()) for x in base]
    b = [torch.nn.Parameter(x.clone()) for x in base]
    hp = {"lr": LR.get(name, 1e-2), **options}
    opt_a = getattr(longmem, name)(a, fused=True, **hp)
    opt_b = getattr(longmem, name)(b, foreach=True, **hp)
    for t in range(STEPS):
        for p, q in zip(a, b, strict=True):
            g = (torch.randn(p.shape, generator=gen) * 0.1).to(dtype).cuda()
            p.grad, q.grad = g.clone(), g.clone()
        opt_a.step()
        opt_b.step()
        for p, q in zip(a, b, strict=True):
            if dtype == torch.float32:
                torch.testing.assert_close(p, q, msg=lambda m, t=t: f"step {t + 1}: {m}")
            else:
                assert _ulps(p.detach().cpu(), q.detach().cpu()).max().item() <= 1
                with torch.no_grad():
                    p.copy_(q)
    _state_close(opt_a, opt_b, a, b)
