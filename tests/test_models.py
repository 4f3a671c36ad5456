"""The model zoo: every family and option trains, scanned stages equal unrolled ones, parameter names,
``block_outputs``, BatchNorm, shortcuts and option validation.

Models are tiny (width 4, 8x8 CIFAR / 32x32 ImageNet images, batch 4); full-size networks are only
built abstractly with ``nnx.eval_shape``. Scanned models are built abstractly and then filled with an
unrolled model's weights: that is what the equivalence test needs anyway, and eager construction of
scanned stages (``nnx.vmap`` over the block constructor) is slow on CPU.
"""

from __future__ import annotations

import re
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from cli_env import XLA_CPU_DEFAULTS
from flax import nnx

from resnet_jax.models import create_model, list_models, resolve_options, spec
from resnet_jax.models.blocks import BlockOptions, Bottleneck, PreActBasicBlock, PreActBottleneck
from resnet_jax.models.layers import BatchNorm, Shortcut, max_pool, space_to_depth_conv, subsample_and_pad

# Per-compilation XLA options for the many small train steps: they about halve CPU compile time.
FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_cpu_use_fusion_emitters": False}
NUM_CLASSES = 5
BATCH = 4
WIDTH = 4


def images(size: int, batch: int = BATCH, seed: int = 0) -> jax.Array:
    return jax.random.normal(jax.random.key(seed), (batch, size, size, 3), jnp.float32)


def flat(model, *filters) -> dict[tuple, nnx.Variable]:
    """``{path: variable}`` of a model's variables (optionally filtered, e.g. ``nnx.Param``)."""
    return dict(nnx.to_flat_state(nnx.state(model, *filters)))


def abstract(name: str, num_classes: int = NUM_CLASSES, **options):
    """The model built with ``nnx.eval_shape``: shapes only, no compute."""
    return nnx.eval_shape(lambda: create_model(name, num_classes=num_classes, rngs=nnx.Rngs(0), **options))


def tiny(name: str, seed: int = 0, **options):
    return create_model(name, num_classes=NUM_CLASSES, rngs=nnx.Rngs(seed), width=WIDTH, **options)


def stacked_state(model) -> dict:
    """``model``'s state as a pure dict in the scanned layout: each stage's blocks[1:] stacked on a new
    leading axis under ``scanned``; everything else as it is."""
    src = nnx.to_pure_dict(nnx.state(model))
    stages = {}
    for i, stage in src["stages"].items():
        blocks = stage["blocks"]
        rest = [blocks[j] for j in range(1, len(blocks))]
        stages[i] = (
            {"blocks": {0: blocks[0]}, "scanned": jax.tree.map(lambda *a: jnp.stack(a), *rest)} if rest else stage
        )
    return {**src, "stages": stages}


def uses_running_average(model) -> bool:
    return next(m for _, m in nnx.iter_modules(model) if isinstance(m, BatchNorm)).use_running_average


def scanned_twin(model, name: str, **options):
    """A ``scan_blocks=True`` build of ``name`` holding exactly the unrolled ``model``'s state, in its mode."""
    twin = abstract(name, model.fc.out_features, scan_blocks=True, **options)
    state = nnx.state(twin)
    shapes = jax.tree.map(lambda v: (v.shape, v.dtype), state)
    nnx.replace_by_pure_dict(state, stacked_state(model))
    assert jax.tree.map(lambda v: (v.shape, v.dtype), state) == shapes, "stacked state does not fit the scanned model"
    nnx.update(twin, state)
    assert all(isinstance(leaf, jax.Array) for leaf in jax.tree.leaves(nnx.state(twin))), "some state was not copied"
    assert all((s.scanned is not None) == (len(b) > 1) for s, b in zip(twin.stages, (s.blocks for s in model.stages)))
    if uses_running_average(model):
        twin.eval()
    return twin


def compiled(fn, *args):
    """``nnx.jit(fn)`` compiled for ``args`` with FAST_COMPILE (module state updates propagate as with
    ``nnx.jit``); reuse it only for arguments of the same shapes and modules in the same mode."""
    return nnx.jit(fn).lower(*args).compile(compiler_options=FAST_COMPILE)


def forward(model, x):
    return model(x)


def block_outputs(model, x):
    return model.block_outputs(x)


def loss_and_grads(model, x, y):
    """Jitted forward + backward (softmax cross entropy): (loss, logits, grads)."""

    def step(model, x, y):
        def loss_fn(model):
            logits = model(x)
            return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean(), logits

        (loss, logits), grads = nnx.value_and_grad(loss_fn, has_aux=True)(model)
        return loss, logits, grads

    return compiled(step, model, x, y)(model, x, y)


# ---------------------------------------------------------------------------------------------
# 1. Every family and option combination trains.

TRAIN_CASES = [
    # Every shortcut kind on a CIFAR ResNet (shape changes in stages 2 and 3), other options mixed
    # in. The shortcut and its merge are one module whatever the block, so the ImageNet nets below
    # do not repeat every kind: each compile costs 2-7 s of a 2-core CPU.
    ("cifar_resnet8", {}),
    ("cifar_resnet8", dict(shortcut="B", bn_group_size=2)),
    ("cifar_resnet8", dict(shortcut="C", remat=True)),
    ("cifar_resnet8", dict(shortcut="none")),
    ("cifar_resnet8", dict(shortcut="gated", dtype="bfloat16")),
    ("cifar_resnet8", dict(shortcut="shortcut_gated", zero_init_last_bn=False, gate_bias_init=-2.0)),
    ("cifar_resnet8", dict(shortcut="scaled", dtype="float16")),
    # ImageNet ResNet-18 (stem, max-pool, basic blocks): its default, and scanned stages.
    ("resnet18", {}),
    ("resnet18", dict(shortcut="shortcut_gated", scan_blocks=True)),
    # ResNet-50 (bottlenecks, whose first block changes the width at stride 1), with both stride
    # placements and the shortcut kinds that meet that change differently (padding, projections).
    ("resnet50", dict(shortcut="A", stride_in="1x1")),
    ("resnet50", {}),
    ("resnet50", dict(shortcut="C", bn_group_size=2, zero_init_last_bn=False)),
    ("resnet50", dict(shortcut="gated")),
    ("resnet50", dict(shortcut="scaled", stride_in="1x1", dtype="bfloat16")),
    # Plain and pre-activation families.
    ("plain18", {}),
    ("cifar_plain8", dict(bn_group_size=2, dtype="bfloat16")),
    ("preact_resnet18", dict(shortcut="C", scan_blocks=True, remat=True)),
    ("preact_resnet50", dict(stride_in="1x1", dtype="bfloat16")),
    ("cifar_preact_resnet11", {}),
    ("cifar_bottleneck_resnet11", dict(shortcut="gated")),  # gates meet B projections here
]


# The option cases of the bottleneck ImageNet families build ResNet-50 with blocks (2, 1, 1, 1)
# instead of (3, 4, 6, 3): every path of the network is still there (the stride-1 projection into
# stage 1, an identity block, a strided first block in each later stage) at under half the compile
# time. ResNet-50 with its default options keeps the full depth.
SHORT_RESNET50 = ("bottleneck", (2, 1, 1, 1))


def _case_id(case) -> str:
    name, opts = case
    return "-".join([name] + [f"{k}={v}" for k, v in opts.items()])


