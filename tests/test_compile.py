"""torch.compile: a compiled step gives eager's numbers, in one graph, compiled once.

Each test steps two copies of the same parameters with the same gradients, one optimizer eagerly
and one through ``torch.compile(opt.step)`` (inductor's C++ backend unless said), and checks:

* the numbers: every parameter and state buffer within 1e-6 of the eager one, relative to the
  tensor's largest magnitude, over 20 steps (the compiled kernels round some operations
  differently from eager CPU kernels, which fuse some into FMAs: last-bit differences, measured at
  about 2e-7 over 20 steps);
* the graph: no graph break (``fullgraph=True`` where the path has none), and nothing compiled
  after the second step, whatever the step count, the schedules or the lr do (the state is created
  eagerly, as torch.optim's, so the first graph is already the steady one).

The default suite runs a few tiny cases (each compile takes seconds); the full matrix of
optimizers and options is marked ``slow`` (``pytest -m slow tests/test_compile.py``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import pytest
import torch
from torch._dynamo.utils import counters

import longmem

STEPS = 20
TOLERANCE = 1e-6
SHAPES = [(4, 5), (4, 5)]  # two tensors of one shape: their kernels are the same code, built once
LR = {"SimplifiedAdEMAMix": 1e-3}


@dataclass
class Run:
    worst: dict[str, float]  # per case: largest |compiled - eager| / max |eager| (parameters and state)
    graph_breaks: int
    graphs: int
    late_frames: int  # frames compiled after the second step


def _tensors(shapes, dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=gen, dtype=torch.float64).to(dtype) for s in shapes]


def _scale_error(a: torch.Tensor, b: torch.Tensor) -> float:
    if a.is_complex():
        a, b = torch.view_as_real(a), torch.view_as_real(b)
    a, b = a.double(), b.double()
    scale = a.abs().max().item()
    return (a - b).abs().max().item() / scale if scale > 0 else (a - b).abs().max().item()


def _case_id(case) -> str:
    name, options = case
    return name + "-" + ("-".join(f"{k}={v}" for k, v in options.items()) or "default")


def run_compiled(
    cases: list[tuple[str, dict[str, Any]]],
    *,
    shapes=SHAPES,
    dtype=torch.float32,
    backend: str = "inductor",
    fullgraph: bool = True,
    steps: int = STEPS,
    on_step=None,
) -> Run:
    """``steps`` steps of each case's optimizer, eagerly and compiled; the compiled optimizers step
    in one compiled function (one compile for all: each compile takes seconds). ``on_step(t, opt)``
    may change each optimizer between steps."""
    pairs = []
    for name, options in cases:
        cls = getattr(longmem, name)
        base = _tensors(shapes, dtype)
        params = [[torch.nn.Parameter(x.clone()) for x in base] for _ in range(2)]
        kw = {"lr": LR.get(name, 1e-2), **options}
        opts = [
            cls(ps, **{k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in kw.items()})
            for ps in params
        ]
        pairs.append((_case_id((name, options)), params, opts))

    def step_all():
        for _, _, (_, compiled) in pairs:
            compiled.step()

    torch._dynamo.reset()
    counters.clear()
    step = torch.compile(step_all, backend=backend, fullgraph=fullgraph)
    gen = torch.Generator().manual_seed(1)
    worst = {case: 0.0 for case, _, _ in pairs}
    warm_frames = 0
    for t in range(steps):
        for _, (eager_params, compiled_params), opts in pairs:
            for p, q in zip(eager_params, compiled_params, strict=True):
                g = torch.randn(p.shape, generator=gen, dtype=torch.float64).to(p.dtype)
                p.grad, q.grad = g.clone(), g.clone()
            if on_step is not None:
                for opt in opts:
                    on_step(t, opt)
            opts[0].step()
        step()
        if t == 1:
            warm_frames = counters["frames"]["total"]
        for case, (eager_params, compiled_params), (eager, compiled) in pairs:
            for p, q in zip(eager_params, compiled_params, strict=True):
                worst[case] = max(worst[case], _scale_error(p.detach(), q.detach()))
                for key, value in eager.state[p].items():
                    worst[case] = max(worst[case], _scale_error(value, compiled.state[q][key]))
    return Run(
        worst=worst,
        graph_breaks=sum(counters["graph_break"].values()),
        graphs=counters["stats"]["unique_graphs"],
        late_frames=counters["frames"]["total"] - warm_frames,
    )


def assert_clean(run: Run, *, graph_breaks: int = 0) -> None:
    off = {case: err for case, err in run.worst.items() if not err <= TOLERANCE}
    assert not off, f"compiled differs from eager (relative to each tensor's scale): {off}"
    assert run.graph_breaks == graph_breaks
    assert run.late_frames == 0, f"{run.late_frames} frames compiled after the second step"


# ---- the default suite: a few tiny cases -----------------------------------------------------------

NAMES = ["AdEMAMix", "SimplifiedAdEMAMix", "AdaMod", "DiffGrad", "DiffMod"]


def test_default_options_compile_to_one_graph_with_eager_numbers():
    """All five optimizers as constructed by default, stepped in one compiled function."""
    run = run_compiled([(name, {}) for name in NAMES])
    assert_clean(run)
    # one graph, compiled once: the state is created outside the graph (torch.optim's _init_group)
    assert run.graphs == 1 and run.late_frames == 0


def test_warmups_tensor_lr_scheduler_fused_and_weight_sums():
    """AdEMAMix's schedules cross the end of their warm-ups (step 8 and 12 of 20) while an LR
    scheduler changes its tensor lr every step; Simplified AdEMAMix's float64 weight sums
    (bias_correction1) under its beta1 warm-up; fused=True, which under compile traces the same rule
    (no ctypes calls to break the graph). One steady graph, never recompiled."""
    cases = [
        (
            "AdEMAMix",
            dict(
                lr=torch.tensor(1e-2),
                alpha=5.0,
                alpha_warmup=8,
                beta3_warmup=12.0,
                weight_decay=0.1,
                maximize=True,
            ),
        ),
        (
            "SimplifiedAdEMAMix",
            dict(alpha=2.0, beta1_warmup=10, bias_correction1=True, bias_correction2=False),
        ),
        ("DiffMod", {"fused": True, "len_memory": 10, "weight_decay": 0.1}),
    ]

    def schedule(t, opt):
        if isinstance(opt, longmem.AdEMAMix):
            opt.param_groups[0]["lr"].fill_(1e-2 * 0.9**t)

    assert_clean(run_compiled(cases, on_step=schedule))


def test_zero_dim_float64_parameters_are_updated():
    """torch's compiler loses in-place updates of a 0-d float64 graph input (torch's own compiled
    AdamW leaves such a parameter unchanged); longmem updates it through a view. Checked with the
    aot_eager backend, where the loss happens too, without inductor's C++ build."""
    run = run_compiled(
        [("SimplifiedAdEMAMix", {"bias_correction1": True}), ("AdaMod", {})],
        shapes=[(), (3,)],
        dtype=torch.float64,
        backend="aot_eager",
    )
    assert_clean(run)


