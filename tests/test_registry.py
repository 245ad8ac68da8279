"""longmem.create_optimizer / list_optimizers / param_groups, and integrations.warmup_kwargs."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import longmem
from longmem.integrations import warmup_kwargs

LONGMEM = {
    "ademamix": longmem.AdEMAMix,
    "simplified_ademamix": longmem.SimplifiedAdEMAMix,
    "adamod": longmem.AdaMod,
    "diffgrad": longmem.DiffGrad,
    "diffmod": longmem.DiffMod,
}
TORCH = {"adamw": torch.optim.AdamW, "adam": torch.optim.Adam, "sgd": torch.optim.SGD}


class Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(10, 4)
        self.proj = nn.Linear(4, 4)
        self.norm = nn.LayerNorm(4)
        self.conv = nn.Conv1d(4, 4, 1, bias=False)
        self.frozen = nn.Linear(4, 4)
        self.frozen.requires_grad_(False)
        self.head = nn.Linear(4, 10, bias=False)
        self.head.weight = self.emb.weight  # tied

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        h = self.norm(self.proj(self.emb(idx)))
        h = self.conv(h.transpose(0, 1).unsqueeze(0)).squeeze(0).transpose(0, 1)
        return self.head(self.frozen(h))


def names(group: dict) -> set[str]:
    return set(group["param_names"])


def test_list_optimizers() -> None:
    assert longmem.list_optimizers() == sorted({*LONGMEM, *TORCH})
    assert {"create_optimizer", "list_optimizers", "param_groups", "get_optimizer_class"} <= set(
        longmem.__all__
    )


@pytest.mark.parametrize(
    ("spelling", "cls"),
    [
        ("AdEMAMix", longmem.AdEMAMix),
        ("ADEMAMIX", longmem.AdEMAMix),
        ("simplified_ademamix", longmem.SimplifiedAdEMAMix),
        ("SimplifiedAdEMAMix", longmem.SimplifiedAdEMAMix),
        ("simplified-ademamix", longmem.SimplifiedAdEMAMix),
        ("AdaMod", longmem.AdaMod),
        ("diff_grad", longmem.DiffGrad),
        ("DiffMod", longmem.DiffMod),
        ("AdamW", torch.optim.AdamW),
        ("adam", torch.optim.Adam),
        ("SGD", torch.optim.SGD),
        (longmem.AdaMod, longmem.AdaMod),
        (torch.optim.RMSprop, torch.optim.RMSprop),
    ],
)
def test_get_optimizer_class(spelling: object, cls: type) -> None:
    assert longmem.get_optimizer_class(spelling) is cls


def test_unknown_name_lists_the_known_ones() -> None:
    with pytest.raises(ValueError, match=r"unknown optimizer 'lion'.*ademamix.*simplified_ademamix"):
        longmem.create_optimizer("lion", nn.Linear(2, 2))
    with pytest.raises(ValueError, match=r"optimizer name or a torch\.optim\.Optimizer subclass"):
        longmem.get_optimizer_class(3)
    with pytest.raises(ValueError, match=r"optimizer name or a torch\.optim\.Optimizer subclass"):
        longmem.get_optimizer_class(nn.Linear)


@pytest.mark.parametrize("name", sorted({*LONGMEM, *TORCH}))
def test_create_optimizer_builds_and_steps(name: str) -> None:
    model = Tiny()
    opt = longmem.create_optimizer(name, model, lr=1e-2, weight_decay=0.1)
    assert type(opt) is {**LONGMEM, **TORCH}[name]
    decay, no_decay = opt.param_groups
    assert (decay["weight_decay"], no_decay["weight_decay"]) == (0.1, 0.0)
    assert decay["lr"] == no_decay["lr"] == 1e-2
    before = [p.detach().clone() for p in model.parameters()]
    model(torch.tensor([1, 2, 3])).square().mean().backward()
    opt.step()
    changed = [not torch.equal(b, p) for b, p in zip(before, model.parameters(), strict=True)]
    trainable = [p.requires_grad for p in model.parameters()]
    assert changed == trainable


def test_default_groups() -> None:
    model = Tiny()
    decay, no_decay = longmem.param_groups(model, 0.1)
    # matrices decay; biases, norm weights and the (tied) embedding do not; frozen parameters are left out
    assert names(decay) == {"proj.weight", "conv.weight"}
    assert names(no_decay) == {"emb.weight", "proj.bias", "norm.weight", "norm.bias"}
    assert decay["params"] == [model.proj.weight, model.conv.weight]
    assert len(no_decay["params"]) == len(no_decay["param_names"]) == 4
    assert (decay["weight_decay"], no_decay["weight_decay"]) == (0.1, 0.0)


def test_decay_embeddings() -> None:
    decay, no_decay = longmem.param_groups(Tiny(), 0.1, decay_embeddings=True)
    assert names(decay) == {"emb.weight", "proj.weight", "conv.weight"}
    assert names(no_decay) == {"proj.bias", "norm.weight", "norm.bias"}


def test_no_decay_patterns_and_predicate() -> None:
    decay, no_decay = longmem.param_groups(Tiny(), 0.1, no_decay=[r"\.bias$"])
    assert names(decay) == {"proj.weight", "conv.weight", "norm.weight"}
    assert names(no_decay) == {"emb.weight", "proj.bias", "norm.bias"}
    decay, no_decay = longmem.param_groups(Tiny(), 0.1, no_decay=lambda name, p: name.startswith("norm."))
    assert names(decay) == {"proj.weight", "proj.bias", "conv.weight"}
    assert names(no_decay) == {"emb.weight", "norm.weight", "norm.bias"}
    with pytest.raises(ValueError, match="not a single string"):
        longmem.param_groups(Tiny(), 0.1, no_decay="bias")


def test_empty_group_dropped_and_nothing_to_train() -> None:
    (only,) = longmem.param_groups(nn.Linear(3, 1, bias=False), 0.1)
    assert only["weight_decay"] == 0.1 and only["param_names"] == ["weight"]
    frozen = nn.Linear(3, 1).requires_grad_(False)
    with pytest.raises(ValueError, match="no parameters that require grad"):
        longmem.create_optimizer("ademamix", frozen)
    with pytest.raises(ValueError, match=r"torch\.nn\.Module"):
        longmem.create_optimizer("ademamix", [nn.Parameter(torch.zeros(2))])


def test_kwargs_and_defaults_reach_the_optimizer() -> None:
    opt = longmem.create_optimizer("ademamix", Tiny(), alpha=5.0, betas=(0.9, 0.99, 0.999), alpha_warmup=100)
    for group in opt.param_groups:
        assert group["lr"] == 1e-3  # AdEMAMix's own default, untouched by lr=None
        assert (group["alpha"], group["betas"], group["alpha_warmup"]) == (5.0, (0.9, 0.99, 0.999), 100)
    assert longmem.create_optimizer("simplified_ademamix", Tiny()).param_groups[0]["lr"] == 1e-4
    with pytest.raises(ValueError, match="alpha"):
        longmem.create_optimizer("ademamix", Tiny(), alpha=-1.0)


def test_state_dict_round_trip_keeps_groups() -> None:
    model = Tiny()
    opt = longmem.create_optimizer("ademamix", model, lr=1e-2, weight_decay=0.1)
    model(torch.tensor([1, 2])).sum().backward()
    opt.step()
    other = longmem.create_optimizer("ademamix", model, lr=1e-2, weight_decay=0.1)
    other.load_state_dict(opt.state_dict())
    other.load_state_dict(opt.state_dict())  # twice, as accelerate's wrapper then Trainer's resume do
    assert [g["param_names"] for g in other.param_groups] == [g["param_names"] for g in opt.param_groups]
    for p in model.parameters():
        if p.requires_grad:
            assert torch.equal(other.state[p]["exp_avg_sq"], opt.state[p]["exp_avg_sq"])


def test_warmup_kwargs() -> None:
    assert warmup_kwargs("ademamix", 1000, alpha=5.0) == {
        "alpha": 5.0,
        "alpha_warmup": 1000,
        "beta3_warmup": 1000,
    }
    assert warmup_kwargs(longmem.AdEMAMix, 1000, alpha_warmup=10) == {
        "alpha_warmup": 10,
        "beta3_warmup": 1000,
    }
    assert warmup_kwargs("ademamix", None, alpha=5.0) == {"alpha": 5.0}
    assert warmup_kwargs("adamod", 1000, beta3=0.99) == {"beta3": 0.99}
    assert warmup_kwargs("sgd", 1000) == {}
    with pytest.raises(ValueError, match="total_steps"):
        warmup_kwargs("ademamix", 0)
    with pytest.raises(ValueError, match="total_steps"):
        warmup_kwargs("ademamix", 2.5)
