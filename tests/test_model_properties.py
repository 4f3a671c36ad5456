"""Property tests of the zoo's options: validity follows the documented rules, every valid combination
builds and runs, every invalid one raises a ValueError naming the offending option.

Validity is decided by ``violation`` below, an independent restatement of the documented constraints
(``create_model``'s docstring and ``list_models``), so that a validator bug shows up as a mismatch.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from resnet_jax.models import create_model, resolve_options

# The documented option values (not imported from the package: they are what is being checked).
SHORTCUTS = ("A", "B", "C", "none", "gated", "shortcut_gated", "scaled")
DTYPES = ("float32", "bfloat16", "float16")
OPTION_NAMES = {
    "shortcut",
    "stride_in",
    "zero_init_last_bn",
    "width",
    "dtype",
    "bn_momentum",
    "bn_epsilon",
    "bn_group_size",
    "gate_bias_init",
    "scan_blocks",
    "remat",
}
IMAGENET_DEPTHS = {18: "basic", 34: "basic", 50: "bottleneck", 101: "bottleneck", 152: "bottleneck", 200: "bottleneck"}
# family -> (CIFAR layers per block or None for ImageNet, plain)
FAMILIES = {
    "resnet": (None, False),
    "plain": (None, True),
    "preact_resnet": (None, False),
    "cifar_resnet": (6, False),
    "cifar_plain": (6, True),
    "cifar_preact_resnet": (9, False),
}
NUM_CLASSES = 3
# Per-compilation XLA options: about halve CPU compile time for these tiny programs.
FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_cpu_use_fusion_emitters": False}
BATCH = 2
WIDTH = 4


def is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def is_real(v) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool)


def block_kind(family: str, depth: int) -> str | None:
    """'basic' / 'bottleneck' for a valid family and depth, else None."""
    per_block, _ = FAMILIES[family]
    if per_block is None:
        return IMAGENET_DEPTHS.get(depth)
    n, rem = divmod(depth - 2, per_block)
    if rem or n < 1:
        return None
    return "bottleneck" if per_block == 9 else "basic"


def violation(family: str, depth: int, options: dict) -> str | None:
    """The documented rule: the offending option's name ('name' for the model name), or None if valid."""
    if family not in FAMILIES or block_kind(family, depth) is None:
        return "name"
    unknown = set(options) - OPTION_NAMES
    if unknown:
        return sorted(unknown)[0]
    o = {k: v for k, v in options.items() if v is not None}
    shortcut = o.get("shortcut", "none" if FAMILIES[family][1] else "A")
    if shortcut not in SHORTCUTS or (FAMILIES[family][1] and shortcut != "none"):
        return "shortcut"
    stride_in = o.get("stride_in", "3x3")
    if stride_in not in ("3x3", "1x1") or (stride_in == "1x1" and block_kind(family, depth) != "bottleneck"):
        return "stride_in"
    if "width" in o and not (is_int(o["width"]) and o["width"] >= 1):
        return "width"
    if "dtype" in o and not (isinstance(o["dtype"], str) and o["dtype"] in DTYPES):
        return "dtype"
    if "bn_momentum" in o and not (is_real(o["bn_momentum"]) and 0 <= o["bn_momentum"] < 1):
        return "bn_momentum"
    if "bn_epsilon" in o and not (is_real(o["bn_epsilon"]) and o["bn_epsilon"] > 0):
        return "bn_epsilon"
    if "bn_group_size" in o and not (is_int(o["bn_group_size"]) and o["bn_group_size"] >= 1):
        return "bn_group_size"
    if "scan_blocks" in o and not (o["scan_blocks"] == "auto" or isinstance(o["scan_blocks"], bool)):
        return "scan_blocks"
    for flag in ("remat", "zero_init_last_bn"):
        if flag in o and not isinstance(o[flag], bool):
            return flag
    if "gate_bias_init" in o and not is_real(o["gate_bias_init"]):
        return "gate_bias_init"
    return None


