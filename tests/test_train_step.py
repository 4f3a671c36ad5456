"""The pure train step in-process: an update, the non-finite guard (skipping or stopping), and the
finiteness checks."""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from cli_env import XLA_CPU_DEFAULTS
from flax import nnx

from resnet_jax import train
from resnet_jax.errors import UserError
from resnet_jax.models import create_model
from resnet_jax.train import all_finite, guard_options, state_finite, train_step

NUM_CLASSES = 10


# The two ways the step can skip a bad update (GPU: select with one fused check; CPU: lax.cond
# with checks by leaf size); every skipping test runs both.
GUARDS = [guard_options(False, "gpu"), guard_options(False, "cpu")]
guards = pytest.mark.parametrize("guard", GUARDS, ids=["select_fused", "cond_by_size"])
# The default: the run stops at a bad step, which the step only flags.
STOP = {"skip_nonfinite": False, "fuse_below": 2**16}


def tiny_model(eval_mode: bool = False):
    """A width-4 cifar_resnet8, its graphdef and ``{"params", "batch_stats"}`` as pure dicts (as the
    Trainer keeps them)."""
    model = create_model("cifar_resnet8", num_classes=NUM_CLASSES, width=4, rngs=nnx.Rngs(0))
    if eval_mode:
        model.eval()
    graphdef, params, batch_stats = nnx.split(model, nnx.Param, nnx.BatchStat)
    return model, graphdef, {"params": nnx.to_pure_dict(params), "batch_stats": nnx.to_pure_dict(batch_stats)}


def make_step(tx, guard, compiler_options=None, schedule=None):
    _, graphdef, weights = tiny_model()
    state = {
        **weights,
        "opt_state": tx.init(weights["params"]),
        "step": jnp.zeros((), jnp.int32),
        "nonfinite": jnp.zeros((), jnp.int32),
    }
    step = functools.partial(
        train_step,
        graphdef=graphdef,
        tx=tx,
        schedule=schedule or optax.constant_schedule(0.1),
        num_classes=NUM_CLASSES,
        label_smoothing=0.0,
        **guard,
    )
    return jax.jit(step, compiler_options=compiler_options), state


def batch(nan: bool = False):
    rng = np.random.default_rng(0)
    image = rng.normal(size=(4, 8, 8, 3)).astype(np.float32)
    if nan:
        image[1, 2, 3, 0] = np.nan
    return {"image": jnp.asarray(image), "label": jnp.asarray(rng.integers(0, NUM_CLASSES, 4), jnp.int32)}


def host(tree):
    return jax.tree.map(np.asarray, tree)


def assert_same(a, b):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_array_equal(x, y)


@guards
def test_a_good_step_updates_all_but_the_zero_initialised_branches(guard):
    """Every BatchNorm statistic moves, and every parameter with a gradient: the stem, the fc
    layer and each block's last BN (zero_init_last_bn: scale 0, yet a non-zero gradient). The
    rest of each residual branch (conv1, bn1, conv2) gets exactly zero gradient through that zero
    scale on the first step, so it and its momentum stay as they were."""
    step, state = make_step(optax.sgd(0.1, momentum=0.9), guard)
    before = host(state)
    new, metrics = step(state, batch())
    assert bool(metrics["finite"]) and bool(metrics["params_finite"])
    assert int(new["step"]) == 1 and int(new["nonfinite"]) == 0
    after = host({k: new[k] for k in ("params", "batch_stats", "opt_state")})
    blocks = [f"['stages'][{i}]['blocks'][0]" for i in range(3)]  # cifar_resnet8: 3 stages of 1 block
    assert not any(np.any(s["blocks"][0]["bn2"]["scale"]) for s in before["params"]["stages"].values())
    with_grad = {"['conv1']['kernel']", "['bn1']['scale']", "['bn1']['bias']", "['fc']['kernel']", "['fc']['bias']"}
    with_grad |= {f"{b}['bn2']['{k}']" for b in blocks for k in ("scale", "bias")}

    def changed(a, b):
        fa, fb = (jax.tree_util.tree_flatten_with_path(t)[0] for t in (a, b))
        return {jax.tree_util.keystr(p) for (p, x), (_, y) in zip(fa, fb, strict=True) if not np.array_equal(x, y)}

    assert changed(before["params"], after["params"]) == with_grad
    assert changed(before["opt_state"], after["opt_state"]) == {f"[0].trace{p}" for p in with_grad}
    stats = {jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(before["batch_stats"])[0]}
    assert len(stats) == 2 * (1 + 2 * 3) and changed(before["batch_stats"], after["batch_stats"]) == stats


