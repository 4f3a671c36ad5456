"""Training and evaluation of any model of the zoo on any number of devices and hosts.

A library (``train_and_evaluate(config, workdir)``) with a thin entry point::

  python -m resnet_jax.train --config=experiments/digits.py --workdir=/tmp/digits \
      [--config.model.name=cifar_resnet56 ...] [--fresh]

Design: the train state is a pytree of plain dicts ``{"params", "batch_stats", "opt_state", "step",
"nonfinite"}`` created directly sharded (``jit`` with ``out_shardings``); one pure
``train_step(state, batch) -> (state, metrics)`` is jitted once over a ``Mesh`` of all devices with
the batch split over the ``data`` axis and the state donated. BatchNorm statistics under a
sharded batch are global (synchronised) unless ``model.bn_group_size`` is set. All randomness of
the input is a function of (seed, step) (for the TFDS datasets, of the number of processes too),
so a resumed run continues exactly where it stopped.
"""

from __future__ import annotations

if __name__ == "__main__":
    # `python -m resnet_jax.train`: the command line is parsed and checked (config file, overrides,
    # required flags) before JAX, Flax and Orbax are imported below, so a typo gets its one-line
    # error in a quarter of a second instead of four. The run imports this module again by name
    # (resnet_jax.cli), and app.run exits, so nothing after this block runs as __main__.
    from resnet_jax.cli import train_main

    train_main()

import dataclasses
import functools
import logging
import math
import signal
import threading
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from resnet_jax import data, warm_start
from resnet_jax.checkpointing import (
    Checkpointer,
    abstract_with_shardings,
    has_checkpoints,
    resolve_step,
    restore_problem,
)
from resnet_jax.cli import check_config
from resnet_jax.config import model_options
from resnet_jax.errors import UserError
from resnet_jax.logbook import Logbook, plot_curves
from resnet_jax.models import create_model
from resnet_jax.optim import make_optimizer
from resnet_jax.schedules import Durations, is_time, learning_rate_schedule
from resnet_jax.workdir import Workdir, read_run_info

log = logging.getLogger("resnet_jax")


def build_model(config, num_classes: int, seed: int = 0) -> nnx.Module:
    """The configured model, with errors turned into a one-line ``UserError``."""
    try:
        return create_model(config.model.name, num_classes=num_classes, rngs=nnx.Rngs(seed), **model_options(config))
    except ValueError as e:
        raise UserError(str(e)) from None


def cross_entropy(logits, labels, num_classes: int, label_smoothing: float = 0.0):
    onehot = (
        optax.smooth_labels(jax.nn.one_hot(labels, num_classes), label_smoothing)
        if label_smoothing
        else jax.nn.one_hot(labels, num_classes)
    )
    return optax.softmax_cross_entropy(logits, onehot)


def all_finite(tree, fuse_below: float = math.inf) -> jax.Array:
    """Whether every element of every leaf is finite.

    Leaves of fewer than ``fuse_below`` elements are checked by one reduction over their
    concatenation, larger ones one by one. Each check is a kernel; the concatenation of a large
    leaf is a copy of it. GPU/TPU (``inf``): launches are what costs (per-leaf checks made
    cifar_resnet56 0.65x the Flax Linen reference on an H100). CPU (``2**16``): the concatenated
    check of resnet18's 11M parameters cost 3% of a step, one check per leaf of cifar_resnet56's
    170 small ones 1.5-3% (2 cores, measured). Sharded leaves (``shard_params``, ``0``) are never
    concatenated: that would gather them.
    """
    leaves = jax.tree.leaves(tree)
    small = [jnp.ravel(x).astype(jnp.float32) for x in leaves if x.size < fuse_below]
    checks = [jnp.all(jnp.isfinite(x)) for x in leaves if x.size >= fuse_below]
    if small:
        checks.append(jnp.all(jnp.isfinite(jnp.concatenate(small))))
    return jnp.all(jnp.array(checks)) if checks else jnp.array(True)


