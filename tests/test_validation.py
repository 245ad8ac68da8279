"""Bad hyperparameters raise ValueError naming the parameter, in the constructor and in add_param_group;
AdEMAMix warns once about the setting the paper reports diverging early."""

from __future__ import annotations

import inspect
import math
import warnings

import pytest
import torch

import longmem

NAN = math.nan
NAMES = ["AdEMAMix", "SimplifiedAdEMAMix", "AdaMod", "DiffGrad", "DiffMod"]

COMMON = [
    ("lr", -1e-3),
    ("lr", NAN),
    ("lr", -math.inf),
    ("eps", -1e-8),
    ("eps", NAN),
    ("weight_decay", -0.1),
    ("weight_decay", NAN),
]


def _two_betas_bad():
    return [
        ("betas", b)
        for b in [
            (1.0, 0.999),
            (-0.1, 0.999),
            (0.9, 1.0),
            (0.9, 1.5),
            (0.9, -1e-3),
            (NAN, 0.999),
            (0.9, NAN),
            (0.9,),
            (0.9, 0.99, 0.999),
            (),
        ]
    ]


WARMUP_BAD = [0, -1, -10, 2.5, True, False, NAN]

CASES = {
    "AdEMAMix": [
        *COMMON,
        *[
            ("betas", b)
            for b in [
                (1.0, 0.999, 0.9999),
                (-0.1, 0.999, 0.9999),
                (0.9, 1.0, 0.9999),
                (0.9, NAN, 0.9999),
                (0.9, 0.999),
                (0.9, 0.999, 0.9999, 0.9),
                (0.9,),
            ]
        ],
        # the third beta may be reported as "betas" or "beta3"
        *[("betas|beta3", b) for b in [(0.9, 0.999, 1.0), (0.9, 0.999, -0.5), (0.9, 0.999, NAN)]],
        ("alpha", -1.0),
        ("alpha", NAN),
        *[("beta3_warmup", w) for w in WARMUP_BAD],
        *[("alpha_warmup", w) for w in WARMUP_BAD],
    ],
    "SimplifiedAdEMAMix": [
        *COMMON,
        *_two_betas_bad(),
        ("alpha", -0.5),
        ("alpha", NAN),
        *[("beta1_warmup", w) for w in WARMUP_BAD],
        ("min_beta1", -0.1),
        ("min_beta1", 1.0),
        ("min_beta1", NAN),
    ],
    "AdaMod": [
        *COMMON,
        *_two_betas_bad(),
        ("beta3", -0.1),
        ("beta3", 1.0),
        ("beta3", 1.5),
        ("beta3", NAN),
    ],
    "DiffGrad": [*COMMON, *_two_betas_bad()],
    "DiffMod": [
        *COMMON,
        *_two_betas_bad(),
        ("len_memory", 0),
        ("len_memory", -3),
        ("len_memory", 0.5),
        ("len_memory", NAN),
        ("beta3", -0.1),
        ("beta3", 1.0),
        ("beta3", NAN),
    ],
}

FLAT = [(name, key, value) for name, cases in CASES.items() for key, value in cases]
FLAT_IDS = [f"{name}-{key}={value!r}" for name, key, value in FLAT]


def _param():
    return torch.nn.Parameter(torch.zeros(3))


@pytest.mark.parametrize(("name", "key", "value"), FLAT, ids=FLAT_IDS)
def test_constructor_rejects(name, key, value):
    kwarg = key.split("|")[0]
    with pytest.raises(ValueError, match=key):
        getattr(longmem, name)([_param()], **{kwarg: value})


