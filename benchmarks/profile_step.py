"""Where does our train step differ from the Linen baseline's? A/B variants, interleaved.

    python benchmarks/profile_step.py --model cifar_resnet56 --batch_size 128 [--steps 3] [--repeats 6]

Times, in one process and interleaved repeat by repeat (alternating the order):

* ``ours``: ``Trainer.train_step`` as a training run uses it;
* ``ours_guard_after``: the non-finite guard as it was before: the new parameters checked too,
  then ``jnp.where`` over the whole state (a second pass and a live copy of the old state);
* ``ours_no_guard``: the same step without any non-finite guard;
* ``ours_cond_guard`` / ``ours_select_guard``: the two ways ``train_step`` can skip a bad step
  (``config.skip_nonfinite=True``; ``ours`` only flags it and the run stops), forced whatever the
  backend (``guard_options`` picks one per backend): checks by leaf size and the update under
  ``lax.cond`` (CPU), or one fused check and a select inside the update (GPU/TPU);
* ``ours_stop_fused`` / ``ours_stop_per_leaf`` / ``ours_stop_by_size``: the stopping step with
  each way of checking finiteness (``resnet_jax.train.all_finite``), whatever the backend;
* ``ours_reshaped_bn``: BatchNorm statistics always through the grouped 5-D reshape
  ``[groups, g, H, W, C]``, also for global statistics (as it was before);
* ``ours_no_guard_const_lr`` (``..._plain_jit``): no guard, a constant learning rate (the
  baseline's; ours evaluates the schedule in the step), and also ``jax.jit`` without shardings;
* ``ours_float_input``: our step fed float images normalised beforehand, as the baseline is;
* ``ours_reduce_window_pool``: the ImageNet stem's max-pool as ``nnx.max_pool`` (reduce_window,
  select-and-scatter gradient), as it was before ``resnet_jax.models.layers.max_pool``;
* ``ours_dot_1x1``: every 1x1 convolution as an ``einsum`` (a matrix product) instead of a
  convolution, so that XLA:GPU may fuse the BatchNorm-ReLU before it into the GEMM;
  ``ours_dot_1x1_triton``: the same, with every dot through XLA's Triton GEMM emitter
  (``xla_gpu_triton_gemm_any``);
* ``--xla_options '{"label": {"xla_cpu_...": value}}'``: our step compiled with those XLA options
  too (every variant of ours is compiled with ``resnet_jax.train.compiler_options()``, as the
  Trainer compiles it);
* ``ours_default_xla``: our step compiled without the Trainer's compiler options;
* ``linen``: the baseline of ``benchmarks/linen_resnet.py``; ``linen_cpu_options``: the same,
  compiled with our compiler options.

The variants only patch ``BatchNorm.__call__``, ``nnx.Conv.__call__`` or the stem's max-pool while
tracing, or swap the step function (the package files are unchanged). Model options
(``model.space_to_depth_stem``, ``remat``...) are compared with ``python -m resnet_jax.bench``.
For each it also prints what XLA compiled: FLOPs and bytes accessed (``cost_analysis``), temporary
buffer bytes, and the number of fusions, convolutions and reductions in the optimized HLO.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import math
import re
import statistics
import sys
from pathlib import Path
from unittest import mock

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import optax  # noqa: E402
from flax import nnx  # noqa: E402

from resnet_jax import bench, train  # noqa: E402
from resnet_jax.data import model_input  # noqa: E402
from resnet_jax.models import layers, resnet  # noqa: E402
from resnet_jax.train import all_finite, guard_options, loss_and_grads, train_step  # noqa: E402

_ORIGINAL_BN = layers.BatchNorm.__call__


def reshaped_bn(self, x):
    """Our BatchNorm with the statistics always taken through the grouped 5-D reshape."""
    if self.use_running_average:
        return _ORIGINAL_BN(self, x)
    x32 = x.astype(jnp.float32)
    n = x.shape[0]
    g = self.group_size or n
    xg = x32.reshape((n // g, g) + x.shape[1:])  # [groups, g, H, W, C]
    axes = tuple(range(1, xg.ndim - 1))
    gmean = jnp.mean(xg, axis=axes, keepdims=True)
    gvar = jnp.maximum(jnp.mean(jnp.square(xg), axis=axes, keepdims=True) - jnp.square(gmean), 0.0)
    m = self.momentum
    self.mean.set_value(m * self.mean[...] + (1 - m) * jnp.mean(gmean, axis=tuple(range(gmean.ndim - 1))))
    self.var.set_value(m * self.var[...] + (1 - m) * jnp.mean(gvar, axis=tuple(range(gvar.ndim - 1))))
    mul = jax.lax.rsqrt(gvar + self.epsilon) * self.scale[...]  # [groups, 1, 1, 1, C]
    y = (xg - gmean) * mul + self.bias[...]
    return y.reshape(x.shape).astype(self.dtype)


def reduce_window_pool(x, window=3, stride=2, padding=1):
    """The stem's max-pool as ``nnx.max_pool`` computes it (and as the Linen baseline pools):
    ``lax.reduce_window``, whose gradient XLA compiles to a select-and-scatter."""
    return nnx.max_pool(x, (window, window), (stride, stride), ((padding, padding), (padding, padding)))


_ORIGINAL_CONV = nnx.Conv.__call__


def dot_1x1(self, x):
    """``nnx.Conv`` with the 1x1 kernels computed as a matrix product (a strided slice first for
    stride 2): the same function and parameters. XLA:GPU hands a convolution to cuDNN as a custom
    call, which no elementwise op fuses into; a dot can take the preceding BatchNorm-ReLU as its
    operand's prologue (XLA's Triton GEMM fusions), which saves writing and reading that tensor."""
    if self.kernel_size != (1, 1) or self.padding not in ("VALID", ((0, 0), (0, 0))):
        return _ORIGINAL_CONV(self, x)
    sh, sw = (self.strides,) * 2 if isinstance(self.strides, int) else self.strides
    x = x[:, ::sh, ::sw].astype(self.dtype)
    return jnp.einsum("nhwc,co->nhwo", x, self.kernel[0, 0].astype(self.dtype))


def patched(bn=_ORIGINAL_BN, pool=None, conv=_ORIGINAL_CONV):
    """The model's BatchNorm, stem max-pool and convolution replaced while tracing."""
    stack = contextlib.ExitStack()
    stack.enter_context(mock.patch.object(layers.BatchNorm, "__call__", bn))
    stack.enter_context(mock.patch.object(resnet, "max_pool", pool or resnet.max_pool))
    stack.enter_context(mock.patch.object(nnx.Conv, "__call__", conv))
    return stack