def loss_and_grads(state, batch, *, graphdef, num_classes, label_smoothing, pixels=None):
    """The training forward and backward pass: ``(loss, logits, new batch_stats, grads)``.

    ``pixels``: the dataset's ``DatasetInfo.pixels``, with which uint8 images are normalised here
    (``data.model_input``)."""
    images = data.model_input(batch["image"], pixels)

    def loss_fn(params):
        model = nnx.merge(graphdef, params, state["batch_stats"], copy=True)
        logits = model(images)
        loss = cross_entropy(logits, batch["label"], num_classes, label_smoothing).mean()
        return loss, (logits, nnx.to_pure_dict(nnx.state(model, nnx.BatchStat)))

    (loss, (logits, batch_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state["params"])
    return loss, logits, batch_stats, grads


# XLA:CPU options for the train and eval steps: YNNPACK also runs the elementwise and reduce
# fusions. Why: XLA:CPU computes a convolution's weight gradient from transposed copies of its
# input and output gradient. By default it fuses into each transpose a recomputation of the
# BatchNorm-ReLU-residual chain that produced that input (up to 9 BatchNorms per element in a
# stage of 9 blocks), evaluated in transposed order: 40% of a cifar_resnet56 step. With YNNPACK
# fusions the chain's values are materialised once and the transposes are plain copies: 3.9x the
# speed of that step and 3.2x of resnet18's on a 2-core AVX2 CPU, at the cost of more temporary
# memory (795 -> 1,305 MiB for cifar_resnet56 b128; benchmarks/RESULTS.md, section 2d).
CPU_COMPILER_OPTIONS = {
    "xla_cpu_experimental_ynn_fusion_type": "LIBRARY_FUSION_TYPE_ELTWISE,LIBRARY_FUSION_TYPE_REDUCE"
}


# XLA:CPU options for the state's initialisation: LLVM's lightest optimisation. Why: the
# initialisers' random-number kernels (threefry, the normal's inverse error function) take LLVM's
# default -O3 10-15 s to compile for any ResNet on a 2-core CPU, against 2-3 s at -O1, for a
# program that runs once, in well under a second either way. The values are bit-identical
# (tests/test_train_step.py checks it); every training run and Trainer starts that much sooner.
CPU_INIT_COMPILER_OPTIONS = {"xla_backend_optimization_level": 1}


@functools.cache
def _compiles_with(options: tuple) -> bool:
    try:
        jax.jit(lambda x: jnp.sum(x * 2.0)).lower(jnp.ones(4)).compile(compiler_options=dict(options))
    except jax.errors.JaxRuntimeError:  # a jaxlib that does not know an option
        return False
    return True


def _cpu_only(options: dict, backend: str | None) -> dict:
    if (backend or jax.default_backend()) != "cpu" or not _compiles_with(tuple(options.items())):
        return {}
    return dict(options)


def compiler_options(backend: str | None = None) -> dict:
    """XLA compiler options for the jitted steps on this backend: ``CPU_COMPILER_OPTIONS`` on the
    CPU where this jaxlib accepts them, none elsewhere."""
    return _cpu_only(CPU_COMPILER_OPTIONS, backend)


def init_compiler_options(backend: str | None = None) -> dict:
    """XLA compiler options for the jitted initialisation: ``CPU_INIT_COMPILER_OPTIONS`` on the
    CPU where this jaxlib accepts them, none elsewhere."""
    return _cpu_only(CPU_INIT_COMPILER_OPTIONS, backend)


def guard_options(shard_params: bool, backend: str | None = None) -> dict:
    """How ``train_step`` checks and skips non-finite steps on this backend (measured).

    GPU/TPU: one fused finiteness check and a select inside the update (a conditional would stall
    the stream on its predicate). CPU: checks by leaf size (see ``all_finite``) and the update
    under ``lax.cond`` (the select added a pass over the parameters and momentum: 3.69 -> 3.54 GB
    per resnet18 step, Linen 3.41). Sharded parameters: one check per leaf.
    """
    cpu = (backend or jax.default_backend()) == "cpu"
    fuse_below = 0 if shard_params else 2**16 if cpu else math.inf
    return {"fuse_below": fuse_below, "skip_by_cond": cpu}


def train_step(
    state,
    batch,
    *,
    graphdef,
    tx,
    schedule,
    num_classes,
    label_smoothing,
    pixels=None,
    skip_nonfinite=True,
    fuse_below=math.inf,
    skip_by_cond=False,
):
    """One SGD step. Pure: ``(state, batch) -> (state, metrics)``.

    ``metrics["finite"]`` is false for a step whose loss or new BatchNorm statistics (and, with
    ``skip_nonfinite``, gradients) are not finite; such steps are counted in ``state["nonfinite"]``.

    * ``skip_nonfinite`` (``config.skip_nonfinite``): a bad step leaves the state unchanged and
      training goes on. A finite update that overflows the parameters (an absurd learning rate)
      cannot be skipped so: it is flagged in ``metrics["params_finite"]`` and the host stops.
      How a step is skipped (``guard_options`` picks per backend; the result is the same):
      ``skip_by_cond`` runs the optimizer update under ``lax.cond``, else a select inside the
      update's elementwise pass keeps the old values.
    * otherwise the run stops at the first bad step and the step only flags it: its new state is
      whatever the update made of it. Non-finite gradients or parameters show in the next step's
      loss (NaN and inf pass through the update and the forward pass), and the caller checks the
      whole state with ``state_finite`` before it saves or evaluates it, as the training loop does.
      The step then does no more work than an unguarded one: no pass over the gradients or
      parameters, and no update waiting for a check.

    ``fuse_below``: see ``all_finite``.
    """
    loss, logits, batch_stats, grads = loss_and_grads(
        state, batch, graphdef=graphdef, num_classes=num_classes, label_smoothing=label_smoothing, pixels=pixels
    )
    finite = jnp.isfinite(loss) & all_finite(batch_stats, fuse_below)

    def update(grads, opt_state, params):
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state

    checks = {}
    if not skip_nonfinite:
        params, opt_state = update(grads, state["opt_state"], state["params"])
    else:
        # Decided before the update, so that skipping costs no second pass over the state.
        # Checking the new parameters first and selecting after needed one, plus a live copy of
        # the old state (measured: ~2x the fused kernels and 1-5% of the step on CPU).
        finite = finite & all_finite(grads, fuse_below)

        def select(new, old):
            return jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)

        def keep(grads, opt_state, params):
            return params, _counted(opt_state)

        if skip_by_cond:
            params, opt_state = jax.lax.cond(finite, update, keep, grads, state["opt_state"], state["params"])
        else:
            new = update(grads, state["opt_state"], state["params"])
            params, opt_state = select(new, (state["params"], _counted(state["opt_state"])))
        batch_stats = select(batch_stats, state["batch_stats"])
        checks["params_finite"] = all_finite(params, fuse_below)
    new = {"params": params, "batch_stats": batch_stats, "opt_state": opt_state}
    new.update(step=state["step"] + 1, nonfinite=state["nonfinite"] + (~finite).astype(jnp.int32))
    metrics = {
        "train/loss": loss,
        "train/top1_acc": jnp.mean(jnp.argmax(logits, -1) == batch["label"]),
        "train/lr": schedule(state["step"]),
        "finite": finite,
        **checks,
    }
    return new, metrics


