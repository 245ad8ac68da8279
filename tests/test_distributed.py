"""longmem under torch.distributed on CPU (gloo, 2 processes): DDP, FSDP2, ZeRO, distributed checkpoints.

One 2-process job (tests/dist_scenarios.py) runs every scenario once; each test checks one of them
against a single-process run on the same data, in this process.
"""

from __future__ import annotations

import copy
import socket
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist

import dist_scenarios as ds
import longmem

if not (dist.is_available() and dist.is_gloo_available()):
    pytest.skip("torch.distributed with gloo is not available", allow_module_level=True)

JOB_TIMEOUT_S = 400
CLOSE = dict(rtol=1e-9, atol=1e-11)  # float64 runs whose gradients are reduced in another order
CLOSE_F32 = dict(rtol=1e-5, atol=1e-6)


@dataclass
class Job:
    out: Path
    error: str | None
    seconds: float


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def job(tmp_path_factory: pytest.TempPathFactory) -> Job:
    import torch.multiprocessing as mp

    out = tmp_path_factory.mktemp("distributed")
    start = time.monotonic()
    ctx = mp.start_processes(
        ds.worker, args=(_free_port(), str(out)), nprocs=ds.WORLD, join=False, start_method="spawn"
    )
    error = None
    try:
        while not ctx.join(timeout=2):
            if time.monotonic() - start > JOB_TIMEOUT_S:
                for process in ctx.processes:
                    process.kill()
                error = f"the 2-process job took more than {JOB_TIMEOUT_S} s and was stopped"
                break
    except Exception as err:  # a worker failed: its scenario wrote a .err file
        error = f"{type(err).__name__}: {err}"
    return Job(out, error, time.monotonic() - start)


_loaded: dict[str, Any] = {}


def result(job: Job, scenario: str) -> Any:
    """What rank 0 saved for ``scenario``; fails with the worker's traceback if it raised."""
    if scenario not in _loaded:
        err = job.out / f"{scenario}.err"
        if err.exists():
            pytest.fail(
                f"scenario {scenario!r} raised in the 2-process job:\n{err.read_text()}", pytrace=False
            )
        pt = job.out / f"{scenario}.pt"
        if not pt.exists():
            pytest.fail(f"scenario {scenario!r} did not run: {job.error}", pytrace=False)
        _loaded[scenario] = torch.load(pt, weights_only=False)
    return _loaded[scenario]


def _named_params(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.detach() for name, p in model.named_parameters()}


def _named_state(model: torch.nn.Module, opt: torch.optim.Optimizer) -> dict[str, dict[str, torch.Tensor]]:
    names = {id(p): name for name, p in model.named_parameters()}
    return {
        names[id(p)]: {k: v for k, v in s.items() if isinstance(v, torch.Tensor)}
        for p, s in opt.state.items()
    }


def assert_tensors(
    got: dict, want: dict, exact: bool = False, where: str = "", tol: dict[str, float] = CLOSE
) -> None:
    assert got.keys() == want.keys(), where
    for key in want:
        if isinstance(want[key], dict):
            assert_tensors(got[key], want[key], exact, f"{where}{key}/", tol)
        elif exact:
            assert torch.equal(got[key], want[key]), f"{where}{key} differs"
        else:
            torch.testing.assert_close(got[key], want[key], **tol, msg=lambda m, k=key: f"{where}{k}: {m}")


@pytest.fixture(scope="module")
def references() -> dict[str, tuple[torch.nn.Module, torch.optim.Optimizer]]:
    return {name: ds.reference(name) for name in ds.CONFIGS}


def test_job_ran(job: Job) -> None:
    assert job.error is None, job.error


@pytest.mark.parametrize("name", list(ds.CONFIGS))
def test_ddp_matches_single_process(job: Job, references: dict, name: str) -> None:
    got = result(job, "ddp")[name]
    assert_tensors(got, _named_params(references[name][0]))


def test_zero_redundancy_optimizer_matches_single_process(job: Job, references: dict) -> None:
    got = result(job, "zero")
    model, _ = references["ademamix"]
    total = sum(p.numel() for p in model.parameters())
    assert 0 < got["owned"] < total, "ZeroRedundancyOptimizer did not partition the parameters"
    assert_tensors(got["params"], _named_params(model))
    assert_tensors(got["reloaded"], got["continued"], exact=True)


