"""``horizon``: does AdEMAMix's gain over AdamW grow with the length of the run?

The AdEMAMix paper's central claim is about length: old gradients stay useful for tens of thousands of
steps, and the gain over AdamW grows with the number of tokens. Here the demo's model and data train at
several run lengths; each run is planned for its own length (its lr warm-up, cosine decay and
AdEMAMix's alpha/beta3 warm-ups all span that run, not a cut of a longer one). AdEMAMix runs with and
without the paper's warm-ups, at each beta3 given. Per length the report gives every setting's final
held-out loss, its gap to AdamW on the same seed, and the paper's "tokens to match": the step at which
AdamW reached AdEMAMix's final loss, as a fraction of the run, and the length of an AdamW run (between
the planned ones) whose final loss equals it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from ._compare import compare_final, final_eval, plot_differences
from ._lm import LM_CHOICES, LM_DEFAULTS, LM_OPTIONS, lm_task_from_config
from ._optim import OPTIMIZERS
from ._report import Figure, ReportContent, Table, fmt, fmt_mean_std, group_runs, mean_std, over_seeds, pyplot
from ._runner import ConfigError, Experiment, Plan
from ._train import RunSpec

__all__ = [
    "HorizonExperiment",
    "Variant",
    "gap_verdict",
    "matching_length",
    "parse_beta3s",
    "parse_lengths",
    "parse_schedulers",
]

WEIGHT_DECAY = 0.1
CLIP = 1.0
REFERENCE = "adamw"
MIN_LENGTH = 2
SCHEDULER_CHOICES = ("with", "without")
#: colours of the AdEMAMix settings: (with warm-ups, without) per beta3, in the order given
PALETTE = [("#d62728", "#ff9896"), ("#9467bd", "#c5b0d5"), ("#8c564b", "#c49c94"), ("#e377c2", "#f7b6d2")]


# ---- options ---------------------------------------------------------------------------------------
def _split(text: str | int) -> list[str]:
    return [s.strip() for s in str(text).split(",") if s.strip()]


def parse_lengths(text: str | int) -> list[int]:
    """``'400,1500,4000'`` -> ``[400, 1500, 4000]``: distinct run lengths, sorted."""
    try:
        values = [int(s) for s in _split(text)]
    except ValueError as e:
        raise ConfigError(f"--steps: comma-separated run lengths, e.g. 400,1500,4000 (got {text!r})") from e
    if not values or any(v < MIN_LENGTH for v in values):
        raise ConfigError(
            f"--steps: run lengths of at least {MIN_LENGTH} steps, e.g. 400,1500 (got {text!r})"
        )
    if len(set(values)) != len(values):
        raise ConfigError(f"--steps: each run length once (got {text!r})")
    return sorted(values)


def parse_beta3s(text: str | float) -> list[float]:
    """``'0.999,0.9999'`` -> AdEMAMix's beta3 values, each in (0, 1), in the order given."""
    try:
        values = [float(s) for s in _split(text)]
    except ValueError as e:
        raise ConfigError(
            f"--beta3: comma-separated values in (0, 1), e.g. 0.999,0.9999 (got {text!r})"
        ) from e
    if not values or any(not 0 < v < 1 for v in values):
        raise ConfigError(f"--beta3: values in (0, 1), e.g. 0.999,0.9999 (got {text!r})")
    if len(set(values)) != len(values):
        raise ConfigError(f"--beta3: each value once (got {text!r})")
    return values


def parse_schedulers(text: str) -> list[bool]:
    """``'with,without'`` -> ``[True, False]``: AdEMAMix with and/or without its alpha/beta3 warm-ups."""
    values = _split(text)
    if not values or any(v not in SCHEDULER_CHOICES for v in values) or len(set(values)) != len(values):
        raise ConfigError(f"--schedulers: 'with', 'without' or 'with,without' (got {text!r})")
    return [v == "with" for v in values]


@dataclass(frozen=True)
class Variant:
    """One optimizer setting, run at every length and seed."""

    key: str  # group prefix: adamw, ademamix-b0.999-sched, ...
    optimizer: str
    label: str
    options: dict[str, Any]
    color: str


