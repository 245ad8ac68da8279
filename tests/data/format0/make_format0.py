"""Writes tests/data/format0/*.pt with the longmem of commit c451e98 (before state dicts had a format).

Run with that version on the path: ``git archive c451e98 src | tar -x -C /tmp/old``, then
``PYTHONPATH=/tmp/old/src python3 tests/data/format0/make_format0.py tests/data/format0``.
tests/test_robustness.py builds the same parameters and gradients (``params``, ``grads``).
"""

import sys

import torch

import longmem

CONFIGS = {
    "AdEMAMix": dict(lr=1e-2, alpha=5.0, alpha_warmup=10, beta3_warmup=10, weight_decay=0.1),
    "SimplifiedAdEMAMix": dict(lr=1e-3, alpha=2.0, beta1_warmup=10, bias_correction1=True),
    "AdaMod": dict(lr=1e-2, beta3=0.99, weight_decay=0.01),
    "DiffGrad": dict(lr=1e-2, weight_decay=0.01),
    "DiffMod": dict(lr=1e-2, len_memory=10, weight_decay=0.01),
}
SHAPES = ((3, 2), (4,))


def params():
    gen = torch.Generator().manual_seed(0)
    return [torch.nn.Parameter(torch.randn(s, generator=gen, dtype=torch.float64)) for s in SHAPES]


def grads(t):
    gen = torch.Generator().manual_seed(100 + t)
    return [torch.randn(s, generator=gen, dtype=torch.float64) for s in SHAPES]


def make(name, ps):
    hp = CONFIGS[name]
    groups = [{"params": [ps[0]]}, {"params": [ps[1]], "lr": hp["lr"] / 2}]
    return getattr(longmem, name)(groups, foreach=False, **hp)


if __name__ == "__main__":
    for name in CONFIGS:
        ps = params()
        opt = make(name, ps)
        for t in range(3):
            for p, g in zip(ps, grads(t), strict=True):
                p.grad = g
            opt.step()
        out = {"optimizer": opt.state_dict(), "params": [p.detach() for p in ps]}
        torch.save(out, f"{sys.argv[1]}/{name}.pt")
        print(name, sorted(opt.state_dict()))
