"""``lr-sensitivity``: final loss against the learning rate, AdaMod against Adam and SGD with momentum.

AdaMod's paper: SGDM's and Adam's results depend on the initial lr, while AdaMod converges to about the
same result with lrs two orders of magnitude apart. Each optimizer runs at its base lr times the same
factors (Adam and AdaMod: 1e-3; SGD: 0.1, as in that paper), with no warm-up (as in that paper).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, ClassVar

from ._compare import final_eval
from ._lm import LM_CHOICES, LM_DEFAULTS, LM_OPTIONS, lm_task_from_config
from ._optim import OPTIMIZERS, lr_setting, optimizer_label
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
from ._train import RunSpec, Task
from .vision import VISION_OPTIONS, vision_task_from_config

__all__ = ["LRSensitivityExperiment", "parse_factors", "task_for", "unit_for"]


def parse_factors(text: str | list[float]) -> list[float]:
    if isinstance(text, list):
        return [float(x) for x in text]
    try:
        values = [float(x) for x in text.split(",") if x.strip()]
    except ValueError as e:
        raise ConfigError(f"--lr-factors: comma-separated numbers, e.g. 0.1,0.3,1,3,10 (got {text!r})") from e
    if not values or any(not v > 0 for v in values):
        raise ConfigError(f"--lr-factors: positive numbers, e.g. 0.1,0.3,1,3,10 (got {text!r})")
    return sorted(values)


def task_for(cfg: dict[str, Any], *, post_ln: bool = False) -> tuple[Task, list[str]]:
    """The LM or vision task of ``cfg['task']`` and its setup lines."""
    if cfg.get("task", "lm") == "vision":
        return vision_task_from_config(cfg)
    return lm_task_from_config(cfg, post_ln=post_ln)


def unit_for(cfg: dict[str, Any]) -> str:
    return "nats" if cfg.get("task", "lm") == "vision" else "nats/byte"


class LRSensitivityExperiment(Experiment):
    name = "lr-sensitivity"
    title = "Learning-rate sensitivity: AdaMod against Adam and SGD with momentum"
    help = "final loss against lr over two orders of magnitude: AdaMod vs Adam vs SGD+momentum"
    claim = (
        "AdaMod is insensitive to the learning rate: in its paper, SGDM's and Adam's results depend on the "
        "initial lr, while AdaMod reaches about the same result with lrs two orders of magnitude apart."
    )
    defaults: ClassVar[dict[str, Any]] = {
        "steps": 400,
        "seeds": 2,
        "seed": 0,
        "optimizers": ["adam", "adamod", "sgd"],
        "lr": 1e-3,
        "warmup": 0.0,
        "size": "small",
        "eval_every": None,
        "lr_factors": "0.1,0.3,1,3,10",
        "task": "lm",
        "fashion_mnist": None,
        **LM_DEFAULTS,
    }
    options: ClassVar[dict[str, tuple[Any, str]]] = {
        "lr_factors": (str, "comma-separated multiples of each optimizer's base lr"),
        "task": (
            str,
            "what to train: lm (a small GPT on the stdlib's source) or vision (a CNN on Fashion-MNIST)",
        ),
        **LM_OPTIONS,
        **VISION_OPTIONS,
    }
    choices: ClassVar[dict[str, list[str]]] = {**LM_CHOICES, "task": ["lm", "vision"]}
    default_out = "runs/lr-sensitivity"

    def validate(self, cfg: dict[str, Any]) -> None:
        cfg["lr_factors"] = ",".join(f"{f:g}" for f in parse_factors(cfg["lr_factors"]))

    def plan(self, cfg: dict[str, Any]) -> Plan:
        task, setup = task_for(cfg)
        steps = int(cfg["steps"])
        warmup = self.warmup_steps(cfg)
        factors = parse_factors(cfg["lr_factors"])
        runs = [
            RunSpec(
                run_id=f"{key}-x{f:g}-s{seed}",
                optimizer=key,
                group=f"{key}@{f:g}",
                label=f"{optimizer_label(key)} lr x{f:g}",
                seed=seed,
                steps=steps,
                lr=float(cfg["lr"]) * f,
                warmup=warmup,
                eval_every=self.eval_every(cfg),
                params={"factor": f},
            )
            for seed in self.seeds(cfg)
            for key in cfg["optimizers"]
            for f in factors
        ]
        base = float(cfg["lr"])
        lrs = "; ".join(
            optimizer_label(k) + ": " + ", ".join(f"{base * OPTIMIZERS[k].lr_scale * f:.3g}" for f in factors)
            for k in cfg["optimizers"]
        )
        setup += [
            f"Steps: {steps} per run; lr factors {', '.join(f'{f:g}' for f in factors)} "
            f"({max(factors) / min(factors):g}x range): peak lrs {lrs}",
            (
                "lr schedule (every optimizer): "
                + (
                    f"linear warm-up over {warmup} steps, then "
                    if warmup
                    else "no warm-up (as in AdaMod's paper), "
                )
                + "cosine decay to 10%; no weight decay, no clipping"
            ),
        ]
        optimizers = [
            (
                OPTIMIZERS[k].label,
                f"base {lr_setting(k, base)}; {OPTIMIZERS[k].describe(base, steps, 0.0, {})}",
            )
            for k in cfg["optimizers"]
        ]
        return Plan({"main": task}, runs, setup, optimizers)

    def summarize(
        self, cfg: dict[str, Any], plan: Plan, records: dict[str, dict[str, Any]], out: Path
    ) -> ReportContent:
        factors = parse_factors(cfg["lr_factors"])
        groups = group_runs(records[s.run_id] for s in plan.runs)
        unit = unit_for(cfg)
        summary: dict[str, Any] = {"factors": factors, "optimizers": {}}
        rows = []
        for key in cfg["optimizers"]:
            cells = []
            means = []
            finals_by_factor = {}
            for f in factors:
                recs = groups.get(f"{key}@{f:g}", [])
                finals = [final_eval(r) for r in recs]
                finals_by_factor[f"{f:g}"] = finals
                cells.append(fmt_mean_std(finals))
                m = mean_std(finals)[0]
                # a diverged setting counts as infinitely bad
                means.append(m if math.isfinite(m) and all(math.isfinite(x) for x in finals) else math.inf)
            best = min(means)
            worst = max(means)
            spread = worst - best if math.isfinite(worst) else math.inf
            summary["optimizers"][key] = {
                "label": optimizer_label(key),
                "final_heldout_loss": finals_by_factor,
                "mean_by_factor": means,
                "peak_lrs": [cfg["lr"] * OPTIMIZERS[key].lr_scale * f for f in factors],
                "best": best,
                "worst": worst,
                "spread": spread,
                "best_factor": factors[means.index(best)] if math.isfinite(best) else None,
            }
            rows.append(
                [
                    optimizer_label(key),
                    *cells,
                    fmt(best),
                    fmt(spread) if math.isfinite(spread) else "inf (a setting diverged)",
                ]
            )
        n = len(self.seeds(cfg))
        table = Table(
            ["optimizer", *[f"lr x{f:g}" for f in factors], "best", "spread (worst - best)"],
            rows,
            note=f"Final held-out loss ({unit}), {over_seeds(n)}; "
            f"base lr {cfg['lr']:g} (SGD: {cfg['lr'] * OPTIMIZERS['sgd'].lr_scale:g}). Spread: the gap "
            "between the "
            "worst and the best lr of the grid, the smaller the less sensitive.",
        )
        figures = [
            self._figure(cfg, factors, summary, unit, out),
            self._curves(cfg, factors, groups, unit, out),
        ]
        verdict = self._verdict(summary["optimizers"], factors)
        summary["verdict"] = verdict
        return ReportContent(verdict, [table], figures, [], summary)

    @staticmethod
    def _verdict(opt: dict[str, Any], factors: list[float]) -> str:
        rng = f"{max(factors) / min(factors):g}x"
        parts = [
            f"{e['label']} {fmt(e['spread'])}"
            if math.isfinite(e["spread"])
            else f"{e['label']} unbounded (diverged at some lr)"
            for e in opt.values()
        ]
        text = f"Spread of the final held-out loss over a {rng} lr range: " + ", ".join(parts) + "."
        if "adamod" not in opt:
            return text
        others = {k: e for k, e in opt.items() if k != "adamod"}
        mine = opt["adamod"]["spread"]
        if all(mine < e["spread"] for e in others.values()):
            text += " AdaMod is the least sensitive to the lr, as its paper reports."
        else:
            worse = [e["label"] for e in others.values() if e["spread"] <= mine]
            text += f" AdaMod is not the least sensitive here: {', '.join(worse)} varied as little or less."
        if "adam" in opt and math.isfinite(opt["adamod"]["best"]) and math.isfinite(opt["adam"]["best"]):
            d = opt["adamod"]["best"] - opt["adam"]["best"]
            text += f" Best loss, AdaMod minus Adam: {d:+.3f}."
        return text

    @staticmethod
    def _figure(
        cfg: dict[str, Any], factors: list[float], summary: dict[str, Any], unit: str, out: Path
    ) -> Figure:
        plt = pyplot()
        fig, ax = plt.subplots(figsize=(7, 4.2))
        points: dict[str, list[tuple[float, float, float, float]]] = {}  # key -> (factor, mean, min, max)
        for key, e in summary["optimizers"].items():
            points[key] = []
            for f in factors:
                finals = e["final_heldout_loss"][f"{f:g}"]
                if finals and all(math.isfinite(v) for v in finals):
                    points[key].append((f, mean_std(finals)[0], min(finals), max(finals)))
        means = sorted(p[1] for pts in points.values() for p in pts)
        # Losses that blew up (or runs that diverged) would flatten every other curve: cap the axis.
        cap = min(means[-1], 2 * means[len(means) // 2]) if means else 1.0
        for key, pts in points.items():
            e = summary["optimizers"][key]
            color = OPTIMIZERS[key].color
            shown = [p for p in pts if p[1] <= cap]
            ax.errorbar(
                [p[0] for p in shown],
                [p[1] for p in shown],
                yerr=[[p[1] - p[2] for p in shown], [min(p[3], cap) - p[1] for p in shown]],
                color=color,
                marker="o",
                capsize=3,
                label=e["label"],
            )
            above = [p[0] for p in pts if p[1] > cap] + [f for f in factors if f not in {p[0] for p in pts}]
            if above:
                ax.scatter(above, [cap] * len(above), marker="^", color=color, s=70, zorder=5)
        ax.set_ylim(top=cap * 1.02)
        ax.set_xscale("log")
        ax.set_xlabel(f"lr / base lr (base: {cfg['lr']:g}; SGD {cfg['lr'] * OPTIMIZERS['sgd'].lr_scale:g})")
        ax.set_ylabel(f"final held-out loss, {unit}")
        ax.set_title("Final loss against the learning rate (flatter: less sensitive)")
        ax.legend()
        fig.tight_layout()
        fig.savefig(out / "lr_sensitivity.png")
        plt.close(fig)
        return Figure(
            "lr_sensitivity.png",
            "Final held-out loss against the lr multiple, mean over seeds (bars: min-max); a triangle at "
            "the top marks a setting that diverged or ended off the chart (its number is in the table)",
        )

    @staticmethod
    def _curves(
        cfg: dict[str, Any],
        factors: list[float],
        groups: dict[str, list[dict[str, Any]]],
        unit: str,
        out: Path,
    ) -> Figure:
        plt = pyplot()
        keys = cfg["optimizers"]
        fig, axes = plt.subplots(1, len(keys), figsize=(4.2 * len(keys), 3.8), sharey=True, squeeze=False)
        cmap = plt.get_cmap("viridis")
        all_vals = []
        for ax, key in zip(axes[0], keys, strict=True):
            sub = {f"{key}@{f:g}": groups[f"{key}@{f:g}"] for f in factors if f"{key}@{f:g}" in groups}
            colors = {g: cmap(i / max(len(factors) - 1, 1)) for i, g in enumerate(sub)}
            labels = {g: f"x{g.split('@')[1]}" for g in sub}
            plot_curves(ax, sub, "eval", "loss", colors=colors, labels=labels, marker="o")
            ax.set_title(optimizer_label(key))
            ax.set_xlabel("step")
            ax.legend(fontsize=8, title="lr")
            all_vals += [
                v for recs in sub.values() for r in recs for v in r["eval"]["loss"][1:] if math.isfinite(v)
            ]
        axes[0][0].set_ylabel(f"held-out loss, {unit}")
        if all_vals:
            lo, hi = min(all_vals), sorted(all_vals)[int(0.95 * (len(all_vals) - 1))]
            axes[0][0].set_ylim(lo - 0.05 * (hi - lo or 1), hi + 0.05 * (hi - lo or 1))
        fig.tight_layout()
        fig.savefig(out / "lr_curves.png")
        plt.close(fig)
        return Figure("lr_curves.png", "Held-out loss against step for each lr multiple (mean over seeds)")
