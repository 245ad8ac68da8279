"""``no-warmup``: a post-LN transformer trained without lr warm-up, Adam against AdaMod.

Post-LN transformers (the original Transformer's layout) are known to need lr warm-up with Adam. AdaMod's
paper: its step-size memory acts as a built-in warm-up, so AdaMod without warm-up trains such models at
least as well as Adam with warm-up, while Adam without it can fail.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, ClassVar

from ._compare import final_eval, group_color, largest_rise
from ._lm import LM_CHOICES, LM_DEFAULTS, LM_OPTIONS
from ._optim import OPTIMIZERS
from ._report import (
    Figure,
    ReportContent,
    Table,
    fmt,
    fmt_mean_std,
    group_runs,
    mean_std,
    over_seeds,
    plot_curves,
    pyplot,
)
from ._runner import ConfigError, Experiment, Plan
from ._train import RunSpec
from .lr_sensitivity import task_for

__all__ = ["NoWarmupExperiment", "parse_lrs"]

#: a run whose final held-out loss is within this many nats of its loss after the first tenth of
#: the steps has stopped learning
STALLED_NATS = 0.1

#: (group suffix, optimizer, warm-up on?, label)
VARIANTS = [
    ("adam", "adam", False, "Adam, no warm-up"),
    ("adamod", "adamod", False, "AdaMod, no warm-up"),
    ("adam-warmup", "adam", True, "Adam with warm-up"),
]
VARIANT_COLORS = {"adam": "#17becf", "adamod": "#2ca02c", "adam-warmup": "#1f3f8f"}


def parse_lrs(text: str) -> list[float]:
    try:
        values = [float(x) for x in str(text).split(",") if x.strip()]
    except ValueError as e:
        raise ConfigError(f"--lrs: comma-separated learning rates, e.g. 1e-3,3e-3 (got {text!r})") from e
    if not values or any(not v > 0 for v in values):
        raise ConfigError(f"--lrs: positive learning rates, e.g. 1e-3,3e-3 (got {text!r})")
    return values


class NoWarmupExperiment(Experiment):
    name = "no-warmup"
    title = "No warm-up: a post-LN transformer, Adam against AdaMod"
    help = "a post-LN transformer without lr warm-up: Adam vs AdaMod (and Adam with warm-up)"
    claim = (
        "AdaMod needs no warm-up: in its paper, Transformers trained with AdaMod without warm-up converge "
        "faster and better than with Adam and warm-up, while Adam without warm-up can fail outright."
    )
    defaults: ClassVar[dict[str, Any]] = {
        "steps": 600,
        "seeds": 2,
        "seed": 0,
        "lrs": "1e-3,3e-3",
        "warmup": 0.1,
        "size": "small",
        "layers": 6,
        "eval_every": None,
        **LM_DEFAULTS,
    }
    options: ClassVar[dict[str, tuple[Any, str]]] = {
        "lrs": (str, "comma-separated peak learning rates; every variant runs at each"),
        "layers": (int, "number of post-LN transformer layers (post-LN needs warm-up more the deeper it is)"),
        **LM_OPTIONS,
    }
    choices = LM_CHOICES
    default_out = "runs/no-warmup"

    def validate(self, cfg: dict[str, Any]) -> None:
        cfg["lrs"] = ",".join(f"{v:g}" for v in parse_lrs(cfg["lrs"]))
        if int(cfg["layers"]) < 1:
            raise ConfigError("--layers must be at least 1")
        if not cfg["warmup"] > 0:
            raise ConfigError("--warmup: the warm-up of the 'Adam with warm-up' runs must be positive")

    def plan(self, cfg: dict[str, Any]) -> Plan:
        import dataclasses

        from ._lm import EVAL_WINDOWS, LMTask

        base, setup = task_for({**cfg, "task": "lm"}, post_ln=True)
        assert isinstance(base, LMTask)
        gcfg = dataclasses.replace(base.cfg, n_layers=int(cfg["layers"]))
        task = LMTask(base.corpus, gcfg, EVAL_WINDOWS[cfg["size"]])
        setup[-1] = task.describe()
        steps = int(cfg["steps"])
        warmup = self.warmup_steps(cfg)
        runs = [
            RunSpec(
                run_id=f"{variant}-lr{lr:g}-s{seed}",
                optimizer=key,
                group=f"{variant}@{lr:g}",
                label=f"{label}, lr {lr:g}",
                seed=seed,
                steps=steps,
                lr=lr,
                warmup=warmup if on else 0,
                eval_every=self.eval_every(cfg),
                params={"variant": variant, "lr": lr, "color": VARIANT_COLORS[variant]},
            )
            for seed in self.seeds(cfg)
            for lr in parse_lrs(cfg["lrs"])
            for variant, key, on, label in VARIANTS
        ]
        setup += [
            f"Steps: {steps}; peak lrs {cfg['lrs']}; 'with warm-up': linear over {warmup} steps; all: "
            "cosine decay to 10%; no weight decay, no gradient clipping (clipping would hide the "
            "instability warm-up prevents)",
        ]
        optimizers = [
            (OPTIMIZERS[k].label, OPTIMIZERS[k].describe(0.0, steps, 0.0, {})) for k in ("adam", "adamod")
        ]
        return Plan({"main": task}, runs, setup, optimizers)

    def summarize(
        self, cfg: dict[str, Any], plan: Plan, records: dict[str, dict[str, Any]], out: Path
    ) -> ReportContent:
        groups = group_runs(records[s.run_id] for s in plan.runs)
        lrs = parse_lrs(cfg["lrs"])
        steps = int(cfg["steps"])
        early = max(1, steps // 10)
        rows = []
        summary: dict[str, Any] = {"lrs": lrs, "runs": {}}
        for group, recs in groups.items():
            finals = [final_eval(r) for r in recs]
            early_loss = [_eval_at(r, early) for r in recs]
            rises = [largest_rise(r) for r in recs]
            summary["runs"][group] = {
                "label": recs[0]["spec"]["label"],
                "variant": recs[0]["spec"]["params"]["variant"],
                "lr": recs[0]["spec"]["params"]["lr"],
                "final_heldout_loss": finals,
                "early_heldout_loss": early_loss,
                "largest_rise": rises,
                "diverged_at": [r["diverged_at"] for r in recs],
            }
            rows.append(
                [
                    recs[0]["spec"]["label"],
                    fmt_mean_std(early_loss),
                    fmt_mean_std(finals),
                    fmt_mean_std(rises),
                ]
            )
        n = len(self.seeds(cfg))
        table = Table(
            ["run", f"held-out loss at step ~{early}", "final held-out loss", "largest loss spike (nats)"],
            rows,
            note=f"Nats per byte, {over_seeds(n)}. Loss spike: the "
            "largest rise of the smoothed training loss above its running minimum.",
        )
        verdict = self._verdict(summary["runs"], lrs, early)
        summary["verdict"] = verdict
        return ReportContent(verdict, [table], [self._figure(groups, lrs, out)], [], summary)

    @staticmethod
    def _verdict(runs: dict[str, Any], lrs: list[float], early: int) -> str:
        parts = []
        for lr in lrs:
            get = {v: runs.get(f"{v}@{lr:g}") for v, *_ in VARIANTS}
            if any(e is None for e in get.values()):
                continue
            m = {v: mean_std(e["final_heldout_loss"])[0] for v, e in get.items()}  # type: ignore[union-attr]
            s = {v: mean_std(e["final_heldout_loss"])[1] for v, e in get.items()}  # type: ignore[union-attr]
            first = {v: mean_std(e["early_heldout_loss"])[0] for v, e in get.items()}  # type: ignore[union-attr]
            text = (
                f"At lr {lr:g}: Adam without warm-up {fmt(m['adam'])}, AdaMod without warm-up "
                f"{fmt(m['adamod'])}, Adam with warm-up {fmt(m['adam-warmup'])}"
            )
            noise = max(s["adamod"], s["adam-warmup"])
            # Runs that stop learning after the first tenth (typically a collapse to predicting byte
            # frequencies) agree with each other without saying anything about warm-up.
            if all(math.isfinite(m[v]) and m[v] > first[v] - STALLED_NATS for v in m):
                text += (
                    f": all three stopped learning after step ~{early} (less than {STALLED_NATS} nats "
                    "gained since), with warm-up or without: this lr is too large for this model, and "
                    "the comparison says nothing about warm-up."
                )
                parts.append(text)
                continue
            if not math.isfinite(m["adamod"]):
                text += " (AdaMod diverged)."
            elif m["adamod"] < m["adam-warmup"] - noise:
                text += ": AdaMod without warm-up beats Adam with warm-up."
            elif m["adamod"] <= m["adam-warmup"] + noise:
                text += ": AdaMod without warm-up matches Adam with warm-up."
            else:
                text += ": AdaMod without warm-up does not match Adam with warm-up."
            if (
                math.isfinite(m["adam"])
                and math.isfinite(m["adam-warmup"])
                and m["adam"] <= m["adam-warmup"] + max(s["adam"], s["adam-warmup"])
            ):
                text += " Adam itself did not need the warm-up at this scale."
            parts.append(text)
        return " ".join(parts) or "No complete comparison."

    @staticmethod
    def _figure(groups: dict[str, list[dict[str, Any]]], lrs: list[float], out: Path) -> Figure:
        plt = pyplot()
        fig, axes = plt.subplots(2, len(lrs), figsize=(5.2 * len(lrs), 7), squeeze=False, sharex=True)
        for col, lr in enumerate(lrs):
            sub = {f"{v}@{lr:g}": groups[f"{v}@{lr:g}"] for v, *_ in VARIANTS if f"{v}@{lr:g}" in groups}
            colors = {g: group_color(r[0]) for g, r in sub.items()}
            labels = {g: r[0]["spec"]["label"].rsplit(",", 1)[0] for g, r in sub.items()}
            plot_curves(axes[0][col], sub, "train", "loss", colors=colors, labels=labels, smooth=0.8)
            plot_curves(axes[1][col], sub, "eval", "loss", colors=colors, labels=labels, marker="o")
            axes[0][col].set_title(f"peak lr {lr:g}: training loss (smoothed)")
            axes[1][col].set_title(f"peak lr {lr:g}: held-out loss")
            axes[1][col].set_xlabel("step")
            for row in (0, 1):
                axes[row][col].set_ylabel("nats/byte")
                axes[row][col].legend(fontsize=8)
                vals = [
                    v
                    for recs in sub.values()
                    for r in recs
                    for v in r["train" if row == 0 else "eval"]["loss"]
                    if math.isfinite(v)
                ]
                if vals:
                    axes[row][col].set_ylim(
                        min(vals) - 0.05, min(max(vals), sorted(vals)[len(vals) // 20] + 1.5)
                    )
        fig.tight_layout()
        fig.savefig(out / "no_warmup.png")
        plt.close(fig)
        return Figure(
            "no_warmup.png",
            "Post-LN transformer: training (top, smoothed) and held-out (bottom) loss "
            "without warm-up (Adam, AdaMod) and with it (Adam); mean over seeds, shading min-max",
        )


def _eval_at(rec: dict[str, Any], step: int) -> float:
    """Held-out loss at the first evaluation at or after ``step``."""
    if rec["diverged_at"] is not None and rec["diverged_at"] <= step:
        return math.nan
    for s, v in zip(rec["eval"]["step"], rec["eval"]["loss"], strict=True):
        if s >= step:
            return v
    return math.nan
