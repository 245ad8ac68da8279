"""What every experiment shares: its command-line options, its configuration, running its runs in
order with checkpoints, and writing its report (also a partial one after Ctrl-C)."""

from __future__ import annotations

import argparse
import io
import json
import math
import os
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from .. import checkpoint as checkpoint_file
from ._distributed import barrier, current_world
from ._optim import OPTIMIZERS, lr_setting, optimizer_label
from ._report import (
    Figure,
    MissingDependencyError,
    ReportContent,
    Table,
    command_line,
    fmt_mean_std,
    group_runs,
    plot_curves,
    pyplot,
    versions,
    write_json,
    write_report,
)
from ._train import Interrupt, InterruptedRun, RunSpec, Task, train_run

__all__ = [
    "EXIT_DATA_MISSING",
    "EXIT_INTERRUPTED",
    "ConfigError",
    "Experiment",
    "Plan",
    "run_experiment",
]

EXIT_INTERRUPTED = 130
EXIT_DATA_MISSING = 2
CHECKPOINT_DIR = "checkpoint"

#: options every experiment takes: name -> (type, help). Their defaults come from Experiment.defaults.
COMMON_OPTIONS: dict[str, tuple[Any, str]] = {
    "steps": (int, "training steps per run"),
    "seeds": (int, "number of seeds (runs per setting); tables show mean ± std over them"),
    "seed": (int, "first seed (seeds are SEED, SEED+1, ...); a seed fixes the init and the data order"),
    "optimizers": (str, "comma-separated optimizers, from: " + ", ".join(OPTIMIZERS)),
    "lr": (
        float,
        "peak learning rate of the adaptive optimizers (SGD: 100x; Simplified AdEMAMix: its authors' "
        "rescaling)",
    ),
    "warmup": (float, "lr warm-up as a fraction of the steps (then cosine decay to 10%%)"),
    "size": (str, "model size preset: tiny (tests), small, base"),
    "eval_every": (int, "steps between held-out evaluations (default: steps / 20)"),
}


class ConfigError(ValueError):
    """Bad options (shown to the user without a traceback)."""


@dataclass
class Plan:
    """The runs of an experiment, the tasks they train on and what the report says about the setup."""

    tasks: dict[str, Task]
    runs: list[RunSpec]
    setup: list[str] = field(default_factory=list)
    optimizers: list[tuple[str, str]] = field(default_factory=list)  # (label, settings) for the report