def test_lean_state_and_nonfinite_checks_run_eagerly_inside_a_compiled_step():
    """state_precision (its noise keyed by host integers of the step) and nonfinite checks (a host
    read) run eagerly, so their numbers are eager's exactly; nothing recompiles as steps go."""
    lean = run_compiled([("AdEMAMix", {"state_precision": "bf16"})], fullgraph=False, backend="aot_eager")
    assert max(lean.worst.values()) == 0.0 and lean.late_frames == 0 and lean.graph_breaks == 1
    checked = run_compiled([("DiffGrad", {"nonfinite": "skip"})], fullgraph=False, backend="aot_eager")
    assert_clean(checked, graph_breaks=checked.graph_breaks)


@pytest.mark.parametrize("fused", [None, True])
def test_stochastic_parameter_rounding_inside_a_compiled_step_is_eagers(fused):
    """param_rounding="stochastic" on bf16 parameters: the group runs eagerly inside the compiled
    step (its noise is keyed by host integers), so parameters and state are eager's bit for bit, and
    the rounding did happen (the same steps with round-to-nearest end elsewhere)."""
    base = _tensors([(33, 7), (5,)], torch.bfloat16)
    runs = {}
    for rounding, compiled in (("stochastic", False), ("stochastic", True), ("nearest", False)):
        params = [torch.nn.Parameter(x.clone()) for x in base]
        opt = longmem.AdEMAMix(params, lr=1e-4, fused=fused, param_rounding=rounding)
        step = torch.compile(opt.step, backend="aot_eager") if compiled else opt.step
        gen = torch.Generator().manual_seed(3)
        for _ in range(6):
            for p in params:
                p.grad = torch.randn(p.shape, generator=gen).to(torch.bfloat16)
            step()
        runs[rounding, compiled] = (params, opt)
    (eager, opt_e), (comp, opt_c) = runs["stochastic", False], runs["stochastic", True]
    for p, q in zip(eager, comp, strict=True):
        assert torch.equal(p, q)
        for key, value in opt_e.state[p].items():
            assert torch.equal(value, opt_c.state[q][key]), key
    nearest = runs["nearest", False][0]
    assert any(not torch.equal(p, q) for p, q in zip(eager, nearest, strict=True))