def _counted(opt_state):
    """``opt_state`` with optax's step counts (its ``count`` fields) one further: a skipped step
    keeps the moments, but the learning-rate schedule stays at the run's step (``train/lr``,
    ``Durations``' boundaries) instead of falling one step behind for each skip."""
    return jax.tree_util.tree_map_with_path(
        lambda path, x: x + 1 if getattr(path[-1], "name", None) == "count" else x, opt_state
    )


def _replace(tree, loaded: dict):
    """``tree`` with the leaves named in ``loaded`` (``warm_start.dotted`` names) replaced."""
    leaves, treedef = jax.tree_util.tree_flatten_with_path(tree)
    return jax.tree_util.tree_unflatten(treedef, [loaded.get(warm_start.dotted(p), v) for p, v in leaves])


def state_finite(state, fuse_below: float = math.inf) -> jax.Array:
    """Whether a train state holds only finite values (jit it; see ``train_step``)."""
    return all_finite({k: state[k] for k in ("params", "batch_stats", "opt_state")}, fuse_below)


EVAL_SUMS = ("loss", "top1", "top5", "count")


def zero_eval_sums() -> dict[str, np.ndarray]:
    """The ``totals`` an eval pass starts from (see ``eval_step``)."""
    return {k: np.zeros((), np.float32) for k in EVAL_SUMS}


def eval_step(state, batch, totals, *, graphdef, num_classes, pixels=None):
    """``totals`` plus this batch's sums of loss and top-1/top-5 hits over the unmasked examples.
    Multi-crop images ``[N, crops, H, W, C]`` are scored by averaging the crops' softmax (paper 1's
    10-crop test).

    Accumulating inside the step chains an eval pass's steps: each starts when the previous one
    is done. Independent steps may run concurrently on XLA:CPU, and then two processes can pair
    their all-reduces differently and wait on each other for good (a 2-process eval hung so, twice
    in about six test-suite runs, both processes blocked in the per-batch addition this replaces).
    """
    model = nnx.merge(graphdef, state["params"], state["batch_stats"], copy=True)
    images = data.model_input(batch["image"], pixels)
    if images.ndim == 5:
        n, c = images.shape[:2]
        probs = jax.nn.softmax(model(images.reshape((n * c,) + images.shape[2:]))).reshape(n, c, -1).mean(1)
        loss = -jnp.log(jnp.take_along_axis(probs, batch["label"][:, None], 1)[:, 0] + 1e-12)
        scores = probs
    else:
        scores = model(images)
        loss = cross_entropy(scores, batch["label"], num_classes)
    mask = batch["mask"]
    top5 = jax.lax.top_k(scores, min(5, num_classes))[1]
    sums = {
        "loss": jnp.sum(loss * mask),
        "top1": jnp.sum((top5[:, 0] == batch["label"]) * mask),
        "top5": jnp.sum(jnp.any(top5 == batch["label"][:, None], -1) * mask),
        "count": jnp.sum(mask),
    }
    return {k: totals[k] + sums[k].astype(jnp.float32) for k in EVAL_SUMS}