class Experiment:
    """Base class of the experiments: subclasses set the class attributes and implement
    :meth:`plan` and :meth:`summarize`."""

    name: ClassVar[str] = ""
    title: ClassVar[str] = ""
    claim: ClassVar[str] = ""  # the paper's claim this experiment tests (markdown)
    help: ClassVar[str] = ""  # one line for `longmem run --help`
    #: every option's default; keys are option names with '_' (the common ones and the experiment's)
    defaults: ClassVar[dict[str, Any]] = {}
    #: options this experiment adds: name -> (type, help); a type of bool makes a flag
    options: ClassVar[dict[str, tuple[Any, str]]] = {}
    #: help texts of common options that mean something else here: name -> help
    option_help: ClassVar[dict[str, str]] = {}
    #: choices of string options (e.g. size, corpus)
    choices: ClassVar[dict[str, list[str]]] = {}
    default_out: ClassVar[str] = ""

    # ---- configuration ----------------------------------------------------------------------------
    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        """Every option defaults to None so that a resumed run can tell what was given."""
        for name, (typ, text) in {**COMMON_OPTIONS, **self.options}.items():
            if name not in self.defaults:
                continue
            text = self.option_help.get(name, text)
            flag = "--" + name.replace("_", "-")
            default = self.defaults[name]
            shown = ",".join(default) if isinstance(default, list) else default
            if typ is bool:
                parser.add_argument(flag, dest=name, action="store_true", default=None, help=text)
                continue
            parser.add_argument(
                flag,
                dest=name,
                type=typ,
                default=None,
                choices=self.choices.get(name),
                help=text if default is None else f"{text} (default: {shown})",
            )

    def resolve(self, given: dict[str, Any]) -> dict[str, Any]:
        """The configuration: ``defaults`` overridden by the options ``given`` (not None)."""
        cfg = dict(self.defaults)
        for k, v in given.items():
            if k in cfg and v is not None:
                cfg[k] = v
        if isinstance(cfg.get("optimizers"), str):
            cfg["optimizers"] = [s.strip() for s in cfg["optimizers"].split(",") if s.strip()]
        for key in cfg.get("optimizers", []):
            if key not in OPTIMIZERS:
                raise ConfigError(f"unknown optimizer {key!r}; choose from {', '.join(OPTIMIZERS)}")
        for key in ("steps", "seeds"):
            if key in cfg and int(cfg[key]) < 1:
                raise ConfigError(f"--{key} must be at least 1 (got {cfg[key]})")
        if "lr" in cfg and not cfg["lr"] > 0:
            raise ConfigError(f"--lr must be positive (got {cfg['lr']})")
        if "warmup" in cfg and not 0 <= cfg["warmup"] < 1:
            raise ConfigError(f"--warmup is a fraction of the steps in [0, 1) (got {cfg['warmup']})")
        self.validate(cfg)
        return cfg

    def validate(self, cfg: dict[str, Any]) -> None:
        """Experiment-specific checks of the resolved configuration (raise :class:`ConfigError`)."""

    # ---- helpers for subclasses -----------------------------------------------------------------------
    @staticmethod
    def seeds(cfg: dict[str, Any]) -> list[int]:
        return [int(cfg["seed"]) + i for i in range(int(cfg["seeds"]))]

    @staticmethod
    def eval_every(cfg: dict[str, Any], steps: int | None = None) -> int:
        steps = int(steps if steps is not None else cfg["steps"])
        return int(cfg.get("eval_every") or max(1, steps // 20))

    @staticmethod
    def warmup_steps(cfg: dict[str, Any], steps: int | None = None) -> int:
        steps = int(steps if steps is not None else cfg["steps"])
        frac = float(cfg.get("warmup", 0.0))
        return max(1, round(frac * steps)) if frac > 0 else 0

    def optimizer_runs(
        self, cfg: dict[str, Any], per_optimizer: dict[str, dict[str, Any]] | None = None, **common: Any
    ) -> list[RunSpec]:
        """One run per seed and optimizer of ``cfg["optimizers"]``, each optimizer a group of its own.

        ``common``: RunSpec fields shared by every run (weight decay, clipping, ...); ``per_optimizer``:
        fields of one optimizer's runs (AdEMAMix's options, SGD's lr scale).
        """
        per_optimizer = per_optimizer or {}
        return [
            RunSpec(
                run_id=f"{key}-s{seed}",
                optimizer=key,
                group=key,
                label=optimizer_label(key),
                seed=seed,
                steps=int(cfg["steps"]),
                lr=float(cfg["lr"]),
                warmup=self.warmup_steps(cfg),
                eval_every=self.eval_every(cfg),
                **{**common, **per_optimizer.get(key, {})},
            )
            for seed in self.seeds(cfg)
            for key in cfg["optimizers"]
        ]

    @staticmethod
    def optimizer_table(
        cfg: dict[str, Any], keys: list[str], options: dict[str, Any] | None = None, weight_decay: float = 0.0
    ) -> list[tuple[str, str]]:
        """(label, settings) of each optimizer, for the report's setup section."""
        out = []
        for key in keys:
            info = OPTIMIZERS[key]
            desc = info.describe(cfg["lr"] * info.lr_scale, int(cfg["steps"]), weight_decay, options or {})
            out.append((info.label, f"{lr_setting(key, cfg['lr'])}; {desc}"))
        return out

    # ---- to implement ---------------------------------------------------------------------------------
    def plan(self, cfg: dict[str, Any]) -> Plan:
        raise NotImplementedError

    def summarize(
        self, cfg: dict[str, Any], plan: Plan, records: dict[str, dict[str, Any]], out: Path
    ) -> ReportContent:
        raise NotImplementedError


# ---- running ---------------------------------------------------------------------------------------
def _check_resume(exp: Experiment, saved: dict[str, Any], given: dict[str, Any]) -> dict[str, Any]:
    if saved.get("experiment") != exp.name:
        raise ConfigError(
            f"the checkpoint in this folder belongs to experiment {saved.get('experiment')!r}, "
            f"not {exp.name!r}"
        )
    cfg = dict(saved["config"])
    resolved_given = exp.resolve({k: v for k, v in given.items() if v is not None})
    for k, v in given.items():
        if v is None or k not in cfg:
            continue
        if resolved_given[k] != cfg[k]:
            raise ConfigError(
                f"--resume: the checkpoint was made with --{k.replace('_', '-')} {cfg[k]!r}, not {v!r}; "
                "drop the option to continue it, or leave out --resume to start afresh"
            )
    return cfg


def _check_can_run(out: Path, ckdir: Path) -> None:
    """What a run needs beyond the options, checked before anything is trained or removed: the packages
    the report needs, and a report folder that can be written. Raises :class:`ConfigError`."""
    try:
        pyplot()
    except MissingDependencyError as e:
        if ckdir.is_dir():
            then = f"The checkpoint in {ckdir} is kept: once it is installed, add --resume to continue it"
        else:
            then = "Nothing was trained; once it is installed, run the same command again"
        raise ConfigError(f"{e}. {then}") from None
    _check_writable(out)


def _check_writable(out: Path) -> None:
    """One line naming ``out`` unless a file can be made in it (or in the folder that will hold it)."""
    base = out
    while not base.exists() and base.parent != base:  # the nearest folder that exists
        base = base.parent
    if not base.is_dir():
        raise ConfigError(f"cannot write the report folder {out}: {base} is a file, not a folder")
    try:
        fd, probe = tempfile.mkstemp(prefix=".longmem-write-test-", dir=base)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise ConfigError(f"cannot write the report folder {out}: {e.strerror or e} ({base})") from None


def _load(path: Path) -> dict[str, Any] | None:
    if not path.is_file():
        return None
    return checkpoint_file.load(path, map_location="cpu")


def run_experiment(
    exp: Experiment,
    given: dict[str, Any],
    *,
    out: Path | None = None,
    argv: list[str] | None = None,
    resume: bool = False,
    quiet: bool = False,
    stream: Any = None,
) -> int:
    """Run experiment ``exp`` with the options ``given``; write ``report.md``, the JSON and the PNGs
    into ``out``. Returns the exit status (0, or 130 after Ctrl-C with a checkpoint saved).

    Under ``torchrun`` every rank trains every run data-parallel; rank 0 alone writes and prints."""
    world = current_world()
    stream = stream if stream is not None else sys.stderr
    if not world.main:
        stream = io.StringIO()
    out = Path(out or exp.default_out or f"runs/{exp.name}")
    argv = list(sys.argv[1:] if argv is None else argv)
    ckdir = out / CHECKPOINT_DIR
    config_path = ckdir / "config.json"
    _check_can_run(out, ckdir)
    if resume:
        if config_path.is_file():
            saved = json.loads(config_path.read_text(encoding="utf-8"))
            cfg = _check_resume(exp, saved, given)
            argv_first = saved.get("argv", argv)
            print(f"Resuming {exp.name} from {ckdir}", file=stream)
        else:
            print(f"--resume: no checkpoint in {ckdir}; starting afresh", file=stream)
            cfg, argv_first = exp.resolve(given), argv
    else:
        cfg, argv_first = exp.resolve(given), argv
        if ckdir.exists() and world.main:
            print(
                f"Starting afresh: removing the old checkpoint {ckdir} (use --resume to continue it)",
                file=stream,
            )
            shutil.rmtree(ckdir)
    plan = exp.plan(cfg)  # loads the data: may raise DataMissingError before anything is written
    earlier_wall = 0.0  # time spent before an interruption
    if resume and config_path.is_file():
        earlier_wall = float(json.loads(config_path.read_text(encoding="utf-8")).get("wall_time_s", 0.0))
    if world.main:
        ckdir.mkdir(parents=True, exist_ok=True)
        write_json(
            config_path,
            {"experiment": exp.name, "config": cfg, "argv": argv_first, "wall_time_s": earlier_wall},
        )
    barrier(world)  # no rank reads a checkpoint folder that rank 0 is still clearing
    # The report shows the command that reproduces the whole result from scratch.
    command = command_line([a for a in argv_first if a != "--resume"])
    resume_cmd = command_line([*(a for a in argv_first if a != "--resume"), "--resume"])

    t0 = time.perf_counter()
    records: dict[str, dict[str, Any]] = {}
    interrupted: str | None = None
    with Interrupt(stream) as interrupt:
        try:
            for spec in plan.runs:
                path = ckdir / f"{spec.run_id}.pt"
                state = _load(path) if resume else None
                if state is not None and state.get("done"):
                    records[spec.run_id] = state["record"]
                    continue
                if interrupt.requested:
                    interrupted = "before " + spec.run_id
                    break
                record = train_run(
                    plan.tasks[spec.task],
                    spec,
                    checkpoint=path,
                    state=state,
                    interrupt=interrupt,
                    progress=not quiet,
                )
                if world.main:
                    checkpoint_file.save(path, {"done": True, "record": record})
                records[spec.run_id] = record
        except InterruptedRun as e:
            interrupted = str(e)
        except KeyboardInterrupt:
            interrupted = "abort"
    wall = time.perf_counter() - t0
    wall_total = wall + earlier_wall
    if not world.main:
        return 0 if interrupted is None else EXIT_INTERRUPTED
    info = versions()
    parallel = (
        [f"Data-parallel: DDP over {world.size} processes (gloo), each on 1/{world.size} of every batch"]
        if world.parallel
        else []
    )
    first_task = next(iter(plan.tasks.values()))
    setup = [
        *plan.setup,
        *parallel,
        f"Seeds: {', '.join(map(str, Experiment.seeds(cfg)))} ({first_task.seed_note()})",
    ]
    payload: dict[str, Any] = {
        "experiment": exp.name,
        "title": exp.title,
        "command": command,
        "argv": argv_first,
        "config": cfg,
        "versions": info,
        "wall_time_s": wall_total,
        "setup": setup,
        "optimizers": dict(plan.optimizers),
    }
    json_name = f"{exp.name}.json"
    out.mkdir(parents=True, exist_ok=True)
    if interrupted is not None:
        write_json(
            config_path,
            {"experiment": exp.name, "config": cfg, "argv": argv_first, "wall_time_s": wall_total},
        )
        note = (
            f"Interrupted: {len(records)} of {len(plan.runs)} runs finished. The unfinished run is "
            f"checkpointed in {CHECKPOINT_DIR}/; continue with `{resume_cmd}`"
        )
    else:
        note = ""
    try:
        content = (
            exp.summarize(cfg, plan, records, out)
            if interrupted is None
            else _partial_content(exp, plan, records, out)
        )
    except MissingDependencyError as e:  # gone since the check; each finished run has its "done" checkpoint
        raise ConfigError(
            f"{e}. The {len(records)} finished runs are checkpointed in {ckdir}; once it is installed, "
            f"`{resume_cmd}` writes the report without training them again"
        ) from None
    payload.update(
        status="complete" if interrupted is None else "interrupted", summary=content.summary, runs=records
    )
    write_json(out / json_name, payload)
    write_report(
        out / "report.md",
        title=exp.title,
        claim=exp.claim,
        content=content,
        setup=setup,
        optimizers=plan.optimizers,
        command=command,
        versions_=info,
        wall_time_s=wall_total,
        json_name=json_name,
        status_note=note,
    )
    if interrupted is not None:
        print(f"\n{note}\nPartial report: {out / 'report.md'}", file=stream)
        return EXIT_INTERRUPTED
    shutil.rmtree(ckdir, ignore_errors=True)
    (out / "partial.png").unlink(missing_ok=True)  # left by an earlier interruption
    print(f"\n{exp.title}\n{content.verdict}\nReport: {out / 'report.md'}", file=stream)
    return 0


def _partial_content(
    exp: Experiment, plan: Plan, records: dict[str, dict[str, Any]], out: Path
) -> ReportContent:
    """What an interrupted experiment can say: each finished run's final held-out metrics."""
    if not records:
        return ReportContent(verdict="No run finished before the interruption.")
    ordered = [records[s.run_id] for s in plan.runs if s.run_id in records]
    groups = group_runs(ordered)
    metric_keys = [k for k in ordered[0]["eval"] if k != "step"]
    held_out = next(iter(plan.tasks.values())).eval_prefix  # "held-out ", or "" for a task without data
    rows = []
    summary: dict[str, Any] = {}
    for group, recs in groups.items():
        finals = {
            k: [r["eval"][k][-1] if r["diverged_at"] is None else math.nan for r in recs] for k in metric_keys
        }
        summary[group] = {k: v for k, v in finals.items()}
        rows.append(
            [recs[0]["spec"]["label"], str(len(recs))] + [fmt_mean_std(finals[k]) for k in metric_keys]
        )
    table = Table(["run", "seeds finished", *[f"final {held_out}{k}" for k in metric_keys]], rows)
    figures = []
    if metric_keys:
        plt = pyplot()
        fig, ax = plt.subplots(figsize=(7, 4))
        colors = {g: OPTIMIZERS[r[0]["spec"]["optimizer"]].color for g, r in groups.items()}
        labels = {g: r[0]["spec"]["label"] for g, r in groups.items()}
        plot_curves(ax, groups, "eval", metric_keys[0], colors=colors, labels=labels, marker="o")
        ax.set_xlabel("step")
        ax.set_ylabel(f"{held_out}{metric_keys[0]}")
        ax.legend()
        fig.tight_layout()
        fig.savefig(out / "partial.png")
        plt.close(fig)
        figures.append(
            Figure("partial.png", f"{held_out or 'evaluation '}curves of the runs that finished".capitalize())
        )
    return ReportContent(
        verdict="Incomplete: the experiment was interrupted; the numbers below are the finished runs only.",
        tables=[table],
        figures=figures,
        summary={"finished": summary},
    )
