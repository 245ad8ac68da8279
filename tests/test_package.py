"""The package as a user meets it: what ``import longmem`` loads and what it makes reachable."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LAZY = ["longmem.checkpoint", "longmem.experiments", "longmem.integrations", "longmem.kernels"]


def run_python(code: str) -> dict:
    """Run ``code`` in a fresh interpreter (this one has imported everything already); it prints JSON."""
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    done = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, env=env, check=False
    )
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_the_readme_names_are_reachable_and_load_on_first_use() -> None:
    out = run_python(
        f"""
        import json, sys
        import longmem
        lazy = {LAZY!r}
        before = [m for m in lazy if m in sys.modules]
        checkpoint = longmem.checkpoint
        after_checkpoint = [m for m in lazy if m in sys.modules]
        warning = longmem.FusedFallbackWarning
        from longmem.kernels import FusedFallbackWarning
        integrations = longmem.integrations
        try:
            longmem.no_such_name
            missing = ""
        except AttributeError as e:
            missing = str(e)
        print(json.dumps({{
            "before": before,
            "after_checkpoint": after_checkpoint,
            "checkpoint": checkpoint.__name__,
            "save": callable(checkpoint.save) and issubclass(checkpoint.CheckpointError, ValueError),
            "warning": warning is FusedFallbackWarning and issubclass(warning, UserWarning),
            "kernels": longmem.kernels is sys.modules["longmem.kernels"],
            "integrations": integrations.__name__ + "." + integrations.warmup_kwargs.__name__,
            "frameworks": [m for m in ("transformers", "lightning") if m in sys.modules],
            "experiments": longmem.experiments.DEMO.name,
            "missing": missing,
            "dir": sorted(set(dir(longmem)) & {{"checkpoint", "kernels", "FusedFallbackWarning"}}),
        }}))
        """
    )
    assert out["before"] == []  # `import longmem` imports none of them
    assert out["after_checkpoint"] == ["longmem.checkpoint"]  # touching one imports only that one
    assert out["checkpoint"] == "longmem.checkpoint" and out["save"]
    assert out["warning"] and out["kernels"]
    assert out["integrations"] == "longmem.integrations.warmup_kwargs"
    assert out["frameworks"] == []  # the integrations import their frameworks only in their own modules
    assert out["experiments"] == "demo"
    assert out["missing"] == "module 'longmem' has no attribute 'no_such_name'"
    assert out["dir"] == ["FusedFallbackWarning", "checkpoint", "kernels"]


def test_star_import_gives_every_public_name() -> None:
    out = run_python(
        """
        import json
        import longmem
        names = {}
        exec("from longmem import *", names)
        got = sorted(n for n in names if n != "__builtins__")
        print(json.dumps({"all": sorted(longmem.__all__), "got": got}))
        """
    )
    assert out["got"] == out["all"]
    assert {"AdEMAMix", "AdEMAMixWarmupWarning", "FusedFallbackWarning", "checkpoint"} <= set(out["all"])


def run_readme_script(*args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    script = str(ROOT / "docs" / "readme_demo_table.py")
    return subprocess.run(
        [sys.executable, script, *args], capture_output=True, text=True, env=env, check=False
    )


def test_the_readme_demo_table_is_docs_demo_json_rounded_as_the_report(tmp_path: Path) -> None:
    done = run_readme_script("--check")
    assert done.returncode == 0, done.stderr
    # without the report's code: the JSON's curves, rounded to the report's digits, are the table's cells
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    data = json.loads((ROOT / "docs" / "demo.json").read_text(encoding="utf-8"))
    steps = data["config"]["steps"]
    for key, label in (("adamw", "AdamW"), ("ademamix", "AdEMAMix"), ("adamod", "AdaMod")):
        run = data["runs"][f"{key}-s0"]
        held_out = run["eval"]["loss"][-1]
        train = sum(run["train"]["loss"][-steps // 20 :]) / (steps // 20)  # mean over the last 5% of steps
        assert f"| {label} | {held_out:.3f} | {train:.3f} |" in readme
    reach = data["summary"]["optimizers"]["adamod"]["reference_steps_to_reach_this_final"][0]
    assert f"| {reach:.0f} ({100 * reach / steps:.0f}%) |" in readme
    # a hand edit is caught
    first_cell = f"| AdamW | {data['runs']['adamw-s0']['eval']['loss'][-1]:.3f} |"
    edited = tmp_path / "README.md"
    edited.write_text(readme.replace(first_cell, "| AdamW | 2.000 |"), encoding="utf-8")
    done = run_readme_script("--check", "--readme", str(edited))
    assert done.returncode == 1 and "demo table" in done.stderr