# ---------------------------------------------------------------------------------------------
# Strategies.


@st.composite
def small_names(draw, valid: bool = True):
    """(family, depth) of a small network: CIFAR n in {1, 2}, ImageNet 18 or 50; with valid=False
    also depths that break the family's rule."""
    family = draw(st.sampled_from(sorted(FAMILIES)))
    per_block, _ = FAMILIES[family]
    if per_block is None:
        depths = [18, 50] if valid else [18, 50, 19, 20, 49, 51, 100]
    else:
        depths = [per_block + 2, 2 * per_block + 2] if valid else list(range(2, 2 * per_block + 4))
    return family, draw(st.sampled_from(depths))


@st.composite
def valid_configs(draw):
    """A valid (family, depth, options) at tiny size; options left out or None mean the default."""
    family, depth = draw(small_names())
    plain = FAMILIES[family][1]
    bottleneck = block_kind(family, depth) == "bottleneck"
    candidates = {
        "shortcut": st.sampled_from([None, "none"] if plain else [None, *SHORTCUTS]),
        "stride_in": st.sampled_from(["3x3", "1x1"] if bottleneck else ["3x3"]),
        "zero_init_last_bn": st.booleans(),
        "dtype": st.sampled_from(DTYPES),
        "bn_group_size": st.sampled_from([None, 1, 2]),
        "gate_bias_init": st.sampled_from([-6.0, -1, 0.5]),
        "scan_blocks": st.sampled_from(["auto", True, False]),
        "remat": st.booleans(),
        "bn_momentum": st.sampled_from([0.0, 0.5, 0.9, 0.99]),
        "bn_epsilon": st.sampled_from([1e-5, 1e-3]),
    }
    keys = draw(st.lists(st.sampled_from(sorted(candidates)), unique=True, max_size=len(candidates)))
    options = {k: draw(candidates[k]) for k in sorted(keys)}
    return family, depth, options


def _bad(values) -> st.SearchStrategy:
    return st.sampled_from(values)


# option -> values that break it on their own (None is not among them: it means the default).
BAD_VALUES = {
    "shortcut": st.one_of(
        _bad(["", "D", "a", "b", "identity", "gate", "NONE", 1]),
        st.text("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz_", max_size=6).filter(
            lambda s: s not in SHORTCUTS
        ),
    ),
    "stride_in": _bad(["", "3X3", "2x2", "1", "3", 3, (1, 1)]),
    "width": st.one_of(st.integers(max_value=0), _bad([2.0, 0.5, "16", -3.5, True])),
    "dtype": _bad(["float64", "int8", "fp16", "half", "bf16", "float", "", np.int32, jnp.float64]),
    "bn_momentum": st.one_of(
        st.floats(min_value=1.0, allow_infinity=True), st.floats(max_value=-1e-9), _bad([math.nan, "0.9", [0.9]])
    ),
    "bn_epsilon": st.one_of(st.floats(max_value=0.0), _bad([math.nan, "1e-5"])),
    "bn_group_size": st.one_of(st.integers(max_value=0), _bad([1.5, 2.0, "2", True])),
    "gate_bias_init": _bad(["-6", "low", [1.0], {"b": 1}]),
    "scan_blocks": _bad(["yes", "on", "true", "Auto", 2, -1, "scan", 1, 0, 1.0]),
    "remat": _bad(["yes", "True", 1, 0, 1.0]),
    "zero_init_last_bn": _bad(["yes", "False", 1, 0, 0.0]),
}


