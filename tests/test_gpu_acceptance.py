"""benchmarks/gpu_acceptance.py, the one command that checks every CUDA path on a GPU, in its CPU mode
(the Triton kernels run by Triton's interpreter): its reduced run (``--quick``) passes and reports
every optimizer on every path, and a wrong kernel makes it fail."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "benchmarks" / "gpu_acceptance.py"
NAMES = ["AdEMAMix", "SimplifiedAdEMAMix", "AdaMod", "DiffGrad", "DiffMod"]
PATHS = ["triton", "fused", "foreach", "single"]


def _has_triton() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def _run(out: Path, *args: str, prelude: str = "") -> subprocess.CompletedProcess[str]:
    """The script in a fresh process (Triton must see TRITON_INTERPRET=1 before it is imported),
    after ``prelude`` (code run first, in that process)."""
    argv = [str(SCRIPT), "--device", "cpu", "--out", str(out), *args]
    run = f"import runpy, sys\nsys.argv = {argv!r}\nrunpy.run_path({str(SCRIPT)!r}, run_name='__main__')"
    code = f"{prelude}\n{run}"
    # set before the prelude runs: a prelude that imports longmem.kernels.cuda may import Triton
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path), "TRITON_INTERPRET": "1"}
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=900)


def test_cpu_quick_run_passes_and_reports_every_path(tmp_path):
    result = _run(tmp_path, "--quick")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    data = json.loads((tmp_path / "acceptance.json").read_text())
    assert data["exit_status"] == 0 and data["counts"]["failed"] == 0 and data["counts"]["not_run"] == 0
    matrix = data["sections"]["matrix"]
    assert {(r["optimizer"], r["path"]) for r in matrix} == {(n, p) for n in NAMES for p in PATHS}
    # each cell ran the steps it should and was held to the float64 reference
    ran = [r for r in matrix if r["status"] == "pass"]
    assert all("of the allowance" in r["vs_reference"] or "<=" in r["vs_reference"] for r in ran)
    assert {r["param_dtype"] for r in ran} >= {"float32", "bfloat16", "float16"}
    assert {r["state_precision"] for r in ran} == {"fp32", "bf16", "8bit"}
    if _has_triton():
        triton_cells = [r for r in matrix if r["path"] == "triton"]
        assert triton_cells and all(
            r["status"] == "pass" and r["launches"]["triton"] > 0 for r in triton_cells
        )
        pieces = data["sections"]["pieces"]
        assert len(pieces) >= 8 and all(r["status"] == "pass" for r in pieces)
    fused_cells = [r for r in matrix if r["path"] == "fused"]
    assert all(r["launches"]["cpu"] > 0 for r in fused_cells)  # the C kernel ran, not a fallback
    summary = (tmp_path / "summary.md").read_text()
    for heading in (
        "## Kernel pieces",
        "## Correctness matrix",
        "## torch.compile of the step",
        "## Step time",
    ):
        assert heading in summary
    assert "every check passed" in summary
    assert (tmp_path / "log.txt").read_text().count("pass ") >= len(ran)


@pytest.mark.skipif(not _has_triton(), reason="could not import 'triton'")
def test_a_wrong_triton_kernel_fails_the_run(tmp_path):
    """A square root off by 0.05% in the generated Triton code: its cells fail against the reference
    and against the C kernel, the C kernel's cells still pass, and the exit status says so."""
    prelude = "from longmem.kernels import cuda\ncuda._EXPR['sqrt'] = 'tl.sqrt_rn({a}) * 1.0005'"
    args = ("--quick", "--sections", "matrix", "--optimizers", "AdEMAMix", "--paths", "triton", "fused")
    result = _run(tmp_path, *args, prelude=prelude)
    assert result.returncode == 1, result.stdout[-3000:] + result.stderr[-3000:]
    matrix = json.loads((tmp_path / "acceptance.json").read_text())["sections"]["matrix"]
    by_path = {path: [r["status"] for r in matrix if r["path"] == path] for path in ("triton", "fused")}
    assert by_path["fused"] and set(by_path["fused"]) == {"pass"}
    failed = [r for r in matrix if r["path"] == "triton" and r["param_dtype"] == "float32"]
    assert failed and all(r["status"] == "FAIL" and "reference" in r["detail"] for r in failed)
    assert all("cross" in r["detail"] for r in failed)
    assert "FAILED" in (tmp_path / "summary.md").read_text()


