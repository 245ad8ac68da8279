"""Every loop of the fused CPU kernels that touches elements vectorizes, on every CPU level.

A loop the compiler leaves scalar makes a fused step several times slower than torch's AdamW on
CPUs where it cannot mask a branch (AVX2, SSE, NEON): the fused AdEMAMix step once ran 3-5x torch's
fused AdamW on an AVX2 host because lerp branched on its scalar weight inside the loop, and diffGrad
10x because the sigmoid's exp chained float ternaries. These tests compile each optimizer's
generated kernel, for every configuration of tests/test_fused.py's CASES, and the generic kernel,
with the kernels' own flags for each x86-64 level and for Arm (with Debian's gcc-aarch64-linux-gnu
cross compiler; skipped where it is not installed), and read the compiler's vectorization report.
No timing: whether a loop is vectorized is a property of the code.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from longmem.kernels import cpu, vectorization
from test_fused import CASES, _pair

TARGETS = list(vectorization.TARGETS)


def _programs() -> dict[tuple, object]:
    """The programs of every case, at steps 1 and 2 (warm-ups move lerp's weight across 0.5)."""
    found = {}
    for name, options in CASES:
        params, opt, _, _ = _pair(name, options, [(3,)])
        with vectorization.recorded_programs() as programs:
            for _ in range(2):
                params[0].grad = torch.ones(3)
                opt.step()
        assert programs, f"{name} {options}: no fused program was traced"
        for prog in programs:
            found.setdefault(prog.signature(), (name, options, prog))
    return found


@pytest.fixture(scope="module")
def programs():
    return _programs()


def _compiler_or_skip(target: str) -> None:
    machine = vectorization.TARGETS[target][0]
    if vectorization.compiler_for(machine) is None:
        package = f"gcc-{machine.replace('_', '-')}-linux-gnu"
        pytest.skip(f"no C compiler for {machine} here (Debian's package: {package})")


def test_the_programs_cover_both_lerp_forms(programs):
    """The configurations include a weight on each side of 0.5, so both lerp formulas are compiled."""
    from longmem.kernels import program

    ops = {row[0] for _, _, prog in programs.values() for row in prog.code}
    assert {program.LERP_LO, program.LERP_HI, program.SIGMOID, program.MIN} <= ops


@pytest.mark.parametrize("target", TARGETS)
def test_every_generated_kernel_vectorizes(target, programs):
    _compiler_or_skip(target)
    cases = list(programs.values())
    with ThreadPoolExecutor(os.cpu_count() or 1) as pool:  # one compiler process per core
        reports = pool.map(lambda case: vectorization.check(cpu.specialized_source(case[2]), target), cases)
    failed = []
    for (name, options, prog), report in zip(cases, reports, strict=True):
        assert len(report.loops) == 3, "one body loop per parameter dtype (float32, bfloat16, float16)"
        if not report.ok:
            failed.append(f"{name} {options}:\n{report.failures()}\n{prog}")
    assert not failed, f"{target}: loops left scalar:\n" + "\n\n".join(failed)


@pytest.mark.parametrize("target", TARGETS)
def test_generic_kernel_vectorizes(target):
    _compiler_or_skip(target)
    report = vectorization.check(vectorization.generic_source(), target)
    assert len(report.loops) >= 6
    assert report.ok, f"{target}:\n{report.failures()}"


def test_the_check_sees_a_scalar_loop():
    """The check itself can fail: a chain of float ternaries (as the sigmoid's exp once had) is
    reported as not vectorized for x86-64-v3, where gcc leaves it as branches."""
    source = """
#include "longmem_ops.h"
void f(float *restrict d, const float *restrict a, long n) {
    for (long i = 0; i < n; i++) { /* LM_BODY_LOOP */
        float x = a[i], y = x * 2.0f;
        y = x > 88.0f ? INFINITY : y;
        y = x < -104.0f ? 0.0f : y;
        d[i] = x != x ? x : y;
    }
}
"""
    report = vectorization.check(source, "x86-64-v3")
    assert list(report.loops.values()) == [False]
    assert "control flow" in report.failures()


def test_host_kernels_vectorize(programs):
    """As built here (-march=native or what the builder fell back to): one program per optimizer."""
    first = {name: (name, options, prog) for name, options, prog in reversed(programs.values())}
    for name, options, prog in first.values():
        report = vectorization.check_host(cpu.specialized_source(prog))
        assert report.ok, f"{name} {options} ({report.target}):\n{report.failures()}"


def _lean_kernels() -> list[tuple[str, vectorization.Kernel]]:
    """The lean kernels (state decoded and encoded in the loop; bf16/fp16 parameters stochastically
    rounded) the fused steps ask for, with bf16 parameters rounded stochastically: AdEMAMix's and
    DiffMod's first configurations with 8-bit state (signed and unsigned codes, a buffer the rule
    copies into), AdEMAMix's also with bf16 state and a small tensor's float32 state. The rules'
    own operations are checked in the fp32 kernels above; four kernels cover every form and keep
    this test short (each 8-bit kernel takes gcc about a second per target)."""
    found: dict[tuple, tuple[str, vectorization.Kernel]] = {}
    seen = set()
    for name, options in CASES:
        if name in seen or name not in ("AdEMAMix", "DiffMod"):
            continue
        seen.add(name)
        for mode in ("bf16", "8bit") if name == "AdEMAMix" else ("8bit",):
            shapes = [(5000,), (3,)] if name == "AdEMAMix" else [(5000,)]
            params, opt, _, _ = _pair(name, options, shapes, dtype=torch.bfloat16,
                                      state_precision=mode, param_rounding="stochastic")  # fmt: skip
            with vectorization.recorded_kernels() as kernels:
                for p in params:
                    p.grad = torch.ones_like(p)
                opt.step()
            for k in kernels:
                assert k.forms is not None and k.stochastic, (name, mode)
                found.setdefault((k.program.signature(), k.forms), (f"{name} {mode}", k))
    return list(found.values())


@pytest.fixture(scope="module")
def lean_kernels():
    return _lean_kernels()


def test_the_lean_kernels_cover_every_form(lean_kernels):
    forms = {f for _, k in lean_kernels for f in k.forms}
    assert forms == {"f32", "bf16", "s8", "u8"}


@pytest.mark.parametrize("target", TARGETS)
def test_every_lean_kernel_vectorizes(target, lean_kernels):
    """Decoding, the counter-based noise, stochastic rounding and the 8-bit encoding (with its
    block absmax) keep every loop vectorized."""
    _compiler_or_skip(target)
    failed = []
    for label, kernel in lean_kernels:
        report = vectorization.check(kernel.source(), target)
        eight = sum(f in ("s8", "u8") for f in kernel.forms)
        # per parameter dtype: the body loop, and an encode loop per 8-bit buffer
        assert len(report.loops) == 3 * (1 + eight)
        if not report.ok:
            failed.append(f"{label} {kernel.forms}:\n{report.failures()}")
    assert not failed, f"{target}: loops left scalar:\n" + "\n\n".join(failed)