def _sgd_step(state, batch, *, graphdef, tx, schedule, num_classes, label_smoothing, pixels):
    """Forward, backward and optimizer update with no guard: (new state, metrics, grads)."""
    loss, logits, batch_stats, grads = loss_and_grads(
        state, batch, graphdef=graphdef, num_classes=num_classes, label_smoothing=label_smoothing, pixels=pixels
    )
    updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
    params = optax.apply_updates(state["params"], updates)
    new = dict(state, params=params, batch_stats=batch_stats, opt_state=opt_state, step=state["step"] + 1)
    metrics = {
        "train/loss": loss,
        "train/top1_acc": jnp.mean(jnp.argmax(logits, -1) == batch["label"]),
        "train/lr": schedule(state["step"]),
    }
    return new, metrics, grads


def train_step_no_guard(state, batch, **kw):
    """resnet_jax.train.train_step without the non-finite guard."""
    new, metrics, _ = _sgd_step(state, batch, **kw)
    return new, metrics


def train_step_guard_after(state, batch, **kw):
    """The guard as it was: new parameters and statistics checked, then a select over the state."""
    new, metrics, grads = _sgd_step(state, batch, **kw)
    finite = (  # one check per leaf, as it was
        jnp.isfinite(metrics["train/loss"])
        & all_finite(grads, fuse_below=0)
        & all_finite(new["params"], fuse_below=0)
        & all_finite(new["batch_stats"], fuse_below=0)
    )
    new = jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, dict(state, step=state["step"] + 1))
    new["nonfinite"] = state["nonfinite"] + (~finite).astype(jnp.int32)
    return new, dict(metrics, finite=finite)


