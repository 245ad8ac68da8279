"""Everything a report is made of: statistics over seeds, plots, the markdown page and the JSON file."""

from __future__ import annotations

import json
import math
import os
import platform
import shlex
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

__all__ = [
    "Figure",
    "MissingDependencyError",
    "ReportContent",
    "Table",
    "aggregate",
    "ema",
    "fmt",
    "fmt_mean_std",
    "group_runs",
    "mean_std",
    "over_seeds",
    "plot_curves",
    "pyplot",
    "sanitize",
    "steps_to_reach",
    "versions",
    "write_json",
    "write_report",
]


# ---- numbers ---------------------------------------------------------------------------------------
def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for one value) of the finite values; NaN if none is."""
    vals = [float(v) for v in values if v is not None and math.isfinite(float(v))]
    if not vals:
        return float("nan"), float("nan")
    m = sum(vals) / len(vals)
    if len(vals) == 1:
        return m, 0.0
    var = sum((v - m) * (v - m) for v in vals) / (len(vals) - 1)  # inf, not OverflowError
    return m, math.sqrt(var)


def fmt(x: float | None, digits: int = 3) -> str:
    if x is None or not math.isfinite(x):
        return "n/a"
    return f"{x:.{digits}f}"


def fmt_mean_std(values: Sequence[float | None], digits: int = 3) -> str:
    """``'2.345 ± 0.012'`` over seeds (``'2.345'`` for one seed); runs that diverged are named."""
    n_bad = sum(1 for v in values if v is None or not math.isfinite(float(v)))
    m, s = mean_std([v for v in values if v is not None])
    n_ok = len(values) - n_bad
    if n_ok == 0:
        return "diverged" if values else "n/a"
    text = fmt(m, digits) if n_ok == 1 else f"{fmt(m, digits)} ± {fmt(s, digits)}"
    if n_bad:
        text += f" ({n_bad} of {len(values)} diverged)"
    return text


def over_seeds(n: int) -> str:
    """``'mean ± std over 3 seeds'`` or ``'one seed'``."""
    return f"mean ± std over {n} seeds" if n > 1 else "one seed"


def ema(values: Sequence[float], beta: float) -> list[float]:
    """Bias-corrected exponential moving average (for drawing noisy training curves)."""
    out: list[float] = []
    avg, weight = 0.0, 0.0
    for v in values:
        if not math.isfinite(v):
            out.append(float("nan"))
            continue
        avg = beta * avg + (1 - beta) * v
        weight = beta * weight + (1 - beta)
        out.append(avg / weight)
    return out


def steps_to_reach(steps: Sequence[float], values: Sequence[float], target: float) -> float | None:
    """First step at which the curve gets down to ``target`` (linear interpolation between points);
    None if it never does."""
    prev_s: float | None = None
    prev_v: float | None = None
    for s, v in zip(steps, values, strict=True):
        if v is not None and math.isfinite(v) and v <= target:
            if prev_s is None or prev_v is None or not math.isfinite(prev_v) or prev_v == v:
                return float(s)
            return float(prev_s + (s - prev_s) * (prev_v - target) / (prev_v - v))
        prev_s, prev_v = s, v
    return None


def group_runs(records: Iterable[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    """Records by ``spec.group``, in first-seen order."""
    groups: dict[str, list[dict[str, Any]]] = {}
    for rec in records:
        groups.setdefault(rec["spec"]["group"], []).append(rec)
    return groups


def aggregate(
    records: Sequence[dict[str, Any]], where: str, key: str
) -> tuple[list[float], list[list[float]]]:
    """The steps and the per-seed values of curve ``records[i][where][key]``, on the steps all share."""
    curves = [(r[where]["step"], r[where].get(key, [])) for r in records]
    common = set(curves[0][0][: len(curves[0][1])])
    for steps, vals in curves[1:]:
        common &= set(steps[: len(vals)])
    steps = sorted(common)
    per_seed = []
    for s_list, vals in curves:
        lookup = dict(zip(s_list, vals, strict=False))
        per_seed.append([lookup[s] for s in steps])
    return steps, per_seed


# ---- plots -----------------------------------------------------------------------------------------
class MissingDependencyError(RuntimeError):
    """A package the reports need does not import (the message says how to install it)."""


def pyplot() -> Any:
    """matplotlib.pyplot on the file-only Agg backend; :class:`MissingDependencyError` without it."""
    try:
        import matplotlib

        matplotlib.use("Agg", force=True)
        import matplotlib.pyplot as plt
    except ImportError as e:
        raise MissingDependencyError(
            f"the reports draw their plots with matplotlib, which does not import ({e}); install it with "
            "`pip install matplotlib` (in a checkout of longmem: `pip install -e '.[experiments]'`)"
        ) from e

    plt.rcParams.update(
        {
            "figure.dpi": 100,
            "savefig.dpi": 110,
            "axes.grid": True,
            "grid.alpha": 0.3,
            "axes.spines.top": False,
            "axes.spines.right": False,
            "legend.frameon": False,
            "font.size": 10,
        }
    )
    return plt


def plot_curves(
    ax: Any,
    groups: dict[str, list[dict[str, Any]]],
    where: str,
    key: str,
    *,
    colors: dict[str, str],
    labels: dict[str, str],
    smooth: float | None = None,
    raw_alpha: float = 0.0,
    linestyle: str = "-",
    marker: str | None = None,
    x_offset: float = 0.0,
    ymax: float = 1e30,
) -> None:
    """Mean over seeds of one curve per group, with the min-max band over seeds shaded. Values above
    ``ymax`` (a run blowing up) are left out of the drawing."""
    for group, recs in groups.items():
        steps, per_seed = aggregate(recs, where, key)
        if not steps:
            continue
        per_seed = [[v if math.isfinite(v) and v <= ymax else math.nan for v in vals] for vals in per_seed]
        xs = [s - x_offset for s in steps]
        mean = [mean_std(col)[0] for col in zip(*per_seed, strict=True)]
        color = colors.get(group)
        if raw_alpha and smooth:
            ax.plot(xs, mean, color=color, alpha=raw_alpha, linewidth=0.7)
        line = ema(mean, smooth) if smooth else mean
        ax.plot(
            xs,
            line,
            color=color,
            label=labels.get(group, group),
            linestyle=linestyle,
            marker=marker,
            markersize=3,
        )
        if len(per_seed) > 1:
            lo = [min(c) for c in zip(*per_seed, strict=True)]
            hi = [max(c) for c in zip(*per_seed, strict=True)]
            if smooth:
                lo, hi = ema(lo, smooth), ema(hi, smooth)
            ax.fill_between(xs, lo, hi, color=color, alpha=0.15, linewidth=0)


# ---- report ----------------------------------------------------------------------------------------
@dataclass
class Table:
    header: list[str]
    rows: list[list[str]]
    title: str = ""
    note: str = ""

    def markdown(self) -> str:
        lines = []
        if self.title:
            lines += [f"### {self.title}", ""]
        lines.append("| " + " | ".join(self.header) + " |")
        lines.append("|" + "|".join("---" for _ in self.header) + "|")
        lines += ["| " + " | ".join(row) + " |" for row in self.rows]
        if self.note:
            lines += ["", self.note]
        return "\n".join(lines)


@dataclass
class Figure:
    filename: str
    caption: str


@dataclass
class ReportContent:
    """What an experiment's summary produces; the runner adds setup, command and versions."""

    verdict: str
    tables: list[Table] = field(default_factory=list)
    figures: list[Figure] = field(default_factory=list)
    findings: list[str] = field(default_factory=list)
    summary: dict[str, Any] = field(default_factory=dict)