def variants(cfg: dict[str, Any]) -> list[Variant]:
    """AdamW (the reference), then AdEMAMix at each beta3, with and/or without its warm-ups."""
    out = [Variant(REFERENCE, "adamw", "AdamW", {}, OPTIMIZERS["adamw"].color)]
    for i, beta3 in enumerate(parse_beta3s(cfg["beta3"])):
        for sched in parse_schedulers(cfg["schedulers"]):
            out.append(
                Variant(
                    f"ademamix-b{beta3:g}-{'sched' if sched else 'nosched'}",
                    "ademamix",
                    f"AdEMAMix, beta3 {beta3:g}, {'with' if sched else 'no'} warm-ups",
                    {"alpha": float(cfg["alpha"]), "beta3": beta3, "schedulers": sched},
                    PALETTE[i % len(PALETTE)][0 if sched else 1],
                )
            )
    return out


# ---- numbers ---------------------------------------------------------------------------------------
def matching_length(lengths: list[int], finals: list[float], target: float) -> float | None:
    """The run length at which the final loss of planned runs (``finals`` at ``lengths``, ascending)
    gets down to ``target``: linear in log(length) between neighbouring lengths, the first crossing.
    None when no run of these lengths gets there (or ``target`` is not finite); ``lengths[0]`` when the
    shortest already does (the true match may then be shorter)."""
    if not math.isfinite(target):
        return None
    prev: tuple[int, float] | None = None
    for n, v in zip(lengths, finals, strict=True):
        if math.isfinite(v) and v <= target:
            if prev is None or prev[1] == v:
                return float(n)
            n0, v0 = prev
            frac = (v0 - target) / (v0 - v)
            return math.exp(math.log(n0) + frac * (math.log(n) - math.log(n0)))
        prev = (n, v) if math.isfinite(v) else None
    return None


def _position(values: list[float]) -> str:
    """Where the paired gaps (AdEMAMix minus AdamW, one per seed) put AdEMAMix: 'ahead', 'behind' or
    'level' (the mean within one std of the paired differences; one seed: never 'level')."""
    finite = [v for v in values if math.isfinite(v)]
    if not finite:
        return "diverged"
    m, s = mean_std(finite)
    if len(finite) > 1 and abs(m) <= s:
        return "level"
    return "ahead" if m < 0 else "behind"


def gap_verdict(label: str, lengths: list[int], gaps: list[list[float]]) -> str:
    """One sentence per AdEMAMix setting: its gap to AdamW at each length (``gaps[i]``: one paired
    difference per seed at ``lengths[i]``), and whether the gap moves in AdEMAMix's favour from the
    shortest length to the longest, beyond the spread over seeds at the two ends."""
    cells = [f"{fmt_mean_std(g)} at {n}" for n, g in zip(lengths, gaps, strict=True)]
    where = [_position(g) for g in gaps]
    text = f"{label}: {', '.join(cells)} steps ({', '.join(where)})"
    ends = [(mean_std(g), sum(1 for x in g if math.isfinite(x))) for g in gaps if any(map(math.isfinite, g))]
    if len(ends) < 2:
        return text + "."
    ((m0, s0), n0), ((m1, s1), n1) = ends[0], ends[-1]
    noise = max(s0, s1) if min(n0, n1) > 1 else 0.0
    change = m1 - m0
    if change < -noise:
        trend = "the gap moves in AdEMAMix's favour as the run gets longer, as the paper says"
    elif change > noise:
        trend = "the gap moves against AdEMAMix as the run gets longer, unlike the paper"
    else:
        trend = "no clear trend with the run's length (the change is within the spread over seeds)"
    return f"{text}: {trend}."