def param_sharding(mesh, shape, shard: bool) -> NamedSharding:
    """Replicated, or (FSDP-style) split over ``data`` along the largest divisible axis."""
    n = mesh.shape["data"]
    if shard and shape:
        axes = sorted(range(len(shape)), key=lambda i: -shape[i])
        for i in axes:
            if shape[i] % n == 0 and shape[i] >= n:
                spec = [None] * len(shape)
                spec[i] = "data"
                return NamedSharding(mesh, P(*spec))
    return NamedSharding(mesh, P())


@dataclasses.dataclass
class Trainer:
    """Everything a run compiles once: mesh, model graph, optimizer and the jitted steps.

    ``train_and_evaluate`` drives it; a loop of one's own uses it the same way::

        trainer = Trainer.for_config(config)
        state = trainer.initial_state()  # config.init_from's weights, or fresh ones
        batches = data.prefetch(
            data.train_batches(config.dataset, global_batch_size=config.batch_size, seed=0), trainer.batch_sharding
        )
        for _ in range(100):
            state, metrics = trainer.train_step(state, next(batches))  # the old state is donated
        trainer.evaluate(state)  # {"eval/loss", "eval/top1_acc", "eval/top5_acc"}
        model = trainer.network(state)  # an nnx ResNet (eval mode) that shares no array with state

    The step donates its input state: use only the state it returns, and take networks out of
    it with ``network`` (a copy), not by merging its arrays into a model of one's own.
    """

    config: Any
    info: data.DatasetInfo
    durations: Durations

    def __post_init__(self):
        config, n_dev = self.config, jax.device_count()
        if config.batch_size % n_dev:
            raise UserError(
                f"batch_size={config.batch_size} is not divisible by the {n_dev} devices; use a multiple of {n_dev}"
            )
        # Sharded parameters need XLA's sharding propagation (Auto axes): under the default
        # Explicit axes a convolution with a sharded kernel demands an explicit out_sharding.
        axis = jax.sharding.AxisType.Auto if config.shard_params else jax.sharding.AxisType.Explicit
        self.mesh = jax.make_mesh((n_dev,), ("data",), axis_types=(axis,))
        self.batch_sharding = NamedSharding(self.mesh, P("data"))
        self.replicated = NamedSharding(self.mesh, P())
        self.schedule = learning_rate_schedule(config, self.durations)
        self.tx = make_optimizer(config, self.schedule)
        model = nnx.eval_shape(lambda: build_model(config, self.info.num_classes))
        # A linear probe (trainable='head') trains the head on the frozen network's features:
        # BatchNorm keeps normalising with, and keeping, its running statistics.
        model.train() if config.get("trainable", "all") == "all" else model.eval()
        self.graphdef_train = nnx.graphdef(model)
        model.eval()
        self.graphdef_eval = nnx.graphdef(model)
        abstract = jax.eval_shape(self._init)
        self.state_shardings = jax.tree.map(lambda a: param_sharding(self.mesh, a.shape, config.shard_params), abstract)
        self.abstract_state = abstract_with_shardings(abstract, self.state_shardings)
        guard = guard_options(config.shard_params)
        step = functools.partial(
            train_step,
            graphdef=self.graphdef_train,
            tx=self.tx,
            schedule=self.schedule,
            num_classes=self.info.num_classes,
            label_smoothing=config.label_smoothing,
            pixels=self.info.pixels,
            skip_nonfinite=config.skip_nonfinite,
            **guard,
        )
        self.train_step = jax.jit(
            step,
            in_shardings=(self.state_shardings, self.batch_sharding),
            out_shardings=(self.state_shardings, self.replicated),
            donate_argnums=0,
            compiler_options=compiler_options(),
        )
        checked = functools.partial(state_finite, fuse_below=guard["fuse_below"])
        self.state_finite = jax.jit(checked, in_shardings=(self.state_shardings,), out_shardings=self.replicated)
        ev = functools.partial(
            eval_step, graphdef=self.graphdef_eval, num_classes=self.info.num_classes, pixels=self.info.pixels
        )
        self.eval_step = jax.jit(
            ev,
            in_shardings=(self.state_shardings, self.batch_sharding, self.replicated),
            out_shardings=self.replicated,
            donate_argnums=2,
            compiler_options=compiler_options(),
        )

    @classmethod
    def for_config(cls, config) -> Trainer:
        """The Trainer of ``config``, with its dataset's facts (a TFDS dataset is prepared if needed)."""
        info = data.get_info(config.dataset)
        return cls(config, info, Durations.from_config(config, info.num_train))

    def network(self, state) -> nnx.Module:
        """The network of ``state`` in eval mode, on copies of its arrays (a later donating step
        does not delete them)."""
        # New buffers: nnx.merge's copy=True copies the Variables, not the arrays they hold.
        params, stats = jax.tree.map(lambda a: jnp.array(a, copy=True), (state["params"], state["batch_stats"]))
        return nnx.merge(self.graphdef_eval, params, stats)

    def _init(self, loaded=None):
        model = build_model(self.config, self.info.num_classes, seed=self.config.seed)
        _, params, batch_stats = nnx.split(model, nnx.Param, nnx.BatchStat)
        # Plain nested dicts, not nnx.State: every call of the jitted step flattens the state and
        # unflattens the new one on the host, 1.5 ms per step for nnx.State against 0.14 ms for
        # dicts (cifar_resnet56); on a GPU that host time was most of a small net's step.
        params, batch_stats = nnx.to_pure_dict(params), nnx.to_pure_dict(batch_stats)
        if loaded:  # trained weights in place of the fresh ones (warm_start; names do not collide)
            params, batch_stats = _replace(params, loaded), _replace(batch_stats, loaded)
        return {
            "params": params,
            "batch_stats": batch_stats,
            "opt_state": self.tx.init(params),
            "step": jnp.zeros((), jnp.int32),
            "nonfinite": jnp.zeros((), jnp.int32),
        }

    def init_state(self, loaded: dict[str, np.ndarray] | None = None):
        """A fresh state, created directly with its shardings (no replicate-then-shard).

        ``loaded``: trained arrays by name (``warm_start.WarmStart.load``) that replace the
        random initialisation; every process passes the same values.
        """
        init = jax.jit(self._init, out_shardings=self.state_shardings, compiler_options=init_compiler_options())
        if not loaded:
            return init()
        # From the host to every device of the mesh, in any number of processes: each device
        # takes its copy from this process's array.
        on_mesh = {
            k: jax.make_array_from_callback(v.shape, self.replicated, lambda i, v=v: v[i]) for k, v in loaded.items()
        }
        return init(on_mesh)

    def weight_shapes(self) -> dict[str, tuple[int, ...]]:
        """The parameters and BatchNorm statistics, ``{name: shape}`` (``stages.0.blocks.1.conv1.kernel``)."""
        trees = (self.abstract_state["params"], self.abstract_state["batch_stats"])
        return {
            warm_start.dotted(p): tuple(a.shape) for t in trees for p, a in jax.tree_util.tree_flatten_with_path(t)[0]
        }

    def start_state(self, warm: warm_start.WarmStart | None):
        """The state of step 0: fresh, or with ``warm``'s trained weights."""
        return self.init_state(warm.load() if warm is not None else None)

    def initial_state(self):
        """The state of step 0 as ``train_and_evaluate`` starts a run: with ``config.init_from``'s
        weights when it names a source (``init_state`` alone is always a fresh one)."""
        return self.start_state(warm_start.from_config(self.config, self.weight_shapes()))

    def evaluate(self, state, dataset_cfg=None, should_stop=None) -> dict[str, float] | None:
        """Loss, top-1 and top-5 accuracy over every example of the eval split, exactly once.

        ``should_stop()`` is polled between batches; when it turns true the pass is abandoned and
        ``None`` is returned (a preempted run must save before its grace period ends).
        """
        totals = jax.device_put(zero_eval_sums(), self.replicated)
        batches = data.eval_batches(dataset_cfg or self.config.dataset, global_batch_size=self.config.batch_size)
        for batch in data.prefetch(batches, self.batch_sharding):
            if should_stop is not None and should_stop():
                return None
            totals = self.eval_step(state, batch, totals)
        t = jax.device_get(totals)
        n = max(float(t["count"]), 1.0)
        return {
            "eval/loss": float(t["loss"]) / n,
            "eval/top1_acc": float(t["top1"]) / n,
            "eval/top5_acc": float(t["top5"]) / n,
        }