def versions() -> dict[str, str]:
    import longmem

    out = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "longmem": longmem.__version__,
        "platform": platform.platform(),
        "machine": platform.machine(),
        "cpu_count": str(os.cpu_count()),
        "torch_threads": str(torch.get_num_threads()),
        "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY", "(unset)"),
    }
    try:
        import numpy

        out["numpy"] = numpy.__version__
    except ImportError:  # pragma: no cover
        pass
    try:
        import matplotlib

        out["matplotlib"] = matplotlib.__version__
    except ImportError:  # pragma: no cover
        pass
    return out


def command_line(argv: Sequence[str]) -> str:
    return shlex.join(["longmem", *argv])


def sanitize(obj: Any) -> Any:
    """JSON-ready copy: non-finite floats become None, tuples lists, paths strings."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {str(k): sanitize(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [sanitize(v) for v in obj]
    if isinstance(obj, Path):
        return str(obj)
    return obj


def write_json(path: Path, payload: dict[str, Any]) -> None:
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(sanitize(payload), indent=1, allow_nan=False) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def write_report(
    path: Path,
    *,
    title: str,
    claim: str,
    content: ReportContent,
    setup: list[str],
    optimizers: list[tuple[str, str]],
    command: str,
    versions_: dict[str, str],
    wall_time_s: float,
    json_name: str,
    status_note: str = "",
) -> None:
    """Write ``report.md``: verdict, tables, plots, findings, setup, exact command and versions."""
    from ._progress import format_duration

    parts = [f"# {title}", ""]
    if status_note:
        parts += [f"> **{status_note}**", ""]
    parts += [f"**The claim.** {claim}", "", f"**At this scale.** {content.verdict}", ""]
    if content.tables:
        parts += ["## Results", ""]
        for table in content.tables:
            parts += [table.markdown(), ""]
    for fig in content.figures:
        parts += [f"![{fig.caption}]({fig.filename})", "", f"*{fig.caption}*", ""]
    if content.findings:
        parts += ["## Findings", ""]
        parts += [f"- {f}" for f in content.findings]
        parts.append("")
    parts += ["## Setup", ""]
    parts += [f"- {s}" for s in setup]
    parts.append("")
    if optimizers:
        parts += ["| optimizer | settings |", "|---|---|"]
        parts += [f"| {name} | {desc} |" for name, desc in optimizers]
        parts.append("")
    parts += [
        "## Reproduce",
        "",
        "```bash",
        command,
        "```",
        "",
        f"Wall time: {format_duration(wall_time_s)} ({wall_time_s:.0f} s) on this machine. "
        f"Every curve is in [`{json_name}`]({json_name}).",
        "",
        "| | version |",
        "|---|---|",
    ]
    parts += [f"| {k} | {v} |" for k, v in versions_.items()]
    parts.append("")
    path.write_text("\n".join(parts), encoding="utf-8")


def default_argv() -> list[str]:
    return sys.argv[1:]