@st.composite
def invalid_configs(draw):
    """A valid configuration with exactly one thing broken: (family, depth, options, culprit)."""
    family, depth, options = draw(valid_configs())
    options = dict(options)
    kind = draw(st.sampled_from(["name", "unknown_option", "plain_shortcut", "basic_stride_in", *sorted(BAD_VALUES)]))
    if kind == "name":
        family, depth = draw(small_names(valid=False).filter(lambda fd: block_kind(*fd) is None))
        options.pop("stride_in", None)  # keep the name the only problem
        options.pop("shortcut", None)
    elif kind == "unknown_option":
        name = draw(st.from_regex(r"[a-z][a-z_]{0,11}", fullmatch=True).filter(lambda s: s not in OPTION_NAMES))
        options[name] = draw(st.one_of(st.none(), st.integers(), st.text(max_size=3)))
    elif kind == "plain_shortcut":
        family = draw(st.sampled_from(["plain", "cifar_plain"]))
        depth = 18 if family == "plain" else 8
        options.pop("stride_in", None)
        options["shortcut"] = draw(st.sampled_from([s for s in SHORTCUTS if s != "none"]))
    elif kind == "basic_stride_in":
        family, depth = draw(
            st.sampled_from(
                [("resnet", 18), ("plain", 18), ("preact_resnet", 18), ("cifar_resnet", 8), ("cifar_plain", 14)]
            )
        )
        options.pop("shortcut", None)
        options["stride_in"] = "1x1"
    else:
        options[kind] = draw(BAD_VALUES[kind])
    culprit = violation(family, depth, options)
    assert culprit is not None, "the strategy should have broken the configuration"
    return family, depth, options, culprit


# ---------------------------------------------------------------------------------------------
# Properties.


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    names=small_names(valid=False),
    shortcut=st.sampled_from([None, *SHORTCUTS]),
    stride_in=st.sampled_from([None, "3x3", "1x1"]),
    width=st.sampled_from([None, 0, 1, 4, -2]),
    group=st.sampled_from([None, 0, 1, 2]),
)
def test_validity_follows_the_documented_rules(names, shortcut, stride_in, width, group):
    """resolve_options accepts a name and options exactly when the documented rules do (depth 6n+2 /
    9n+2 / the ImageNet table, plain nets take no shortcut, '1x1' stride only in bottlenecks, ...),
    and on success returns every option resolved to a concrete value."""
    family, depth = names
    name = f"{family}{depth}"
    options = dict(shortcut=shortcut, stride_in=stride_in, width=width, bn_group_size=group)
    culprit = violation(family, depth, options)
    if culprit is None:
        o = resolve_options(name, **options)
        assert o["shortcut"] == (
            shortcut or ("none" if FAMILIES[family][1] else "A" if family == "cifar_resnet" else "B")
        )
        assert o["width"] == (width or (16 if family.startswith("cifar") else 64))
        assert o["stride_in"] == (stride_in or "3x3") and o["bn_group_size"] == group
        assert block_kind(family, depth) in o["block"]
    else:
        with pytest.raises(ValueError) as err:
            resolve_options(name, **options)
        msg = str(err.value)
        assert msg and (culprit in msg if culprit != "name" else name in msg or f"depth {depth}" in msg), msg


def _stacked(model) -> dict:
    src = nnx.to_pure_dict(nnx.state(model))
    stages = {}
    for i, stage in src["stages"].items():
        rest = [stage["blocks"][j] for j in range(1, len(stage["blocks"]))]
        stages[i] = (
            {"blocks": {0: stage["blocks"][0]}, "scanned": jax.tree.map(lambda *a: jnp.stack(a), *rest)}
            if rest
            else stage
        )
    return {**src, "stages": stages}