def test_compiled_step_skips_nonfinite_gradients():
    p = torch.nn.Parameter(torch.ones(3))
    opt = longmem.AdaMod([p], nonfinite="skip")
    step = torch.compile(opt.step, backend="aot_eager")
    p.grad = torch.tensor([1.0, float("nan"), 1.0])
    step()
    assert torch.equal(p.detach(), torch.ones(3)) and opt.skipped_steps == 1 and not opt.state[p]
    p.grad = torch.ones(3)
    step()
    assert opt.state[p]["step"].item() == 1 and not torch.equal(p.detach(), torch.ones(3))


def test_tensor_steps_give_eager_schedules_exactly():
    """The step-dependent scalars computed as float64 tensors equal the eager doubles (SPEC's
    schedule values), including at and after the end of the warm-ups."""
    from longmem import schedules

    for t in (1.0, 7.0, 50.0, 99.0, 100.0, 101.0, 1e6):
        tt = torch.tensor(t, dtype=torch.float64)
        for args in (
            (0.9, 0.9999, 100),
            (0.0, 0.999, 100),
            (0.9, 0.0, 100),
            (0.0, 0.0, 100),
            (0.5, 0.99, None),
        ):
            eager = schedules.beta_halflife_schedule(t, *args)
            traced = schedules.beta_halflife_schedule(tt, *args)
            assert float(traced) == pytest.approx(eager, rel=1e-15, abs=1e-300), (t, args)
        assert float(schedules.alpha_schedule(tt, 5.0, 100)) == schedules.alpha_schedule(t, 5.0, 100)
    # SPEC.md's vector: beta_start 0.9, beta3 0.9999, T 100
    at = schedules.beta_halflife_schedule(torch.tensor(50.0, dtype=torch.float64), 0.9, 0.9999, 100)
    assert float(at) == pytest.approx(0.9998001996254803, rel=1e-15)


# ---- the full matrix (slow) ---------------------------------------------------------------------

