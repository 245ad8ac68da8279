"""Comparing optimizers against a reference run (AdamW): tables, verdicts and loss plots shared by the
``lm``/``demo``, ``vision`` and ``schedulers`` experiments."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ._optim import OPTIMIZERS
from ._progress import format_duration
from ._report import (
    Figure,
    Table,
    aggregate,
    ema,
    fmt,
    fmt_mean_std,
    mean_std,
    plot_curves,
    pyplot,
    steps_to_reach,
)

__all__ = [
    "compare_final",
    "comparison_table",
    "comparison_verdict",
    "difference_figure",
    "final_eval",
    "final_train",
    "group_color",
    "largest_rise",
    "loss_figure",
    "plot_differences",
    "reach_text",
]


def group_color(rec: dict[str, Any]) -> str:
    """A run's plot colour: its spec's ``params['color']``, else its optimizer's."""
    return rec["spec"]["params"].get("color") or OPTIMIZERS[rec["spec"]["optimizer"]].color


def final_eval(rec: dict[str, Any], key: str = "loss") -> float:
    """The run's last held-out value (NaN if it diverged)."""
    if rec["diverged_at"] is not None or not rec["eval"].get(key):
        return math.nan
    return float(rec["eval"][key][-1])


def final_train(rec: dict[str, Any], fraction: float = 0.05) -> float:
    """Mean training loss over the last ``fraction`` of the steps (NaN if it diverged)."""
    losses = rec["train"]["loss"]
    if rec["diverged_at"] is not None or not losses:
        return math.nan
    k = max(1, int(len(losses) * fraction))
    return sum(losses[-k:]) / k


def compare_final(a: dict[str, Any], b: dict[str, Any], key: str = "loss") -> float | None:
    """Steps run ``a`` needed to get its held-out ``key`` down to run ``b``'s final one (None: never)."""
    target = final_eval(b, key)
    if not math.isfinite(target) or a["diverged_at"] is not None:
        return None
    return steps_to_reach(a["eval"]["step"], a["eval"][key], target)


def largest_rise(rec: dict[str, Any], smooth: float = 0.9, skip: int = 5) -> float:
    """Largest rise of the smoothed training loss above its running minimum (a loss spike), in nats."""
    losses = ema(rec["train"]["loss"], smooth)
    if rec["diverged_at"] is not None:
        return math.inf
    best = math.inf
    rise = 0.0
    for i, v in enumerate(losses):
        if i >= skip:
            rise = max(rise, v - best)
        best = min(best, v)
    return rise


def reach_text(values: Sequence[float | None], steps: int) -> str:
    """``'312 (78%)'``, ``'312 ± 10 (78%)'`` or ``'never (within 400)'`` over seeds."""
    if not values:
        return "-"
    reached = [v for v in values if v is not None]
    if not reached:
        return f"never (within {steps})"
    m, s = mean_std(reached)
    text = (
        f"{m:.0f} ({100 * m / steps:.0f}%)"
        if len(reached) == 1
        else f"{m:.0f} ± {s:.0f} ({100 * m / steps:.0f}%)"
    )
    if len(reached) < len(values):
        text += f"; {len(values) - len(reached)} of {len(values)} seeds never"
    return text


def comparison_table(
    groups: dict[str, list[dict[str, Any]]],
    *,
    reference: str,
    steps: int,
    key: str = "loss",
    key_label: str = "held-out loss",
    extra: dict[str, Any] | None = None,
    note: str = "",
) -> tuple[Table, dict[str, Any]]:
    """One row per group: final held-out ``key``, final train loss, steps each needed to reach the other's
    final value (against ``reference``, same seed), wall time, plus ``extra`` columns
    (name -> function of a record). Returns the table and the numbers behind it."""
    extra = extra or {}
    ref = {r["spec"]["seed"]: r for r in groups.get(reference, [])}
    ref_label = groups[reference][0]["spec"]["label"] if reference in groups else reference
    higher_better = key == "accuracy"
    rows: list[list[str]] = []
    summary: dict[str, Any] = {}
    for group, recs in groups.items():
        finals = [final_eval(r, key) for r in recs]
        trains = [final_train(r) for r in recs]
        m, s = mean_std(finals)
        entry: dict[str, Any] = {
            "label": recs[0]["spec"]["label"],
            "seeds": [r["spec"]["seed"] for r in recs],
            f"final_heldout_{key}": finals,
            f"final_heldout_{key}_mean": m,
            f"final_heldout_{key}_std": s,
            "final_train_loss": trains,
            "diverged_at": [r["diverged_at"] for r in recs],
            "wall_time_s": [r["wall_time_s"] for r in recs],
        }
        reach_ref: list[float | None] = []
        ref_reach: list[float | None] = []
        if group != reference and ref and not higher_better:
            for r in recs:
                base = ref.get(r["spec"]["seed"])
                if base is not None:
                    reach_ref.append(compare_final(r, base, key))
                    ref_reach.append(compare_final(base, r, key))
            entry["steps_to_reach_reference_final"] = reach_ref
            entry["reference_steps_to_reach_this_final"] = ref_reach
        extra_cells = []
        for name, fn in extra.items():
            values = [fn(r) for r in recs]
            entry[name] = values
            extra_cells.append(fmt_mean_std(values))
        summary[group] = entry
        row = [entry["label"], fmt_mean_std(finals), fmt_mean_std(trains)]
        if not higher_better:
            row += [
                reach_text(reach_ref, steps) if group != reference else "-",
                reach_text(ref_reach, steps) if group != reference else "-",
            ]
        row += [*extra_cells, format_duration(mean_std(entry["wall_time_s"])[0])]
        rows.append(row)
    header = ["optimizer", f"final {key_label}", "final train loss"]
    if not higher_better:
        header += [
            f"steps this optimizer needed to reach {ref_label}'s final {key_label}",
            f"steps {ref_label} needed to reach this optimizer's final {key_label}",
        ]
    header += [*extra, "wall time per run"]
    return Table(header, rows, note=note), summary