# ---- the experiment --------------------------------------------------------------------------------
class HorizonExperiment(Experiment):
    name = "horizon"
    title = "Horizon: AdEMAMix against AdamW at several run lengths"
    help = (
        "AdamW vs AdEMAMix (with and without warm-ups) at run lengths 400 to 4000 steps: does the gain grow?"
    )
    claim = (
        "AdEMAMix's gain over AdamW grows with the length of the run: in the paper, old gradients stay "
        "useful for tens of thousands of steps, and the number of tokens AdamW needs to match AdEMAMix "
        "grows with the budget (a 1.3B-parameter AdEMAMix model on 101B tokens matches AdamW on 197B)."
    )
    defaults: ClassVar[dict[str, Any]] = {
        "steps": "400,1500,4000",
        "seeds": 2,
        "seed": 0,
        "lr": 2e-3,
        "warmup": 0.05,
        "size": "base",
        "eval_every": None,
        "alpha": 8.0,
        "beta3": "0.999,0.9999",
        "schedulers": "with,without",
        **LM_DEFAULTS,
    }
    options: ClassVar[dict[str, tuple[Any, str]]] = {
        "steps": (
            str,
            "comma-separated run lengths; each run plans its lr schedule and warm-ups for its own",
        ),
        "alpha": (float, "AdEMAMix's alpha (the paper: 4 to 10)"),
        "beta3": (str, "comma-separated AdEMAMix beta3 values, each run at every length"),
        "schedulers": (
            str,
            "AdEMAMix with its alpha/beta3 warm-ups over the whole run ('with'), without them ('without'), "
            "or both",
        ),
        **LM_OPTIONS,
    }
    choices = LM_CHOICES
    default_out = "runs/horizon"

    def resolve(self, given: dict[str, Any]) -> dict[str, Any]:
        """``--steps`` is a list here: the shared checks see the shortest length, the configuration keeps
        the canonical list (``'400,1500,4000'``), so ``--resume`` compares like with like."""
        text = given.get("steps")
        lengths = parse_lengths(self.defaults["steps"] if text is None else text)
        cfg = super().resolve({**given, "steps": lengths[0]})
        cfg["steps"] = ",".join(map(str, lengths))
        return cfg

    def validate(self, cfg: dict[str, Any]) -> None:
        if not cfg["alpha"] > 0:
            raise ConfigError(f"--alpha must be positive (got {cfg['alpha']})")
        cfg["beta3"] = ",".join(f"{v:g}" for v in parse_beta3s(cfg["beta3"]))
        cfg["schedulers"] = ",".join("with" if s else "without" for s in parse_schedulers(cfg["schedulers"]))

    def plan(self, cfg: dict[str, Any]) -> Plan:
        task, setup = lm_task_from_config(cfg)
        lengths = parse_lengths(cfg["steps"])
        tokens = task.tokens_per_step()
        # shortest lengths first: an interrupted run has whole lengths to report
        runs = [
            RunSpec(
                run_id=f"{v.key}-n{n}-s{seed}",
                optimizer=v.optimizer,
                group=f"{v.key}@{n}",
                label=f"{v.label}, {n} steps",
                seed=seed,
                steps=n,
                lr=float(cfg["lr"]),
                warmup=self.warmup_steps(cfg, n),
                eval_every=self.eval_every(cfg, n),
                weight_decay=WEIGHT_DECAY,
                clip=CLIP,
                options=dict(v.options),
                params={"variant": v.key, "length": n, "color": v.color},
            )
            for n in lengths
            for seed in self.seeds(cfg)
            for v in variants(cfg)
        ]
        warmups = ", ".join(str(self.warmup_steps(cfg, n)) for n in lengths)
        setup += [
            "Run lengths: "
            + ", ".join(f"{n} steps ({n * tokens / 1e6:.2f}M tokens)" for n in lengths)
            + f", {tokens} tokens per step",
            f"Each run is planned for its own length: linear lr warm-up over {cfg['warmup']:.0%} of its "
            f"steps ({warmups}) to {cfg['lr']:g}, cosine decay to 10% at its last step; AdEMAMix's "
            "alpha/beta3 warm-ups (where on) span the whole run (T_alpha = T_beta3 = its length), as in "
            f"the paper. Weight decay {WEIGHT_DECAY} (decoupled), gradient clipping at norm {CLIP}",
            "Held-out loss evaluated "
            + (
                f"every {cfg['eval_every']} steps"
                if cfg.get("eval_every")
                else "20 times per run (every length / 20 steps)"
            ),
        ]
        optimizers = []
        for v in variants(cfg):
            text = OPTIMIZERS[v.optimizer].describe(cfg["lr"], lengths[-1], WEIGHT_DECAY, v.options)
            optimizers.append((v.label, text.replace(f"{lengths[-1]} (total steps)", "the run's length")))
        return Plan({"main": task}, runs, setup, optimizers)

    # ---- the report -------------------------------------------------------------------------------
    def summarize(
        self, cfg: dict[str, Any], plan: Plan, records: dict[str, dict[str, Any]], out: Path
    ) -> ReportContent:
        lengths = parse_lengths(cfg["steps"])
        vs = variants(cfg)
        n_seeds = len(self.seeds(cfg))
        groups = group_runs(records[s.run_id] for s in plan.runs)
        by_seed = {g: {r["spec"]["seed"]: r for r in recs} for g, recs in groups.items()}
        seeds = self.seeds(cfg)
        ref_finals = {
            s: [final_eval(by_seed[f"{REFERENCE}@{n}"][s]) for n in lengths] for s in seeds
        }  # AdamW's final loss at each length, per seed: for the matching AdamW run length
        summary: dict[str, Any] = {"lengths": lengths, "reference": REFERENCE, "settings": {}}
        rows = []
        for v in vs:
            entry: dict[str, Any] = {"label": v.label, "options": v.options, "by_length": {}}
            for n in lengths:
                recs = by_seed[f"{v.key}@{n}"]
                finals = [final_eval(recs[s]) for s in seeds]
                m, sd = mean_std(finals)
                row_entry: dict[str, Any] = {
                    "seeds": seeds,
                    "final_heldout_loss": finals,
                    "final_heldout_loss_mean": m,
                    "final_heldout_loss_std": sd,
                    "diverged_at": [recs[s]["diverged_at"] for s in seeds],
                    "wall_time_s": [recs[s]["wall_time_s"] for s in seeds],
                }
                cells = ["-"] * 5
                if v.key != REFERENCE:
                    ref = by_seed[f"{REFERENCE}@{n}"]
                    gaps = [f - final_eval(ref[s]) for f, s in zip(finals, seeds, strict=True)]
                    gm, gs = mean_std(gaps)
                    adamw_reach = [compare_final(ref[s], recs[s]) for s in seeds]
                    mine_reach = [compare_final(recs[s], ref[s]) for s in seeds]
                    match = [
                        matching_length(lengths, ref_finals[s], f) for f, s in zip(finals, seeds, strict=True)
                    ]
                    row_entry.update(
                        gap=gaps,
                        gap_mean=gm,
                        gap_std=gs,
                        seeds_ahead=sum(1 for g in gaps if g < 0),
                        adamw_steps_to_reach_this_final=adamw_reach,
                        steps_to_reach_adamw_final=mine_reach,
                        adamw_run_length_matching_this_final=match,
                    )
                    both = [math.isfinite(g) for g in gaps]  # neither run of the seed diverged
                    cells = [
                        fmt_mean_std(gaps),
                        f"{row_entry['seeds_ahead']} of {len(seeds)}",
                        _fraction_text(adamw_reach, both, n, "AdEMAMix ahead"),
                        _fraction_text(mine_reach, both, n, "AdEMAMix behind"),
                        _match_text(match, finals, n, lengths),
                    ]
                entry["by_length"][str(n)] = row_entry
                rows.append([str(n), v.label, fmt_mean_std(finals), *cells])
            summary["settings"][v.key] = entry
        rows.sort(key=lambda r: int(r[0]))  # grouped by length, settings in their order within it
        table = Table(
            [
                "steps",
                "setting",
                "final held-out loss",
                "gap: AdEMAMix minus AdamW (same seed)",
                "seeds AdEMAMix ahead",
                "AdamW's step to reach this final loss (fraction of the run)",
                "this setting's step to reach AdamW's final loss (fraction of the run)",
                "length of an AdamW run with this final loss (multiple of this run's)",
            ],
            rows,
            title="Per run length",
            note=f"Nats per byte, {over_seeds(n_seeds)}; the gap is paired by seed (below zero: "
            "AdEMAMix ahead), its spread is the std of the paired differences. Steps to reach a loss are "
            "read off the held-out curve (interpolated between evaluations); 'never' means not within "
            "the run. The step at which AdamW reaches AdEMAMix's final loss is the paper's 'tokens to "
            "match' within one run; as both follow a schedule planned for the whole run, it overstates "
            "what an AdamW run planned for that many steps would need. The last column is the other "
            "reading: the length of a planned AdamW run whose final loss equals this one, interpolated "
            "in log(length) between the AdamW runs of this experiment (same seed), as a multiple of this "
            "run's length.",
        )
        gap_table = self._gap_table(summary, vs, lengths, n_seeds)
        figures = [self._figure(summary, vs, lengths, out), self._curves(groups, vs, lengths, out)]
        verdict = self._verdict(summary, vs, lengths)
        summary["verdict"] = verdict
        findings = [
            "A longer run here is a run planned for that many steps (its own warm-up and cosine decay), not "
            "a cut of the longest run, so each length is what a user with that budget would get. The "
            f"longest run here ({lengths[-1]} steps) is still far from the paper's runs of hundreds of "
            "thousands of steps, at a model 1000 times smaller.",
        ]
        return ReportContent(verdict, [table, gap_table], figures, findings, summary)

    @staticmethod
    def _gap_table(summary: dict[str, Any], vs: list[Variant], lengths: list[int], n_seeds: int) -> Table:
        rows = [
            [
                v.label,
                *[fmt_mean_std(summary["settings"][v.key]["by_length"][str(n)]["gap"]) for n in lengths],
            ]
            for v in vs
            if v.key != REFERENCE
        ]
        best = [
            f"{label} ({fmt(m)})" if label else "n/a"
            for label, m in (_lowest(summary, vs, n) for n in lengths)
        ]
        rows.append(["lowest final held-out loss", *best])
        return Table(
            ["gap to AdamW (nats/byte)", *[f"{n} steps" for n in lengths]],
            rows,
            title="Gap against run length",
            note=f"AdEMAMix's final held-out loss minus AdamW's on the same seed, {over_seeds(n_seeds)} "
            "(below zero: AdEMAMix ahead). Last row: the setting with the lowest mean final loss at each "
            "length, AdamW included.",
        )

    @staticmethod
    def _verdict(summary: dict[str, Any], vs: list[Variant], lengths: list[int]) -> str:
        parts = []
        for v in vs:
            if v.key == REFERENCE:
                continue
            by = summary["settings"][v.key]["by_length"]
            parts.append(gap_verdict(v.label, lengths, [by[str(n)]["gap"] for n in lengths]))
        text = "Gap to AdamW (AdEMAMix minus AdamW, final held-out loss, nats/byte): " + " ".join(parts)
        lowest = [(n, *_lowest(summary, vs, n)) for n in lengths]
        text += (
            " Lowest mean final loss: "
            + "; ".join(f"at {n} steps {label} ({fmt(m)})" for n, label, m in lowest if label)
            + "."
        )
        if len(summary["settings"][REFERENCE]["by_length"][str(lengths[0])]["seeds"]) == 1:
            text += " One seed only: no estimate of the seed-to-seed spread (use --seeds 2 or more)."
        return text

    @staticmethod
    def _figure(summary: dict[str, Any], vs: list[Variant], lengths: list[int], out: Path) -> Figure:
        plt = pyplot()
        fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
        for v in vs:
            by = summary["settings"][v.key]["by_length"]
            panels = [(axes[1], "final_heldout_loss")] + ([] if v.key == REFERENCE else [(axes[0], "gap")])
            for ax, key in panels:
                per_length = [[x for x in by[str(n)][key] if math.isfinite(x)] for n in lengths]
                xs = [n for n, vals in zip(lengths, per_length, strict=True) if vals]
                means = [mean_std(vals)[0] for vals in per_length if vals]
                stds = [mean_std(vals)[1] for vals in per_length if vals]
                ax.errorbar(xs, means, yerr=stds, color=v.color, marker="o", capsize=3, label=v.label)
                for n, vals in zip(lengths, per_length, strict=True):  # every seed, faint
                    ax.scatter([n] * len(vals), vals, color=v.color, s=10, alpha=0.4)
        axes[0].axhline(0.0, color=OPTIMIZERS["adamw"].color, linewidth=1, label="AdamW (reference)")
        axes[0].set_ylabel("final held-out loss minus AdamW's, nats/byte")
        axes[0].set_title("Gap to AdamW against run length (below zero: AdEMAMix ahead)")
        axes[1].set_ylabel("final held-out loss, nats/byte")
        axes[1].set_title("Final held-out loss against run length")
        for ax in axes:
            ax.set_xscale("log")
            ax.set_xticks(lengths)
            ax.set_xticklabels([str(n) for n in lengths])
            ax.minorticks_off()
            ax.set_xlabel("run length (steps; each run planned for its length)")
            ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(out / "horizon.png")
        plt.close(fig)
        return Figure(
            "horizon.png",
            "Left: AdEMAMix's final held-out loss minus AdamW's (same seed) against the run's length; "
            "right: every setting's final held-out loss. Mean over seeds, bars: std, dots: single seeds",
        )

    @staticmethod
    def _curves(
        groups: dict[str, list[dict[str, Any]]], vs: list[Variant], lengths: list[int], out: Path
    ) -> Figure:
        plt = pyplot()
        fig, axes = plt.subplots(1, len(lengths), figsize=(4.4 * len(lengths), 4), squeeze=False)
        for ax, n in zip(axes[0], lengths, strict=True):
            sub = {f"{v.key}@{n}": groups[f"{v.key}@{n}"] for v in vs if f"{v.key}@{n}" in groups}
            if f"{REFERENCE}@{n}" in sub:
                labels = {f"{v.key}@{n}": v.label for v in vs}
                plot_differences(ax, sub, reference=f"{REFERENCE}@{n}", labels=labels)
            ax.set_title(f"{n} steps")
            ax.set_xlabel("step")
        axes[0][0].set_ylabel("held-out loss minus AdamW's, nats/byte")
        axes[0][-1].legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(out / "horizon_curves.png")
        plt.close(fig)
        return Figure(
            "horizon_curves.png",
            "Held-out loss minus AdamW's at the same step and seed, one panel per run length (below zero: "
            "AdEMAMix ahead at that step); mean over seeds, shading: min-max",
        )


