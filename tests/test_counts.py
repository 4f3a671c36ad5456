"""Parameter and MAC counts against torchvision and the papers' tables, all computed abstractly.

Every model here is built under ``nnx.eval_shape`` (``summary.abstract_model``): no parameter is
allocated, so even CIFAR ResNet-1202 costs only tracing time.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import pytest
from flax import nnx

from resnet_jax.models import create_model
from resnet_jax.summary import abstract_model, count_macs, count_params, jaxpr_macs, summarize

# torchvision's ResNets (sum of p.numel() over model.parameters(), 1000 classes).
TORCHVISION_PARAMS = {
    "resnet18": 11_689_512,
    "resnet34": 21_797_672,
    "resnet50": 25_557_032,
    "resnet101": 44_549_160,
    "resnet152": 60_192_808,
}
# torchvision's model table, "GFLOPS" at 224x224 (which are in fact GMACs).
TORCHVISION_GMACS = {"resnet18": 1.81, "resnet34": 3.66, "resnet50": 4.09, "resnet101": 7.80, "resnet152": 11.51}

# Paper 1 (He et al. 2015), Table 6, CIFAR-10, option A; paper 2 (He et al. 2016), pre-activation.
# Strings, so that the paper's own rounding (its number of digits) is what we compare at.
PAPER1_CIFAR_MPARAMS = {
    "cifar_resnet20": "0.27",
    "cifar_resnet32": "0.46",
    "cifar_resnet44": "0.66",
    "cifar_resnet56": "0.85",
    "cifar_resnet110": "1.7",
    "cifar_resnet1202": "19.4",
}
PAPER2_CIFAR_MPARAMS = {"cifar_preact_resnet164": "1.7", "cifar_bottleneck_resnet164": "1.7"}


@functools.cache
def _model(name: str, num_classes: int, **options):
    """Abstract models are never mutated by the counters, so tests share them (builds dominate)."""
    return abstract_model(name, num_classes=num_classes, **options)


def _rounded_like(count: int, paper: str) -> str:
    """``count`` in millions, rounded to as many decimals as the paper's figure has."""
    decimals = len(paper.split(".")[1]) if "." in paper else 0
    return f"{count / 1e6:.{decimals}f}"


@pytest.mark.parametrize("name", sorted(TORCHVISION_PARAMS))
def test_imagenet_params_equal_torchvision(name):
    model = _model(name, 1000, shortcut="B", stride_in="3x3")
    assert count_params(model) == TORCHVISION_PARAMS[name]
    # The same count from the state (BatchNorm statistics are not parameters).
    assert count_params(nnx.state(model)) == TORCHVISION_PARAMS[name]


@pytest.mark.parametrize("name", sorted(TORCHVISION_GMACS))
def test_imagenet_macs_match_torchvision(name):
    model = _model(name, 1000, shortcut="B", stride_in="3x3")
    gmacs = count_macs(model, 224) / 1e9
    assert gmacs == pytest.approx(TORCHVISION_GMACS[name], rel=0.02)


@pytest.mark.parametrize("name", sorted(PAPER1_CIFAR_MPARAMS))
def test_cifar_params_match_paper1_table6(name):
    model = _model(name, 10)  # the family default is option A
    assert _rounded_like(count_params(model), PAPER1_CIFAR_MPARAMS[name]) == PAPER1_CIFAR_MPARAMS[name]


@pytest.mark.parametrize("name", sorted(PAPER2_CIFAR_MPARAMS))
def test_cifar_bottleneck_params_match_paper2(name):
    """Paper 2's ResNet-164, pre-activation and original: 1.7M parameters both."""
    model = _model(name, 10)
    assert _rounded_like(count_params(model), PAPER2_CIFAR_MPARAMS[name]) == PAPER2_CIFAR_MPARAMS[name]


def test_cifar_preact_resnet1001_params():
    """Paper 2 gives ResNet-1001 10.2M; with BatchNorm's scale/bias counted it has 10.33M.

    ResNet-164's 1.7M and paper 1's ResNet-1202 19.4M hold with BN parameters counted (without
    them 1202 would be 19.3M), so the papers count differently, or paper 2 rounds loosely: its
    10.2M matches the convolution and fc weights alone (10,178,490).
    """
    model = _model("cifar_preact_resnet1001", 10)
    total = count_params(model)
    assert total == 10_327_706  # (its three projection shortcuts have no BN: the paper's code)
    bn_params = sum(
        math.prod(v.get_value().shape)
        for path, v in nnx.to_flat_state(nnx.state(model, nnx.Param))
        if any(str(p).startswith(("bn", "final_bn")) for p in path)
    )
    assert _rounded_like(total - bn_params, "10.2") == "10.2"


