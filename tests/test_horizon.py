"""``longmem run horizon`` end to end at a tiny size (the report's numbers re-derived from the JSON's
curves), Ctrl-C and ``--resume`` across run lengths, its options, and its pieces against analytic
values. The default budget (hours) is not run here."""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path

import pytest

pytest.importorskip("matplotlib")

from longmem.experiments._train import INTERRUPT_AFTER_ENV
from longmem.experiments.horizon import gap_verdict, matching_length
from test_cli import check_report, run, table_rows

TINY = ["run", "horizon", "--size", "tiny"]
PEAK = 2e-3  # the experiment's default peak lr


def first_reach(steps: list[int], values: list[float], target: float) -> float | None:
    """The first step at which a curve is down to ``target``, linear between points (a re-statement)."""
    for i, (s, v) in enumerate(zip(steps, values, strict=True)):
        if v <= target:
            if i == 0:
                return float(s)
            s0, v0 = steps[i - 1], values[i - 1]
            return s0 + (s - s0) * (v0 - target) / (v0 - v)
    return None


def mean_pm_std(values: list[float]) -> str:
    return f"{statistics.mean(values):.3f} ± {statistics.stdev(values):.3f}"


def test_horizon_report_matches_the_runs(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "horizon"
    args = [*TINY, "--steps", "12,6", "--seeds", "2", "--beta3", "0.999", "--schedulers", "with,without"]
    code, text = run([*args, "--out", str(out)], capsys)
    assert code == 0, text
    report, data = check_report(out, "horizon", 2 * 2 * 3)  # lengths x seeds x (AdamW + 2 AdEMAMix)
    assert {"horizon.png", "horizon_curves.png"} <= {p.name for p in out.glob("*.png")}
    assert data["config"]["steps"] == "6,12"  # the lengths, sorted
    runs = data["runs"]
    settings = {"adamw": "AdamW", "ademamix-b0.999-sched": None, "ademamix-b0.999-nosched": None}
    for key in settings:
        for n in (6, 12):
            for seed in (0, 1):
                rec = runs[f"{key}-n{n}-s{seed}"]
                lrs = rec["train"]["lr"]
                # planned for its own length, not cut from a longer run: warm-up over round(5%) -> 1 step
                # (lr = peak / 2 at the first step), then cosine down to 10% of the peak at its last step
                assert len(lrs) == n
                assert lrs[0] == pytest.approx(PEAK / 2) and lrs[1] == pytest.approx(PEAK)
                assert lrs[-1] == pytest.approx(0.1 * PEAK)
    assert runs["adamw-n6-s0"]["train"]["lr"][3] < runs["adamw-n12-s0"]["train"]["lr"][3]
    assert runs["ademamix-b0.999-sched-n6-s0"]["spec"]["options"] == {
        "alpha": 8.0,
        "beta3": 0.999,
        "schedulers": True,
    }
    assert runs["ademamix-b0.999-nosched-n12-s1"]["spec"]["options"]["schedulers"] is False
    # same seed, same initialisation: every setting starts from the same held-out loss
    assert (
        runs["adamw-n12-s1"]["eval"]["loss"][0] == runs["ademamix-b0.999-nosched-n12-s1"]["eval"]["loss"][0]
    )

    rows = table_rows(report)
    summary = data["summary"]["settings"]
    for key in ("ademamix-b0.999-sched", "ademamix-b0.999-nosched"):
        label = summary[key]["label"]
        gap_cells = []
        for n in (6, 12):
            finals = {s: runs[f"{key}-n{n}-s{s}"]["eval"]["loss"][-1] for s in (0, 1)}
            ref = {s: runs[f"adamw-n{n}-s{s}"]["eval"]["loss"][-1] for s in (0, 1)}
            gaps = [finals[s] - ref[s] for s in (0, 1)]
            entry = summary[key]["by_length"][str(n)]
            assert entry["gap"] == pytest.approx(gaps)
            row = next(r for r in rows if r[:2] == [str(n), label])
            assert row[2] == mean_pm_std(list(finals.values()))
            assert row[3] == mean_pm_std(gaps)
            assert row[4] == f"{sum(g < 0 for g in gaps)} of 2"
            # the paper's 'tokens to match': AdamW's step to reach this setting's final loss, per seed
            for s in (0, 1):
                adamw_eval = runs[f"adamw-n{n}-s{s}"]["eval"]
                reach = first_reach(adamw_eval["step"], adamw_eval["loss"], finals[s])
                got = entry["adamw_steps_to_reach_this_final"][s]
                assert got == (None if reach is None else pytest.approx(reach))
            fractions = [x / n for x in entry["adamw_steps_to_reach_this_final"] if x is not None]
            if len(fractions) == 2:
                assert row[5] == f"{statistics.mean(fractions):.2f} ± {statistics.stdev(fractions):.2f}"
            elif not fractions:
                assert row[5].startswith("never")
            gap_cells.append(mean_pm_std(gaps))
        gap_row = next(r for r in rows if r[0] == label)  # the gap-against-length table
        assert gap_row[1:] == gap_cells
    assert data["summary"]["verdict"] in report


def test_horizon_interrupt_and_resume(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    args = [*TINY, "--steps", "4,8", "--seeds", "1", "--beta3", "0.999", "--schedulers", "with"]
    code, text = run([*args, "--out", str(tmp_path / "straight")], capsys)
    assert code == 0, text
    out = tmp_path / "cut"
    monkeypatch.setenv(INTERRUPT_AFTER_ENV, "6")  # in the middle of the second run (AdEMAMix, 4 steps)
    code, text = run([*args, "--out", str(out)], capsys)
    assert code == 130 and "--resume" in text
    partial = json.loads((out / "horizon.json").read_text())
    assert partial["status"] == "interrupted" and list(partial["runs"]) == ["adamw-n4-s0"]
    monkeypatch.delenv(INTERRUPT_AFTER_ENV)
    code, text = run([*TINY, "--steps", "4,9", "--out", str(out), "--resume"], capsys)
    assert code == 2 and "--steps '4,8'" in text  # a different list of lengths is refused
    code, text = run([*TINY, "--steps", "8,4", "--out", str(out), "--resume"], capsys)  # the same lengths
    assert code == 0, text
    _, resumed = check_report(out, "horizon", 4)
    straight = json.loads((tmp_path / "straight" / "horizon.json").read_text())
    assert set(resumed["runs"]) == set(straight["runs"])
    for run_id, rec in straight["runs"].items():
        for part in ("train", "eval"):
            assert resumed["runs"][run_id][part] == rec[part], (run_id, part)
    for key, entry in straight["summary"]["settings"].items():  # the same numbers, wall times apart
        for n, numbers in entry["by_length"].items():
            got = resumed["summary"]["settings"][key]["by_length"][n]
            assert {k: v for k, v in got.items() if k != "wall_time_s"} == {
                k: v for k, v in numbers.items() if k != "wall_time_s"
            }


@pytest.mark.parametrize(
    ("option", "value"),
    [
        ("--steps", "400,abc"),
        ("--steps", "1,400"),
        ("--steps", "400,400"),
        ("--beta3", "0.999,1"),
        ("--beta3", "x"),
        ("--schedulers", "sometimes"),
        ("--alpha", "0"),
    ],
)
def test_horizon_bad_options(
    option: str, value: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, text = run([*TINY, option, value, "--out", str(tmp_path / "o")], capsys)
    assert code == 2 and option in text
    assert not (tmp_path / "o").exists()  # refused before anything is written


def test_matching_length_interpolates_in_log_length() -> None:
    lengths, finals = [100, 1000, 4000], [3.0, 2.0, 1.5]
    assert matching_length(lengths, finals, 2.5) == pytest.approx(math.sqrt(100 * 1000))
    assert matching_length(lengths, finals, 2.0) == pytest.approx(1000)
    assert matching_length(lengths, finals, 1.75) == pytest.approx(2000)  # halfway in log between 1000, 4000
    assert matching_length(lengths, finals, 3.5) == 100  # the shortest run already gets there
    assert matching_length(lengths, finals, 1.4) is None  # better than the longest AdamW run
    assert matching_length(lengths, finals, math.nan) is None
    # a diverged length is skipped: interpolate between the finite neighbours only
    assert matching_length(lengths, [3.0, math.nan, 1.0], 2.0) == pytest.approx(4000)
    assert matching_length(lengths, [math.nan, 2.0, 1.0], 1.5) == pytest.approx(2000)


def test_gap_verdict_reads_the_trend_against_the_spread() -> None:
    lengths = [400, 1500, 4000]
    text = gap_verdict("X", lengths, [[0.20, 0.22], [0.05, 0.06], [-0.02, -0.03]])
    assert "(behind, behind, ahead)" in text and "in AdEMAMix's favour" in text
    text = gap_verdict("X", lengths, [[-0.05, -0.06], [0.0, 0.01], [0.10, 0.12]])
    assert "(ahead, level, behind)" in text and "against AdEMAMix" in text
    # a change smaller than the spread over seeds is no trend
    text = gap_verdict("X", lengths, [[0.02, -0.02], [0.0, 0.0], [0.01, -0.02]])
    assert "(level, level, level)" in text and "no clear trend" in text
    # a diverged seed is named and left out of the means
    text = gap_verdict("X", [400, 1500], [[0.1, math.nan], [-0.1, -0.1]])
    assert "(1 of 2 diverged)" in text and "in AdEMAMix's favour" in text
    assert gap_verdict("X", [400], [[0.1, 0.12]]).endswith("(behind).")


def test_reach_cells_keep_diverged_seeds_apart() -> None:
    from longmem.experiments.horizon import _fraction_text, _match_text

    assert _fraction_text([100.0, 300.0], [True, True], 400, "ahead") == "0.50 ± 0.35"
    assert _fraction_text([None, None], [True, True], 400, "ahead") == "never (ahead)"
    # a seed whose AdEMAMix run diverged has no final loss to reach: not 'never (ahead)'
    assert _fraction_text([None, None], [True, False], 400, "ahead") == (
        "1 of 2 seeds never; 1 of 2 seeds diverged"
    )
    assert _match_text([None, 600.0], [1.0, math.nan], 400, [400, 1500]) == (
        "> 1500 steps (1 of 2 seeds); diverged (1 of 2 seeds)"
    )
    assert _match_text([800.0, 400.0], [1.0, 1.1], 400, [400, 1500]) == "2.00; <= 400 steps (1 of 2 seeds)"