class Variant:
    """A variant of our step, compiled on the batch and state of ``base`` (a ``bench.OurStep``)."""

    def __init__(
        self,
        label: str,
        base: bench.OurStep,
        *,
        step_fn=train_step,
        bn=_ORIGINAL_BN,
        pool=None,
        conv=_ORIGINAL_CONV,
        const_lr: bool = False,
        shardings: bool = True,
        float_input: bool = False,
        compiler_options: dict | None = None,
    ):
        self.label = label
        self.patches = dict(bn=bn, pool=pool, conv=conv)
        t = base.trainer
        tx, schedule = t.tx, t.schedule
        if const_lr:  # the Linen baseline's optimizer: no schedule evaluated inside the step
            lr = float(t.schedule(0))
            tx = optax.chain(optax.add_decayed_weights(t.config.weight_decay), optax.sgd(lr, momentum=0.9))
            schedule = optax.constant_schedule(lr)
        fn = functools.partial(
            step_fn,
            graphdef=t.graphdef_train,
            tx=tx,
            schedule=schedule,
            num_classes=t.info.num_classes,
            label_smoothing=t.config.label_smoothing,
            pixels=t.info.pixels,
            # the Trainer's choice for this backend and config (see resnet_jax.train.guard_options)
            **(dict(guard_options(False), skip_nonfinite=t.config.skip_nonfinite) if step_fn is train_step else {}),
        )
        if shardings:
            jitted = jax.jit(
                fn,
                in_shardings=(t.state_shardings, t.batch_sharding),
                out_shardings=(t.state_shardings, t.replicated),
                donate_argnums=0,
            )
        else:  # as the Linen baseline is jitted
            jitted = jax.jit(fn, donate_argnums=0)
        self.state = t.init_state()
        self.batch = base.batch
        if float_input:  # normalised beforehand, as the Linen baseline gets them
            images = jax.jit(model_input, static_argnums=1)(base.batch["image"], t.info.pixels)
            self.batch = dict(base.batch, image=images)
        if compiler_options is None:  # the Trainer's, as jitted for this backend
            compiler_options = train.compiler_options()
        with patched(**self.patches):
            self.compiled = jitted.lower(self.state, self.batch).compile(compiler_options=compiler_options)

    def step(self):
        self.state, metrics = self.compiled(self.state, self.batch)
        jax.block_until_ready((self.state, metrics))


def hlo_stats(compiled) -> dict:
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    text = compiled.as_text()
    ma = compiled.memory_analysis()
    return {
        "gflops": round(cost.get("flops", 0.0) / 1e9, 2),
        "gbytes_accessed": round(cost.get("bytes accessed", 0.0) / 1e9, 2),
        "temp_mib": round(ma.temp_size_in_bytes / 2**20, 1) if ma else None,
        "fusions": len(re.findall(r"^\s*%?\S+ = \S+ fusion\(", text, re.M)),
        "convolutions": len(re.findall(r" convolution\(", text)),
        "reduces": len(re.findall(r" reduce\(", text)),
        "custom_calls": len(re.findall(r" custom-call\(", text)),
    }


