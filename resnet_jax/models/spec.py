"""The zoo's names, depth table and options, in plain Python: the command line checks a model's
name and options with them before it imports JAX (a typo is answered at once), and
``resnet_jax.models.zoo`` builds the networks from them."""

from __future__ import annotations

import numbers
import re
from typing import Any

# Depth is data: ImageNet depth -> (block kind, blocks per stage). Paper 1, Table 1.
IMAGENET_DEPTHS: dict[int, tuple[str, tuple[int, ...]]] = {
    18: ("basic", (2, 2, 2, 2)),
    34: ("basic", (3, 4, 6, 3)),
    50: ("bottleneck", (3, 4, 6, 3)),
    101: ("bottleneck", (3, 4, 23, 3)),
    152: ("bottleneck", (3, 8, 36, 3)),
    200: ("bottleneck", (3, 24, 36, 3)),
}

# family -> (stem, base width, default shortcut, pre-activation; CIFAR: the block). CIFAR depths
# are computed: 6n+2 layers with basic blocks, 9n+2 with bottlenecks (3 stages of n blocks).
FAMILIES: dict[str, dict[str, Any]] = {
    "resnet": dict(stem="imagenet", width=64, shortcut="B", preact=False),
    "plain": dict(stem="imagenet", width=64, shortcut="none", preact=False),
    "preact_resnet": dict(stem="imagenet", width=64, shortcut="B", preact=True),
    "cifar_resnet": dict(stem="cifar", width=16, shortcut="A", preact=False, block="basic"),
    "cifar_plain": dict(stem="cifar", width=16, shortcut="none", preact=False, block="basic"),
    # Paper 2's ResNet-164/1001 use 1x1 projections where the width changes (16 -> 64 already in
    # the first block): 'B'. Its code (KaimingHe/resnet-1k-layers, resnet-pre-act.lua) makes them
    # bare convolutions of the pre-activated input, with no BN after: projection_bn=False.
    "cifar_preact_resnet": dict(
        stem="cifar_preact", width=16, shortcut="B", preact=True, block="preact_bottleneck", projection_bn=False
    ),
    # Paper 2's "original" ResNet-164/1001 baselines: the same bottleneck nets, post-activation.
    "cifar_bottleneck_resnet": dict(stem="cifar", width=16, shortcut="B", preact=False, block="bottleneck"),
}

# The networks of the papers, for list_models(); any valid CIFAR depth is accepted too.
_LISTED_CIFAR = {
    "cifar_resnet": (20, 32, 44, 56, 110, 1202),
    "cifar_plain": (20, 32, 44, 56, 110, 1202),
    "cifar_preact_resnet": (164, 1001),
    "cifar_bottleneck_resnet": (164, 1001),
}

# Stages with at least this many blocks are scanned when scan_blocks='auto' (CIFAR ResNet-1202 has
# 200, pre-act ResNet-1001 has 111; nothing up to CIFAR ResNet-110 or ImageNet ResNet-200 does).
AUTO_SCAN_MIN_BLOCKS = 50

# Compute dtypes by name (the parameters stay float32); zoo maps them to JAX's types.
DTYPE_NAMES = ("float32", "bfloat16", "float16")

SHORTCUTS = ("A", "B", "C", "none", "gated", "shortcut_gated", "scaled")

DEFAULT_OPTIONS: dict[str, Any] = dict(
    shortcut=None,  # family default
    stride_in="3x3",
    zero_init_last_bn=True,
    width=None,  # family default
    dtype="float32",
    bn_momentum=0.9,
    bn_epsilon=1e-5,
    bn_group_size=None,
    gate_bias_init=-6.0,
    scan_blocks="auto",
    remat=False,
    space_to_depth_stem=False,
)


def list_models() -> list[str]:
    """The named networks of both papers. ``cifar_resnet{6n+2}``, ``cifar_plain{6n+2}``,
    ``cifar_preact_resnet{9n+2}`` and ``cifar_bottleneck_resnet{9n+2}`` accept any n >= 1 as well."""
    names = [f"{fam}{d}" for fam in ("resnet", "plain", "preact_resnet") for d in IMAGENET_DEPTHS]
    names += [f"{fam}{d}" for fam, depths in _LISTED_CIFAR.items() for d in depths]
    return names


def parse_name(name: str) -> tuple[str, str, tuple[int, ...]]:
    """``'cifar_resnet56'`` -> (family, block kind, blocks per stage). Raises ValueError."""
    m = re.fullmatch(r"([a-z_]+?)(\d+)", name or "")
    fam = m.group(1) if m else None
    if fam not in FAMILIES:
        raise ValueError(
            f"unknown model {name!r}; valid names: {', '.join(list_models())} "
            "(cifar_resnet/cifar_plain take any depth 6n+2, cifar_preact_resnet/cifar_bottleneck_resnet any 9n+2)"
        )
    depth = int(m.group(2))
    preact = FAMILIES[fam]["preact"]
    if not fam.startswith("cifar"):
        if depth not in IMAGENET_DEPTHS:
            raise ValueError(f"unknown depth {depth} for {fam}; valid depths: {sorted(IMAGENET_DEPTHS)}")
        block, sizes = IMAGENET_DEPTHS[depth]
        return fam, ("preact_" + block if preact else block), sizes
    block = FAMILIES[fam]["block"]
    per_block = 9 if "bottleneck" in block else 6
    n, rem = divmod(depth - 2, per_block)
    if rem or n < 1:
        raise ValueError(
            f"{name}: CIFAR depth must be {per_block}n+2 with n >= 1 (e.g. {per_block * 3 + 2}), got {depth}"
        )
    return fam, block, (n, n, n)