@guards
def test_a_non_finite_batch_leaves_the_state_unchanged(guard):
    step, state = make_step(optax.sgd(0.1, momentum=0.9), guard)
    state, _ = step(state, batch())  # a non-zero momentum, so "unchanged" is not trivially zero
    before = host(state)
    new, metrics = step(state, batch(nan=True))
    assert not bool(metrics["finite"]) and bool(metrics["params_finite"])
    assert int(new["step"]) == 2 and int(new["nonfinite"]) == 1
    for key in ("params", "batch_stats", "opt_state"):
        assert_same(before[key], host(new[key]))


@guards
def test_a_skipped_step_keeps_the_schedule_at_the_runs_step(guard):
    """A skipped step keeps the momentum but counts in the optimizer's schedule: after a NaN
    batch and two good ones, the optimizer's step count is the run's (3), so the rate applied at
    the third step is the schedule's at step 2, as train/lr says."""
    schedule = optax.piecewise_constant_schedule(0.1, {2: 0.1})  # 0.1 at steps 0-1, then 0.01
    step, state = make_step(optax.sgd(schedule, momentum=0.9), guard, schedule=schedule)
    lrs = []
    for nan in (True, False, False):
        state, metrics = step(state, batch(nan=nan))
        lrs.append(float(metrics["train/lr"]))
    counts = [int(x) for p, x in jax.tree_util.tree_flatten_with_path(state["opt_state"])[0] if "count" in str(p)]
    assert counts == [int(state["step"])] == [3] and int(state["nonfinite"]) == 1
    assert lrs == pytest.approx([0.1, 0.1, 0.01])  # the schedule at the step taken: 0, 1, 2


@guards
def test_an_overflowing_update_is_flagged(guard):
    # Each scale alone keeps a gradient finite; both together overflow float32 for any |g| > 4e-38.
    step, state = make_step(optax.chain(optax.scale(1e38), optax.scale(1e38)), guard)
    _, metrics = step(state, batch())
    assert bool(metrics["finite"]) and not bool(metrics["params_finite"])


@pytest.mark.parametrize("where", ["large", "small"])
@pytest.mark.parametrize("bad", [None, np.nan, np.inf, -np.inf])
def test_every_way_of_checking_agrees(bad, where):
    rng = np.random.default_rng(1)
    tree = {"a": rng.normal(size=(3, 4)).astype(np.float32), "b": [rng.normal(size=(5,)), np.ones((2, 2), np.int32)]}
    if bad is not None:
        (tree["a"] if where == "large" else tree["b"][0])[1] = bad
    # all concatenated, one by one, and split by size (12 elements checked alone, 5 and 4 together)
    results = [bool(all_finite(tree, fuse_below=f)) for f in (math.inf, 0, 10)]
    assert results == [bad is None] * 3
    assert bool(all_finite({})) and bool(all_finite({}, fuse_below=0))


def test_both_guards_compute_the_same_step():
    results = []
    for guard in GUARDS:
        step, state = make_step(optax.sgd(0.1, momentum=0.9), guard)
        for nan in (False, True, False):
            state, metrics = step(state, batch(nan=nan))
        results.append(host(state))
    for x, y in zip(jax.tree.leaves(results[0]), jax.tree.leaves(results[1]), strict=True):
        np.testing.assert_allclose(x, y, rtol=1e-6, atol=1e-7)
    assert int(results[0]["nonfinite"]) == 1


def test_a_stopping_step_is_the_skipping_step_on_good_batches():
    """Without a skip to prepare, the default step computes what the guarded step does."""
    results = []
    for guard in (STOP, GUARDS[1]):
        step, state = make_step(optax.sgd(0.1, momentum=0.9), guard)
        for _ in range(2):
            state, metrics = step(state, batch())
        assert bool(metrics["finite"])
        results.append(host(state))
    for x, y in zip(jax.tree.leaves(results[0]), jax.tree.leaves(results[1]), strict=True):
        np.testing.assert_allclose(x, y, rtol=1e-6, atol=1e-7)  # (fused differently: last-bit differences)


def test_a_stopping_step_flags_a_non_finite_batch():
    step, state = make_step(optax.sgd(0.1, momentum=0.9), STOP)
    new, metrics = step(state, batch(nan=True))
    assert not bool(metrics["finite"]) and "params_finite" not in metrics
    assert int(new["nonfinite"]) == 1
    assert not bool(state_finite(new))  # nothing was kept: the caller must stop