def test_scanned_macs_equal_unrolled():
    """CIFAR ResNet-1202 scans its stages (nnx.scan): the scan body must count `length` times.
    A CIFAR ResNet-(6n+2) has the same blocks as one of depth 8 plus (n - 1) identical blocks per
    stage, so its counts are linear in n: the scanned 1202 (n = 200) must equal the line through
    the unrolled 8 and 14 (tracing the unrolled 1202 takes 18 s on a 2-core CPU), and a scanned 56
    must equal the unrolled 56."""
    scanned = _model("cifar_resnet1202", 10)
    assert all(stage.scanned is not None for stage in scanned.stages)
    n1, n2 = (_model(f"cifar_resnet{d}", 10, scan_blocks=False) for d in (8, 14))
    assert all(stage.scanned is None and len(stage.blocks) == 2 for stage in n2.stages)
    for count in (lambda m: count_macs(m, 32), count_params):
        assert count(scanned) == count(n1) + 199 * (count(n2) - count(n1))
    scanned56, unrolled56 = (_model("cifar_resnet56", 10, scan_blocks=sb) for sb in (True, False))
    assert all(stage.scanned is not None for stage in scanned56.stages)
    assert count_macs(scanned56, 32) == count_macs(unrolled56, 32)
    assert count_params(scanned56) == count_params(unrolled56)
    assert 2.7e9 < count_macs(scanned, 32) < 2.9e9  # paper 1 has no MAC figure for it; a sanity range


def test_summary_rows_add_up():
    rows = summarize("resnet50")
    assert [r.part for r in rows] == ["stem", "stage1", "stage2", "stage3", "stage4", "head", "total"]
    parts, total = rows[:-1], rows[-1]
    assert total.params == sum(r.params for r in parts) == TORCHVISION_PARAMS["resnet50"]
    assert (
        total.macs
        == sum(r.macs for r in parts)
        == count_macs(_model("resnet50", 1000, shortcut="B", stride_in="3x3"), 224)
    )
    assert [r.blocks for r in parts] == [0, 3, 4, 6, 3, 0]
    assert [r.output_shape for r in parts] == [
        (56, 56, 64),
        (56, 56, 256),
        (28, 28, 512),
        (14, 14, 1024),
        (7, 7, 2048),
        (1000,),
    ]


def test_summary_cifar_defaults_and_options():
    rows = summarize("cifar_resnet56")  # CIFAR nets default to 32x32 and 10 classes
    assert rows[0].output_shape == (32, 32, 16) and rows[-1].output_shape == (10,)
    # Option B adds the two 1x1 projections (16->32, 32->64) with their BNs.
    rows_b = summarize("cifar_resnet56", shortcut="B")
    assert rows_b[-1].params - rows[-1].params == (16 * 32 + 2 * 32) + (32 * 64 + 2 * 64)
    # The paper's bottleneck (stride on the 1x1) costs fewer MACs than torchvision's v1.5.
    assert summarize("resnet50", stride_in="1x1")[-1].macs < summarize("resnet50")[-1].macs
    with pytest.raises(ValueError, match="unknown depth"):
        summarize("resnet51")


def test_abstract_model_matches_plain_eval_shape():
    """abstract_model evaluates the Rngs counter eagerly (speed); the result must not change."""
    fast = abstract_model("resnet18", num_classes=10, scan_blocks=True)
    plain = nnx.eval_shape(lambda: create_model("resnet18", num_classes=10, rngs=nnx.Rngs(0), scan_blocks=True))
    assert nnx.graphdef(fast) == nnx.graphdef(plain)
    shapes = lambda m: jax.tree.map(lambda a: (a.shape, a.dtype), nnx.state(m))  # noqa: E731
    assert shapes(fast) == shapes(plain)


def test_jaxpr_macs_primitives():
    """Grouped convolutions, dots, and sub-jaxprs: jit (counted once), scan (x length), cond (max)."""
    x = jnp.zeros((2, 8, 8, 6))
    w = jnp.zeros((3, 3, 3, 12))  # HWIO; 6 input channels in 2 groups of 3

    def conv(x, w):
        return jax.lax.conv_general_dilated(
            x, w, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"), feature_group_count=2
        )

    conv_macs = 2 * 8 * 8 * 12 * (3 * 3 * 3)
    assert jaxpr_macs(jax.make_jaxpr(conv)(x, w)) == conv_macs
    assert jaxpr_macs(jax.make_jaxpr(jax.jit(conv))(x, w)) == conv_macs

    a, b = jnp.zeros((4, 5)), jnp.zeros((5, 7))

    def scanned(a, b):
        return jax.lax.scan(lambda c, _: (c + a @ b, None), jnp.zeros((4, 7)), None, length=6)[0]

    assert jaxpr_macs(jax.make_jaxpr(scanned)(a, b)) == 6 * 4 * 5 * 7

    def branch(p, a, b):
        return jax.lax.cond(p, lambda: (a @ b) @ b.T, lambda: a @ jnp.ones((5, 5)))

    assert jaxpr_macs(jax.make_jaxpr(branch)(True, a, b)) == 4 * 5 * 7 + 4 * 7 * 5


def test_macs_are_per_image_whatever_the_traced_batch():
    """count_macs traces a batch and divides by it: the same figure at batch 1 and batch 4."""
    model = abstract_model("cifar_resnet20", num_classes=10)
    assert count_macs(model, 32, batch_size=4) == count_macs(model, 32, batch_size=1) > 0