def comparison_verdict(
    summary: dict[str, Any],
    *,
    reference: str,
    steps: int,
    key: str = "loss",
    key_label: str = "held-out loss",
    note_seeds: bool = True,
) -> str:
    """Honest sentences: who beat the reference on the final held-out ``key``, beyond the seed spread."""
    if reference not in summary:
        return f"No {reference} run to compare against."
    ref = summary[reference]
    ref_label = ref["label"]
    ref_m, ref_s = ref[f"final_heldout_{key}_mean"], ref[f"final_heldout_{key}_std"]
    sign = -1.0 if key == "accuracy" else 1.0  # lower is better unless accuracy
    sentences = []
    for group, entry in summary.items():
        if group == reference:
            continue
        m, s = entry[f"final_heldout_{key}_mean"], entry[f"final_heldout_{key}_std"]
        label = entry["label"]
        if not math.isfinite(m):
            sentences.append(f"{label} diverged.")
            continue
        diff = m - ref_m
        seeds = len(entry[f"final_heldout_{key}"])
        noise = max(s, ref_s) if seeds > 1 else 0.0
        vs = f"{key_label} {fmt(m, 4)} vs {fmt(ref_m, 4)}, {diff:+.4f}"
        if seeds > 1 and abs(diff) <= noise:
            sentences.append(f"{label} and {ref_label} end level ({vs}, within the spread over seeds).")
        elif sign * diff < 0:
            reach = [x for x in entry.get("steps_to_reach_reference_final", []) if x is not None]
            extra = (
                f"; it reached {ref_label}'s final {key_label} after "
                f"{100 * sum(reach) / len(reach) / steps:.0f}% of the steps"
                if reach
                else ""
            )
            sentences.append(f"{label} beats {ref_label} ({vs}){extra}.")
        else:
            reach = [x for x in entry.get("reference_steps_to_reach_this_final", []) if x is not None]
            extra = (
                f"; {ref_label} reached {label}'s final {key_label} after "
                f"{100 * sum(reach) / len(reach) / steps:.0f}% of the steps"
                if reach
                else ""
            )
            sentences.append(f"{label} does not beat {ref_label} here ({vs}){extra}.")
    if note_seeds and len(ref["seeds"]) == 1:
        sentences.append("One seed only: no estimate of the seed-to-seed spread (use --seeds 3).")
    return " ".join(sentences)


def loss_figure(
    groups: dict[str, list[dict[str, Any]]],
    out: Path,
    filename: str,
    title: str,
    *,
    eval_key: str = "loss",
    eval_label: str = "held-out loss",
    unit: str = "nats/byte",
    zoom: bool = True,
) -> Figure:
    """Train (smoothed) and held-out curves against step: mean over seeds, min-max band shaded."""
    plt = pyplot()
    colors = {g: group_color(r[0]) for g, r in groups.items()}
    labels = {g: r[0]["spec"]["label"] for g, r in groups.items()}
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    plot_curves(axes[0], groups, "train", "loss", colors=colors, labels=labels, smooth=0.9, raw_alpha=0.2)
    plot_curves(axes[1], groups, "eval", eval_key, colors=colors, labels=labels, marker="o")
    steps = max(r["spec"]["steps"] for recs in groups.values() for r in recs)
    panels = (
        ("train", "loss", "training loss (smoothed)", unit),
        ("eval", eval_key, eval_label, "" if eval_key == "accuracy" else unit),
    )
    for ax, (where, key, name, u) in zip(axes, panels, strict=True):
        ax.set_xlabel("step")
        ax.set_ylabel(f"{name}, {u}" if u else name)
        ax.set_title(name)
        ax.legend()
        if zoom:  # the informative part: from a fifth of the run on, where the curves separate
            vals = [
                v
                for recs in groups.values()
                for r in recs
                for s, v in zip(r[where]["step"], r[where].get(key, []), strict=False)
                if s >= steps / 5 and math.isfinite(v)
            ]
            if vals:
                ax.set_ylim(*_zoom_limits(vals, pad=0.05))
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(out / filename)
    plt.close(fig)
    zoomed = " (y axis zoomed on the last four fifths of the run)" if zoom else ""
    return Figure(
        filename,
        f"{title}: training loss (left, smoothed; raw mean faint) and {eval_label} (right) "
        f"against step{zoomed}{_shading(groups)}",
    )


