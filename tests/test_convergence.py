"""Every optimizer trains a small MLP on sklearn's digits (8x8 images, 10 classes) to a stated held-out
accuracy. Fixed seeds; features standardized on the training split; 80/20 stratified split; 300 steps,
full-batch or mini-batch (128); CPU, well under a second per run.

Thresholds were set below what every one of seeds 0-4 reached (so they are not tuned to one lucky seed)
while staying far above chance (0.1) and above what an untrained or barely-trained model gets.
"""

from __future__ import annotations

import functools

import pytest
import torch

import longmem

STEPS = 300


@functools.cache
def _digits():
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split
    from sklearn.preprocessing import StandardScaler

    x, y = load_digits(return_X_y=True)
    x_tr, x_te, y_tr, y_te = train_test_split(x, y, test_size=0.2, random_state=0, stratify=y)
    scaler = StandardScaler().fit(x_tr)
    x_tr, x_te = scaler.transform(x_tr), scaler.transform(x_te)
    return (
        torch.tensor(x_tr, dtype=torch.float32),
        torch.tensor(y_tr),
        torch.tensor(x_te, dtype=torch.float32),
        torch.tensor(y_te),
    )


def _mlp(seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.ReLU(), torch.nn.Linear(64, 10))


def _accuracy(model, x, y):
    with torch.no_grad():
        return (model(x).argmax(1) == y).float().mean().item()


def _train(make_opt, batch, steps=STEPS, seed=0):
    x_tr, y_tr, x_te, y_te = _digits()
    model = _mlp(seed)
    opt = make_opt(model.parameters())
    gen = torch.Generator().manual_seed(seed)
    losses = []
    for _ in range(steps):
        if batch:
            idx = torch.randint(0, len(x_tr), (batch,), generator=gen)
            xb, yb = x_tr[idx], y_tr[idx]
        else:
            xb, yb = x_tr, y_tr
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(model(xb), yb)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return _accuracy(model, x_te, y_te), losses


# (optimizer, hyperparameters, min accuracy full-batch, min accuracy mini-batch 128)
CONFIGS = [
    ("AdEMAMix", dict(lr=1e-3, alpha=5.0, alpha_warmup=STEPS, beta3_warmup=STEPS), 0.93, 0.93),
    ("AdEMAMix", dict(lr=1e-3, alpha=2.0), 0.95, 0.94),
    (
        "AdEMAMix",
        dict(lr=1e-3, alpha=5.0, betas=(0.0, 0.999, 0.9999), alpha_warmup=STEPS, beta3_warmup=STEPS),
        0.93,
        0.92,
    ),
    (
        "SimplifiedAdEMAMix",
        dict(lr=1e-4, betas=(0.99, 0.95), alpha=2.0, beta1_warmup=STEPS, min_beta1=0.9),
        0.93,
        0.94,
    ),
    ("AdaMod", dict(lr=3e-3), 0.94, 0.92),
    ("AdaMod", dict(lr=3e-3, beta3=0.99), 0.96, 0.96),
    ("DiffGrad", dict(lr=3e-3), 0.96, 0.96),
    ("DiffMod", dict(lr=3e-3, len_memory=100), 0.96, 0.95),
]


def test_untrained_model_is_near_chance():
    """Control for the thresholds below."""
    _, _, x_te, y_te = _digits()
    assert _accuracy(_mlp(), x_te, y_te) < 0.3


@pytest.mark.parametrize("batch", [0, 128], ids=["full-batch", "mini-batch"])
@pytest.mark.parametrize(
    ("name", "hp", "full_min", "mini_min"),
    CONFIGS,
    ids=[f"{n}-{i}" for i, (n, *_) in enumerate(CONFIGS)],
)
def test_trains_digits_mlp(name, hp, full_min, mini_min, batch):
    acc, losses = _train(lambda params: getattr(longmem, name)(params, **hp), batch)
    threshold = mini_min if batch else full_min
    assert acc >= threshold, f"{name} {hp}: held-out accuracy {acc:.4f} < {threshold}"
    first = sum(losses[:10]) / 10
    last = sum(losses[-10:]) / 10
    assert last < 0.1 * first, (first, last)