class _Preemption:
    """SIGTERM (or a first Ctrl-C) -> save at the next step boundary and exit with status 0.

    One process: a SIGTERM handler sets a flag (installed when the run starts, so a SIGTERM during
    start-up is honoured at the first step boundary too). SIGINT does the same, so that Ctrl-C in
    a terminal keeps the work done; a second Ctrl-C stops at once (KeyboardInterrupt). Several processes: JAX's preemption
    service (started by ``jax.distributed.initialize``) catches the SIGTERM of any process and all
    of them agree on the step to stop at through Orbax's ``reached_preemption``; a Python handler
    there would replace JAX's own and hide the notice, so none is installed.
    """

    def __init__(self):
        self.requested = False
        self._interrupts = 0
        self._multi = jax.process_count() > 1
        self._installed = False
        if not self._multi and threading.current_thread() is threading.main_thread():
            # (Signal handlers can only be set from the main thread; a library caller training in
            # another thread keeps its own SIGTERM handling.)
            self._old = {s: signal.signal(s, self._handle) for s in (signal.SIGTERM, signal.SIGINT)}
            self._installed = True

    def _handle(self, signum, frame):
        if signum == signal.SIGINT:
            # Counted apart from SIGTERM: a sweep passes a Ctrl-C on as SIGTERM, which may arrive
            # before the terminal's own SIGINT, and that is still the first Ctrl-C.
            self._interrupts += 1
            if self._interrupts > 1:
                raise KeyboardInterrupt
            log.warning("Ctrl-C: saving at the next step boundary, then stopping (Ctrl-C again to stop at once)")
        self.requested = True

    def reached(self, ckpt: Checkpointer, step: int) -> bool:
        if self._multi:
            return ckpt.manager.reached_preemption(step)
        return self.requested

    def restore(self):
        if self._installed:
            for s, handler in self._old.items():
                signal.signal(s, handler)
            self._installed = False