def residual_bytes(runner, base: bench.OurStep) -> int:
    """Bytes autodiff keeps for the backward pass of the model's loss (see bench.saved_residual_bytes)."""
    image = model_input(base.batch["image"], base.trainer.info.pixels)
    if isinstance(runner, bench.LinenStep):
        state = runner.state

        def loss(params):
            logits, _ = state.apply_fn(
                {"params": params, "batch_stats": state.batch_stats}, image, mutable=["batch_stats"]
            )
            return logits.sum()

        return bench.saved_residual_bytes(loss, state.params)
    t = base.trainer

    def loss(params):
        model = nnx.merge(t.graphdef_train, params, runner.state["batch_stats"], copy=True)
        return model(image).sum()

    with patched(**getattr(runner, "patches", {})):
        return bench.saved_residual_bytes(loss, runner.state["params"])


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="cifar_resnet56")
    p.add_argument("--batch_size", type=int, default=128)
    p.add_argument("--image_size", type=int, default=None)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--repeats", type=int, default=6)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--half_precision", action="store_true")
    p.add_argument("--variants", default="ours,ours_guard_after,ours_no_guard,ours_reshaped_bn,linen")
    p.add_argument(
        "--xla_options",
        default="{}",
        help='more variants: our step compiled with XLA options, as JSON {"label": {"xla_option": value}}',
    )
    a = p.parse_args(argv)
    args = bench.build_parser().parse_args(
        [f"--model={a.model}", f"--batch_size={a.batch_size}"] + (["--half_precision"] if a.half_precision else [])
    )
    args.image_size = a.image_size or bench.default_image_size(a.model)
    args.num_classes = bench.default_num_classes(a.model)
    bench.use_fast_prng()
    base = bench.OurStep(args)
    runners = []
    wanted = a.variants.split(",")
    specs = {  # Variant's keyword arguments
        "ours_guard_after": dict(step_fn=train_step_guard_after),
        "ours_no_guard": dict(step_fn=train_step_no_guard),
        "ours_reshaped_bn": dict(bn=reshaped_bn),
        "ours_cond_guard": dict(step_fn=functools.partial(train_step, **guard_options(False, "cpu"))),
        "ours_select_guard": dict(step_fn=functools.partial(train_step, **guard_options(False, "gpu"))),
        # The stopping step (flags only) with each way of checking, whatever the backend.
        "ours_stop_fused": dict(step_fn=functools.partial(train_step, skip_nonfinite=False, fuse_below=math.inf)),
        "ours_stop_per_leaf": dict(step_fn=functools.partial(train_step, skip_nonfinite=False, fuse_below=0)),
        "ours_stop_by_size": dict(step_fn=functools.partial(train_step, skip_nonfinite=False, fuse_below=2**16)),
        # The rest of the Linen baseline's differences: a constant learning rate, jit without shardings.
        "ours_no_guard_const_lr": dict(step_fn=train_step_no_guard, const_lr=True),
        "ours_no_guard_const_lr_plain_jit": dict(step_fn=train_step_no_guard, const_lr=True, shardings=False),
        "ours_float_input": dict(float_input=True),
        "ours_reduce_window_pool": dict(pool=reduce_window_pool),
        "ours_dot_1x1": dict(conv=dot_1x1),
        # ... and every dot through XLA's Triton GEMM emitter (ignored off GPUs)
        "ours_dot_1x1_triton": dict(
            conv=dot_1x1, compiler_options={**train.compiler_options(), "xla_gpu_triton_gemm_any": True}
        ),
    }
    xla_options = json.loads(a.xla_options)
    wanted += list(xla_options)
    for label in wanted:
        if label == "linen":
            r = bench.LinenStep(args, base)
        elif label == "ours":
            r = base
        elif label in xla_options:
            r = Variant(label, base, compiler_options={**train.compiler_options(), **xla_options[label]})
        elif label == "ours_default_xla":
            r = Variant(label, base, compiler_options={})
        elif label == "linen_cpu_options":
            r = bench.LinenStep(args, base, compiler_options=train.compiler_options(), label=label)
        else:
            r = Variant(label, base, **specs[label])
        stats = hlo_stats(r.compiled)
        stats["residual_mib"] = round(residual_bytes(r, base) / 2**20, 1)
        print(label, json.dumps(stats), flush=True)
        runners.append(r)
    if a.repeats < 1:
        return
    t = bench.interleaved_times(runners, steps=a.steps, repeats=a.repeats, warmup=a.warmup)
    print(f"\n{a.model}, batch {a.batch_size}, {args.image_size}px ({a.repeats} x {a.steps} steps, interleaved)")
    print("  (speed vs ours > 1: faster than ours; paired = median over repeats of the within-repeat ratio)")
    summary = {}
    for r in runners:
        sp = t.speedups(r.label, "ours") if "ours" in t.wall else None
        summary[r.label] = {"img_per_s": t.img_per_s(r.label, a.batch_size), **(sp or {})}
        print(
            f"  {r.label:24s} {t.img_per_s(r.label, a.batch_size):8.2f} img/s"
            f"  cpu {1e3 * statistics.median(t.cpu[r.label]):9.1f} ms/step"
            + (f"  vs ours: {sp['ratio']:.3f} (paired {sp['paired']:.3f}, cpu {sp['cpu']:.3f})" if sp else "")
        )
    print(json.dumps({"model": a.model, "batch_size": a.batch_size, "variants": summary}))


if __name__ == "__main__":
    main()