def test_an_overflow_shows_in_the_state_check_then_in_the_next_loss():
    """The stopping step checks no parameters: an update that overflows them passes its own step
    (finite loss), fails ``state_finite`` (checked before any save) and the next step's loss."""
    step, state = make_step(optax.chain(optax.scale(1e38), optax.scale(1e38)), STOP)
    assert bool(state_finite(state))
    state, metrics = step(state, batch())
    assert bool(metrics["finite"]) and not bool(state_finite(state))
    _, metrics = step(state, batch())
    assert not bool(metrics["finite"])


def test_the_loop_never_saves_an_overflowed_state(tmp_path, monkeypatch):
    """An update that overflows the parameters at step 1, a checkpoint due at step 1: the run stops
    with the one-line error before saving (without the state check it would save step 1, whose
    own loss is finite)."""
    from resnet_jax.config import get_base_config

    monkeypatch.setattr(
        train, "make_optimizer", lambda config, schedule: optax.chain(optax.scale(1e38), optax.scale(1e38))
    )
    c = get_base_config()
    c.dataset.name, c.model.name, c.model.width = "digits", "cifar_resnet8", 4
    c.batch_size, c.num_steps, c.checkpoint_every_steps, c.log_every_steps, c.progress_bar = 16, 3, 1, 1, False
    with pytest.raises(UserError, match=r"non-finite parameters or optimizer state at step 1; no checkpoint was saved"):
        train.train_and_evaluate(c, str(tmp_path))
    assert not (tmp_path / "checkpoints").exists() or not list((tmp_path / "checkpoints").iterdir())


def _ynn_fusions(jitted, *args) -> int:
    return jitted.lower(*args).compile().as_text().count('"kind":"__ynn_fusion"')


def test_cpu_compiler_options_compute_the_same_step():
    """The Trainer's XLA:CPU options (YNNPACK elementwise and reduce fusions) change how XLA
    compiles the step, not what it computes: three steps agree with the default compilation to
    float rounding."""
    options = train.compiler_options("cpu")
    assert options == train.CPU_COMPILER_OPTIONS, "this jaxlib should accept the CPU options"
    tx = optax.sgd(0.1, momentum=0.9)
    default, state = make_step(tx, STOP)
    tuned, _ = make_step(tx, STOP, compiler_options=options)
    # (How many fusions go to YNNPACK depends on the sizes: fewer here, for a tiny net, than XLA's
    # defaults make; more for a real one, e.g. 235 against 143 for cifar_resnet20 at batch 32.)
    assert _ynn_fusions(tuned, state, batch()) != _ynn_fusions(default, state, batch()), "the options did nothing"
    states = {}
    for name, step in [("default", default), ("tuned", tuned)]:
        s, losses = jax.tree.map(jnp.copy, state), []
        for _ in range(3):
            s, m = step(s, batch())
            losses.append(float(m["train/loss"]))
        states[name] = (s, losses)
    np.testing.assert_allclose(states["tuned"][1], states["default"][1], rtol=1e-5)
    for a, b in zip(jax.tree.leaves(states["tuned"][0]), jax.tree.leaves(states["default"][0])):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


def test_compiler_options_per_backend(monkeypatch):
    """Only the CPU gets options, and only those this jaxlib accepts: an unknown option (a newer or
    older jaxlib) falls back to XLA's defaults instead of failing every compile."""
    assert train.compiler_options("gpu") == {} and train.compiler_options("tpu") == {}
    monkeypatch.setattr(train, "CPU_COMPILER_OPTIONS", {"xla_cpu_no_such_option_anywhere": True})
    assert train.compiler_options("cpu") == {}


def tiny_trainer(num_examples: int | None = None, label_smoothing: float = 0.0) -> train.Trainer:
    """A Trainer of a width-4 cifar_resnet8 on 8x8 synthetic images, batch 8."""
    from resnet_jax.config import get_base_config

    config = get_base_config()
    config.model.name, config.model.width, config.batch_size = "cifar_resnet8", 4, 8
    config.dataset.name, config.dataset.image_size, config.dataset.num_classes = "synthetic", 8, 10
    config.dataset.num_examples = num_examples or config.dataset.num_examples
    config.label_smoothing = label_smoothing
    return train.Trainer.for_config(config)


def first_batch_by_hand(trainer: train.Trainer):
    """The Trainer's initial state, its first training batch, and that batch's train-mode logits
    computed outside the step, from the same network and weights."""
    from resnet_jax import data

    state = trainer.init_state()
    batch = next(data.train_batches(trainer.config.dataset, global_batch_size=trainer.config.batch_size, seed=0))
    model = nnx.merge(trainer.graphdef_train, state["params"], state["batch_stats"], copy=True)
    logits = np.asarray(model(data.model_input(jnp.asarray(batch["image"]), trainer.info.pixels)))
    return state, batch, logits