def agree_on_start_up(problem: BaseException | None) -> None:
    """Raises ``problem`` if this process failed to start; a ``UserError`` if another one did.

    Processes check different things (only process 0 opens the workdir; each reads its own copy
    of the dataset), and one that stopped alone would leave the others waiting in their first
    collective until the distributed runtime's timeout. So every process says whether it started,
    and all stop together.
    """
    failed = [0] if problem is not None else []
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        started = np.ravel(multihost_utils.process_allgather(np.int32(problem is None)))
        failed = [i for i, ok in enumerate(started) if not ok]
    if problem is not None:
        raise problem
    if failed:
        names = ", ".join(map(str, failed))
        raise UserError(f"process {names} could not start (its error says why); fix that and start every process again")


def _record_start(config, wd: Workdir, warm, info, durations: Durations, step: int) -> None:
    """Process 0, once the state is restored or initialised: warnings, config.json, run_info.json."""
    for warning in durations.warnings(config):
        log.warning("%s", warning)
    if config.get("trainable", "all") == "head" and warm is None and step == 0:
        log.warning("trainable='head' without init_from: a linear probe of a randomly initialised network")
    changes = wd.changed_settings if step > 0 else {}
    if changes:
        log.warning(
            "resuming step %d with other settings than the run's last start: %s (run_info.json keeps the history)",
            step,
            ", ".join(f"{k} {old} -> {new}" for k, (old, new) in changes.items()),
        )
    previous = read_run_info(wd.path) if step > 0 else {}
    before = previous.get("processes")
    if before not in (None, jax.process_count()) and config.dataset.name not in ("digits", "synthetic"):
        log.warning(
            "resuming on %d processes, the run's last start had %s: each reads another share of %s, so the "
            "rest of this epoch repeats or skips some examples",
            jax.process_count(),
            before,
            config.dataset.name,
        )
    wd.write_config(config.to_dict())
    history = previous.get("setting_changes", [])
    if changes:
        history = [*history, {"step": step, **{k: list(v) for k, v in changes.items()}}]
    wd.write_run_info(
        devices=jax.device_count(),
        processes=jax.process_count(),
        platform=jax.devices()[0].platform,
        resumed_from=step,
        steps_per_epoch=durations.steps_per_epoch,
        total_steps=durations.total_steps,
        # What a model restored from this run needs (analysis.common.load_model), without the data.
        dataset_info=dataclasses.asdict(info),
        # Where the weights of step 0 came from (kept on resume: the source is not read then).
        **({"init_from": warm.record()} if warm is not None else {}),
        **({"setting_changes": history} if history else {}),
        keep=("init_from",) if step > 0 else (),
    )