def test_timing_figures_and_targets_from_raw_times(tmp_path):
    """The CUDA timing section's arithmetic and report, on made-up raw times (no GPU here): medians,
    the median of per-step ratios to AdamW, the fraction of the bandwidth bound, the verdicts."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import gpu_acceptance as ga
    finally:
        sys.path.pop(0)
    n = 1000
    adamw = {"optimizer": "torch AdamW", "path": "fused", "state": "fp32", "times": [0.010, 0.012, 0.011],
             "first": 0.5, "nbytes": 28 * n}  # fmt: skip
    ours = {"optimizer": "AdEMAMix", "path": "fused", "state": "fp32", "times": [0.013, 0.016, 0.014],
            "ref_times": [0.010, 0.012, 0.011], "first": 0.2, "nbytes": 36 * n}  # fmt: skip
    lean = {"optimizer": "AdEMAMix", "path": "fused", "state": "8bit", "times": [0.02, 0.02, 0.03],
            "ref_times": [0.010, 0.010, 0.010], "first": 0.3, "nbytes": 18 * n}  # fmt: skip
    missing = {"optimizer": "bitsandbytes AdEMAMix8bit", "path": "-", "state": "8bit", "error": "ImportError"}
    bw = 36 * n / 0.014 / 0.9  # AdEMAMix's median step then runs at 90% of the bound
    for row in (adamw, ours, lean, missing):
        ga._row_stats(row, bw, n)
    assert ours["median_ms"] == pytest.approx(14.0) and ours["min_ms"] == pytest.approx(13.0)
    assert ours["x_adamw_fused"] == pytest.approx(1.3)  # median of 1.3, 1.333, 1.273
    assert ours["bound"] == pytest.approx(0.9) and ours["bytes_per_param"] == 36
    assert lean["x_adamw_fused"] == pytest.approx(2.0) and "x_adamw_fused" not in adamw
    workloads = {"llama-1b": {"params": n, "tensors": 3, "rows": [adamw, ours, lean, missing]}}
    verdicts = {t["target"]: (t["measured"], t["verdict"]) for t in ga.targets(workloads)}
    assert verdicts == {
        "AdEMAMix fused >= 85% of the bound (llama-1b)": ("90%", "met"),
        "AdEMAMix fused <= 1.35x torch fused AdamW (llama-1b)": ("1.30x", "met"),
        "AdEMAMix 8-bit state <= 0.85x torch fused AdamW (llama-1b)": ("2.00x", "MISSED"),
    }
    meta = {
        "_t0": 0.0,
        "date": "today",
        "command": "test",
        "device": "cuda",
        "device_name": "a GPU",
        "budget_s": 1,
    }
    report = ga.Report(tmp_path, meta)
    report.timing = {"bandwidth": {"bytes": 1 << 30, "start_gbs": bw / 1e9, "end_gbs": bw / 1e9},
                     "workloads": workloads, "targets": ga.targets(workloads)}  # fmt: skip
    report.write()
    summary = (tmp_path / "summary.md").read_text()
    assert "### llama-1b: 0.0M parameters in 3 tensors" in summary
    assert "| AdEMAMix | fused | fp32 | 14.00 | 13.00 | 1.30 | 90% | 36.0 | 200 |" in summary
    assert "| bitsandbytes AdEMAMix8bit | - | 8bit | ImportError |" in summary
    assert "| AdEMAMix 8-bit state <= 0.85x torch fused AdamW (llama-1b) | 2.00x | MISSED |" in summary
    assert json.loads((tmp_path / "acceptance.json").read_text())["timing"]["targets"][0]["verdict"] == "met"


def test_stochastic_rounding_check_tells_it_from_nearest():
    """The check for param_rounding="stochastic" (cells that appear once an optimizer takes it): on
    made-up bf16 trajectories whose steps are below half an ulp, stochastic rounding follows the
    float64 path (slope 1), round-to-nearest stalls (slope 0) and fails."""
    import torch

    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import gpu_acceptance as ga
    finally:
        sys.path.pop(0)
    gen = torch.Generator().manual_seed(0)
    start = (torch.rand(100_000, generator=gen) + 1.0).to(torch.bfloat16)  # in [1, 2): ulp 2^-7
    exact, nearest, stochastic = start.double(), start.clone(), start.clone()
    for _ in range(30):
        step = torch.full((100_000,), 2.0**-10, dtype=torch.float64)  # an eighth of an ulp
        exact = exact + step
        nearest = (nearest.double() + step).to(torch.bfloat16)
        below = stochastic.double() + step
        down = below.to(torch.bfloat16)
        down = torch.where(down.double() > below, (down.double() - 2.0**-7).to(torch.bfloat16), down)
        up = (down.double() + 2.0**-7).to(torch.bfloat16)
        p_up = (below - down.double()) / 2.0**-7
        stochastic = torch.where(torch.rand(100_000, generator=gen, dtype=torch.float64) < p_up, up, down)
    ok = ga.compare("reference", [stochastic], [exact], [start], "stochastic", torch.bfloat16, 30)
    stalled = ga.compare("reference", [nearest], [exact], [start], "stochastic", torch.bfloat16, 30)
    assert ok.ok and not stalled.ok, (ok.text, stalled.text)
    assert bool((nearest == start).all())  # the stall the check is there for