def one_step_metrics(trainer: train.Trainer, state, batch) -> dict:
    """The metrics of ``trainer.train_step`` on ``batch``, placed as the training loop places it."""
    from resnet_jax import data

    batches = data.prefetch(iter([batch]), trainer.batch_sharding)
    _, metrics = trainer.train_step(state, next(batches))
    batches.close()
    return metrics


def test_the_trainers_loss_is_the_batch_mean_of_the_configured_cross_entropy():
    """train/loss (the loss the gradient is taken of) is the mean over the global batch of the
    cross-entropy against labels smoothed by config.label_smoothing, computed here by hand from
    the same network in training mode (batch statistics)."""
    losses = {}
    for smoothing in (0.0, 0.1):
        trainer = tiny_trainer(num_examples=40, label_smoothing=smoothing)
        state, batch, logits = first_batch_by_hand(trainer)
        targets = (1 - smoothing) * jax.nn.one_hot(batch["label"], 10) + smoothing / 10
        want = float(jnp.mean(-jnp.sum(targets * jax.nn.log_softmax(logits), axis=-1)))
        losses[smoothing] = float(one_step_metrics(trainer, state, batch)["train/loss"])
        assert losses[smoothing] == pytest.approx(want, rel=1e-5), smoothing
    assert abs(losses[0.1] - losses[0.0]) > 1e-3


def test_a_loop_of_ones_own_as_the_trainer_docstring_writes_it():
    """Trainer.for_config, init_state, train_step over prefetched batches, evaluate and network:
    a network taken out between steps survives the next (donating) step, and its predictions are
    the ones evaluate counts."""
    from resnet_jax import data

    trainer = tiny_trainer(num_examples=40)
    config = trainer.config
    state = trainer.init_state()
    batches = data.prefetch(
        data.train_batches(config.dataset, global_batch_size=config.batch_size, seed=0), trainer.batch_sharding
    )
    state, metrics = trainer.train_step(state, next(batches))
    early = trainer.network(state)
    for _ in range(2):
        state, metrics = trainer.train_step(state, next(batches))
    batches.close()
    assert int(state["step"]) == 3 and np.isfinite(float(metrics["train/loss"]))
    x = np.random.default_rng(0).normal(size=(2, 8, 8, 3)).astype(np.float32)
    assert np.all(np.isfinite(early(x)))  # its arrays were not donated away
    model = trainer.network(state)
    assert not np.allclose(early(x), model(x))  # two steps apart
    correct = count = 0
    for batch in data.eval_batches(config.dataset, global_batch_size=config.batch_size):
        logits = model(data.model_input(batch["image"], trainer.info.pixels))
        correct += int(np.sum((np.argmax(logits, -1) == batch["label"]) * batch["mask"]))
        count += int(np.sum(batch["mask"]))
    result = trainer.evaluate(state)
    assert count == trainer.info.num_eval
    assert result["eval/top1_acc"] == pytest.approx(correct / count)


def test_the_trainer_compiles_its_steps_with_the_options(monkeypatch):
    """Trainer.train_step and eval_step are jitted with compiler_options() (what the options do is
    checked by test_cpu_compiler_options_compute_the_same_step): an option this jaxlib does not
    know, returned by compiler_options(), makes both compiles fail with XLA's error naming it."""
    from resnet_jax import data

    monkeypatch.setattr(train, "compiler_options", lambda backend=None: {"xla_cpu_no_such_option_anywhere": True})
    trainer = tiny_trainer()
    state = trainer.abstract_state  # lowering needs shapes only
    b = data.synthetic_global_batch(trainer.config.dataset, 8, trainer.batch_sharding, seed=0)
    mask = jnp.ones((8,))
    for jitted, args in [
        (trainer.train_step, (state, b)),
        (trainer.eval_step, (state, dict(b, mask=mask), train.zero_eval_sums())),
    ]:
        lowered = jitted.lower(*args)
        with pytest.raises(jax.errors.JaxRuntimeError, match="xla_cpu_no_such_option_anywhere"):
            lowered.compile()