def train_and_evaluate(config, workdir: str, *, fresh: bool = False) -> dict[str, float]:
    """Trains ``config`` in ``workdir``, resuming from its latest complete checkpoint.

    Everything that can be wrong with the input (dataset, model, batch size, devices) is checked
    before the workdir is touched; then the workdir is locked and checked against its checkpoints.

    Returns:
      The final eval metrics (empty if the run was preempted before the end).
    """
    lead = jax.process_index() == 0
    preempt = _Preemption()
    wd = Workdir(workdir)
    ckpt = logbook = bar = final = None
    try:
        problem = None
        try:
            check_config(config)  # what the CLI checks before JAX, for library callers too
            info = data.get_info(config.dataset)
            durations = Durations.from_config(config, info.num_train)
            trainer = Trainer(config, info, durations)  # model and batch/device errors, before any write
            # The source of trained weights is read only to start a run (a resumed run has its own),
            # and read whole here, before the workdir is touched: a damaged source is refused with
            # nothing written, and with --fresh the source may lie in the files set aside.
            warm = loaded = None
            if fresh or not has_checkpoints(workdir):
                warm = warm_start.from_config(config, trainer.weight_shapes())
                if warm is not None and fresh:
                    warm_start.check_not_set_aside(warm, workdir)
                loaded = warm.load() if warm is not None else None
            if lead:
                # config.json is written once the checkpoint is restored: a refused resume leaves
                # the run's record (what evaluate reads) as it was.
                wd.open(config.to_dict(), fresh=fresh, write=False)
        except Exception as e:  # noqa: BLE001 - re-raised by agree_on_start_up, after the other processes learn of it
            problem = e
        agree_on_start_up(problem)
        warm_start.agree_on_source(warm)
        ckpt = Checkpointer(workdir, keep=config.keep_checkpoints)
        problem, state, step = None, None, 0
        try:  # one process short of memory must not leave the others waiting in the next collective
            state, step = ckpt.restore_latest(trainer.abstract_state)
        except Exception as e:  # noqa: BLE001 - re-raised by agree_on_start_up
            problem = e
        agree_on_start_up(problem)
        if state is None:
            if warm is None and config.get("init_from", {}).get("path") is not None:
                # (has_checkpoints listed steps that the manager then did not: never silently random.)
                raise UserError(f"{ckpt.directory} holds step folders that are not checkpoints; move them away")
            state = trainer.init_state(loaded)
            loaded = None  # (host copies: not kept for the whole run)
            if warm is not None and lead:
                log.info("%s", warm_start.describe(warm))
        elif lead:
            log.info("resumed from %s at step %d", ckpt.directory / str(step), step)
            if config.get("init_from", {}).get("path") is not None:
                recorded = "init_from" in read_run_info(workdir)
                log.warning(
                    "config.init_from.path is not read: the run continues from its own checkpoint%s",
                    " (run_info.json records what step 0 started from)" if recorded else "",
                )
        problem = None
        try:  # process 0's records: a failure here (disk full) must stop the other processes too
            if lead:
                _record_start(config, wd, warm, info, durations, step)
            logbook = Logbook(workdir, start_step=step, enabled=lead)
        except Exception as e:  # noqa: BLE001 - re-raised by agree_on_start_up
            problem = e
        agree_on_start_up(problem)
        if lead and config.progress_bar:
            from tqdm import tqdm

            bar = tqdm(total=durations.total_steps, initial=step, unit="step", dynamic_ncols=True)
        final = _train_loop(config, trainer, durations, state, step, ckpt, logbook, preempt, bar)
    finally:
        preempt.restore()
        if bar is not None:
            bar.close()
        if ckpt is not None:
            ckpt.close()
        if logbook is not None:
            logbook.close()
        wd.close()
    if lead and final is not None and config.plot_curves:
        plot_curves(workdir)
    return final or {}


