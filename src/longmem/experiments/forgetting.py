"""``forgetting``: how fast a model forgets one batch it saw once (the AdEMAMix paper's experiment).

A batch B of windows from the held-out files is kept out of training, except that at step t_B it
replaces the regular batch, once. The measurement is paired: every run is made twice with the same
seed, once with the injection and once without (the regular batch at t_B), and B's loss is compared
between the two. Up to t_B the two runs are the same run, so the difference is exactly zero there, and
after it the drift of B's own difficulty as the model learns cancels. The one exposure lowers B's loss
below the plain run's; training on other data then erodes that advantage: the faster it erodes, the
faster the model forgets. Control batches drawn like B but never trained on get the same paired
comparison: the floor of what one changed batch does to text the model never saw.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from ._compare import final_eval, group_color
from ._data import ByteCorpus
from ._lm import EVAL_WINDOWS, LM_CHOICES, LM_DEFAULTS, LM_OPTIONS, LMTask, _windows, lm_task_from_config
from ._models import GPTConfig
from ._optim import ademamix_beta3_for
from ._report import (
    Figure,
    ReportContent,
    Table,
    fmt_mean_std,
    group_runs,
    mean_std,
    plot_curves,
    pyplot,
    steps_to_reach,
)
from ._runner import ConfigError, Experiment, Plan

__all__ = ["ForgettingExperiment", "ForgettingTask", "forgetting_metrics"]

N_CONTROL = 4  # control batches, averaged
WEIGHT_DECAY = 0.1
CLIP = 1.0


class ForgettingTask(LMTask):
    """The LM task with batch B injected once, at 0-based step ``inject_step`` (unless ``inject`` is
    False: the paired run without it), and probes of the loss on B and on the control batches every
    ``probe_every`` steps (and right before and after the injection step, in both runs)."""

    name = "forgetting"

    def __init__(
        self,
        corpus: ByteCorpus,
        cfg: GPTConfig,
        eval_windows: int,
        inject_step: int,
        probe_every: int,
        *,
        inject: bool = True,
    ) -> None:
        super().__init__(corpus, cfg, eval_windows)
        self.inject_step = inject_step
        self.probe_every = probe_every
        self.inject = inject
        self._probe_cache: dict[int, tuple[Tensor, Tensor]] = {}

    def probe_batches(self, seed: int) -> tuple[Tensor, Tensor]:
        """(B, controls) for ``seed``: windows of the held-out files, drawn per seed."""
        if seed not in self._probe_cache:
            g = torch.Generator().manual_seed(777_777 + seed)
            n = self.corpus.held_out.numel() - self.cfg.context - 1
            starts = torch.randint(0, n, ((1 + N_CONTROL) * self.cfg.batch_size,), generator=g)
            windows = _windows(self.corpus.held_out, starts, self.cfg.context + 1)
            self._probe_cache[seed] = (windows[: self.cfg.batch_size], windows[self.cfg.batch_size :])
        return self._probe_cache[seed]

    def train_batch(self, step: int, seed: int) -> Tensor:
        if self.inject and step == self.inject_step:
            return self.probe_batches(seed)[0]
        return super().train_batch(step, seed)

    def probe(self, model: nn.Module, done: int, seed: int) -> dict[str, float] | None:
        t_b = self.inject_step
        if done % self.probe_every and done not in (t_b, t_b + 1, t_b + 2):
            return None
        b, controls = self.probe_batches(seed)
        return {"loss_B": self.batch_loss(model, b), "loss_control": self.batch_loss(model, controls)}


PEAK_WINDOW = 0.1  # the gain: the largest advantage within this fraction of the steps after t_B
END_WINDOW = 0.1  # what is left: the mean advantage over this last fraction of the steps after t_B
PLAIN = "plain"  # group suffix of the paired runs without the injection


def forgetting_metrics(rec: dict[str, Any], plain: dict[str, Any], inject_step: int) -> dict[str, Any]:
    """From the probes of run ``rec`` (B trained on once, at step t_B) and ``plain`` (the same seed without
    it): B's advantage, its loss in ``plain`` minus its loss in ``rec``. ``jump``: its largest value shortly
    after the injection (the momentum keeps applying B's gradient for a few steps, so the peak can come
    after step t_B + 1); ``left``: its mean over the end of the run; ``retained``: left / jump;
    ``half_life``: the steps from the injection until it first falls to half the peak, after the peak;
    ``control_left``: the same paired difference on the never-seen control batches, at the end;
    ``before``: the largest paired difference up to t_B (zero: the two runs are one run until then)."""
    empty = {
        "jump": math.nan,
        "left": math.nan,
        "retained": math.nan,
        "half_life": None,
        "control_left": math.nan,
        "before": math.nan,
        "curve": ([], []),
        "control_curve": ([], []),
    }
    probe, base = rec["probe"], plain["probe"]
    steps = probe["step"]
    if (
        rec["diverged_at"] is not None
        or plain["diverged_at"] is not None
        or inject_step + 1 not in steps
        or base["step"][: len(steps)] != steps
    ):
        return empty
    adv = [p - b for b, p in zip(probe["loss_B"], base["loss_B"], strict=False)]
    ctrl = [p - c for c, p in zip(probe["loss_control"], base["loss_control"], strict=False)]
    before = max(abs(adv[i]) for i, s in enumerate(steps) if s <= inject_step)
    after = [i for i, s in enumerate(steps) if s > inject_step]
    after_steps = [steps[i] for i in after]
    excess = [adv[i] for i in after]
    span = max(after_steps[-1] - inject_step, 1)
    early = [k for k, s in enumerate(after_steps) if s - inject_step <= max(1.0, PEAK_WINDOW * span)]
    peak_k = max(early, key=lambda k: excess[k])
    jump = excess[peak_k]
    late = [k for k, s in enumerate(after_steps) if s - inject_step >= (1 - END_WINDOW) * span]
    left = sum(excess[k] for k in late) / len(late)
    # forgetting half of the gain: the first step after the peak at which the advantage is down to jump / 2
    half = steps_to_reach(after_steps[peak_k:], excess[peak_k:], jump / 2) if jump > 0 else None
    since = [s - inject_step for s in after_steps]
    return {
        "jump": jump,
        "left": left,
        "retained": left / jump if jump > 0 else math.nan,
        "half_life": None if half is None else half - inject_step,
        "control_left": sum(ctrl[after[k]] for k in late) / len(late),
        "before": before,
        "curve": (since, excess),
        "control_curve": (since, [ctrl[i] for i in after]),
    }


class ForgettingExperiment(Experiment):
    name = "forgetting"
    title = "Forgetting: the loss on one batch seen once, AdamW against AdEMAMix"
    help = "inject one held-out batch once at step t_B and track its loss: AdamW vs AdEMAMix"
    claim = (
        'AdEMAMix "significantly slows down model forgetting during training": in the paper, a batch seen '
        "once at step t_B keeps a lower loss for many more steps under AdEMAMix than under AdamW."
    )
    defaults: ClassVar[dict[str, Any]] = {
        "steps": 1000,
        "seeds": 3,
        "seed": 0,
        "optimizers": ["adamw", "ademamix"],
        "lr": 2e-3,
        "warmup": 0.05,
        "size": "small",
        "eval_every": None,
        "inject_at": 0.3,
        **LM_DEFAULTS,
    }
    options: ClassVar[dict[str, tuple[Any, str]]] = {
        **LM_OPTIONS,
        "inject_at": (float, "when B is trained on, as a fraction of the steps"),
    }
    choices = LM_CHOICES
    default_out = "runs/forgetting"

    def validate(self, cfg: dict[str, Any]) -> None:
        if not 0 < cfg["inject_at"] < 1:
            raise ConfigError(f"--inject-at is a fraction of the steps in (0, 1) (got {cfg['inject_at']})")

    def inject_step(self, cfg: dict[str, Any]) -> int:
        return min(int(cfg["steps"]) - 2, max(1, round(cfg["inject_at"] * int(cfg["steps"]))))

    def plan(self, cfg: dict[str, Any]) -> Plan:
        lm, setup = lm_task_from_config(cfg)
        steps = int(cfg["steps"])
        if steps < 4:
            raise ConfigError("forgetting needs --steps 4 or more")
        t_b = self.inject_step(cfg)
        every = max(1, steps // 100)
        windows = EVAL_WINDOWS[cfg["size"]]
        tasks = {
            "main": ForgettingTask(lm.corpus, lm.cfg, windows, t_b, every),
            PLAIN: ForgettingTask(lm.corpus, lm.cfg, windows, t_b, every, inject=False),
        }
        warmup = self.warmup_steps(cfg)
        opts = {"alpha": 8.0, "beta3": ademamix_beta3_for(steps)}
        runs = []
        for spec in self.optimizer_runs(
            cfg, {"ademamix": {"options": opts}}, weight_decay=WEIGHT_DECAY, clip=CLIP
        ):
            runs.append(spec)  # the same seed again without B: everything else equal
            runs.append(
                dataclasses.replace(
                    spec,
                    run_id=f"{spec.optimizer}-{PLAIN}-s{spec.seed}",
                    group=f"{spec.group}-{PLAIN}",
                    label=f"{spec.label}, without B",
                    task=PLAIN,
                    params={**spec.params, "paired_with": spec.run_id},
                )
            )
        setup += [
            f"Steps: {steps}; batch B ({lm.cfg.batch_size} windows of the held-out files, drawn per seed) "
            f"replaces the regular batch once, at step t_B = {t_b}. Paired design: each optimizer and seed "
            "also runs without the injection (the regular batch at t_B, everything else the same), and B's "
            f"loss is compared between the two runs. {N_CONTROL} control batches drawn like B are never "
            f"trained on, in either run. Loss on B and on the controls measured every {every} steps",
            f"lr schedule (every optimizer): linear warm-up over {warmup} steps, cosine decay to 10%; weight "
            f"decay {WEIGHT_DECAY}, clipping at norm {CLIP}",
        ]
        optimizers = self.optimizer_table(cfg, cfg["optimizers"], opts, WEIGHT_DECAY)
        return Plan(tasks, runs, setup, optimizers)

    def summarize(
        self, cfg: dict[str, Any], plan: Plan, records: dict[str, dict[str, Any]], out: Path
    ) -> ReportContent:
        groups = group_runs(records[s.run_id] for s in plan.runs)
        t_b = self.inject_step(cfg)
        steps = int(cfg["steps"])
        rows = []
        summary: dict[str, Any] = {"inject_step": t_b, "optimizers": {}}
        metrics: dict[str, list[dict[str, Any]]] = {}
        for group in cfg["optimizers"]:
            plain = {r["spec"]["seed"]: r for r in groups[f"{group}-{PLAIN}"]}
            recs = groups[group]
            ms = [forgetting_metrics(r, plain[r["spec"]["seed"]], t_b) for r in recs]
            metrics[group] = ms
            keys = ("jump", "left", "retained", "half_life", "control_left", "before")
            entry: dict[str, Any] = {k: [m[k] for m in ms] for k in keys}
            entry["label"] = recs[0]["spec"]["label"]
            entry["final_heldout_loss"] = [final_eval(r) for r in recs]
            summary["optimizers"][group] = entry
            halves = entry["half_life"]
            reached = [h for h in halves if h is not None]
            half_text = fmt_mean_std(reached, 0) if reached else f"more than {steps - t_b}"
            if reached and len(reached) < len(halves):
                half_text += (
                    f" ({len(halves) - len(reached)} of {len(halves)} seeds: more than {steps - t_b})"
                )
            rows.append(
                [
                    entry["label"],
                    fmt_mean_std(entry["jump"]),
                    fmt_mean_std(entry["left"]),
                    fmt_mean_std(entry["retained"], 2),
                    half_text,
                    fmt_mean_std(entry["control_left"]),
                    fmt_mean_std(entry["final_heldout_loss"]),
                ]
            )
        table = Table(
            [
                "optimizer",
                "B's advantage gained from one exposure (nats)",
                "advantage left at the end",
                "fraction retained",
                "steps to forget half of it",
                "the same on the never-seen controls, at the end",
                "final held-out loss",
            ],
            rows,
            note="Advantage: B's loss in the run without the injection minus its loss in the run with it "
            "(same seed; zero up to the injection, where the two runs are the same run). Gained: its "
            f"largest value within {PEAK_WINDOW:.0%} of the remaining steps after it (momentum keeps "
            f"applying B's gradient for a few steps); left: its mean over the last {END_WINDOW:.0%} of "
            f"the run (to step {steps}, {steps - t_b} steps after the injection); steps to forget half: "
            "from the injection until it first falls to half the gain. Controls: the same paired "
            "difference on batches never trained on, over the same last steps: what one changed batch "
            "does to unseen text (transfer from B, and the two runs drifting apart), the floor to read "
            "'left' against.",
        )
        figures = [self._figure(groups, cfg["optimizers"], metrics, t_b, out)]
        verdict = self._verdict(summary["optimizers"])
        summary["verdict"] = verdict
        findings = [
            "B is trained on once, in place of a regular batch, with the lr of that step; the lr keeps "
            "decaying afterwards (cosine), which slows all forgetting late in the run.",
            "The paired run without B costs a second run per optimizer and seed; it cancels what the old "
            "unpaired comparison (B against other held-out batches in the same run) could not: the drift "
            "of B's difficulty relative to other text as the model learns.",
        ]
        return ReportContent(verdict, [table], figures, findings, summary)

    @staticmethod
    def _verdict(opt: dict[str, Any]) -> str:
        if "adamw" not in opt or "ademamix" not in opt:
            return "Run with AdamW and AdEMAMix to compare their forgetting."
        a, e = opt["adamw"], opt["ademamix"]
        ra, sa = mean_std(a["retained"])
        re_, se = mean_std(e["retained"])
        if not (math.isfinite(ra) and math.isfinite(re_)):
            return "A run diverged or B left no measurable trace; no comparison."
        several = len(a["retained"]) > 1 and len(e["retained"]) > 1
        noise = max(sa, se) if several else 0.0
        la, le = mean_std(a["left"])[0], mean_std(e["left"])[0]
        text = (
            f"At the end AdEMAMix keeps {100 * re_:.0f}% of the advantage that one exposure gave B "
            f"({le:.3f} of {mean_std(e['jump'])[0]:.3f} nats), AdamW {100 * ra:.0f}% ({la:.3f} of "
            f"{mean_std(a['jump'])[0]:.3f})"
        )
        if several and abs(re_ - ra) <= noise:
            text += ": no clear difference at this scale (within the spread over seeds)."
        elif re_ > ra:
            text += ": AdEMAMix forgets more slowly, as the paper reports."
        else:
            text += ": AdEMAMix does not forget more slowly here, unlike the paper's finding."
        if not several:
            text += " One seed only: no estimate of the spread over seeds (use --seeds 3)."
        # the floor: what the changed batch did to text neither run trained on
        floor = max(abs(mean_std(x["control_left"])[0]) for x in (a, e))
        if math.isfinite(floor):
            below = [name for name, left in (("AdEMAMix", le), ("AdamW", la)) if left <= floor]
            text += f" On the never-seen controls the same paired difference ends within {floor:.3f} nats"
            text += (
                f"; what {' and '.join(below)} kept of B is no more than that, so it is not told apart "
                "from the pairing's own noise."
                if below
                else ", below what both kept of B."
            )
        halves = {}
        for key, entry in (("AdEMAMix", e), ("AdamW", a)):
            h = [x for x in entry["half_life"] if x is not None]
            n = len(entry["half_life"])
            halves[key] = f"{mean_std(h)[0]:.0f}" if h else "never within the run"
            if h and len(h) < n:
                halves[key] += f" ({n - len(h)} of {n} seeds never)"
        return text + (
            f" Steps from the injection until half of the gain was gone: {halves['AdEMAMix']} under "
            f"AdEMAMix, {halves['AdamW']} under AdamW (mean over seeds)."
        )

    @staticmethod
    def _figure(
        groups: dict[str, list[dict[str, Any]]],
        keys: list[str],
        metrics: dict[str, list[dict[str, Any]]],
        t_b: int,
        out: Path,
    ) -> Figure:
        plt = pyplot()
        fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
        shown = {g: groups[g] for k in keys for g in (k, f"{k}-{PLAIN}")}
        colors = {g: group_color(r[0]) for g, r in shown.items()}
        labels = {g: r[0]["spec"]["label"] for g, r in shown.items()}
        for key in keys:
            for group, style in ((key, "-"), (f"{key}-{PLAIN}", "--")):
                plot_curves(
                    axes[0],
                    {group: shown[group]},
                    "probe",
                    "loss_B",
                    colors=colors,
                    linestyle=style,
                    labels={group: f"{labels[group]}: loss on B"},
                )
        axes[0].axvline(t_b + 1, color="k", linewidth=0.8, linestyle=":")
        axes[0].set_xlabel("step")
        axes[0].set_ylabel("loss on B, nats/byte")
        axes[0].set_title(f"loss on B with (solid) and without (dashed) training on it at step {t_b}")
        axes[0].legend(fontsize=8)
        later = [
            v
            for recs in shown.values()
            for r in recs
            for s, v in zip(r["probe"]["step"], r["probe"].get("loss_B", []), strict=False)
            if s >= t_b - 1 and math.isfinite(v)
        ]
        if later:
            axes[0].set_ylim(min(later) - 0.05, max(later) + 0.05)
        for key in keys:
            for field, style, suffix in (("curve", "-", "batch B"), ("control_curve", ":", "controls")):
                curves = [m[field] for m in metrics[key] if m[field][0]]
                if not curves:
                    continue
                n = min(len(c[1]) for c in curves)
                xs = curves[0][0][:n]
                per = [c[1][:n] for c in curves]
                mean = [mean_std(col)[0] for col in zip(*per, strict=True)]
                axes[1].plot(
                    xs,
                    mean,
                    color=colors[key],
                    linestyle=style,
                    label=f"{labels[key]}: {suffix}",
                    marker="o" if field == "curve" else None,
                    markersize=2,
                )
                if len(per) > 1 and field == "curve":
                    axes[1].fill_between(
                        xs,
                        [min(c) for c in zip(*per, strict=True)],
                        [max(c) for c in zip(*per, strict=True)],
                        color=colors[key],
                        alpha=0.15,
                    )
        axes[1].axhline(0.0, color="k", linewidth=0.8)
        axes[1].set_xlabel("steps since B was trained on")
        axes[1].set_ylabel("loss without B minus loss with B, nats/byte")
        axes[1].set_title("what is left of one exposure (higher: remembered)")
        axes[1].legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(out / "forgetting.png")
        plt.close(fig)
        return Figure(
            "forgetting.png",
            "Left: loss on batch B in the run that trained on it once (solid) and in the same seed's run "
            "without it (dashed); the dotted line marks the step after the injection. Right: the paired "
            "difference (loss without B minus loss with B) on B and, dotted, on the never-seen controls; "
            "mean over seeds, shading min-max.",
        )
