"""The optimizer treats a ``scan_blocks=True`` model exactly as the unrolled one: the same weight
decay mask block by block, and the same updates (SGD, LARS with its per-block trust ratio).

Models are only built abstractly (``nnx.eval_shape``) for their parameter shapes; the weights and
gradients are random numpy arrays in the unrolled layout, stacked into the scanned one as
``scan_blocks=True`` stores them (a stage's blocks[1:] under ``scanned``, one leading axis)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
from flax import nnx

from resnet_jax.models import create_model
from resnet_jax.optim import decay_mask, make_optimizer

WIDTH = 4
MODELS = [
    ("cifar_resnet20", {}),  # 3 basic blocks a stage: 2 stacked
    ("resnet18", dict(shortcut="shortcut_gated")),  # gates: kernels and biases in every block
    ("resnet50", dict(shortcut="gated")),  # bottlenecks: 2, 3, 5, 2 stacked
    ("preact_resnet18", dict(shortcut="C")),
]


def param_shapes(name: str, scan: bool, **options) -> dict:
    """The model's parameters as a pure dict of ``jax.ShapeDtypeStruct``s (no compute)."""
    model = nnx.eval_shape(
        lambda: create_model(name, num_classes=10, rngs=nnx.Rngs(0), width=WIDTH, scan_blocks=scan, **options)
    )
    return nnx.to_pure_dict(nnx.state(model, nnx.Param))


def stacked(params: dict) -> dict:
    """Unrolled ``params`` in the scanned layout: each stage's blocks[1:] stacked under ``scanned``."""
    stages = {}
    for i, stage in params["stages"].items():
        blocks = [stage["blocks"][j] for j in sorted(stage["blocks"])]
        stages[i] = (
            {"blocks": {0: blocks[0]}, "scanned": jax.tree.map(lambda *a: jnp.stack(a), *blocks[1:])}
            if len(blocks) > 1
            else stage
        )
    return {**params, "stages": stages}


def dotted(path) -> str:
    return ".".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path)


def unrolled_leaves(tree, n_blocks: dict[str, int] | None = None) -> dict[str, object]:
    """``{unrolled dotted name: leaf}``: a stacked entry ``stages.i.scanned.x`` becomes
    ``stages.i.blocks.1.x`` .. ``stages.i.blocks.n.x``. Array leaves are split along their stacking
    axis; other leaves (mask booleans) stand for every block, ``n_blocks`` giving their count."""
    out = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        name = dotted(path)
        head, sep, rest = name.partition(".scanned.")
        if not sep:
            out[name] = leaf
            continue
        n = n_blocks[name] if n_blocks is not None else leaf.shape[0]
        for j in range(n):
            out[f"{head}.blocks.{j + 1}.{rest}"] = leaf[j] if n_blocks is None else leaf
    return out


def random_like(shapes: dict, seed: int, spread: bool = False) -> dict:
    """Random float32 arrays of ``shapes``' shapes. ``spread``: each leaf scaled by its own factor
    (so that the blocks of a stage have different parameter-to-gradient norm ratios)."""
    rng = np.random.default_rng(seed)
    return jax.tree.map(
        lambda s: (rng.standard_normal(s.shape) * (rng.uniform(0.1, 10.0) if spread else 1.0)).astype(np.float32),
        shapes,
    )


def config(optimizer: str, decay_bn_and_bias: bool, **overrides) -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.optimizer = optimizer
    c.momentum = 0.9
    c.nesterov = False
    c.weight_decay = 0.1  # large, so that decaying a BN parameter or not shows in one step
    c.decay_bn_and_bias = decay_bn_and_bias
    c.trainable = "all"
    c.update(overrides)
    return c


@pytest.mark.parametrize("decay_bn_and_bias", [False, True])
@pytest.mark.parametrize(("name", "options"), MODELS, ids=[m for m, _ in MODELS])
def test_decay_mask_scanned_equals_unrolled(name, options, decay_bn_and_bias):
    unrolled = param_shapes(name, scan=False, **options)
    scanned = param_shapes(name, scan=True, **options)
    assert jax.eval_shape(stacked, unrolled) == scanned  # the layout scan_blocks=True stores
    n_blocks = {dotted(p): s.shape[0] for p, s in jax.tree_util.tree_flatten_with_path(scanned)[0]}
    want = unrolled_leaves(decay_mask(unrolled, decay_bn_and_bias))
    got = unrolled_leaves(decay_mask(scanned, decay_bn_and_bias), n_blocks)
    assert got == want
    decayed = {n for n, m in want.items() if m}
    # Without BN/bias decay exactly the kernels (convolutions, gates, the head's) are decayed.
    assert decayed == (set(want) if decay_bn_and_bias else {n for n in want if n.endswith(".kernel")})


