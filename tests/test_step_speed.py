"""benchmarks/step_speed.py's timing-only 8-bit codec floors: they must run a kernel whose only change
is the codec, and leave the shipped kernels in place afterwards (otherwise the floor rows would time
something else, or later rows the floor)."""

from __future__ import annotations

import importlib.util
import sys
import warnings
from pathlib import Path

import pytest
import torch

from longmem.kernels import cpu, program

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "step_speed.py"


@pytest.fixture(scope="module")
def step_speed():
    sys.path.insert(0, str(SCRIPT.parent))
    try:
        spec = importlib.util.spec_from_file_location("step_speed", SCRIPT)
        module = importlib.util.module_from_spec(spec)
        sys.modules["step_speed"] = module  # its dataclasses look their module up there
        spec.loader.exec_module(module)
        yield module
    finally:
        sys.modules.pop("step_speed", None)
        sys.path.remove(str(SCRIPT.parent))


def test_floor_source_replaces_the_codec_and_nothing_else(step_speed):
    prog = program.Program(("m1", "nu", "m2"))
    prog.code.append((program.COPY, 2, 1, 1, 1))
    prog.scalars.append(0.0)
    shipped = cpu.lean_source(prog, ("s8", "u8", "s8"), False)
    assert "lm_enc_s8(" in shipped and "lm_dec_u8(" in shipped
    for floor, names in step_speed.FLOORS.items():
        source = step_speed._floor_source(cpu.lean_source, floor, prog, ("s8", "u8", "s8"), False)
        body = source.split(step_speed.FLOOR_CODECS, 1)[1]
        for name in ("lm_enc_s8", "lm_enc_u8", "lm_dec_s8", "lm_dec_u8"):
            assert (f"{name}(" in body) == (name not in names), (floor, name)
        undo = body
        for name in names:
            undo = undo.replace(f"floor_{name[3:]}(", f"{name}(")
        assert shipped.split('#include "longmem_ops.h"\n', 1)[1] == undo


def _codes(make) -> torch.Tensor:
    gen = torch.Generator().manual_seed(0)
    p = torch.nn.Parameter(torch.randn(4096, generator=gen))
    p.grad = torch.randn(4096, generator=gen)
    opt = make([p])
    for _ in range(3):
        opt.step()
    return opt.state[p]["exp_avg_slow"].clone()


def test_floor_rows_run_the_floor_kernel_and_restore_the_shipped_one(step_speed):
    source, cache = cpu.lean_source, cpu._specialized

    def shipped(ps):
        return step_speed.OPTIMIZERS["AdEMAMix"](ps, fused=True, state_precision="8bit")

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        before = _codes(shipped)
        floored = {name: _codes(make) for name, _, make in step_speed.floor_candidates()}
        after = _codes(shipped)
        foreach = _codes(
            lambda ps: step_speed.OPTIMIZERS["AdEMAMix"](ps, foreach=True, state_precision="8bit")
        )
    assert before.dtype == torch.int8
    assert torch.equal(before, after) and torch.equal(before, foreach)  # the shipped codec, on both paths
    for name, codes in floored.items():
        assert not torch.equal(codes, before), name  # the floor's kernel ran
    assert cpu.lean_source is source and cpu._specialized is cache
