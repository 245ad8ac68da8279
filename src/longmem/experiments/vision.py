"""``vision``: a small CNN on Fashion-MNIST (Debian's ``dataset-fashion-mnist``).

The AdEMAMix paper also reports gains in image classification; AdaMod's paper trains CNNs. Here every
optimizer trains the same CNN on the same batches with the same schedule.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ._compare import comparison_table, comparison_verdict, difference_figure, loss_figure
from ._data import ImageDataset, load_fashion_mnist
from ._models import SmallCNN, count_parameters
from ._optim import ademamix_beta3_for
from ._report import ReportContent, group_runs
from ._runner import Experiment, Plan
from ._train import Task, batch_generator

__all__ = ["VISION_SIZES", "VisionExperiment", "VisionTask", "vision_task_from_config"]

#: size -> (CNN channels, batch size, training images used, test images used; 0 = all)
VISION_SIZES: dict[str, tuple[int, int, int, int]] = {
    "tiny": (4, 16, 2000, 256),
    "small": (16, 128, 0, 0),
    "base": (32, 128, 0, 0),
}
WEIGHT_DECAY = 0.1
REFERENCE = "adamw"


class VisionTask(Task):
    """Classification; held-out metrics: test cross-entropy and accuracy (the whole test set)."""

    name = "vision"

    def __init__(self, data: ImageDataset, size: str) -> None:
        self.channels, self.batch_size, n_train, n_test = VISION_SIZES[size]
        self.data = data
        self.train_x = data.train_x[:n_train] if n_train else data.train_x
        self.train_y = data.train_y[:n_train] if n_train else data.train_y
        self.test_x = data.test_x[:n_test] if n_test else data.test_x
        self.test_y = data.test_y[:n_test] if n_test else data.test_y
        self.n_params = count_parameters(SmallCNN(self.channels))

    def build_model(self) -> nn.Module:
        return SmallCNN(self.channels)

    def train_batch(self, step: int, seed: int) -> tuple[Tensor, Tensor]:
        idx = torch.randint(0, len(self.train_y), (self.batch_size,), generator=batch_generator(seed, step))
        return self.train_x[idx], self.train_y[idx]

    def loss(self, model: nn.Module, batch: tuple[Tensor, Tensor]) -> Tensor:
        x, y = batch
        return F.cross_entropy(model(x), y)

    @torch.no_grad()
    def evaluate(self, model: nn.Module, final: bool = False) -> dict[str, float]:
        total, correct = 0.0, 0
        for i in range(0, len(self.test_y), 1000):
            logits = model(self.test_x[i : i + 1000])
            y = self.test_y[i : i + 1000]
            total += float(F.cross_entropy(logits, y, reduction="sum"))
            correct += int((logits.argmax(1) == y).sum())
        n = len(self.test_y)
        return {"loss": total / n, "accuracy": correct / n}

    def describe(self) -> str:
        return (
            f"Model: small CNN (conv {self.channels}, conv {2 * self.channels}, linear), {self.n_params} "
            f"parameters; batch {self.batch_size}; {len(self.train_y)} training and {len(self.test_y)} test "
            "images"
        )


def vision_task_from_config(cfg: dict[str, Any]) -> tuple[VisionTask, list[str]]:
    data = load_fashion_mnist(cfg.get("fashion_mnist"))
    task = VisionTask(data, cfg["size"])
    return task, [
        f"Data: {data.describe()}",
        task.describe(),
        "Held-out metrics: cross-entropy and accuracy on the test images",
    ]


VISION_OPTIONS: dict[str, tuple[Any, str]] = {
    "fashion_mnist": (
        str,
        "folder with the Fashion-MNIST idx files (default: /usr/share/datasets/fashion-mnist, "
        "from the Debian package dataset-fashion-mnist)",
    ),
}


class VisionExperiment(Experiment):
    name = "vision"
    title = "AdamW, AdEMAMix and AdaMod on Fashion-MNIST"
    help = "a small CNN on Fashion-MNIST (needs the Debian package dataset-fashion-mnist)"
    claim = (
        "AdEMAMix's gains are not specific to language models: the paper also reports better image "
        "classification (ViTs on ImageNet). AdaMod's paper reports CNNs trained stably at Adam's settings."
    )
    defaults: ClassVar[dict[str, Any]] = {
        "steps": 1500,
        "seeds": 3,
        "seed": 0,
        "optimizers": ["adamw", "ademamix", "adamod"],
        "lr": 1e-3,
        "warmup": 0.05,
        "size": "small",
        "eval_every": None,
        "fashion_mnist": None,
    }
    options = VISION_OPTIONS
    choices: ClassVar[dict[str, list[str]]] = {"size": list(VISION_SIZES)}
    default_out = "runs/vision"

    def plan(self, cfg: dict[str, Any]) -> Plan:
        task, setup = vision_task_from_config(cfg)
        steps = int(cfg["steps"])
        warmup = self.warmup_steps(cfg)
        opts = {"alpha": 8.0, "beta3": ademamix_beta3_for(steps)}
        runs = self.optimizer_runs(cfg, {"ademamix": {"options": opts}}, weight_decay=WEIGHT_DECAY)
        setup += [
            f"Steps: {steps} per run ({steps * task.batch_size / len(task.train_y):.1f} epochs)",
            f"lr schedule (every optimizer): linear warm-up over {warmup} steps, cosine decay to 10%; weight "
            f"decay {WEIGHT_DECAY} where the optimizer has decoupled decay; no clipping",
        ]
        optimizers = self.optimizer_table(cfg, cfg["optimizers"], opts, WEIGHT_DECAY)
        return Plan({"main": task}, runs, setup, optimizers)

    def summarize(
        self, cfg: dict[str, Any], plan: Plan, records: dict[str, dict[str, Any]], out: Path
    ) -> ReportContent:
        groups = group_runs(records[s.run_id] for s in plan.runs)
        steps = int(cfg["steps"])
        n = len(self.seeds(cfg))
        spread = f"mean ± std over {n} seeds" if n > 1 else "one seed"
        loss_table, per_group = comparison_table(
            groups,
            reference=REFERENCE,
            steps=steps,
            key_label="test loss",
            note=f"Test cross-entropy (nats), {spread}; steps read off the test curve (evaluated every "
            f"{self.eval_every(cfg)} steps, interpolated).",
        )
        acc_table, acc_group = comparison_table(
            groups,
            reference=REFERENCE,
            steps=steps,
            key="accuracy",
            key_label="test accuracy",
            note=f"Test accuracy (fraction of the {len(plan.tasks['main'].test_y)} test images), {spread}.",  # type: ignore[attr-defined]
        )
        figures = [
            loss_figure(groups, out, "loss_curves.png", self.title, unit="nats", zoom=True),
            loss_figure(
                groups,
                out,
                "accuracy_curves.png",
                self.title + " (accuracy)",
                eval_key="accuracy",
                eval_label="test accuracy",
                unit="nats",
            ),
        ]
        diff = difference_figure(
            groups, out, "loss_vs_adamw.png", reference=REFERENCE, eval_label="test loss"
        )
        if diff is not None:
            figures.append(diff)
        verdict = " ".join(
            [
                comparison_verdict(per_group, reference=REFERENCE, steps=steps, key_label="test loss"),
                comparison_verdict(
                    acc_group,
                    reference=REFERENCE,
                    steps=steps,
                    key="accuracy",
                    key_label="test accuracy",
                    note_seeds=False,
                ),
            ]
        )
        summary = {
            "steps": steps,
            "reference": REFERENCE,
            "optimizers": per_group,
            "accuracy": acc_group,
            "verdict": verdict,
        }
        return ReportContent(verdict, [loss_table, acc_table], figures, [], summary)
