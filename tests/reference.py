"""Independent float64 re-statement of SPEC.md (written from SPEC.md only).

Every optimizer is a pair of plain functions: ``*_init(p)`` returns a fresh state dict and
``*_step(p, g, state, **hyperparameters)`` returns the new parameter and updates ``state`` in place.
``p`` and ``g`` are float64 tensors (or anything convertible); nothing here imports ``longmem``.
State keys use the names of docs/API.md so that they can be compared to the library's state.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch

DTYPE = torch.float64


def _t(x) -> torch.Tensor:
    return torch.as_tensor(x, dtype=DTYPE).clone()


def _decay(weight_decay: float, p: torch.Tensor):
    """``weight_decay * p``; exactly 0 when weight_decay is 0 (no decay term, even where p is +-inf)."""
    return weight_decay * p if weight_decay != 0.0 else 0.0


# --------------------------------------------------------------------------- schedules


def alpha_schedule(t: int, alpha: float, warmup: int | None) -> float:
    """alpha_t = alpha * min(t / T_alpha, 1); warmup None -> alpha."""
    if warmup is None:
        return float(alpha)
    return float(alpha) * min(t / warmup, 1.0)


def _inv_log(b: float) -> float:
    """1 / ln(b), with the limit 1/ln(0) = 0."""
    if b == 0.0:
        return 0.0
    return 1.0 / math.log(b)


def beta_halflife_schedule(
    t: int, beta_start: float, beta_end: float, warmup: int | None, log_eps: float = 0.0
) -> float:
    """exp(1 / ((1 - s)/ln(beta_start) + s/ln(beta_end))), s = min(t / T, 1); exactly beta_end once s >= 1.

    ``log_eps`` evaluates ln(beta + log_eps): the Simplified AdEMAMix authors' form (1e-8), which SPEC's
    Simplified AdEMAMix vector follows (SPEC: where the authors' code and the paper differ, the code wins).
    """
    if warmup is None:
        return float(beta_end)
    s = min(t / warmup, 1.0)
    if s >= 1.0:
        return float(beta_end)
    denom = (1.0 - s) * _inv_log(beta_start + log_eps) + s * _inv_log(beta_end + log_eps)
    if denom == 0.0:  # both betas are 0: ln(beta_t) -> -inf
        return 0.0
    return math.exp(1.0 / denom)


# --------------------------------------------------------------------------- AdEMAMix


def ademamix_init(p) -> dict:
    p = _t(p)
    return {
        "step": 0,
        "exp_avg_fast": torch.zeros_like(p),
        "exp_avg_slow": torch.zeros_like(p),
        "exp_avg_sq": torch.zeros_like(p),
    }


def ademamix_step(
    p,
    g,
    state: dict,
    *,
    lr=1e-3,
    betas=(0.9, 0.999, 0.9999),
    alpha=2.0,
    beta3_warmup=None,
    alpha_warmup=None,
    eps=1e-8,
    weight_decay=0.0,
    maximize=False,
) -> torch.Tensor:
    p, g = _t(p), _t(g)
    if maximize:
        g = -g
    b1, b2, b3 = (float(b) for b in betas)
    t = state["step"] + 1
    state["step"] = t
    alpha_t = alpha_schedule(t, alpha, alpha_warmup)
    beta3_t = beta_halflife_schedule(t, b1, b3, beta3_warmup)
    if b1 == 0.0:
        m1 = g
    else:
        m1 = b1 * state["exp_avg_fast"] + (1.0 - b1) * g
        state["exp_avg_fast"] = m1
    m2 = beta3_t * state["exp_avg_slow"] + (1.0 - beta3_t) * g
    nu = b2 * state["exp_avg_sq"] + (1.0 - b2) * g * g
    state["exp_avg_slow"] = m2
    state["exp_avg_sq"] = nu
    bc1 = 1.0 - b1**t
    bc2 = 1.0 - b2**t
    update = (m1 / bc1 + alpha_t * m2) / (torch.sqrt(nu / bc2) + eps)
    return p - lr * (update + _decay(weight_decay, p))


# --------------------------------------------------------------------------- Simplified AdEMAMix

SIMPLIFIED_LOG_EPS = 1e-8  # the authors' ln(beta + 1e-8); SPEC's t=5 vector is computed with it


def simplified_ademamix_init(p) -> dict:
    p = _t(p)
    return {
        "step": 0,
        "exp_avg": torch.zeros_like(p),
        "exp_avg_sq": torch.zeros_like(p),
        "num_sum": 0.0,
    }


def simplified_ademamix_step(
    p,
    g,
    state: dict,
    *,
    lr=1e-4,
    betas=(0.99, 0.95),
    alpha=0.0,
    beta1_warmup=None,
    min_beta1=0.9,
    eps=1e-8,
    weight_decay=0.0,
    bias_correction1=False,
    bias_correction2=True,
    maximize=False,
) -> torch.Tensor:
    p, g = _t(p), _t(g)
    if maximize:
        g = -g
    b1, b2 = (float(b) for b in betas)
    t = state["step"] + 1
    state["step"] = t
    beta1_t = beta_halflife_schedule(t, min_beta1, b1, beta1_warmup, log_eps=SIMPLIFIED_LOG_EPS)
    m = beta1_t * state["exp_avg"] + g  # a sum, not an EMA
    nu = b2 * state["exp_avg_sq"] + (1.0 - b2) * g * g
    w = beta1_t * state["num_sum"] + 1.0  # W_t = sum_k prod beta1
    state["exp_avg"] = m
    state["exp_avg_sq"] = nu
    state["num_sum"] = w
    if bias_correction2:
        denom = torch.sqrt(nu / (1.0 - b2**t)) + eps
    else:  # SPEC: eps stays scaled by sqrt(1 - beta2^t); only the factor on the update is dropped
        denom = torch.sqrt(nu) + eps * math.sqrt(1.0 - b2**t)
    update = (alpha * g + m) / denom
    if bias_correction1:
        update = update / w
    return p - lr * (update + _decay(weight_decay, p))


# --------------------------------------------------------------------------- AdaMod


def adamod_init(p) -> dict:
    p = _t(p)
    return {
        "step": 0,
        "exp_avg": torch.zeros_like(p),
        "exp_avg_sq": torch.zeros_like(p),
        "exp_avg_lr": torch.zeros_like(p),
    }


def _adamod_core(g, state, lr, betas, beta3, eps):
    b1, b2 = (float(b) for b in betas)
    t = state["step"] + 1
    state["step"] = t
    m = b1 * state["exp_avg"] + (1.0 - b1) * g
    v = b2 * state["exp_avg_sq"] + (1.0 - b2) * g * g
    eta = lr * math.sqrt(1.0 - b2**t) / (1.0 - b1**t) / (torch.sqrt(v) + eps)
    s = beta3 * state["exp_avg_lr"] + (1.0 - beta3) * eta
    state["exp_avg"] = m
    state["exp_avg_sq"] = v
    state["exp_avg_lr"] = s
    return torch.minimum(eta, s), m


def adamod_step(
    p, g, state: dict, *, lr=1e-3, betas=(0.9, 0.999), beta3=0.999, eps=1e-8, weight_decay=0.0, maximize=False
) -> torch.Tensor:
    p, g = _t(p), _t(g)
    if maximize:
        g = -g
    bound, m = _adamod_core(g, state, lr, betas, float(beta3), eps)
    return p * (1.0 - lr * weight_decay) - bound * m


# --------------------------------------------------------------------------- diffGrad


def diffgrad_init(p) -> dict:
    p = _t(p)
    return {
        "step": 0,
        "exp_avg": torch.zeros_like(p),
        "exp_avg_sq": torch.zeros_like(p),
        "previous_grad": torch.zeros_like(p),
    }


def diffgrad_step(
    p, g, state: dict, *, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, maximize=False
) -> torch.Tensor:
    p, g = _t(p), _t(g)
    if maximize:
        g = -g
    g = g + _decay(weight_decay, p)  # L2: decay is added to the gradient
    b1, b2 = (float(b) for b in betas)
    t = state["step"] + 1
    state["step"] = t
    m = b1 * state["exp_avg"] + (1.0 - b1) * g
    v = b2 * state["exp_avg_sq"] + (1.0 - b2) * g * g
    xi = torch.sigmoid(torch.abs(state["previous_grad"] - g))
    state["exp_avg"] = m
    state["exp_avg_sq"] = v
    state["previous_grad"] = g.clone()
    step_size = lr * math.sqrt(1.0 - b2**t) / (1.0 - b1**t)
    return p - step_size * xi * m / (torch.sqrt(v) + eps)


# --------------------------------------------------------------------------- DiffMod


def diffmod_init(p) -> dict:
    state = adamod_init(p)
    state["previous_grad"] = torch.zeros_like(_t(p))
    return state


def resolve_diffmod_beta3(len_memory=None, beta3=None) -> float:
    if beta3 is not None:
        return float(beta3)
    if len_memory is None:
        len_memory = 1000
    return 1.0 - 1.0 / len_memory


def diffmod_step(
    p,
    g,
    state: dict,
    *,
    lr=1e-3,
    betas=(0.9, 0.999),
    len_memory=None,
    beta3=None,
    eps=1e-8,
    weight_decay=0.0,
    maximize=False,
) -> torch.Tensor:
    p, g = _t(p), _t(g)
    if maximize:
        g = -g
    b3 = resolve_diffmod_beta3(len_memory, beta3)
    bound, m = _adamod_core(g, state, lr, betas, b3, eps)
    xi = torch.sigmoid(torch.abs(state["previous_grad"] - g))
    state["previous_grad"] = g.clone()
    return p * (1.0 - lr * weight_decay) - bound * xi * m


# --------------------------------------------------------------------------- registry / driver

REFERENCE: dict[str, tuple[Callable, Callable]] = {
    "AdEMAMix": (ademamix_init, ademamix_step),
    "SimplifiedAdEMAMix": (simplified_ademamix_init, simplified_ademamix_step),
    "AdaMod": (adamod_init, adamod_step),
    "DiffGrad": (diffgrad_init, diffgrad_step),
    "DiffMod": (diffmod_init, diffmod_step),
}


def run_reference(
    name: str,
    p0,
    grad_fn: Callable[[int, torch.Tensor], torch.Tensor],
    steps: int,
    lrs: Sequence[float] | None = None,
    **hyper,
) -> tuple[list[torch.Tensor], dict]:
    """Run ``steps`` steps of optimizer ``name``; ``grad_fn(t, p)`` gives the gradient at 1-based step t.

    Returns the list of parameters after every step (length ``steps``) and the final state.
    ``lrs`` (optional) overrides ``hyper['lr']`` per step.
    """
    init, step = REFERENCE[name]
    p = _t(p0)
    state = init(p)
    history = []
    for t in range(1, steps + 1):
        hp = dict(hyper)
        if lrs is not None:
            hp["lr"] = float(lrs[t - 1])
        p = step(p, grad_fn(t, p), state, **hp)
        history.append(p)
    return history, state