def materialise(model, name: str, options: dict):
    """Fills the abstract ``model`` with the weights of an eagerly initialised ``scan_blocks=False``
    copy (re-stacked where ``model`` scans): eager construction of scanned stages is slow on CPU."""
    eager = create_model(
        name, num_classes=NUM_CLASSES, rngs=nnx.Rngs(0), width=WIDTH, **{**options, "scan_blocks": False}
    )
    state = nnx.state(model)
    scans = any(s.scanned is not None for s in model.stages)
    nnx.replace_by_pure_dict(state, _stacked(eager) if scans else nnx.to_pure_dict(nnx.state(eager)))
    nnx.update(model, state)
    assert all(isinstance(x, jax.Array) for x in jax.tree.leaves(nnx.state(model)))
    return model


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(config=valid_configs(), eval_mode=st.booleans())
def test_valid_combinations_build_and_run(config, eval_mode):
    """Every valid combination (width 4, batch 2) builds, with float32 parameters whatever the compute
    dtype, and its forward pass gives float32 logits of shape [B, num_classes]. The CIFAR nets run for
    real (jitted), and their logits are finite; the ImageNet nets are only traced here (nnx.eval_shape),
    since they run for real in test_models.py and their compilations would dominate this test."""
    family, depth, options = config
    assert violation(family, depth, options) is None
    name = f"{family}{depth}"
    resolve_options(name, **options)
    model = nnx.eval_shape(
        lambda: create_model(name, num_classes=NUM_CLASSES, rngs=nnx.Rngs(0), width=WIDTH, **options)
    )
    assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(nnx.state(model, nnx.Param)))
    if eval_mode:
        model.eval()
    size = 8 if family.startswith("cifar") else 32
    x = jax.random.normal(jax.random.key(0), (BATCH, size, size, 3))
    if not family.startswith("cifar"):
        out = nnx.eval_shape(lambda m, x: m(x), model, x)
        assert out.shape == (BATCH, NUM_CLASSES) and out.dtype == jnp.float32
        return
    materialise(model, name, options)
    forward = nnx.jit(lambda m, x: m(x)).lower(model, x).compile(compiler_options=FAST_COMPILE)
    logits = forward(model, x)
    assert logits.shape == (BATCH, NUM_CLASSES) and logits.dtype == jnp.float32
    assert np.all(np.isfinite(np.asarray(logits)))


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(config=invalid_configs())
def test_invalid_combinations_raise(config):
    """Every configuration with one bad name, option value, option name or combination raises a
    ValueError from resolve_options and create_model, whose message names the offending option
    as ``option=`` or, if unknown, as the quoted name (for a bad name: the depth or the name)."""
    family, depth, options, culprit = config
    name = f"{family}{depth}"
    for make in (
        lambda: resolve_options(name, **options),
        lambda: nnx.eval_shape(lambda: create_model(name, num_classes=NUM_CLASSES, rngs=nnx.Rngs(0), **options)),
    ):
        with pytest.raises(ValueError) as err:
            make()
        msg = str(err.value)
        assert msg.strip()
        if culprit == "name":
            assert name in msg or f"depth {depth}" in msg, msg
        elif culprit in OPTION_NAMES:  # spec.py's messages say "option=value"
            assert f"{culprit}=" in msg, msg
        else:  # the one unknown option, quoted in the list of unknown names (it may be one letter)
            assert f"unknown model option(s) ['{culprit}']; valid: " in msg, msg


@settings(max_examples=30, deadline=None)
@given(num_classes=st.one_of(st.integers(max_value=0), st.sampled_from([2.0, "10", None, [3], True])))
def test_bad_num_classes_raise(num_classes):
    """num_classes must be a positive integer (a bool is not one); the message names it."""
    with pytest.raises(ValueError, match="num_classes"):
        create_model("cifar_resnet8", num_classes=num_classes, rngs=nnx.Rngs(0))


@pytest.mark.parametrize("rngs", [0, None, jax.random.key(0)])
def test_rngs_that_are_not_nnx_rngs_raise(rngs):
    """Before: Flax's AttributeError ("'int' object has no attribute 'params'") from inside a layer."""
    with pytest.raises(ValueError, match=rf"rngs is a {type(rngs).__name__}; pass nnx\.Rngs\(seed\)"):
        create_model("cifar_resnet8", num_classes=10, rngs=rngs)
