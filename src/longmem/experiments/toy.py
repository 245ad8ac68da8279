"""``toy``: every optimizer on the Rosenbrock function, trajectories drawn over its contours.

f(x, y) = (1 - x)^2 + 100 (y - x^2)^2, minimum 0 at (1, 1), reached along a long curved valley. A
picture of how each method moves, not evidence about neural networks: momentum with a long memory
(AdEMAMix's slow EMA) overshoots along the valley, AdaMod's capped steps start slowly.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from ._compare import final_eval, group_color
from ._optim import OPTIMIZERS, lr_setting
from ._report import (
    Figure,
    ReportContent,
    Table,
    fmt_mean_std,
    group_runs,
    plot_curves,
    pyplot,
    steps_to_reach,
)
from ._runner import Experiment, Plan
from ._train import Task

__all__ = ["RosenbrockTask", "ToyExperiment", "rosenbrock"]

START = (-1.5, 2.0)
JITTER = 0.2  # each seed starts at START + JITTER * N(0, I)
SGD_LR_SCALE = 0.1  # SGD's lr relative to the others' here: its usual 100x diverges at once on Rosenbrock
SGD_LR_REASON = "its usual 100x diverges at once on Rosenbrock"
ADEMAMIX_OPTIONS = {"alpha": 8.0, "beta3": 0.999}
TARGET = 1e-3


def rosenbrock(p: Tensor) -> Tensor:
    x, y = p[0], p[1]
    return (1 - x) ** 2 + 100 * (y - x**2) ** 2


class _Point(nn.Module):
    def __init__(self, start: Tensor) -> None:
        super().__init__()
        self.p = nn.Parameter(start.clone())


class RosenbrockTask(Task):
    """The 'model' is the point (x, y); the probe records it after every step."""

    name = "rosenbrock"
    eval_prefix = ""  # f and the distance to the minimum: there is no held-out data

    def seed_note(self) -> str:
        return "a seed fixes the starting point, the same for every optimizer; f has no data and no noise"

    def build_model(self) -> nn.Module:
        start = torch.tensor(START, dtype=torch.float64) + JITTER * torch.randn(2, dtype=torch.float64)
        return _Point(start)

    def train_batch(self, step: int, seed: int) -> None:
        return None

    def loss(self, model: nn.Module, batch: Any) -> Tensor:
        assert isinstance(model, _Point)
        return rosenbrock(model.p)

    def evaluate(self, model: nn.Module, final: bool = False) -> dict[str, float]:
        assert isinstance(model, _Point)
        f = float(rosenbrock(model.p))
        return {"f": f, "distance": float(torch.dist(model.p.detach(), torch.ones(2, dtype=torch.float64)))}

    def probe(self, model: nn.Module, done: int, seed: int) -> dict[str, float]:
        assert isinstance(model, _Point)
        x, y = (float(v) for v in model.p.detach())
        return {"x": x, "y": y, "f": float(rosenbrock(model.p.detach()))}

    def describe(self) -> str:
        return (
            f"f(x, y) = (1 - x)^2 + 100 (y - x^2)^2 in float64, from {START} plus {JITTER} x N(0, I) "
            "per seed; "
            "minimum 0 at (1, 1)"
        )


class ToyExperiment(Experiment):
    name = "toy"
    title = "Trajectories on the Rosenbrock function"
    help = "every optimizer on the Rosenbrock function, trajectories over its contours"
    claim = (
        "Not a claim of the papers: a picture. Long gradient memory (AdEMAMix's slow EMA) carries momentum "
        "along a curved valley; AdaMod caps each step size by its own running average, so it starts slowly "
        "and never takes an outsized step."
    )
    defaults: ClassVar[dict[str, Any]] = {
        "steps": 2000,
        "seeds": 3,
        "seed": 0,
        "optimizers": ["sgd", "adam", "ademamix", "adamod", "diffgrad", "diffmod", "simplified-ademamix"],
        "lr": 1e-2,
        "warmup": 0.0,
        "eval_every": None,
    }
    option_help: ClassVar[dict[str, str]] = {
        "lr": f"peak lr of the adaptive optimizers (SGD: {SGD_LR_SCALE:g}x, as {SGD_LR_REASON}; "
        "Simplified AdEMAMix: its authors' rescaling)",
        "eval_every": "steps between evaluations of f (default: steps / 20)",
    }
    default_out = "runs/toy"

    def plan(self, cfg: dict[str, Any]) -> Plan:
        steps = int(cfg["steps"])
        warmup = self.warmup_steps(cfg)
        runs = self.optimizer_runs(
            cfg, {"sgd": {"lr_scale": SGD_LR_SCALE}, "ademamix": {"options": ADEMAMIX_OPTIONS}}
        )
        task = RosenbrockTask()
        lrs = [
            lr_setting(key, cfg["lr"], SGD_LR_SCALE, SGD_LR_REASON)
            if key == "sgd"
            else lr_setting(key, cfg["lr"])
            for key in cfg["optimizers"]
        ]
        setup = [
            f"Function: {task.describe()}",
            f"Steps: {steps}; "
            + (f"warm-up over {warmup} steps, then " if warmup else "no warm-up, ")
            + "cosine decay to 10% of each optimizer's peak lr (below); no weight decay",
        ]
        optimizers = [
            (
                OPTIMIZERS[key].label,
                f"{lr}; " + OPTIMIZERS[key].describe(cfg["lr"], steps, 0.0, ADEMAMIX_OPTIONS),
            )
            for key, lr in zip(cfg["optimizers"], lrs, strict=True)
        ]
        return Plan({"main": task}, runs, setup, optimizers)

    def summarize(
        self, cfg: dict[str, Any], plan: Plan, records: dict[str, dict[str, Any]], out: Path
    ) -> ReportContent:
        groups = group_runs(records[s.run_id] for s in plan.runs)
        rows = []
        summary: dict[str, Any] = {"optimizers": {}}
        for group, recs in groups.items():
            finals = [final_eval(r, "f") for r in recs]
            dists = [final_eval(r, "distance") for r in recs]
            reach = [steps_to_reach(r["probe"]["step"], r["probe"]["f"], TARGET) for r in recs]
            summary["optimizers"][group] = {
                "label": recs[0]["spec"]["label"],
                "final_f": finals,
                "final_distance": dists,
                "steps_to_target": reach,
            }
            reached = [x for x in reach if x is not None]
            reach_text = fmt_mean_std(reached, 0) if reached else "never"
            if reached and len(reached) < len(reach):
                reach_text += f" ({len(reach) - len(reached)} of {len(reach)} never)"
            rows.append(
                [recs[0]["spec"]["label"], fmt_mean_std(finals, 6), fmt_mean_std(dists, 4), reach_text]
            )
        table = Table(
            ["optimizer", "final f", "final distance to (1, 1)", f"steps to f < {TARGET:g}"],
            rows,
            note=f"Mean ± std over {len(self.seeds(cfg))} starting points.",
        )
        finite = {
            g: e for g, e in summary["optimizers"].items() if all(math.isfinite(v) for v in e["final_f"])
        }
        best = min(finite, key=lambda g: sum(finite[g]["final_f"])) if finite else None
        verdict = (f"Lowest final f: {summary['optimizers'][best]['label']}. " if best else "") + (
            "A two-dimensional picture of each method's dynamics; it says nothing about which optimizer "
            "trains "
            "networks better."
        )
        summary["verdict"] = verdict
        return ReportContent(verdict, [table], [self._figure(groups, out)], [], summary)

    @staticmethod
    def _figure(groups: dict[str, list[dict[str, Any]]], out: Path) -> Figure:
        plt = pyplot()
        import numpy as np

        fig, axes = plt.subplots(1, 2, figsize=(12, 5.4), gridspec_kw={"width_ratios": [1.2, 1]})
        xs = np.linspace(-2.0, 2.0, 400)
        ys = np.linspace(-1.0, 3.5, 400)
        gx, gy = np.meshgrid(xs, ys)
        fz = (1 - gx) ** 2 + 100 * (gy - gx**2) ** 2
        axes[0].contour(gx, gy, np.log10(fz), levels=np.linspace(-1, 3.3, 18), cmap="Greys", linewidths=0.6)
        axes[0].plot([1], [1], marker="*", color="gold", markersize=16, markeredgecolor="k", zorder=5)
        styles = ["-", "--", "-.", ":"]
        for i, recs in enumerate(groups.values()):
            r = recs[0]
            px = np.array(r["probe"]["x"], dtype=float)
            py = np.array(r["probe"]["y"], dtype=float)
            inside = (np.abs(px) < 10) & (np.abs(py) < 10)  # a blown-up run: draw only its start
            px, py = px[inside], py[inside]
            axes[0].plot(
                px,
                py,
                color=group_color(r),
                linewidth=1.6,
                linestyle=styles[i % len(styles)],
                label=r["spec"]["label"],
                alpha=0.9,
            )
            axes[0].plot(px[-1:], py[-1:], marker="o", color=group_color(r), markersize=5, zorder=6)
        start = groups[next(iter(groups))][0]["probe"]
        axes[0].plot(start["x"][:1], start["y"][:1], marker="s", color="k", markersize=6, zorder=6)
        axes[0].set_xlim(-2.0, 2.0)
        axes[0].set_ylim(-1.0, 3.5)
        axes[0].set_xlabel("x")
        axes[0].set_ylabel("y")
        axes[0].set_title("paths from the first seed's start (square) to where they end (dots)")
        colors = {g: group_color(r[0]) for g, r in groups.items()}
        labels = {g: r[0]["spec"]["label"] for g, r in groups.items()}
        plot_curves(axes[1], groups, "probe", "f", colors=colors, labels=labels, ymax=1e4)
        axes[1].set_yscale("log")
        axes[1].set_xlabel("step")
        axes[1].set_ylabel("f(x, y)")
        seeds = max(len(recs) for recs in groups.values())
        axes[1].set_title("f against step" + (" (mean over starts; shading min-max)" if seeds > 1 else ""))
        handles, names = axes[0].get_legend_handles_labels()
        fig.legend(handles, names, loc="lower center", ncol=min(len(names), 7), fontsize=9)
        fig.tight_layout(rect=(0, 0.07, 1, 1))
        fig.savefig(out / "rosenbrock.png")
        plt.close(fig)
        return Figure(
            "rosenbrock.png",
            "Left: each optimizer's path from the first seed's start (square) over log-spaced contours "
            "of f; star: the minimum. Right: f against step on a log scale",
        )