def test_zero_consolidated_state_dict_loads_into_one_process(job: Job, references: dict) -> None:
    state_dict = result(job, "zero")["state_dict"]
    ref_model, ref_opt = copy.deepcopy(references["ademamix"])  # deepcopy keeps opt's params the model's
    model = ds.make_model()
    kwargs = dict(ds.CONFIGS["ademamix"])
    opt = longmem.AdEMAMix(longmem.param_groups(model, kwargs.pop("weight_decay")), **kwargs)
    opt.load_state_dict(state_dict)
    with torch.no_grad():
        for p, q in zip(model.parameters(), ref_model.parameters(), strict=True):
            p.copy_(q)
    assert_tensors(_named_state(model, opt), _named_state(ref_model, ref_opt))
    # and it steps on from there as the reference does
    ds.train(model, opt, range(ds.STEPS, ds.STEPS + 2), None)
    ds.train(ref_model, ref_opt, range(ds.STEPS, ds.STEPS + 2), None)
    assert_tensors(_named_params(model), _named_params(ref_model))


@pytest.mark.parametrize("mode", ["single", "foreach"])
@pytest.mark.parametrize("name", list(ds.CONFIGS))
def test_fsdp2_matches_single_process(job: Job, references: dict, name: str, mode: str) -> None:
    got = result(job, "fsdp2")[f"{name}/{mode}"]
    assert "DTensor" in got["state_types"], "the state of FSDP2 parameters should be sharded DTensors"
    assert_tensors(got["params"], _named_params(references[name][0]))


@pytest.mark.parametrize("name", list(ds.CONFIGS))
def test_fsdp2_fused_matches_single_process(job: Job, name: str) -> None:
    if not ds.supports_fused():
        pytest.skip("this build of longmem has no fused path (no `fused=` argument)")
    got = result(job, "fsdp2_fused")[name]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model, _ = ds.reference(name, dtype=ds.FUSED_DTYPE, fused=True)
    # sharded DTensors fall back from the fused kernel exactly when plain tensors do (no C compiler)
    assert got["warnings"] == [str(w.message) for w in caught]
    assert_tensors(got["params"], _named_params(model), tol=CLOSE_F32)


@pytest.mark.parametrize("name", list(ds.CONFIGS))
def test_full_state_dict_into_fsdp2_optimizer_is_refused(job: Job, name: str) -> None:
    refused = result(job, "dcp")[name]["refused"]
    assert refused is not None, "loading plain tensors as the state of DTensor parameters should fail"
    assert "is a plain tensor, the parameter a DTensor" in refused and "set_optimizer_state_dict" in refused


@pytest.mark.parametrize("name", list(ds.CONFIGS))
def test_dcp_fsdp2_resume_is_bit_identical(job: Job, name: str) -> None:
    got = result(job, "dcp")[name]
    assert_tensors(got["restored"], got["saved"], exact=True, where="restored/")
    assert_tensors(got["resumed"], got["straight"], exact=True, where="resumed/")


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled")  # dcp.load(no_dist=True) says it anyway
@pytest.mark.parametrize("name", list(ds.CONFIGS))
def test_dcp_checkpoint_from_two_ranks_loads_on_one(job: Job, references: dict, name: str) -> None:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (
        get_model_state_dict,
        get_optimizer_state_dict,
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    got = result(job, "dcp")[name]
    assert not dist.is_initialized()
    model = ds.make_model()
    opt = longmem.create_optimizer(name, model, **ds.CONFIGS[name])
    loaded = {"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, opt)}
    dcp.load(loaded, checkpoint_id=got["path"], no_dist=True)  # one process reads every shard
    set_model_state_dict(model, loaded["model"])
    set_optimizer_state_dict(model, opt, loaded["optim"])
    assert_tensors(
        {"params": _named_params(model), "state": _named_state(model, opt)}, got["saved"], exact=True
    )
    ds.train(model, opt, range(ds.STEPS // 2, ds.STEPS), None)
    assert_tensors(_named_params(model), got["straight"]["params"])
    assert_tensors(_named_params(model), _named_params(references[name][0]))