OPTIMIZERS = [
    ("sgd", False, {}),
    ("sgd", True, dict(nesterov=True)),
    ("lars", False, {}),
    ("lars", True, dict(nesterov=True)),
    ("lars", False, dict(trainable="head")),
    ("sgd", False, dict(trainable="head")),
]


@pytest.mark.parametrize(("name", "options"), MODELS[:3], ids=[m for m, _ in MODELS[:3]])
@pytest.mark.parametrize(
    ("optimizer", "decay_bn_and_bias", "overrides"),
    OPTIMIZERS,
    ids=[f"{o}-decay_bn_{d}-{'-'.join(f'{k}_{v}' for k, v in x.items())}" for o, d, x in OPTIMIZERS],
)
def test_update_scanned_equals_unrolled(name, options, optimizer, decay_bn_and_bias, overrides):
    """Two steps (the second with momentum) on the same weights and gradients, in both layouts."""
    shapes = param_shapes(name, scan=False, **options)
    params = random_like(shapes, seed=0)
    grads = [random_like(shapes, seed=1 + k, spread=True) for k in range(2)]
    tx = make_optimizer(config(optimizer, decay_bn_and_bias, **overrides), optax.constant_schedule(0.1))

    def run(params, grads):
        state = tx.init(params)
        out = []
        for g in grads:
            updates, state = tx.update(g, state, params)
            params = optax.apply_updates(params, updates)
            out.append(updates)
        return out

    want = run(params, grads)
    got = run(stacked(params), [stacked(g) for g in grads])
    for w, g in zip(want, got):
        w, g = unrolled_leaves(w), unrolled_leaves(g)
        assert set(g) == set(w)
        for n in w:
            np.testing.assert_allclose(g[n], w[n], rtol=1e-5, atol=1e-7, err_msg=n)


@pytest.mark.parametrize("nesterov", [False, True])
def test_lars_unrolled_is_optax_lars(nesterov):
    """On an unrolled model the LARS chain is optax.lars, BN/bias out of decay and trust ratio."""
    shapes = param_shapes("cifar_resnet20", scan=False)
    params, grads = random_like(shapes, seed=0), random_like(shapes, seed=1, spread=True)
    schedule = optax.constant_schedule(0.1)
    no_bn = lambda p: jax.tree.map(lambda a: a.ndim > 1, p)  # noqa: E731
    ref = optax.lars(
        schedule, weight_decay=0.1, weight_decay_mask=no_bn, trust_ratio_mask=no_bn, momentum=0.9, nesterov=nesterov
    )
    tx = make_optimizer(config("lars", False, nesterov=nesterov), schedule)
    want, _ = ref.update(grads, ref.init(params), params)
    got, _ = tx.update(grads, tx.init(params), params)
    jax.tree.map(lambda g, w: np.testing.assert_allclose(g, w, rtol=1e-6), got, want)


@pytest.mark.parametrize("nesterov", [False, True])
def test_sgd_is_the_papers_l2_momentum_update(nesterov):
    """Two SGD steps are PyTorch's SGD (the papers' update), written out: the L2 term joins the
    gradient before the momentum, only the kernels are decayed (``decay_bn_and_bias=False``) and
    ``nesterov`` takes the look-ahead step (the modern recipe's; a plain step otherwise)."""
    shapes = param_shapes("cifar_resnet8", scan=False)
    params = random_like(shapes, seed=0)
    grads = [random_like(shapes, seed=1 + k, spread=True) for k in range(2)]
    lr, m, wd = 0.1, 0.9, 0.1
    tx = make_optimizer(config("sgd", False, nesterov=nesterov), optax.constant_schedule(lr))
    opt_state, got, want = tx.init(params), params, params
    trace = jax.tree.map(np.zeros_like, params)
    kernel = jax.tree.map(lambda a: a.ndim > 1, params)
    for g in grads:
        updates, opt_state = tx.update(g, opt_state, got)
        got = optax.apply_updates(got, updates)
        d = jax.tree.map(lambda gi, w, k: gi + (wd * w if k else 0.0), g, want, kernel)
        trace = jax.tree.map(lambda v, di: m * v + di, trace, d)
        step = jax.tree.map(lambda v, di: di + m * v, trace, d) if nesterov else trace
        want = jax.tree.map(lambda w, s: w - lr * s, want, step)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), got, want)