MATRIX = [
    ("AdEMAMix", {"foreach": True}),
    ("AdEMAMix", {"foreach": False, "betas": (0.0, 0.999, 0.9999), "alpha_warmup": 10}),
    ("AdEMAMix", {"fused": True, "alpha_warmup": 5, "beta3_warmup": 15, "weight_decay": 0.1}),
    ("AdEMAMix", {"maximize": True, "lr": torch.tensor(1e-2)}),
    ("SimplifiedAdEMAMix", {"foreach": True, "alpha": 2.0}),
    ("SimplifiedAdEMAMix", {"fused": True, "beta1_warmup": 10, "bias_correction1": True}),
    ("SimplifiedAdEMAMix", {"betas": (0.0, 0.95), "beta1_warmup": 5, "maximize": True}),
    ("AdaMod", {"foreach": True, "weight_decay": 0.1}),
    ("AdaMod", {"fused": True, "maximize": True, "beta3": 0.0}),
    ("DiffGrad", {"foreach": True, "weight_decay": 0.1}),
    ("DiffGrad", {"fused": True, "maximize": True, "betas": (0.5, 0.9)}),
    ("DiffMod", {"foreach": True, "beta3": 0.5}),
    ("DiffMod", {"maximize": True, "lr": torch.tensor(3e-3)}),
]


def _skip_unless_slow(request):
    if "slow" not in (request.config.getoption("markexpr") or ""):
        pytest.skip("the full compile matrix takes minutes; run with -m slow")


@pytest.mark.slow
@pytest.mark.parametrize("case", MATRIX, ids=_case_id)
def test_matrix(case, request):
    _skip_unless_slow(request)
    assert_clean(run_compiled([case]))


@pytest.mark.slow
@pytest.mark.parametrize("name", ["AdEMAMix", "SimplifiedAdEMAMix", "AdaMod", "DiffGrad", "DiffMod"])
def test_matrix_complex_and_float64(name, request):
    """Complex parameters (as pairs of reals) and float64 ones, 0-d among them."""
    _skip_unless_slow(request)
    shapes = [(3, 2), (), (4,)]
    assert_clean(run_compiled([(name, {"weight_decay": 0.1})], shapes=shapes, dtype=torch.complex64))
    assert_clean(run_compiled([(name, {"foreach": True})], shapes=shapes, dtype=torch.float64))


@pytest.mark.slow
@pytest.mark.parametrize("name", ["AdEMAMix", "DiffMod"])
def test_matrix_lean_state(name, request):
    _skip_unless_slow(request)
    for mode in ("bf16", "8bit"):
        run = run_compiled([(name, {"state_precision": mode})], shapes=[(70, 70), (5,)], fullgraph=False)
        assert max(run.worst.values()) == 0.0 and run.late_frames == 0


@pytest.mark.slow
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_matrix_low_precision_parameters(dtype, request):
    """bf16/fp16 parameters, float32 state: the state within the tolerance; the parameters, rounded
    to their dtype once a step, land within one unit in the last place (the float32 values agree to
    float32 rounding, and rounding them can then differ by one ulp), resynchronized every step."""
    _skip_unless_slow(request)
    base = _tensors(SHAPES, dtype)
    a = [torch.nn.Parameter(x.clone()) for x in base]
    b = [torch.nn.Parameter(x.clone()) for x in base]
    eager, compiled = longmem.AdEMAMix(a, lr=1e-2), longmem.AdEMAMix(b, lr=1e-2)
    step = torch.compile(compiled.step, fullgraph=True)
    gen = torch.Generator().manual_seed(1)
    for _ in range(10):
        for p, q in zip(a, b, strict=True):
            g = torch.randn(p.shape, generator=gen).to(dtype)
            p.grad, q.grad = g.clone(), g.clone()
        eager.step()
        step()
        for p, q in zip(a, b, strict=True):
            ulp = torch.finfo(dtype).eps * p.detach().float().abs().clamp(min=torch.finfo(dtype).tiny)
            assert ((p.detach().float() - q.detach().float()).abs() <= ulp * 1.01).all()
            with torch.no_grad():
                q.copy_(p)
            for key, value in eager.state[p].items():
                assert _scale_error(value, compiled.state[q][key]) <= TOLERANCE, key