def _is_real(v: Any) -> bool:
    return isinstance(v, numbers.Real) and not isinstance(v, bool)


def _check(cond: bool, msg: str) -> None:
    if not cond:
        raise ValueError(msg)


def dtype_name(dtype) -> str | None:
    """The name of a dtype given as a NumPy-compatible type (``jnp.bfloat16`` -> ``'bfloat16'``); a
    string is returned as it is, to be checked against ``DTYPE_NAMES``; None for what NumPy does
    not know as a dtype."""
    if isinstance(dtype, str):
        return dtype
    import numpy as np

    try:
        return np.dtype(dtype).name
    except TypeError:
        return None


def resolve_options(name: str, **options) -> dict[str, Any]:
    """Validates ``options`` for model ``name`` and fills in the defaults. Raises ValueError."""
    fam, block, sizes = parse_name(name)
    unknown = set(options) - set(DEFAULT_OPTIONS)
    _check(not unknown, f"unknown model option(s) {sorted(unknown)}; valid: {sorted(DEFAULT_OPTIONS)}")
    o = {**DEFAULT_OPTIONS, **{k: v for k, v in options.items() if v is not None}}
    spec = FAMILIES[fam]
    # `is None`, not `or`: a falsy value (width=0, shortcut='') is an error, not the default.
    o["shortcut"] = spec["shortcut"] if o["shortcut"] is None else o["shortcut"]
    o["width"] = spec["width"] if o["width"] is None else o["width"]
    _check(o["shortcut"] in SHORTCUTS, f"shortcut={o['shortcut']!r}; valid: {', '.join(SHORTCUTS)}")
    _check(
        not (fam.endswith("plain") and o["shortcut"] != "none"),
        f"{name} is a plain network (shortcut='none'); use the resnet family for shortcut={o['shortcut']!r}",
    )
    _check(o["stride_in"] in ("3x3", "1x1"), f"stride_in={o['stride_in']!r}; valid: '3x3', '1x1'")
    _check(
        o["stride_in"] == "3x3" or "bottleneck" in block,
        f"stride_in='1x1' needs bottleneck blocks; {name} has basic blocks (use '3x3')",
    )
    # bool is an int subclass: width=True would silently build a 1-channel network.
    w = o["width"]
    _check(isinstance(w, int) and not isinstance(w, bool) and w >= 1, f"width={w!r}; must be a positive integer")
    _check(dtype_name(o["dtype"]) in DTYPE_NAMES, f"dtype={o['dtype']!r}; valid: {', '.join(DTYPE_NAMES)}")
    _check(
        _is_real(o["bn_momentum"]) and 0.0 <= o["bn_momentum"] < 1.0,
        f"bn_momentum={o['bn_momentum']!r}; must be in [0, 1)",
    )
    _check(_is_real(o["bn_epsilon"]) and o["bn_epsilon"] > 0, f"bn_epsilon={o['bn_epsilon']!r}; must be > 0")
    g = o["bn_group_size"]
    _check(
        g is None or (isinstance(g, int) and not isinstance(g, bool) and g >= 1),
        f"bn_group_size={g!r}; must be None or a positive integer",
    )
    sb = o["scan_blocks"]
    # `in ("auto", True, False)` would accept 1 and 0 (1 == True): compare by identity.
    _check(sb == "auto" or sb is True or sb is False, f"scan_blocks={sb!r}; valid: 'auto', True, False")
    _check(isinstance(o["remat"], bool), f"remat={o['remat']!r}; must be True or False")
    s2d = o["space_to_depth_stem"]
    _check(isinstance(s2d, bool), f"space_to_depth_stem={s2d!r}; must be True or False")
    _check(
        not s2d or spec["stem"] == "imagenet",
        f"space_to_depth_stem applies to the ImageNet stem (7x7, stride 2); {name} has a CIFAR stem",
    )
    _check(
        isinstance(o["zero_init_last_bn"], bool), f"zero_init_last_bn={o['zero_init_last_bn']!r}; must be True or False"
    )
    _check(_is_real(o["gate_bias_init"]), f"gate_bias_init={o['gate_bias_init']!r}; must be a number")
    o["gate_bias_init"] = float(o["gate_bias_init"])
    o.update(family=fam, block=block, stage_sizes=sizes)
    return o