def _train_loop(config, trainer, durations, state, step, ckpt, logbook, preempt, bar) -> dict[str, float] | None:
    """Runs from ``step`` to the end. Returns the final eval metrics, or None when preempted."""
    batches = data.prefetch(
        data.train_batches(config.dataset, global_batch_size=config.batch_size, seed=config.seed, start_step=step),
        trainer.batch_sharding,
    )
    # Abandoning an eval pass is only safe where no other process waits in its collectives.
    eval_stop = (lambda: preempt.requested) if jax.process_count() == 1 else None
    final: dict[str, float] = {}
    window: list[dict] = []
    t0, s0 = time.perf_counter(), step
    pending = None  # (step, device metrics): read one step late so the host never stalls the device

    def stop(what: str, advice: str):
        ckpt.wait()
        last = max(ckpt.all_steps(), default=None)
        kept = f"the last good checkpoint (step {last}) is intact" if last else "no checkpoint was saved yet"
        raise UserError(f"{what}; {kept}. Lower the learning rate{advice}")

    def take(entry):
        s, m = entry
        m = jax.device_get(m)
        if not m.pop("params_finite", True):  # (only a skipping step checks this every step)
            # The old parameters are gone (the step updates them in place): skipping is impossible.
            stop(f"the update at step {s} overflowed the parameters (finite gradient, non-finite result)", "")
        if not m.pop("finite"):
            if not config.skip_nonfinite:
                stop(
                    f"non-finite loss or BatchNorm statistics at step {s}",
                    ", or pass --config.skip_nonfinite=true to skip such steps",
                )
            log.warning("skipped step %d: non-finite loss, gradient or BatchNorm statistics", s)
            return  # a skipped step changes nothing; its loss stays out of the averages
        window.append(m)

    def missed_eval(step) -> dict[str, float] | None:
        """The eval of a restored eval step that a preemption saved without it (skipped, or
        abandoned by the signal); every process reads the same checkpoint metrics, so all of them
        run it or none. None: preempted again during it. A row already logged is not repeated."""
        metrics = trainer.evaluate(state, should_stop=eval_stop)
        if metrics is not None and logbook.logged_eval(step) is None:
            logbook.write(step, metrics)
        return metrics

    if 0 < step < durations.total_steps and is_time(step, durations.eval_every_steps, durations.total_steps):
        if not ckpt.metrics(step):
            log.info("step %d was saved without its eval (preempted): evaluating it now", step)
            if missed_eval(step) is None:
                return None
            t0 = time.perf_counter()  # (the first logged images/s is of training only)
    while step < durations.total_steps:
        state, metrics = trainer.train_step(state, next(batches))
        step += 1
        if pending is not None:
            take(pending)
        pending = (step, metrics)
        if bar is not None:
            bar.update(1)
        log_now = is_time(step, config.log_every_steps, durations.total_steps)
        eval_now = is_time(step, durations.eval_every_steps, durations.total_steps)
        save_now = eval_now or is_time(step, config.checkpoint_every_steps, durations.total_steps)
        stop_now = preempt.reached(ckpt, step)
        if not (log_now or eval_now or save_now or stop_now):
            continue
        take(pending)
        pending = None
        if (eval_now or save_now or stop_now) and not config.skip_nonfinite and not trainer.state_finite(state):
            # A stopping step does not check its gradients or new parameters (see train_step):
            # this is where a bad update that the loss has not shown yet is caught before a save.
            stop(
                f"non-finite parameters or optimizer state at step {step}",
                ", or pass --config.skip_nonfinite=true to skip steps with non-finite gradients",
            )
        if log_now:
            dt = time.perf_counter() - t0
            row = {k: float(np.mean([w[k] for w in window])) for k in (window[0] if window else ())}
            row["train/img_per_s"] = (step - s0) * config.batch_size / max(dt, 1e-9)
            row["train/nonfinite_steps"] = float(jax.device_get(state["nonfinite"]))
            logbook.write(step, row)
            if bar is not None and window:
                bar.set_postfix(loss=f"{row['train/loss']:.3f}", acc=f"{row['train/top1_acc']:.3f}")
            window.clear()
            t0, s0 = time.perf_counter(), step
        eval_metrics = None
        if eval_now and not stop_now:
            eval_metrics = trainer.evaluate(state, should_stop=eval_stop)
            if eval_metrics is not None:
                logbook.write(step, eval_metrics)
                final = eval_metrics
                if bar is not None:
                    bar.write(
                        f"step {step}: eval top-1 {eval_metrics['eval/top1_acc']:.4f}, "
                        f"loss {eval_metrics['eval/loss']:.4f}"
                    )
            else:
                stop_now = True  # SIGTERM during the eval pass: save without it and stop
            t0, s0 = time.perf_counter(), step
        if save_now or stop_now:
            ckpt.save(step, state, metrics=eval_metrics, force=True)
        if stop_now:
            ckpt.wait()
            log.warning("preempted: saved step %d to %s; start the same command again to resume", step, ckpt.directory)
            return None
    if not final and step >= durations.total_steps:
        # Started on a finished run (or one stopped right at its last step): report, or finish, its
        # final evaluation instead of returning nothing.
        final = {k: float(v) for k, v in (ckpt.metrics(step) or {}).items() if k.startswith("eval/")}
        if not final:
            final = missed_eval(step)
    return final


def evaluate_checkpoint(
    workdir: str, checkpoint: str | int = "latest", dataset_overrides: dict | None = None
) -> tuple[int, dict[str, float]]:
    """Evaluates a run's checkpoint ('latest', 'best' or a step number) on its eval split."""
    import ml_collections

    from resnet_jax.workdir import load_config_dict

    checkpoint = str(checkpoint)  # a step may be given as an int
    config = ml_collections.ConfigDict(load_config_dict(workdir))
    if dataset_overrides:
        config.dataset.update(dataset_overrides)
    ckpt = Checkpointer(workdir, read_only=True)
    try:
        step = resolve_step(workdir, checkpoint, checkpointer=ckpt)
        info = data.get_info(config.dataset)
        trainer = Trainer(config, info, Durations.from_config(config, info.num_train))
        try:
            state = ckpt.restore(step, trainer.abstract_state)
        except Exception as e:  # noqa: BLE001 - a damaged checkpoint is a one-line error here
            raise UserError(
                f"checkpoint {ckpt.directory / str(step)} cannot be restored ({restore_problem(e)}); "
                "try another --checkpoint"
            ) from None
    finally:
        ckpt.close()
    return step, trainer.evaluate(state)


def main(argv=None):
    from resnet_jax import cli

    cli.train_main(argv)