@pytest.mark.parametrize("name,options", TRAIN_CASES, ids=[_case_id(c) for c in TRAIN_CASES])
def test_forward_backward_under_jit(name, options, monkeypatch):
    """Forward + backward under jit at width 4: float32 logits [B, classes], a finite loss, finite
    float32 gradients for every parameter, a non-zero gradient at the stem's conv1 kernel (it flows
    back through every stage), and float32 parameters whatever the compute dtype. scan_blocks=True
    cases run the scanned build holding the unrolled build's initial weights."""
    if name.endswith("resnet50") and options:
        monkeypatch.setitem(spec.IMAGENET_DEPTHS, 50, SHORT_RESNET50)
    options = dict(options)
    scan = options.pop("scan_blocks", False)
    model = tiny(name, scan_blocks=False, **options)
    if scan:  # same weights, stacked: see scanned_twin
        model = scanned_twin(model, name, width=WIDTH, **options)
    size = 8 if name.startswith("cifar") else 32
    x = images(size)
    y = jnp.arange(BATCH) % NUM_CLASSES
    loss, logits, grads = loss_and_grads(model, x, y)

    assert logits.shape == (BATCH, NUM_CLASSES) and logits.dtype == jnp.float32
    assert np.isfinite(float(loss))
    params = flat(model, nnx.Param)
    assert all(v.dtype == jnp.float32 for v in params.values())
    flat_grads = dict(nnx.to_flat_state(grads))
    assert set(flat_grads) == set(params), "every parameter gets a gradient"
    for path, g in flat_grads.items():
        assert g.dtype == jnp.float32, path
        assert np.all(np.isfinite(np.asarray(g[...]))), f"non-finite gradient at {path}"
    stem_grad = np.asarray(grads["conv1"]["kernel"][...])
    assert np.abs(stem_grad).max() > 0, "the gradient does not reach the stem"


# ---------------------------------------------------------------------------------------------
# 2. A scanned stage computes what its blocks compute one by one.


def _assert_trees_close(a, b, what: str, tol: float = 1e-5) -> None:
    """Same tree structure, leaves equal to ``tol`` relative to each leaf's largest magnitude."""
    la, lb = jax.tree.leaves_with_path(a), jax.tree.leaves_with_path(b)
    assert [p for p, _ in la] == [p for p, _ in lb], what
    for (path, u), (_, v) in zip(la, lb):
        u, v = np.asarray(u), np.asarray(v)
        scale = max(1.0, float(np.abs(v).max()))
        np.testing.assert_allclose(u, v, rtol=tol, atol=tol * scale, err_msg=f"{what} {jax.tree_util.keystr(path)}")


@pytest.mark.parametrize("name", ["cifar_resnet20", "cifar_preact_resnet20"])
def test_scanned_stage_equals_unrolled_blocks(name):
    """For the same weights, ``scan_blocks=True`` computes what ``scan_blocks=False`` does: train-mode
    logits and block outputs, the BatchNorm statistics that call leaves behind, eval-mode logits and
    block outputs (all to 1e-5)."""
    unrolled = tiny(name, scan_blocks=False, zero_init_last_bn=False)
    # Non-trivial weights and running statistics: perturb every parameter, then two training calls.
    rng = np.random.default_rng(0)
    params = nnx.state(unrolled, nnx.Param)
    nnx.update(
        unrolled, jax.tree.map(lambda p: jnp.asarray(p + 0.2 * rng.normal(size=p.shape).astype(np.float32)), params)
    )
    x = images(8, seed=3)
    run_unrolled = compiled(block_outputs, unrolled, x)
    run_unrolled(unrolled, images(8, seed=1))
    run_unrolled(unrolled, images(8, seed=2))
    assert float(np.abs(np.asarray(unrolled.stages[2].blocks[1].bn1.mean[...])).max()) > 0

    scanned = scanned_twin(unrolled, name, width=WIDTH, zero_init_last_bn=False)
    n = len(unrolled.stages[0].blocks)
    assert all(s.scanned is not None and s.scanned.conv1.kernel.shape[0] == n - 1 for s in scanned.stages)
    np.testing.assert_array_equal(
        scanned.stages[1].scanned.conv1.kernel[...][n - 2], unrolled.stages[1].blocks[n - 1].conv1.kernel[...]
    )

    train_u, train_s = run_unrolled(unrolled, x), compiled(block_outputs, scanned, x)(scanned, x)
    assert len(train_u[1]) == len(train_s[1]) == 3 * n
    # The compared parts include every branch conv's response (2 per basic block, 3 per bottleneck).
    per_block = 3 if "preact" in name else 2  # cifar_preact_resnet20 is a bottleneck net (9n + 2)
    assert all(len(p["responses"]) == len(q["responses"]) == per_block for p, q in zip(train_u[1], train_s[1]))
    assert scanned.conv_response_names() == unrolled.conv_response_names()
    _assert_trees_close(train_u, train_s, "train-mode (logits, block parts)")
    _assert_trees_close(stacked_state(unrolled), nnx.to_pure_dict(nnx.state(scanned)), "state after a train-mode call")

    unrolled.eval()
    scanned.eval()
    eval_u = compiled(block_outputs, unrolled, x)(unrolled, x)
    eval_s = compiled(block_outputs, scanned, x)(scanned, x)
    _assert_trees_close(eval_u, eval_s, "eval-mode (logits, block parts)")
    assert not np.allclose(eval_u[0], train_u[0], atol=1e-3), "eval mode should use the running statistics"