def _shading(groups: dict[str, list[dict[str, Any]]]) -> str:
    """What a caption says about the bands: nothing when every group has one seed (none is drawn)."""
    seeds = max(len(recs) for recs in groups.values())
    return f"; mean over {seeds} seeds, shading: min-max over seeds" if seeds > 1 else ""


def _zoom_limits(values: list[float], pad: float = 0.08) -> tuple[float, float]:
    lo, hi = min(values), max(values)
    margin = pad * (hi - lo or 1.0)
    return lo - margin, hi + margin


def plot_differences(
    ax: Any,
    groups: dict[str, list[dict[str, Any]]],
    *,
    reference: str,
    eval_key: str = "loss",
    labels: dict[str, str] | None = None,
    since: float = 0.0,
) -> list[float]:
    """On ``ax``: held-out ``eval_key`` minus the reference group's at each evaluation (same seed), mean
    over seeds with the min-max band; ``labels``: legend labels by group (default: the runs' own).
    Returns the finite values drawn from step ``since`` on (and 0), for a zoomed axis."""
    labels = labels or {}
    ref = {r["spec"]["seed"]: r for r in groups[reference]}
    ref_label = labels.get(reference, groups[reference][0]["spec"]["label"])
    ax.axhline(0.0, color=group_color(groups[reference][0]), linewidth=1, label=f"{ref_label} (reference)")
    late_values = [0.0]
    for group, recs in groups.items():
        if group == reference:
            continue
        diffs = []
        steps: list[int] = []
        for r in recs:
            base = ref.get(r["spec"]["seed"])
            if base is None:
                continue
            steps, (mine, theirs) = aggregate([r, base], "eval", eval_key)
            diffs.append([a - b for a, b in zip(mine, theirs, strict=True)])
        if not diffs or not steps:
            continue
        mean = [mean_std(col)[0] for col in zip(*diffs, strict=True)]
        lo = [min(c) for c in zip(*diffs, strict=True)]
        hi = [max(c) for c in zip(*diffs, strict=True)]
        color = group_color(recs[0])
        ax.plot(
            steps,
            mean,
            marker="o",
            markersize=3,
            color=color,
            label=labels.get(group, recs[0]["spec"]["label"]),
        )
        if len(diffs) > 1:
            ax.fill_between(steps, lo, hi, color=color, alpha=0.15)
        drawn = [mean, lo, hi] if len(diffs) > 1 else [mean]
        late_values += [
            v for curve in drawn for s, v in zip(steps, curve, strict=True) if s >= since and math.isfinite(v)
        ]
    return late_values


def difference_figure(
    groups: dict[str, list[dict[str, Any]]],
    out: Path,
    filename: str,
    *,
    reference: str,
    eval_key: str = "loss",
    eval_label: str = "held-out loss",
) -> Figure | None:
    """Held-out ``eval_key`` minus the reference's at each evaluation (same seed), mean over seeds: the
    whole run (left) and, zoomed, from a fifth of the run on (right), so that an early spike of one
    optimizer does not flatten the others' differences."""
    if reference not in groups:
        return None
    plt = pyplot()
    ref_label = groups[reference][0]["spec"]["label"]
    total = max(r["spec"]["steps"] for recs in groups.values() for r in recs)
    start = total / 5
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    plot_differences(axes[0], groups, reference=reference, eval_key=eval_key)
    late_values = plot_differences(axes[1], groups, reference=reference, eval_key=eval_key, since=start)
    better = "above" if eval_key == "accuracy" else "below"
    axes[0].set_title("the whole run")
    axes[1].set_title(f"from step {start:.0f} on (zoomed)")
    axes[1].set_xlim(start - 0.02 * total, total + 0.02 * total)
    axes[1].set_ylim(*_zoom_limits(late_values))
    for ax in axes:
        ax.set_xlabel("step")
        ax.set_ylabel(f"{eval_label} minus {ref_label}'s")
    axes[0].legend()
    fig.suptitle(f"{better.capitalize()} zero: better than {ref_label} at the same step")
    fig.tight_layout()
    fig.savefig(out / filename)
    plt.close(fig)
    return Figure(
        filename,
        f"{eval_label.capitalize()} minus {ref_label}'s at the same step and seed: the whole run (left) and "
        f"from step {start:.0f} on with the y axis zoomed (right){_shading(groups)}",
    )
