"""``longmem run lm`` under ``torchrun --nproc-per-node 2`` (DDP over gloo) gives the single-process result.

Each rank trains on half of every batch; the averaged gradients make every step the whole batch's step,
so the curves agree with a single-process run to float rounding (the sums are taken in another order).
"""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("matplotlib")
dist = pytest.importorskip("torch.distributed")
if not (dist.is_available() and dist.is_gloo_available()):
    pytest.skip("torch.distributed with gloo is not available", allow_module_level=True)

from longmem.cli import main  # noqa: E402

ARGS = ["run", "lm", "--size", "tiny", "--steps", "12", "--seeds", "1", "--optimizers", "adamw,ademamix"]
ARGS += ["--eval-every", "4", "--quiet"]


def _curves(out: Path) -> dict[str, dict[str, list[float]]]:
    runs = json.loads((out / "lm.json").read_text(encoding="utf-8"))["runs"]
    return {rid: {"train": r["train"]["loss"], "eval": r["eval"]["loss"]} for rid, r in runs.items()}


def test_lm_under_torchrun_matches_single_process(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    single, parallel = tmp_path / "single", tmp_path / "ddp"
    assert main([*ARGS, "--threads", "1", "--out", str(single)]) == 0
    capsys.readouterr()

    env = {**os.environ, "OMP_NUM_THREADS": "1", "OMP_WAIT_POLICY": "PASSIVE"}
    env["PYTHONPATH"] = os.pathsep.join(
        filter(None, [str(Path(__file__).parents[1] / "src"), env.get("PYTHONPATH")])
    )
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    job = subprocess.Popen(
        [*command, "-m", "longmem", *ARGS, "--out", str(parallel)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
        start_new_session=True,  # a hung job is killed with its worker processes
    )
    try:
        output, _ = job.communicate(timeout=300)
    except subprocess.TimeoutExpired:
        os.killpg(job.pid, signal.SIGKILL)
        pytest.fail("torchrun did not finish within 300 s: " + (job.communicate()[0] or "")[-3000:])
    assert job.returncode == 0, output[-6000:]

    report = (parallel / "report.md").read_text(encoding="utf-8")
    assert "DDP over 2 processes" in report
    want, got = _curves(single), _curves(parallel)
    assert want.keys() == got.keys() == {"adamw-s0", "ademamix-s0"}
    for rid in want:
        for kind in ("train", "eval"):
            a, b = want[rid][kind], got[rid][kind]
            assert len(a) == len(b) > 1
            assert all(math.isfinite(x) for x in b)
            assert b == pytest.approx(a, rel=2e-5), (rid, kind)
    # training moved the loss: the agreement is not two untrained models agreeing
    assert got["ademamix-s0"]["eval"][-1] < got["ademamix-s0"]["eval"][0] - 0.05