@pytest.mark.parametrize("k,c,size", [(7, 3, 32), (7, 2, 10), (3, 4, 8)])
def test_space_to_depth_conv_is_the_strided_conv(k, c, size):
    """space_to_depth_conv computes the stride-2 convolution padded k//2 (also for non-square
    images), as a 2x2 space-to-depth and a stride-1 convolution of the regrouped kernel."""
    rng = np.random.default_rng(k + c)
    x = jnp.asarray(rng.normal(size=(2, size, size + 2, c)), jnp.float32)
    kernel = jnp.asarray(rng.normal(size=(k, k, c, 5)), jnp.float32)
    want = jax.lax.conv_general_dilated(
        x, kernel, (2, 2), [(k // 2, k // 2)] * 2, dimension_numbers=("NHWC", "HWIO", "NHWC")
    )
    got = space_to_depth_conv(x, kernel)
    assert got.shape == want.shape == (2, size // 2, size // 2 + 1, 5)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize(
    "shape,window,stride,padding",
    [((2, 9, 7, 3), 3, 2, 1), ((2, 8, 8, 3), 3, 2, 1), ((1, 10, 10, 2), 2, 2, 0), ((1, 11, 11, 2), 3, 1, 1)],
)
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_max_pool_is_nnx_max_pool(shape, window, stride, padding, dtype):
    """max_pool gives nnx.max_pool's values and exactly its gradient, also with ties (the gradient
    goes to the first maximum of a window, as select-and-scatter sends it) and negative inputs
    next to the padding; forward-mode differentiation works too."""
    rng = np.random.default_rng(sum(shape))
    # Half-integers make many ties inside windows.
    x = jnp.asarray(np.round(rng.normal(size=shape) * 2) / 2 - 1, dtype)

    def reference(x):
        return nnx.max_pool(x, (window, window), (stride, stride), ((padding, padding), (padding, padding)))

    def ours(x):
        return max_pool(x, window, stride, padding)

    # One jitted program for all of it: eagerly, each slice, maximum and transpose would compile
    # on its own.
    @jax.jit
    def check(x, g):
        (want, pull_want), (got, pull_got) = jax.vjp(reference, x), jax.vjp(ours, x)
        _, tangent = jax.jvp(ours, (x,), (jnp.ones_like(x),))
        return want, got, pull_want(g)[0], pull_got(g)[0], tangent

    assert int(jnp.sum(x[:, :-1] == x[:, 1:])) > 0, "the input should have ties"
    out_shape = jax.eval_shape(reference, x).shape
    g = jnp.asarray(rng.integers(1, 5, size=out_shape), dtype)  # exact sums in bfloat16 too
    want, got, grad_want, grad_got, tangent = check(x, g)
    assert got.shape == want.shape and got.dtype == want.dtype
    np.testing.assert_array_equal(np.asarray(got, np.float32), np.asarray(want, np.float32))
    np.testing.assert_array_equal(np.asarray(grad_got, np.float32), np.asarray(grad_want, np.float32))
    np.testing.assert_array_equal(np.asarray(tangent, np.float32), np.ones(want.shape, np.float32))


def test_max_pool_passes_nan_on():
    """A NaN in a window makes its output NaN, as reduce_window's maximum does, so that the loss
    shows it (a selection by equality alone would drop it)."""
    x = jnp.zeros((1, 6, 6, 2)).at[0, 1, 1, 0].set(jnp.nan)
    got, want = max_pool(x), nnx.max_pool(x, (3, 3), (2, 2), ((1, 1), (1, 1)))
    np.testing.assert_array_equal(np.isnan(got), np.isnan(want))
    assert bool(jnp.isnan(got[0, 0, 0, 0])) and not bool(jnp.isnan(got[0, 2, 2, 0]))
    np.testing.assert_array_equal(got[..., 1], want[..., 1])


def test_space_to_depth_stem_is_the_same_network():
    """model.space_to_depth_stem changes how the stem is computed, not what: same parameter tree,
    same logits and BatchNorm statistics for the same weights, gradients included; odd image sizes
    fall back to the direct convolution."""
    direct = tiny("resnet18")
    s2d = tiny("resnet18", space_to_depth_stem=True)
    assert jax.tree.map(jnp.shape, nnx.state(direct)) == jax.tree.map(jnp.shape, nnx.state(s2d))
    nnx.update(s2d, nnx.state(direct))

    def loss(model, x):
        return jnp.sum(model(x) ** 2)

    x = images(32, seed=1)
    out_d, grads_d = compiled(nnx.value_and_grad(loss), direct, x)(direct, x)
    out_s, grads_s = compiled(nnx.value_and_grad(loss), s2d, x)(s2d, x)
    np.testing.assert_allclose(out_s, out_d, rtol=1e-4)
    _assert_trees_close(nnx.to_pure_dict(grads_s), nnx.to_pure_dict(grads_d), "gradients", 1e-4)
    _assert_trees_close(
        nnx.to_pure_dict(nnx.state(s2d, nnx.BatchStat)),
        nnx.to_pure_dict(nnx.state(direct, nnx.BatchStat)),
        "BatchNorm statistics",
    )
    odd = images(33, seed=2)  # the fallback: the direct convolution, so exactly the same
    np.testing.assert_array_equal(compiled(forward, s2d, odd)(s2d, odd), compiled(forward, direct, odd)(direct, odd))
    wide = jax.random.normal(jax.random.key(4), (BATCH, 32, 33, 3))  # odd in one side only: the fallback too
    np.testing.assert_array_equal(
        compiled(forward, s2d, wide)(s2d, wide), compiled(forward, direct, wide)(direct, wide)
    )


# ---------------------------------------------------------------------------------------------
# 3-4. scan_blocks='auto' and the compile time of the deepest network.


@pytest.mark.parametrize(
    "name,scanned",
    [("cifar_resnet1202", True), ("cifar_preact_resnet1001", True), ("cifar_resnet110", False), ("resnet200", False)],
)
def test_scan_blocks_auto(name, scanned):
    """'auto' scans the very deep CIFAR nets (ResNet-1202, pre-act ResNet-1001), stacking blocks 2..n
    of every stage, and unrolls everything up to CIFAR ResNet-110 and ImageNet ResNet-200."""
    model = abstract(name, num_classes=10)
    sizes = resolve_options(name)["stage_sizes"]
    for stage, n in zip(model.stages, sizes):
        if scanned:
            assert stage.scanned is not None and len(stage.blocks) == 1
            assert stage.scanned.conv1.kernel.shape[0] == n - 1
        else:
            assert stage.scanned is None and len(stage.blocks) == n


def test_cifar_resnet1202_train_step_compiles_quickly():
    """The jitted train step (forward, backward, SGD with momentum) of CIFAR ResNet-1202 with default
    options lowers and compiles in under 60 s (batch 8, 32x32): scanning keeps compile time flat."""
    model = abstract("cifar_resnet1202", num_classes=10)
    tx = optax.sgd(0.1, momentum=0.9)
    opt_state = jax.eval_shape(tx.init, nnx.state(model, nnx.Param))

    @nnx.jit
    def train_step(model, opt_state, x, y):
        def loss_fn(model):
            return optax.softmax_cross_entropy_with_integer_labels(model(x), y).mean()

        loss, grads = nnx.value_and_grad(loss_fn)(model)
        params = nnx.state(model, nnx.Param)
        updates, opt_state = tx.update(grads, opt_state, params)
        nnx.update(model, optax.apply_updates(params, updates))
        return loss, opt_state

    x = jax.ShapeDtypeStruct((8, 32, 32, 3), jnp.float32)
    y = jax.ShapeDtypeStruct((8,), jnp.int32)
    # A real compile with XLA:CPU's defaults (LLVM -O3, fusion emitters): not served by the test
    # run's compilation cache, and not with the lighter flags tests/conftest.py sets for the others.
    cache = jax.config.jax_enable_compilation_cache
    jax.config.update("jax_enable_compilation_cache", False)
    try:
        start = time.perf_counter()
        compiled = train_step.lower(model, opt_state, x, y).compile(compiler_options=XLA_CPU_DEFAULTS)
        elapsed = time.perf_counter() - start
    finally:
        jax.config.update("jax_enable_compilation_cache", cache)
    assert elapsed < 60, f"lowering + compiling took {elapsed:.1f} s"
    # Flat because the 3 stages of 200 blocks stay loops, forward and backward, in the executable.
    loops = compiled.as_text().count(" while(")
    assert loops >= 2 * 3, f"{loops} while loops in the compiled step"


# ---------------------------------------------------------------------------------------------
# 5. Parameter names (checkpoints and the torchvision converter depend on them).


def test_parameter_names_and_shapes_resnet50():
    """Full-size ResNet-50: torchvision-like names, shapes and its exact parameter count (25,557,032)."""
    v = flat(abstract("resnet50", num_classes=1000))
    expect = {
        ("conv1", "kernel"): (nnx.Param, (7, 7, 3, 64)),
        ("bn1", "scale"): (nnx.Param, (64,)),
        ("bn1", "bias"): (nnx.Param, (64,)),
        ("bn1", "mean"): (nnx.BatchStat, (64,)),
        ("bn1", "var"): (nnx.BatchStat, (64,)),
        ("stages", 0, "blocks", 0, "conv1", "kernel"): (nnx.Param, (1, 1, 64, 64)),
        ("stages", 0, "blocks", 0, "conv2", "kernel"): (nnx.Param, (3, 3, 64, 64)),
        ("stages", 0, "blocks", 0, "conv3", "kernel"): (nnx.Param, (1, 1, 64, 256)),
        ("stages", 0, "blocks", 0, "bn3", "scale"): (nnx.Param, (256,)),
        ("stages", 0, "blocks", 0, "shortcut", "conv", "kernel"): (nnx.Param, (1, 1, 64, 256)),
        ("stages", 0, "blocks", 0, "shortcut", "bn", "var"): (nnx.BatchStat, (256,)),
        ("stages", 3, "blocks", 0, "shortcut", "conv", "kernel"): (nnx.Param, (1, 1, 1024, 2048)),
        ("stages", 2, "blocks", 5, "conv2", "kernel"): (nnx.Param, (3, 3, 256, 256)),
        ("fc", "kernel"): (nnx.Param, (2048, 1000)),
        ("fc", "bias"): (nnx.Param, (1000,)),
    }
    for path, (kind, shape) in expect.items():
        assert path in v, path
        assert type(v[path]) is kind and v[path].shape == shape, path
    # Option B: projections only where the shape changes (the first block of each stage).
    projecting = {p[:4] for p in v if "shortcut" in p}
    assert projecting == {("stages", i, "blocks", 0) for i in range(4)}
    assert not any("stages" in p and "scanned" in p for p in v)
    assert all(p[-1] in ("kernel", "bias", "scale", "mean", "var") for p in v)
    assert (
        sum(int(np.prod(x.shape)) for x in flat(abstract("resnet50", num_classes=1000), nnx.Param).values())
        == 25_557_032
    )


def test_parameter_count_resnet18():
    """Full-size ResNet-18 has torchvision's 11,689,512 parameters."""
    params = flat(abstract("resnet18", num_classes=1000), nnx.Param)
    assert sum(int(np.prod(x.shape)) for x in params.values()) == 11_689_512


def test_shortcut_parameters_per_option():
    """Option A has no shortcut parameters at all; C has a projection (conv + BN) on every block;
    the gating kinds have a ``gate`` conv with bias on every block; pre-activation nets have
    ``final_bn`` and the CIFAR one no stem BN; scanned stages are stored under ``scanned``."""
    a = flat(abstract("cifar_resnet20", width=WIDTH, shortcut="A"))
    assert not any("shortcut" in p for p in a)
    assert ("stages", 2, "blocks", 2, "conv2", "kernel") in a and ("final_bn", "scale") not in a

    c = flat(abstract("cifar_resnet20", width=WIDTH, shortcut="C"))
    for i in range(3):
        for j in range(3):
            for leaf in ("conv", "kernel"), ("bn", "scale"), ("bn", "bias"), ("bn", "mean"), ("bn", "var"):
                assert ("stages", i, "blocks", j, "shortcut", *leaf) in c, (i, j, leaf)

    g = flat(abstract("cifar_resnet14", width=WIDTH, shortcut="gated"))
    gates = {p[:4] for p in g if p[-2:] in {("gate", "kernel"), ("gate", "bias")}}
    assert gates == {("stages", i, "blocks", j) for i in range(3) for j in range(2)}

    p = flat(abstract("cifar_preact_resnet164", num_classes=10))
    assert ("final_bn", "scale") in p and ("bn1", "scale") not in p and ("conv1", "kernel") in p
    assert p[("stages", 0, "blocks", 0, "shortcut", "conv", "kernel")].shape == (1, 1, 16, 64)

    # Paper 2's original ResNet-164: the same bottleneck stages, post-activation (a conv-BN-ReLU
    # stem, BN after each conv, no final BN), 1x1 projections where the shape changes.
    o = flat(abstract("cifar_bottleneck_resnet164", num_classes=10))
    assert ("bn1", "scale") in o and ("final_bn", "scale") not in o
    assert o[("stages", 0, "blocks", 0, "shortcut", "conv", "kernel")].shape == (1, 1, 16, 64)
    assert o[("stages", 2, "blocks", 0, "conv3", "kernel")].shape == (1, 1, 64, 256)
    assert ("stages", 2, "blocks", 0, "bn3", "scale") in o and (
        "stages",
        0,
        "blocks",
        1,
        "shortcut",
        "conv",
        "kernel",
    ) not in o
    assert {k[:4] for k in o if k[0] == "stages"} == {k[:4] for k in p if k[0] == "stages"}  # same blocks

    s = flat(abstract("cifar_resnet20", width=WIDTH, scan_blocks=True))
    assert s[("stages", 1, "scanned", "conv1", "kernel")].shape == (2, 3, 3, 8, 8)
    assert type(s[("stages", 1, "scanned", "bn1", "mean")]) is nnx.BatchStat
    assert ("stages", 1, "blocks", 0, "conv1", "kernel") in s and ("stages", 1, "blocks", 1, "conv1", "kernel") not in s


def test_listed_models_resolve_with_the_right_depth():
    """Every listed name resolves, and its depth counts its weighted layers: 2 per basic block,
    3 per bottleneck, plus the stem conv and the fc layer."""
    names = list_models()
    for fam in ("resnet", "plain", "preact_resnet"):
        for d in (18, 34, 50, 101, 152, 200):
            assert f"{fam}{d}" in names
    for name in [
        "cifar_resnet20",
        "cifar_resnet110",
        "cifar_resnet1202",
        "cifar_plain56",
        "cifar_preact_resnet164",
        "cifar_preact_resnet1001",
        "cifar_bottleneck_resnet164",
        "cifar_bottleneck_resnet1001",
    ]:
        assert name in names
    for name in names:
        o = resolve_options(name)
        per_block = 3 if "bottleneck" in o["block"] else 2
        assert name.endswith(str(per_block * sum(o["stage_sizes"]) + 2)), name
        assert len(o["stage_sizes"]) == (3 if name.startswith("cifar") else 4), name


# ---------------------------------------------------------------------------------------------
# 6. block_outputs and zero-initialised last BN.


def _expected_block_shapes(name, sizes, size, expansion):
    shapes, h = [], size // (1 if name.startswith("cifar") else 4)
    for i, n in enumerate(sizes):
        h = h if i == 0 else (h + 1) // 2
        shapes += [(BATCH, h, h, WIDTH * 2**i * expansion)] * n
    return shapes


@pytest.mark.parametrize(
    "name,size,expansion",
    [("cifar_resnet14", 8, 1), ("cifar_preact_resnet20", 8, 4), ("resnet50", 32, 4), ("cifar_plain8", 8, 1)],
)
def test_block_outputs(name, size, expansion):
    """One entry per block; residual and shortcut shapes are the block outputs' shapes; the logits are
    ``model(x)``'s; where the shortcut is the identity it is the previous block's output (the parts
    recombine: relu(s + r) post-activation, s + r pre-activation); plain nets have no shortcut.
    ``responses``: one per branch conv (2 basic, 3 bottleneck), the last being ``residual``, the
    others at the branch's inner width; ``conv_responses`` is the stem's and then these, named."""
    model = tiny(name, zero_init_last_bn=False)
    x = images(size)
    logits, parts = model.block_outputs(x)
    np.testing.assert_allclose(logits, model(x), rtol=1e-6, atol=1e-6)
    sizes = resolve_options(name)["stage_sizes"]
    assert len(parts) == sum(sizes)
    shapes = _expected_block_shapes(name, sizes, size, expansion)
    plain = "plain" in name
    preact = "preact" in name
    per_block = 3 if expansion == 4 else 2
    for k, (p, shape) in enumerate(zip(parts, shapes)):
        assert set(p) == {"residual", "shortcut", "responses", "output"}
        assert p["residual"].shape == shape and p["output"].shape == shape, k
        assert len(p["responses"]) == per_block and p["responses"][-1] is p["residual"], k
        assert all((r.shape[0], r.shape[-1]) == (BATCH, shape[-1] // expansion) for r in p["responses"][:-1]), k
        if not plain and k + 1 < len(parts) and shapes[k + 1] == shape:  # the next block's identity input
            np.testing.assert_allclose(parts[k + 1]["shortcut"], p["output"], rtol=1e-6, atol=1e-6)
        if plain:
            assert p["shortcut"] is None
            continue
        assert p["shortcut"].shape == shape, k
        if k + 1 < len(parts) and shapes[k + 1] == shape:  # identity shortcut into the next block
            out = p["shortcut"] + p["residual"]
            out = out if preact else jax.nn.relu(out)
            np.testing.assert_allclose(parts[k + 1]["shortcut"], out, rtol=1e-5, atol=1e-5)

    conv_logits, responses = model.conv_responses(x)
    np.testing.assert_allclose(conv_logits, logits, rtol=1e-6, atol=1e-6)
    names = model.conv_response_names()
    assert len(responses) == len(names) == 1 + per_block * sum(sizes)
    assert (
        names[:2] == ["stem", "stage1.block1.conv1"]
        and names[-1] == f"stage{len(sizes)}.block{sizes[-1]}.conv{per_block}"
    )
    flat_parts = [r for p in parts for r in p["responses"]]
    for r, q in zip(responses[1:], flat_parts):
        np.testing.assert_array_equal(r, q)


@pytest.mark.parametrize("name,size", [("cifar_resnet8", 8), ("cifar_preact_resnet20", 8), ("resnet18", 32)])
def test_features_are_what_the_head_reads(name, size):
    """``features(x)`` is [N, num_features] float32 and the head applied to it gives ``model(x)``;
    for a pre-activation net it comes after the final BN-ReLU (so it is non-negative)."""
    model = tiny(name, zero_init_last_bn=False)
    model.eval()
    x = images(size)
    f = model.features(x)
    assert f.shape == (BATCH, model.num_features) and f.dtype == jnp.float32
    np.testing.assert_allclose(model.fc(f), model(x), rtol=1e-5, atol=1e-5)
    _, parts = model.block_outputs(x)
    last = parts[-1]["output"]
    expected = jnp.mean(jax.nn.relu(model.final_bn(last)) if model.final_bn is not None else last, axis=(1, 2))
    np.testing.assert_allclose(f, expected, rtol=1e-5, atol=1e-5)
    assert float(f.min()) >= 0.0  # a ReLU (post-activation: the last block's; pre-act: the final one)


def test_block_outputs_scanned_under_jit():
    """block_outputs works on a scanned model under jit and matches the unrolled model's."""
    model = tiny("cifar_resnet14", zero_init_last_bn=False)
    model.eval()
    scanned = scanned_twin(model, "cifar_resnet14", width=WIDTH, zero_init_last_bn=False)
    x = images(8)
    logits, parts = nnx.jit(lambda m, x: m.block_outputs(x))(scanned, x)
    ref_logits, ref_parts = model.block_outputs(x)
    assert len(parts) == 6
    np.testing.assert_allclose(logits, ref_logits, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(logits, scanned(x), rtol=1e-5, atol=1e-5)
    for p, q in zip(parts, ref_parts):
        np.testing.assert_allclose(p["residual"], q["residual"], rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(p["shortcut"], q["shortcut"], rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(p["output"], q["output"], rtol=1e-5, atol=1e-5)
        assert len(p["responses"]) == len(q["responses"]) == 2
        for u, v in zip(p["responses"], q["responses"]):
            np.testing.assert_allclose(u, v, rtol=1e-5, atol=1e-5)
    # Every conv layer's response (stem + 2 per block), scanned under jit = unrolled.
    _, responses = nnx.jit(lambda m, x: m.conv_responses(x))(scanned, x)
    _, ref_responses = model.conv_responses(x)
    assert len(responses) == len(ref_responses) == 13
    assert scanned.conv_response_names() == model.conv_response_names()
    for u, v in zip(responses, ref_responses):
        np.testing.assert_allclose(u, v, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "name,size,options",
    [("cifar_resnet8", 8, {}), ("cifar_resnet8", 8, dict(shortcut="gated")), ("resnet50", 32, dict(shortcut="C"))],
)
def test_zero_init_last_bn(name, size, options):
    """zero_init_last_bn=True (the default) makes every residual branch output exactly zero at init
    (train mode), so each block starts as its shortcut; False does not."""
    x = images(size)
    _, parts = tiny(name, **options).block_outputs(x)
    assert all(np.all(np.asarray(p["residual"]) == 0) for p in parts)
    _, parts = tiny(name, zero_init_last_bn=False, **options).block_outputs(x)
    assert all(np.any(np.asarray(p["residual"]) != 0) for p in parts)


@pytest.mark.parametrize("name,size", [("cifar_plain8", 8), ("plain18", 32)])
def test_plain_nets_are_never_zero_initialised(name, size):
    """A plain net has no identity to fall back on: zero_init_last_bn=True leaves its last BNs alone,
    so no block output and no logit row is all zero."""
    model = tiny(name, zero_init_last_bn=True)
    bn_scales = [v for p, v in flat(model, nnx.Param).items() if p[-1] == "scale"]
    assert all(np.all(np.asarray(s[...]) == 1) for s in bn_scales)
    logits, parts = model.block_outputs(images(size))
    assert all(np.any(np.asarray(p["residual"]) != 0) for p in parts)
    assert np.all(np.any(np.asarray(logits) != 0, axis=1))


# ---------------------------------------------------------------------------------------------
# 7. BatchNorm.


def test_eval_mode_uses_running_stats():
    """In eval mode an image's logits do not depend on the rest of the batch (in train mode they do)."""
    model = tiny("cifar_resnet8", zero_init_last_bn=False)
    x, other = images(8, seed=0), images(8, seed=1)
    mixed = x.at[1:].set(other[1:] * 3 + 1)
    train_a, train_b = model(x), model(mixed)
    assert not np.allclose(train_a[0], train_b[0], atol=1e-3)
    model.eval()
    np.testing.assert_allclose(model(x)[0], model(mixed)[0], rtol=1e-6, atol=1e-6)

    bn = BatchNorm(3)
    bn.mean.set_value(jnp.array([1.0, -2.0, 0.5]))
    bn.var.set_value(jnp.array([4.0, 0.25, 1.0]))
    bn.scale.set_value(jnp.array([2.0, 1.0, -1.0]))
    bn.bias.set_value(jnp.array([0.0, 1.0, 3.0]))
    bn.use_running_average = True
    y = np.asarray(images(2, batch=2))
    expect = (y - [1.0, -2.0, 0.5]) / np.sqrt(np.array([4.0, 0.25, 1.0]) + 1e-5) * [2.0, 1.0, -1.0] + [0.0, 1.0, 3.0]
    np.testing.assert_allclose(bn(jnp.asarray(y)), expect, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(bn.mean[...], [1.0, -2.0, 0.5])  # eval mode does not update


def test_batchnorm_epsilon_is_added_to_the_variance():
    """(x - mean) / sqrt(var + eps), as PyTorch and Flax: on channels whose variance is near eps
    (1e-6 here, eps 1e-5) the epsilon dominates, so adding it after the square root shows, in
    train mode (batch statistics) and in eval mode (running ones)."""
    x = np.random.default_rng(0).normal(size=(4, 3, 3, 2)) * np.array([1e-3, 1.0])  # variances ~1e-6 and ~1
    bn = BatchNorm(2)
    np.testing.assert_allclose(bn(jnp.asarray(x, jnp.float32)), _normalise(x), rtol=1e-3, atol=1e-4)
    bn.use_running_average = True
    bn.mean.set_value(jnp.zeros(2))
    bn.var.set_value(jnp.array([1e-6, 1.0]))
    np.testing.assert_allclose(bn(jnp.asarray(x, jnp.float32)), x / np.sqrt(np.array([1e-6, 1.0]) + 1e-5), rtol=1e-4)


def _normalise(x, eps=1e-5):
    x = np.asarray(x, np.float64)
    return (x - x.mean(axis=(0, 1, 2))) / np.sqrt(x.var(axis=(0, 1, 2)) + eps)


def test_batchnorm_of_a_constant_channel_is_finite():
    """E[x^2] - E[x]^2 of a constant channel of large values rounds below zero in float32 (about
    -0.06 for 123.4, more than epsilon): the variance is clamped at zero, so no NaN comes out."""
    bn = BatchNorm(2)
    for value in (7.7, 123.4, 1000.1):
        y = np.asarray(bn(jnp.full((8, 4, 4, 2), value, jnp.float32)))
        var = np.asarray(bn.var[...])
        assert np.isfinite(y).all() and np.isfinite(var).all() and (var >= 0).all(), value


def test_batchnorm_groups():
    """Train mode with group_size=g normalises each group of g images with its own statistics; the
    model-level bn_group_size=2 equals running the model on each pair of images separately."""
    x = np.asarray(images(4, batch=8)) * np.arange(1, 9)[:, None, None, None] + np.arange(8)[:, None, None, None]
    bn = BatchNorm(3, group_size=2)
    y = np.asarray(bn(jnp.asarray(x, jnp.float32)))
    expect = np.concatenate([_normalise(x[i : i + 2]) for i in range(0, 8, 2)])
    np.testing.assert_allclose(y, expect, rtol=1e-4, atol=1e-4)
    assert not np.allclose(y, _normalise(x), atol=1e-2)
    # Running statistics: the mean of the groups' means and (biased) variances, as averaging the
    # per-GPU running statistics would give; not the whole batch's variance, which also counts the
    # spread between the group means (each image here has its own offset).
    groups = x.reshape(4, 2, *x.shape[1:])
    m = bn.momentum
    group_var = groups.var(axis=(1, 2, 3)).mean(axis=0)
    np.testing.assert_allclose(np.asarray(bn.mean[...]), (1 - m) * groups.mean(axis=(1, 2, 3)).mean(axis=0), rtol=1e-5)
    np.testing.assert_allclose(np.asarray(bn.var[...]), m + (1 - m) * group_var, rtol=1e-4)
    assert not np.allclose(np.asarray(bn.var[...]), m + (1 - m) * x.var(axis=(0, 1, 2)), rtol=1e-2)
    with pytest.raises(ValueError, match="bn_group_size"):
        BatchNorm(3, group_size=3)(jnp.asarray(x))

    grouped = tiny("cifar_resnet8", bn_group_size=2, zero_init_last_bn=False)
    whole = tiny("cifar_resnet8", zero_init_last_bn=False)
    xs = images(8)
    half = compiled(forward, whole, xs[:2])
    separate = jnp.concatenate([half(whole, xs[:2]), half(whole, xs[2:])])
    np.testing.assert_allclose(compiled(forward, grouped, xs)(grouped, xs), separate, rtol=1e-5, atol=1e-5)
    assert not np.allclose(compiled(forward, whole, xs)(whole, xs), separate, atol=1e-3)


@pytest.mark.parametrize("momentum", [0.9, 0.5])
def test_batchnorm_running_stats_update(momentum):
    """ra = momentum * ra + (1 - momentum) * batch statistic, with the biased batch variance
    (momentum 0.9 is PyTorch's 0.1); the normalisation itself uses the batch statistics."""
    rng = np.random.default_rng(0)
    x1, x2 = (rng.normal(2.0, 3.0, (4, 3, 3, 2)).astype(np.float32) for _ in range(2))
    bn = BatchNorm(2, momentum=momentum)
    np.testing.assert_allclose(bn(jnp.asarray(x1)), _normalise(x1), rtol=1e-4, atol=1e-4)
    m1 = (1 - momentum) * x1.mean(axis=(0, 1, 2))
    v1 = momentum * 1.0 + (1 - momentum) * x1.var(axis=(0, 1, 2))
    np.testing.assert_allclose(bn.mean[...], m1, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(bn.var[...], v1, rtol=1e-5, atol=1e-5)
    bn(jnp.asarray(x2))
    np.testing.assert_allclose(
        bn.mean[...], momentum * m1 + (1 - momentum) * x2.mean(axis=(0, 1, 2)), rtol=1e-5, atol=1e-5
    )
    np.testing.assert_allclose(
        bn.var[...], momentum * v1 + (1 - momentum) * x2.var(axis=(0, 1, 2)), rtol=1e-5, atol=1e-5
    )

    model = tiny("cifar_resnet8", bn_momentum=momentum, bn_epsilon=1e-3)
    bns = [m for _, m in nnx.iter_modules(model) if isinstance(m, BatchNorm)]
    assert len(bns) == 1 + 3 * 2 and all(b.momentum == momentum and b.epsilon == 1e-3 for b in bns)
    x = images(8)
    stem = np.asarray(model.conv1(x))
    model(x)
    np.testing.assert_allclose(model.bn1.mean[...], (1 - momentum) * stem.mean(axis=(0, 1, 2)), rtol=1e-5, atol=1e-6)


def test_batchnorm_float32_statistics_with_bf16_compute():
    """With bfloat16 compute, BN computes and keeps its statistics in float32 and returns bfloat16;
    a bf16 model's parameters and batch statistics stay float32 through a train-mode call."""
    x = (10.0 + jax.random.normal(jax.random.key(0), (4, 4, 4, 3))).astype(jnp.bfloat16)
    bn = BatchNorm(3, dtype=jnp.bfloat16)
    y = bn(x)
    assert y.dtype == jnp.bfloat16
    assert bn.mean[...].dtype == jnp.float32 and bn.var[...].dtype == jnp.float32
    x32 = np.asarray(x.astype(jnp.float32), np.float64)
    np.testing.assert_allclose(bn.mean[...], 0.1 * x32.mean(axis=(0, 1, 2)), rtol=1e-5)
    np.testing.assert_allclose(bn.var[...], 0.9 + 0.1 * x32.var(axis=(0, 1, 2)), rtol=1e-4)

    model = tiny("cifar_resnet8", dtype="bfloat16")
    logits = model(images(8))
    assert logits.dtype == jnp.float32
    assert all(v.dtype == jnp.float32 for v in flat(model).values())
    assert model.stages[0].blocks[0].conv1(jnp.zeros((1, 8, 8, WIDTH), jnp.bfloat16)).dtype == jnp.bfloat16


# ---------------------------------------------------------------------------------------------
# 8. Shortcuts.


def _shortcut(kind, in_ch, out_ch, stride, downsample="A", gate_bias_init=-6.0):
    return Shortcut(
        kind,
        in_ch,
        out_ch,
        stride,
        downsample=downsample,
        gate_bias_init=gate_bias_init,
        norm=BatchNorm,
        dtype=jnp.float32,
        rngs=nnx.Rngs(0),
    )


def test_option_a_shortcut():
    """Option A is parameter-free: stride-2 subsampling then zero channels appended; the identity
    where the shape is kept; and inside a CIFAR ResNet it is applied to the previous block's output."""
    x = np.arange(2 * 4 * 4 * 3, dtype=np.float32).reshape(2, 4, 4, 3)
    sc = _shortcut("A", 3, 5, 2)
    assert jax.tree.leaves(nnx.state(sc)) == []
    expect = np.concatenate([x[:, ::2, ::2, :], np.zeros((2, 2, 2, 2), np.float32)], axis=-1)
    np.testing.assert_array_equal(sc.identity(jnp.asarray(x)), expect)
    np.testing.assert_array_equal(subsample_and_pad(jnp.asarray(x), 5, 2), expect)
    np.testing.assert_array_equal(_shortcut("A", 3, 3, 1).identity(jnp.asarray(x)), x)
    np.testing.assert_array_equal(_shortcut("B", 3, 3, 1).identity(jnp.asarray(x)), x)
    assert jax.tree.leaves(nnx.state(_shortcut("B", 3, 3, 1))) == []
    assert len(jax.tree.leaves(nnx.state(_shortcut("B", 3, 5, 2), nnx.Param))) == 3  # conv kernel, bn scale/bias

    model = tiny("cifar_resnet8", zero_init_last_bn=False)
    _, parts = model.block_outputs(images(8))
    out0 = jax.nn.relu(parts[0]["shortcut"] + parts[0]["residual"])
    np.testing.assert_allclose(parts[1]["shortcut"], subsample_and_pad(out0, 2 * WIDTH, 2), rtol=1e-6)
    assert np.all(np.asarray(parts[1]["shortcut"])[..., WIDTH:] == 0)


def test_gated_and_scaled_merges():
    """Gates start nearly closed: bias = gate_bias_init (-6 by default), so g = sigmoid(-6) for a zero
    kernel; exclusive gating (1-g) s + g F, shortcut-only gating (1-g) s + F, scaling 0.5 s + 0.5 F,
    'none' F and the rest s + F."""
    rng = np.random.default_rng(0)
    x, r = (jnp.asarray(rng.normal(size=(2, 4, 4, 3)), jnp.float32) for _ in range(2))
    g = jax.nn.sigmoid(-6.0)
    for kind, expect in [
        ("gated", (1 - g) * x + g * r),
        ("shortcut_gated", (1 - g) * x + r),
        ("scaled", 0.5 * x + 0.5 * r),
        ("A", x + r),
        ("none", r),
    ]:
        sc = _shortcut(kind, 3, 3, 1)
        if kind in ("gated", "shortcut_gated"):
            np.testing.assert_array_equal(sc.gate.bias[...], np.full(3, -6.0))
            sc.gate.kernel.set_value(jnp.zeros_like(sc.gate.kernel[...]))
        s = sc.identity(x)
        assert (s is None) == (kind == "none")
        np.testing.assert_allclose(sc.merge(x, s, r), expect, rtol=1e-6, atol=1e-6, err_msg=kind)

    for init in (-6.0, -2.5):
        v = flat(tiny("cifar_resnet8", shortcut="gated", gate_bias_init=init))
        biases = [x for p, x in v.items() if p[-2:] == ("gate", "bias")]
        assert len(biases) == 3 and all(np.all(np.asarray(b[...]) == init) for b in biases)


def _block_options(**overrides) -> BlockOptions:
    defaults = dict(
        shortcut="B",
        downsample="B",
        stride_in="3x3",
        gate_bias_init=-6.0,
        zero_init_last_bn=False,
        bn_momentum=0.9,
        bn_epsilon=1e-5,
        bn_group_size=None,
        dtype=jnp.float32,
    )
    return BlockOptions(**{**defaults, **overrides})


@pytest.mark.parametrize("cls", [Bottleneck, PreActBottleneck])
def test_stride_in_places_the_stride(cls):
    """stride_in='1x1' puts a downsampling bottleneck's stride on its first 1x1 conv (paper 1, Caffe):
    the block then reads only the even-indexed pixels (the projection shortcut too); '3x3' puts it on
    the 3x3 conv (torchvision's v1.5), which also reads the odd ones."""
    x = jax.random.normal(jax.random.key(0), (2, 8, 8, 8))
    odd = jnp.zeros_like(x).at[:, 1::2].set(1.0).at[:, :, 1::2].set(1.0)  # an odd row or column
    perturbed = x + odd * jax.random.normal(jax.random.key(1), x.shape)
    for stride_in, invariant in (("1x1", True), ("3x3", False)):
        block = cls(8, 4, 2, _block_options(stride_in=stride_in), rngs=nnx.Rngs(0))
        block.eval()  # per-pixel behaviour: no batch statistics
        y = block(x)
        assert y.shape == (2, 4, 4, 16)
        assert np.allclose(y, block(perturbed), atol=1e-6) == invariant, stride_in


def test_preact_projection_reads_the_preactivated_input():
    """In a pre-activation block a projection shortcut is applied to relu(bn1(x)) (paper 2's reference
    code) and an identity shortcut to x itself; the block output is their sum with the branch, with
    no activation after the addition."""
    x = jax.random.normal(jax.random.key(0), (2, 8, 8, 4))
    block = PreActBasicBlock(4, 8, 2, _block_options(), rngs=nnx.Rngs(0))
    block.bn1.bias.set_value(jnp.full((4,), 0.3))
    block.eval()
    out, parts = block.forward(x)
    a = jax.nn.relu(block.bn1(x))
    np.testing.assert_allclose(parts["shortcut"], block.shortcut.bn(block.shortcut.conv(a)), rtol=1e-5, atol=1e-5)
    assert not np.allclose(parts["shortcut"], block.shortcut.bn(block.shortcut.conv(x)), atol=1e-3)
    np.testing.assert_allclose(out, parts["shortcut"] + parts["residual"], rtol=1e-6, atol=1e-6)

    identity = PreActBasicBlock(4, 4, 1, _block_options(), rngs=nnx.Rngs(0))
    out, parts = identity.forward(x)
    np.testing.assert_array_equal(parts["shortcut"], x)
    np.testing.assert_allclose(out, x + parts["residual"], rtol=1e-6, atol=1e-6)


def test_preact_basic_block_is_bn_relu_conv_twice():
    """Paper 2's Fig. 4(e): the branch is BN-ReLU-conv-BN-ReLU-conv with nothing after the last
    conv (so it takes negative values), added to the identity."""
    x = jax.random.normal(jax.random.key(0), (2, 8, 8, 4))
    block = PreActBasicBlock(4, 4, 1, _block_options(), rngs=nnx.Rngs(0))
    block.bn2.bias.set_value(jnp.full((4,), 0.2))
    block.eval()
    out, parts = block.forward(x)
    relu = jax.nn.relu
    r = block.conv2(relu(block.bn2(block.conv1(relu(block.bn1(x))))))
    np.testing.assert_allclose(parts["residual"], r, rtol=1e-5, atol=1e-5)
    assert float(jnp.min(parts["residual"])) < 0
    np.testing.assert_allclose(out, x + r, rtol=1e-5, atol=1e-5)


def test_preact_after_an_imagenet_stem_does_not_normalise_twice():
    """The paper's code ("no_preact"): after an ImageNet stem's conv-BN-ReLU-max-pool, the first
    pre-activation block starts with its convolution (no bn1) and its projection shortcut reads the
    stem output; every other block, and the first block after a CIFAR stem's bare conv, does
    BN-ReLU first."""
    for name in ("preact_resnet18", "preact_resnet50"):
        model = abstract(name)
        assert model.bn1 is not None and model.stages[0].blocks[0].bn1 is None, name
        assert all(b.bn1 is not None for b in model.stages[0].blocks[1:]), name
        assert all(stage.blocks[0].bn1 is not None for stage in model.stages[1:]), name
        assert not any(
            "bn1" in str(path) for path in flat(model) if path[:3] == ("stages", 0, "blocks") and path[3] == 0
        )
    cifar = abstract("cifar_preact_resnet11")
    assert cifar.bn1 is None and cifar.stages[0].blocks[0].bn1 is not None

    x = jax.random.normal(jax.random.key(1), (2, 8, 8, 4))
    block = PreActBottleneck(4, 2, 1, _block_options(), rngs=nnx.Rngs(0), preactivate=False)
    block.eval()
    out, parts = block.forward(x)
    r = block.conv3(jax.nn.relu(block.bn3(block.conv2(jax.nn.relu(block.bn2(block.conv1(x)))))))
    np.testing.assert_allclose(parts["residual"], r, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(parts["shortcut"], block.shortcut.bn(block.shortcut.conv(x)), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(out, parts["shortcut"] + r, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------------
# 9. Validation.

BAD = [
    ("vgg16", {}, r"unknown model 'vgg16'; valid names: .*resnet50.*cifar_resnet110"),
    ("cifar_resnet21", {}, r"6n\+2"),
    ("cifar_plain9", {}, r"6n\+2"),
    ("cifar_resnet2", {}, r"6n\+2 with n >= 1"),
    ("cifar_preact_resnet20x", {}, r"unknown model"),
    ("cifar_preact_resnet21", {}, r"9n\+2"),
    ("resnet19", {}, r"unknown depth 19.*\[18, 34, 50, 101, 152, 200\]"),
    ("cifar_resnet20", dict(shortcut="D"), r"shortcut='D'; valid: A, B, C, none, gated, shortcut_gated, scaled"),
    ("cifar_resnet20", dict(shortcut=""), r"shortcut=''; valid"),
    ("resnet18", dict(stride_in="1x1"), r"stride_in='1x1' needs bottleneck blocks"),
    ("cifar_resnet20", dict(stride_in="1x1"), r"stride_in='1x1' needs bottleneck blocks"),
    ("resnet50", dict(stride_in="2x2"), r"stride_in='2x2'; valid: '3x3', '1x1'"),
    ("plain18", dict(shortcut="A"), r"plain network"),
    ("cifar_plain20", dict(shortcut="B"), r"plain network"),
    ("cifar_resnet20", dict(width=0), r"width=0; must be a positive integer"),
    ("resnet18", dict(width=-8), r"width=-8"),
    ("resnet18", dict(width=2.5), r"width=2.5"),
    ("resnet18", dict(dtype="float64"), r"dtype='float64'; valid: float32, bfloat16, float16"),
    ("resnet18", dict(bn_group_size=0), r"bn_group_size=0; must be None or a positive integer"),
    ("resnet18", dict(bn_momentum=1.0), r"bn_momentum=1.0"),
    ("resnet18", dict(bn_momentum="0.9"), r"bn_momentum='0.9'"),
    ("resnet18", dict(bn_epsilon=0.0), r"bn_epsilon=0.0"),
    ("resnet18", dict(gate_bias_init="low"), r"gate_bias_init='low'"),
    ("resnet18", dict(scan_blocks="yes"), r"scan_blocks='yes'; valid: 'auto', True, False"),
    ("resnet18", dict(remat="yes"), r"remat='yes'"),
    ("resnet18", dict(zero_init_last_bn=1), r"zero_init_last_bn=1"),
    ("resnet18", dict(space_to_depth_stem=1), r"space_to_depth_stem=1; must be True or False"),
    ("cifar_resnet20", dict(space_to_depth_stem=True), r"space_to_depth_stem applies to the ImageNet stem"),
    ("resnet18", dict(depth=18), r"unknown model option\(s\) \['depth'\]; valid: .*bn_group_size"),
]


@pytest.mark.parametrize("name,options,match", BAD, ids=[f"{n}-{o}" for n, o, _ in BAD])
def test_bad_names_and_options_raise(name, options, match):
    """Bad names, depths, option values and combinations raise ValueError saying what is allowed, from
    resolve_options and create_model alike."""
    with pytest.raises(ValueError, match=match):
        resolve_options(name, **options)
    with pytest.raises(ValueError, match=match):
        abstract(name, **options)


@pytest.mark.parametrize("num_classes", [0, -1, 2.0])
def test_bad_num_classes_raises(num_classes):
    """num_classes must be a positive integer."""
    with pytest.raises(ValueError, match=r"num_classes=.*must be a positive integer"):
        abstract("cifar_resnet20", num_classes=num_classes)


@pytest.mark.parametrize("num_classes", [np.int64(7), np.int32(7)])
def test_numpy_integer_num_classes_are_accepted(num_classes):
    """A class count from a label array (``labels.max() + 1``) is a NumPy integer."""
    model = abstract("cifar_resnet8", num_classes=num_classes)
    assert model.fc.kernel.shape[-1] == 7 and type(model.fc.out_features) is int


def test_cifar_preact_projections_have_no_bn():
    """Paper 2's CIFAR code: a pre-activation bottleneck's projection is a bare 1x1 conv of the
    pre-activated input; the original (post-activation) baseline's has a BN, as paper 1's B."""

    def shortcut_params(name):
        flat = nnx.to_flat_state(nnx.state(abstract(name), nnx.Param))
        return sorted(".".join(map(str, p[5:])) for p, _ in flat if p[:5] == ("stages", 1, "blocks", 0, "shortcut"))

    assert shortcut_params("cifar_preact_resnet164") == ["conv.kernel"]
    assert shortcut_params("cifar_bottleneck_resnet164") == ["bn.bias", "bn.scale", "conv.kernel"]
    assert shortcut_params("preact_resnet50") == ["bn.bias", "bn.scale", "conv.kernel"]  # fb.resnet.torch


def test_none_means_default():
    """Passing None for an option selects its default (e.g. the family's shortcut and width)."""
    o = resolve_options("cifar_resnet20", shortcut=None, width=None, bn_group_size=None)
    assert (o["shortcut"], o["width"], o["bn_group_size"]) == ("A", 16, None)
    assert (
        resolve_options("resnet50")["shortcut"] == "B" and resolve_options("cifar_preact_resnet164")["shortcut"] == "B"
    )
    assert resolve_options("plain34")["shortcut"] == "none" and resolve_options("resnet34")["width"] == 64


def test_a_wrong_input_shape_is_named_before_the_first_convolution():
    """Found by probing the API: a single image or NCHW input failed inside the first convolution
    ("not enough values to unpack", "lhs feature dimension ... 32 // 1 != 3")."""
    model = create_model("cifar_resnet8", num_classes=10, rngs=nnx.Rngs(0))
    for shape, hint in [
        ((32, 32, 3), "a single image needs x[None]"),
        ((2, 3, 32, 32), "NCHW input needs x.transpose(0, 2, 3, 1)"),
        ((2, 32, 32, 1), ""),
        ((1, 2, 32, 32, 3), ""),
    ]:
        expected = re.escape(f"[N, H, W, 3] (NHWC), got shape {shape}") + ".*" + re.escape(hint)
        with pytest.raises(ValueError, match=expected):
            model(jnp.zeros(shape))
