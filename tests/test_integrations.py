"""Hugging Face Trainer and PyTorch Lightning with longmem optimizers (skipped without them installed).

Models are built from configs (nothing is downloaded) and train a few steps on CPU.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from torch import nn

import longmem

# ---- Hugging Face Transformers ---------------------------------------------------------------------


def _hf():
    pytest.importorskip("transformers")
    pytest.importorskip("accelerate")  # Trainer needs it
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    import transformers

    return transformers


def _gpt2(transformers):
    torch.manual_seed(0)
    config = transformers.GPT2Config(
        vocab_size=32, n_positions=16, n_embd=16, n_layer=1, n_head=2, bos_token_id=0, eos_token_id=0
    )
    return transformers.GPT2LMHeadModel(config)


def _data(n: int = 24) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    rows = []
    for _ in range(n):
        ids = torch.randint(0, 32, (16,), generator=g)
        rows.append({"input_ids": ids, "labels": ids})
    return rows


def _args(transformers, out: Path, **kw):
    base = dict(
        output_dir=str(out),
        per_device_train_batch_size=4,
        learning_rate=1e-2,
        weight_decay=0.1,
        report_to="none",
        save_strategy="no",
        use_cpu=True,
        disable_tqdm=True,
        logging_steps=1,
        seed=0,
    )
    return transformers.TrainingArguments(**{**base, **kw})


def _inner(optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
    return getattr(optimizer, "optimizer", optimizer)  # accelerate wraps it


def _snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def test_trainer_with_optimizer_cls_and_kwargs(tmp_path: Path) -> None:
    transformers = _hf()
    from longmem.integrations.huggingface import optimizer_cls_and_kwargs

    model = _gpt2(transformers)
    before = _snapshot(model)
    args = _args(transformers, tmp_path, max_steps=4)
    trainer = transformers.Trainer(
        model=model,
        args=args,
        train_dataset=_data(),
        optimizer_cls_and_kwargs=optimizer_cls_and_kwargs("ademamix", args, alpha=5.0),
    )
    out = trainer.train()
    opt = _inner(trainer.optimizer)
    assert type(opt) is longmem.AdEMAMix
    decay, no_decay = opt.param_groups
    assert (decay["weight_decay"], no_decay["weight_decay"]) == (0.1, 0.0)
    for group in opt.param_groups:
        assert (group["alpha"], group["alpha_warmup"], group["beta3_warmup"]) == (5.0, 4, 4)
    assert {float(s["step"]) for s in opt.state.values()} == {4.0}
    assert out.global_step == 4 and torch.isfinite(torch.tensor(out.training_loss))
    after = _snapshot(model)
    assert all(not torch.equal(before[n], after[n]) for n in before)


def test_trainer_epochs_warmups_from_callback(tmp_path: Path) -> None:
    transformers = _hf()
    from longmem.integrations.huggingface import AdEMAMixWarmupCallback, optimizer_cls_and_kwargs

    args = _args(transformers, tmp_path, num_train_epochs=2, per_device_train_batch_size=8)
    cls, kwargs = optimizer_cls_and_kwargs("ademamix", args, alpha=5.0)
    assert "alpha_warmup" not in kwargs  # the run is set in epochs: the total is known only to the Trainer
    trainer = transformers.Trainer(
        model=_gpt2(transformers),
        args=args,
        train_dataset=_data(24),
        optimizer_cls_and_kwargs=(cls, kwargs),
        callbacks=[AdEMAMixWarmupCallback()],
    )
    trainer.train()
    assert trainer.state.max_steps == 6  # 2 epochs of 24 / 8
    for group in _inner(trainer.optimizer).param_groups:
        assert (group["alpha_warmup"], group["beta3_warmup"]) == (6, 6)


def test_trainer_with_ready_optimizer_and_scheduler(tmp_path: Path) -> None:
    transformers = _hf()
    from longmem.integrations.huggingface import create_optimizer_and_scheduler

    model = _gpt2(transformers)
    args = _args(transformers, tmp_path, max_steps=4, lr_scheduler_type="cosine", warmup_steps=1)
    opt, sched = create_optimizer_and_scheduler(model, args, name_or_class="ademamix", alpha=5.0)
    decay, no_decay = opt.param_groups
    assert "transformer.wte.weight" in no_decay["param_names"]  # embeddings (tied to lm_head): no decay
    assert all(p.ndim >= 2 for p in decay["params"]) and decay["weight_decay"] == 0.1
    assert (decay["alpha_warmup"], decay["beta3_warmup"], decay["lr"]) == (
        4,
        4,
        0.0,
    )  # lr warm-up starts at 0
    trainer = transformers.Trainer(model=model, args=args, train_dataset=_data(), optimizers=(opt, sched))
    trainer.train()
    assert _inner(trainer.optimizer) is opt and sched.last_epoch == 4
    assert {float(s["step"]) for s in opt.state.values()} == {4.0}
    with pytest.raises(ValueError, match="num_training_steps"):
        create_optimizer_and_scheduler(model, _args(transformers, tmp_path))


def test_trainer_resume_from_checkpoint_is_exact(tmp_path: Path) -> None:
    """Trainer saves the optimizer with torch.save(optimizer.state_dict()) and loads it back."""
    transformers = _hf()
    from longmem.integrations.huggingface import optimizer_cls_and_kwargs

    def run(resume: str | None) -> transformers.Trainer:
        args = _args(transformers, tmp_path / "out", max_steps=4, save_strategy="steps", save_steps=2)
        trainer = transformers.Trainer(
            model=_gpt2(transformers),
            args=args,
            train_dataset=_data(),
            optimizer_cls_and_kwargs=optimizer_cls_and_kwargs("ademamix", args, alpha=5.0),
        )
        trainer.train(resume_from_checkpoint=resume)
        return trainer

    straight = run(None)
    resumed = run(str(tmp_path / "out" / "checkpoint-2"))
    want, got = _snapshot(straight.model), _snapshot(resumed.model)
    assert all(torch.equal(want[n], got[n]) for n in want)
    opt_a, opt_b = _inner(straight.optimizer), _inner(resumed.optimizer)
    for pa, pb in zip(straight.model.parameters(), resumed.model.parameters(), strict=True):
        for key in ("exp_avg_fast", "exp_avg_slow", "exp_avg_sq", "step"):
            assert torch.equal(opt_a.state[pa][key], opt_b.state[pb][key])


# ---- PyTorch Lightning -------------------------------------------------------------------------------


def _lightning():
    try:
        import lightning.pytorch as pl
    except ImportError:
        pl = pytest.importorskip("pytorch_lightning")
    return pl


def _loader() -> torch.utils.data.DataLoader:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(48, 4, generator=g, dtype=torch.float64)
    y = x.sum(1, keepdim=True).sin()
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=16)


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.LayerNorm(8), nn.Tanh(), nn.Linear(8, 1)).double()


@pytest.mark.filterwarnings("ignore:.*LeafSpec")  # inside lightning, not ours
def test_lightning_configure_optimizers() -> None:
    pl = _lightning()
    from longmem.integrations import lightning as lml

    class Model(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = _net()

        def training_step(self, batch, batch_idx):
            x, y = batch
            return nn.functional.mse_loss(self.net(x), y)

        def configure_optimizers(self):
            return lml.configure_optimizers(self, "ademamix", lr=1e-2, weight_decay=0.1, alpha=5.0)

    model = Model()
    trainer = pl.Trainer(
        max_epochs=2,
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(model, _loader())
    opt = trainer.optimizers[0]
    assert type(opt) is longmem.AdEMAMix and trainer.global_step == 6
    for group in opt.param_groups:
        assert (group["alpha_warmup"], group["beta3_warmup"]) == (6, 6)

    # the same run by hand: Lightning adds nothing to the optimizer's arithmetic
    net = _net()
    ref = longmem.create_optimizer(
        "ademamix", net, lr=1e-2, weight_decay=0.1, alpha=5.0, alpha_warmup=6, beta3_warmup=6
    )
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(ref, T_max=6)
    for _ in range(2):
        for x, y in _loader():
            ref.zero_grad()
            nn.functional.mse_loss(net(x), y).backward()
            ref.step()
            sched.step()
    for p, q in zip(model.net.parameters(), net.parameters(), strict=True):
        torch.testing.assert_close(p.detach(), q.detach(), rtol=1e-12, atol=1e-14)

    with pytest.raises(ValueError, match="not attached"):
        lml.total_steps(nn.Linear(2, 2))