def test_the_initialisation_is_compiled_light_to_the_same_values(monkeypatch):
    """Trainer.init_state compiles with init_compiler_options() (LLVM -O1 on the CPU, for compile
    time): its state is bit for bit the one that XLA's default -O3 computes (and the one of this
    test process's flags, tests/conftest.py), and the options do reach that compile (an option
    this jaxlib does not know makes it fail)."""
    assert train.init_compiler_options("cpu") == train.CPU_INIT_COMPILER_OPTIONS
    assert train.init_compiler_options("gpu") == {}
    trainer = tiny_trainer()
    here = trainer.init_state()
    lowered = jax.jit(trainer._init, out_shardings=trainer.state_shardings).lower()
    light = lowered.compile(compiler_options={**XLA_CPU_DEFAULTS, **train.CPU_INIT_COMPILER_OPTIONS})()
    default = lowered.compile(compiler_options=XLA_CPU_DEFAULTS)()
    assert jax.tree.structure(light) == jax.tree.structure(default) == jax.tree.structure(here)
    for a, b, c in zip(jax.tree.leaves(light), jax.tree.leaves(default), jax.tree.leaves(here)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
        np.testing.assert_array_equal(np.asarray(c), np.asarray(b))
    monkeypatch.setattr(train, "init_compiler_options", lambda: {"xla_cpu_no_such_option_anywhere": True})
    with pytest.raises(jax.errors.JaxRuntimeError, match="xla_cpu_no_such_option_anywhere"):
        trainer.init_state()


@pytest.mark.parametrize("crops", [1, 10])
def test_eval_step_counts_the_unmasked_rows_top1_top5_and_averages_the_crops_softmax(crops):
    """eval_step's sums, by hand: only rows with mask 1 count (the last batch's padding is masked
    out even where the network predicts its label); top-5 is a hit for a label ranked 5th, not
    6th; multi-crop images are scored by the mean of the crops' softmax (paper 1's 10-crop test),
    not by one crop."""
    model, graphdef, state = tiny_model(eval_mode=True)
    shape = (4, crops, 8, 8, 3) if crops > 1 else (4, 8, 8, 3)
    images = jax.random.normal(jax.random.key(3), shape) * 2.0
    flat = images.reshape((-1, 8, 8, 3))
    probs = jax.nn.softmax(model(flat)).reshape(4, crops, NUM_CLASSES).mean(1)
    rank = np.argsort(-np.asarray(probs), axis=1)  # classes from the most to the least likely
    # Rows 0-2 count: labels ranked 5th (a top-5 hit only), 1st (both) and 6th (neither); row 3
    # is padding whose label the network ranks first.
    labels = jnp.asarray([rank[0, 4], rank[1, 0], rank[2, 5], rank[3, 0]], jnp.int32)
    mask = jnp.asarray([1, 1, 1, 0], jnp.float32)
    step = jax.jit(functools.partial(train.eval_step, graphdef=graphdef, num_classes=NUM_CLASSES))
    sums = step(state, {"image": images, "label": labels, "mask": mask}, train.zero_eval_sums())
    assert (float(sums["count"]), float(sums["top1"]), float(sums["top5"])) == (3.0, 1.0, 2.0)
    want_loss = -np.log(np.asarray(probs)[np.arange(3), np.asarray(labels)[:3]]).sum()
    assert float(sums["loss"]) == pytest.approx(want_loss, rel=1e-4)
    if crops > 1:  # the centre crop alone gives another loss
        centre = jax.nn.softmax(model(images[:, 4]))
        assert abs(-np.log(np.asarray(centre)[np.arange(3), np.asarray(labels)[:3]]).sum() - want_loss) > 1e-3


def test_train_top1_is_the_argmax_accuracy_of_the_steps_logits():
    """train/top1_acc is the share of the batch whose argmax over the train-mode logits (the
    ones the loss is taken of) is the label; labels chosen so that it is 6 of 8 here."""
    trainer = tiny_trainer(num_examples=40)
    state, batch, logits = first_batch_by_hand(trainer)
    ranked = np.argsort(-logits, axis=1)
    batch["label"] = np.where(np.arange(8) < 6, ranked[:, 0], ranked[:, 1]).astype(batch["label"].dtype)
    assert float(one_step_metrics(trainer, state, batch)["train/top1_acc"]) == pytest.approx(6 / 8)


def test_batches_split_over_the_data_axis_and_shard_params_splits_the_largest_axis():
    """The Trainer's batches are split over the mesh's ``data`` axis (each device a slice of the
    global batch); with shard_params a parameter is split along its largest divisible axis (a
    scalar stays replicated), and without it every parameter is replicated. (One device here: the
    replication of a shape no axis of which divides the device count is not reachable.)"""
    from jax.sharding import PartitionSpec as P

    trainer = tiny_trainer()
    assert trainer.batch_sharding.spec == P("data") and trainer.replicated.spec == P()
    mesh = trainer.mesh
    assert train.param_sharding(mesh, (3, 3, 16, 64), True).spec == P(None, None, None, "data")
    assert train.param_sharding(mesh, (3, 3, 16, 64), False).spec == P()
    assert train.param_sharding(mesh, (), True).spec == P()