@pytest.mark.parametrize(("name", "key", "value"), FLAT, ids=FLAT_IDS)
def test_add_param_group_rejects(name, key, value):
    p, q = _param(), _param()
    opt = getattr(longmem, name)([p], lr=1e-3)
    before = [{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups]
    with pytest.raises(ValueError, match=key):
        opt.add_param_group({"params": [q], key.split("|")[0]: value})
    assert len(opt.param_groups) == 1
    assert opt.param_groups[0]["params"] == [p]
    assert [{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups] == before
    # q was not registered anywhere: it can still be added with good values
    opt.add_param_group({"params": [q]})
    assert len(opt.param_groups) == 2


def test_diffmod_len_memory_and_beta3_agree_or_raise():
    """Both only when they say the same (beta3 = 1 - 1 / len_memory, as the optimizer derives it)."""
    with pytest.raises(ValueError, match="len_memory") as info:
        longmem.DiffMod([_param()], len_memory=10, beta3=0.5)
    assert "beta3" in str(info.value) and "1 - 1 / len_memory = 0.9" in str(info.value)
    opt = longmem.DiffMod([_param()], len_memory=10)
    with pytest.raises(ValueError, match=r"len_memory|beta3"):
        opt.add_param_group({"params": [_param()], "len_memory": 5, "beta3": 0.5})
    assert len(opt.param_groups) == 1
    opt.add_param_group({"params": [_param()], "len_memory": 5, "beta3": 0.8})
    assert (opt.param_groups[1]["len_memory"], opt.param_groups[1]["beta3"]) == (5, 0.8)


REBUILD_OPTIONS = {
    "AdEMAMix": [{}, {"alpha_warmup": 100, "beta3_warmup": 200, "weight_decay": 0.1}],
    "SimplifiedAdEMAMix": [{}, {"beta1_warmup": 50, "bias_correction1": True}],
    "AdaMod": [{}, {"beta3": 0.9}],
    "DiffGrad": [{}, {"weight_decay": 0.01}],
    "DiffMod": [{}, {"len_memory": 10}, {"beta3": 0.5}],
}


@pytest.mark.parametrize("name", NAMES)
def test_rebuilds_from_its_own_defaults_and_groups(name):
    """``cls(params, **opt.defaults)`` (ZeRO-style wrappers, sweeps) and ``cls(opt.param_groups)``
    build the same optimizer."""
    cls = getattr(longmem, name)
    for options in REBUILD_OPTIONS[name]:
        opt = cls([_param()], **options)
        again = cls([_param()], **opt.defaults)
        assert again.defaults == opt.defaults
        groups = cls([{**group, "params": [_param()]} for group in opt.param_groups])
        assert [{k: v for k, v in g.items() if k != "params"} for g in groups.param_groups] == [
            {k: v for k, v in g.items() if k != "params"} for g in opt.param_groups
        ]


@pytest.mark.parametrize("name", NAMES)
def test_tensor_lr_with_more_than_one_element_in_torch_words(name):
    lr = torch.tensor([1e-3, 1e-3])
    with pytest.raises(ValueError, match="Tensor lr must be 1-element") as ours:
        getattr(longmem, name)([_param()], lr=lr)
    with pytest.raises(ValueError, match="Tensor lr must be 1-element"):
        torch.optim.AdamW([_param()], lr=lr)
    assert "(2,)" in str(ours.value)  # and it says what it got


def test_adamw_style_betas_say_what_to_pass():
    with pytest.raises(ValueError, match=r"betas must be a tuple of 3 numbers") as info:
        longmem.AdEMAMix([_param()], betas=(0.9, 0.99))
    assert "betas=(0.9, 0.99, 0.9999)" in str(info.value) and "beta3" in str(info.value)
    with pytest.raises(ValueError) as other:  # a wrong count that is not AdamW's: no such hint
        longmem.AdEMAMix([_param()], betas=(0.9,))
    assert "AdamW" not in str(other.value)


@pytest.mark.parametrize(
    ("name", "key"),
    [("AdEMAMix", "alpha_warmup"), ("AdEMAMix", "beta3_warmup"), ("SimplifiedAdEMAMix", "beta1_warmup")],
)
def test_integral_float_warmups_are_the_integer(name, key):
    """``1000.0``, as scripts compute a warm-up from a fraction of the run, steps exactly as ``1000``."""
    cls = getattr(longmem, name)
    params = []
    for warmup in (7, 7.0):
        p = _param()
        opt = cls([p], lr=1e-3, **{key: warmup})
        for t in range(10):
            p.grad = torch.full((3,), 0.1 * (t + 1))
            opt.step()
        params.append(p.detach())
    assert torch.equal(params[0], params[1])
    for bad in (7.5, math.inf, -7.0, 0.0):
        with pytest.raises(ValueError, match=f"{key} must be None or a whole number >= 1"):
            cls([_param()], **{key: bad})


GOOD = {
    "AdEMAMix": dict(
        lr=0.0, eps=0.0, weight_decay=0.0, alpha=0.0, betas=(0.0, 0.0, 0.0), beta3_warmup=1, alpha_warmup=1
    ),
    "SimplifiedAdEMAMix": dict(
        lr=0.0,
        eps=0.0,
        alpha=0.0,
        betas=(0.0, 0.0),
        beta1_warmup=1,
        min_beta1=0.0,
        bias_correction1=True,
        bias_correction2=False,
    ),
    "AdaMod": dict(lr=0.0, eps=0.0, betas=(0.0, 0.0), beta3=0.0),
    "DiffGrad": dict(lr=0.0, eps=0.0, betas=(0.0, 0.0)),
    "DiffMod": dict(lr=0.0, eps=0.0, betas=(0.0, 0.0), len_memory=1),
}


@pytest.mark.parametrize("name", NAMES)
def test_boundary_values_are_accepted(name):
    """Control: the edges of the allowed ranges are fine (and a step with them runs)."""
    p = _param()
    opt = getattr(longmem, name)([p], **GOOD[name])
    p.grad = torch.ones(3)
    opt.step()
    assert torch.isfinite(p).all()


@pytest.mark.parametrize(
    "cls", [longmem.AdEMAMix, longmem.SimplifiedAdEMAMix, longmem.AdaMod, longmem.DiffGrad, longmem.DiffMod]
)
def test_docstring_documents_every_argument(cls) -> None:
    doc = cls.__doc__ or ""
    assert "{common_args}" not in doc
    for name in inspect.signature(cls).parameters:
        assert f"        {name}: " in doc, f"{cls.__name__} does not document {name!r}"


# ---- AdEMAMix without warm-ups -------------------------------------------------------------------------
def _warnings_of_steps(opt: torch.optim.Optimizer, params: list[torch.Tensor], steps: int) -> list[list]:
    """The AdEMAMixWarmupWarnings each of ``steps`` steps gives, with every warning shown ("always")."""
    given = []
    for _ in range(steps):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            for p in params:
                p.grad = torch.ones_like(p)
            opt.step()
        given.append([w for w in caught if issubclass(w.category, longmem.AdEMAMixWarmupWarning)])
    return given


def test_ademamix_without_warmups_warns_once_at_the_first_step() -> None:
    p = _param()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing at construction
        opt = longmem.AdEMAMix([p], alpha=8.0, betas=(0.9, 0.999, 0.9999))
    given = _warnings_of_steps(opt, [p], 3)
    assert [len(g) for g in given] == [1, 0, 0]
    text = str(given[0][0].message)
    assert "alpha_warmup" in text and "beta3_warmup" in text and "AdEMAMixWarmupCallback" in text
    assert "param group 0: alpha 8, beta3 0.9999" in text
    assert given[0][0].filename == __file__  # points at the caller's opt.step()
    assert longmem.AdEMAMixWarmupWarning is longmem.ademamix.AdEMAMixWarmupWarning
    assert issubclass(longmem.AdEMAMixWarmupWarning, UserWarning)


def test_ademamix_warning_names_the_group_and_points_past_an_lr_scheduler() -> None:
    p, q = _param(), _param()
    opt = longmem.AdEMAMix([{"params": [p]}, {"params": [q], "alpha": 4.0, "betas": (0.9, 0.999, 0.99999)}])
    scheduler = torch.optim.lr_scheduler.StepLR(opt, step_size=10)  # wraps opt.step once more
    (first,) = _warnings_of_steps(opt, [p, q], 1)[0]
    scheduler.step()
    assert "param group 1: alpha 4, beta3 0.99999" in str(first.message)
    assert "param group 0" not in str(first.message)
    assert first.filename == __file__


@pytest.mark.parametrize(
    "kwargs",
    [
        {},  # the authors' defaults: alpha 2, beta3 0.9999, no warm-ups
        {"alpha": 3.99},
        {"alpha": 8.0, "betas": (0.9, 0.999, 0.999)},  # the paper's beta3 for short runs
        {"alpha": 8.0, "alpha_warmup": 100},
        {"alpha": 8.0, "beta3_warmup": 100},
        {"alpha": 8.0, "alpha_warmup": 100, "beta3_warmup": 100},
    ],
    ids=repr,
)
def test_ademamix_is_silent_outside_the_unwarmed_setting(kwargs: dict) -> None:
    p = _param()
    opt = longmem.AdEMAMix([p], **kwargs)
    assert _warnings_of_steps(opt, [p], 2) == [[], []]