def _lowest(summary: dict[str, Any], vs: list[Variant], n: int) -> tuple[str, float]:
    """The setting (AdamW included) with the lowest mean final held-out loss at length ``n``: (label,
    mean), or ('', NaN) if every one diverged."""
    means = {v.label: summary["settings"][v.key]["by_length"][str(n)]["final_heldout_loss_mean"] for v in vs}
    finite = {k: m for k, m in means.items() if math.isfinite(m)}
    if not finite:
        return "", math.nan
    label = min(finite, key=finite.__getitem__)
    return label, finite[label]


def _fraction_text(values: list[float | None], ok: list[bool], steps: int, never_means: str) -> str:
    """``'0.62 ± 0.03'`` of the run over the seeds whose two runs finished (``ok``), or ``'never'``;
    seeds with a diverged run are counted apart."""
    kept = [v for v, good in zip(values, ok, strict=True) if good]
    reached = [v / steps for v in kept if v is not None]
    parts = [fmt_mean_std(reached, 2)] if reached else []
    if len(reached) < len(kept):
        never = len(kept) - len(reached)
        parts.append(
            f"never ({never_means})"
            if not reached and never == len(values)
            else f"{never} of {len(values)} seeds never"
        )
    if len(kept) < len(values):
        parts.append(f"{len(values) - len(kept)} of {len(values)} seeds diverged")
    return "; ".join(parts)


def _match_text(values: list[float | None], finals: list[float], steps: int, lengths: list[int]) -> str:
    """``'1.40'`` times this run's length over seeds; out of the range of the planned AdamW runs:
    ``'> 4000 steps'`` (better than AdamW's longest) or ``'<= 400 steps'``."""
    ok = [v for v, f in zip(values, finals, strict=True) if math.isfinite(f)]
    inside = [v / steps for v in ok if v is not None and v > lengths[0]]
    counts = {
        f"<= {lengths[0]} steps": sum(1 for v in ok if v is not None and v <= lengths[0]),
        f"> {lengths[-1]} steps": sum(1 for v in ok if v is None),
        "diverged": len(values) - len(ok),
    }
    parts = [fmt_mean_std(inside, 2)] if inside else []
    for text, k in counts.items():
        if k:
            parts.append(text + (f" ({k} of {len(values)} seeds)" if len(values) > 1 else ""))
    return "; ".join(parts)
