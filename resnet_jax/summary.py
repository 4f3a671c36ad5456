"""Per-stage output shapes, parameter counts and MACs of a network, computed without any FLOP.

    python -m resnet_jax.summary resnet50 [--image_size 224] [--num_classes 1000] [--shortcut A]
        [--stride_in 1x1] [--width N] [--scan_blocks auto|true|false]

Everything is abstract: the model is built under ``nnx.eval_shape`` (no parameter is allocated)
and MACs are read off the jaxpr of a forward pass over ``jax.ShapeDtypeStruct`` inputs, so the
largest networks take seconds. Parameters count ``nnx.Param`` only (not BatchNorm statistics),
like torchvision's ``sum(p.numel() for p in model.parameters())``. MACs are multiply-accumulates of
convolutions and dense layers per image (what torchvision's model table calls "GFLOPS").

Library: ``abstract_model``, ``count_params``, ``count_macs``, ``summarize``.
This module never imports TensorFlow (nor torch).
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import sys
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from resnet_jax import cli
from resnet_jax.errors import first_line
from resnet_jax.models import ResNet, create_model, resolve_options

# Defaults by family: CIFAR networks are summarised on CIFAR-10 (as in the papers' tables).
_IMAGENET_DEFAULTS = {"image_size": 224, "num_classes": 1000}
_CIFAR_DEFAULTS = {"image_size": 32, "num_classes": 10}


def abstract_model(name: str, *, num_classes: int, **options: Any) -> ResNet:
    """``create_model`` under ``nnx.eval_shape``: variables hold ``jax.ShapeDtypeStruct``s, no memory.

    Args:
      name: a model name of the zoo (``resnet_jax.models.list_models``).
      num_classes: size of the linear head.
      **options: model options, as for ``create_model``.

    Returns:
      An abstract ``ResNet`` (in training mode, as ``create_model`` returns it).

    Raises:
      ValueError: a bad name or option (the factory's message).
    """

    def build(key: jax.Array) -> ResNet:
        # nnx.Rngs bumps a counter Variable on every draw. Traced, each bump makes flax read the
        # tracer's `.sharding`, and JAX answers by walking every equation traced so far: quadratic
        # in depth (55 s for an unrolled CIFAR ResNet-1202). Evaluating the counter eagerly avoids
        # that; the key stays a tracer, so the parameter initialisers are still only traced.
        with jax.ensure_compile_time_eval():
            return create_model(name, num_classes=num_classes, rngs=nnx.Rngs(key), **options)

    resolve_options(name, **options)  # fail fast, with the factory's message, before tracing
    return nnx.eval_shape(build, jax.random.key(0))


def count_params(model_or_state: Any) -> int:
    """Number of trainable parameters (``nnx.Param`` elements).

    Args:
      model_or_state: an ``nnx.Module`` (concrete or abstract), an ``nnx.State`` (only its
        ``nnx.Param`` variables count), or a plain pytree of arrays (every leaf counts).

    Returns:
      The total element count.
    """
    tree = nnx.state(model_or_state, nnx.Param) if isinstance(model_or_state, nnx.Module) else model_or_state
    total = 0
    for leaf in jax.tree.leaves(tree, is_leaf=lambda x: isinstance(x, nnx.Variable)):
        if isinstance(leaf, nnx.Variable):
            if not isinstance(leaf, nnx.Param):
                continue
            leaf = leaf.get_value()
        total += math.prod(leaf.shape)
    return total


# --- MACs from a jaxpr ------------------------------------------------------------------------


def _conv_macs(eqn: Any) -> int:
    # Each output element is a dot product over the kernel window and its input channels; the
    # kernel's input-feature dim is already in_channels / feature_group_count.
    rhs = eqn.invars[1].aval.shape
    rhs_spec = eqn.params["dimension_numbers"].rhs_spec  # (out feature, in feature, *spatial)
    per_output = rhs[rhs_spec[1]] * math.prod(rhs[d] for d in rhs_spec[2:])
    return math.prod(eqn.outvars[0].aval.shape) * per_output


def _dot_macs(eqn: Any) -> int:
    # Each output element sums over the contracted dims (batch and free dims index the output).
    (lhs_contract, _), _ = eqn.params["dimension_numbers"]
    lhs = eqn.invars[0].aval.shape
    return math.prod(eqn.outvars[0].aval.shape) * math.prod(lhs[d] for d in lhs_contract)


def _sub_jaxprs(value: Any) -> Iterator[Any]:
    """The (open) jaxprs inside an equation parameter: pjit/remat/custom_jvp/scan/cond bodies."""
    if hasattr(value, "eqns"):  # core.Jaxpr
        yield value
    elif hasattr(value, "jaxpr") and hasattr(value.jaxpr, "eqns"):  # core.ClosedJaxpr
        yield value.jaxpr
    elif isinstance(value, tuple | list):  # cond's branches
        for v in value:
            yield from _sub_jaxprs(v)


def jaxpr_macs(jaxpr: Any) -> int:
    """Multiply-accumulates of every ``conv_general_dilated`` and ``dot_general`` in ``jaxpr``.

    Recurses into sub-jaxprs (``jit``, ``checkpoint``/remat, ``custom_jvp_call``, ...); a ``scan``
    body counts ``length`` times, a ``cond`` its most expensive branch. A ``while`` body counts
    once (its trip count is not static); no network here uses one.

    Args:
      jaxpr: a ``jax.core.Jaxpr`` or ``ClosedJaxpr`` (e.g. from ``jax.make_jaxpr``).

    Returns:
      The total over the traced batch (divide by the batch size for per-image MACs).
    """
    jaxpr = getattr(jaxpr, "jaxpr", jaxpr)
    total = 0
    for eqn in jaxpr.eqns:
        name = eqn.primitive.name
        if name == "conv_general_dilated":
            total += _conv_macs(eqn)
        elif name == "dot_general":
            total += _dot_macs(eqn)
        subs = [j for v in eqn.params.values() for j in _sub_jaxprs(v)]
        if not subs:
            continue
        if name == "cond":
            total += max(jaxpr_macs(j) for j in subs)  # exactly one branch runs
        else:
            inner = sum(jaxpr_macs(j) for j in subs)
            total += inner * (eqn.params["length"] if name == "scan" else 1)
    return total


def _abstract(tree: Any) -> Any:
    return jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), tree)


def _trace(
    module: nnx.Module, fn: Callable[[Any, jax.Array], jax.Array], x: jax.ShapeDtypeStruct
) -> tuple[int, jax.ShapeDtypeStruct]:
    """MACs (whole batch) and output shape/dtype of ``fn(module, x)``, in eval mode, without computing.

    The module is split so that its variables enter the trace as abstract inputs; the merged copy
    is switched to eval mode, which leaves ``module`` itself as it was.
    """
    graphdef, state = nnx.split(module)

    def run(state, x):
        m = nnx.merge(graphdef, state)
        m.eval()  # no batch-statistics updates to trace; MACs are the same in both modes
        return fn(m, x)

    closed, out = jax.make_jaxpr(run, return_shape=True)(_abstract(state), x)
    return jaxpr_macs(closed), out


def _input_spec(image_size: int | tuple[int, int], batch_size: int, channels: int = 3) -> jax.ShapeDtypeStruct:
    h, w = (image_size, image_size) if isinstance(image_size, int) else image_size
    return jax.ShapeDtypeStruct((batch_size, h, w, channels), jnp.float32)


def count_macs(model: ResNet, image_size: int | tuple[int, int], *, batch_size: int = 1) -> int:
    """Multiply-accumulates per image of ``model``'s forward pass (convolutions and dense layers).

    Args:
      model: a ``ResNet``, concrete or abstract (``abstract_model`` / ``nnx.eval_shape``).
      image_size: input height and width (an int for square images).
      batch_size: batch to trace with; the result is per image either way.

    Returns:
      MACs per image.
    """
    macs, _ = _trace(model, lambda m, x: m(x), _input_spec(image_size, batch_size))
    return macs // batch_size


@dataclasses.dataclass(frozen=True)
class Row:
    """One line of the summary table: a part of the network (``stem``, ``stage{i}``, ``head``, ``total``)."""

    part: str
    blocks: int  # residual blocks in the part (0 for stem and head)
    output_shape: tuple[int, ...]  # per image: (H, W, C), or (num_classes,) for head and total
    params: int
    macs: int  # per image


def summarize(name: str, image_size: int | None = None, num_classes: int | None = None, **options: Any) -> list[Row]:
    """The summary table of a network, one ``Row`` per part and a final ``total`` row.

    Args:
      name: model name (``resnet_jax.models.list_models``).
      image_size: input height = width; default 224 for ImageNet networks, 32 for CIFAR ones.
      num_classes: default 1000 for ImageNet networks, 10 for CIFAR ones.
      **options: model options, as for ``create_model`` (``shortcut``, ``stride_in``, ``width``, ...).

    Returns:
      Rows ``stem``, ``stage1`` .. ``stageN``, ``head``, ``total``; the parts' params and MACs sum
      to the total's.

    Raises:
      ValueError: a bad name, option, image size or class count.
    """
    defaults = _CIFAR_DEFAULTS if resolve_options(name, **options)["family"].startswith("cifar") else _IMAGENET_DEFAULTS
    image_size = defaults["image_size"] if image_size is None else image_size
    num_classes = defaults["num_classes"] if num_classes is None else num_classes
    if not (isinstance(image_size, int) and image_size >= 1):
        raise ValueError(f"image_size={image_size!r}; must be a positive integer")
    model = abstract_model(name, num_classes=num_classes, **options)
    x = _input_spec(image_size, 1)
    rows = []

    def add(part: str, blocks: int, module: nnx.Module, params: int, fn: Callable) -> None:
        nonlocal x
        macs, x = _trace(module, fn, x)  # each part's output is the next part's input
        rows.append(Row(part, blocks, tuple(x.shape[1:]), params, macs))

    add(
        "stem",
        0,
        model,
        count_params(model.conv1) + (count_params(model.bn1) if model.bn1 is not None else 0),
        ResNet.stem_forward,
    )
    for i, stage in enumerate(model.stages):
        n = len(stage.blocks) + (
            jax.tree.leaves(nnx.state(stage.scanned))[0].shape[0] if stage.scanned is not None else 0
        )
        add(f"stage{i + 1}", n, stage, count_params(stage), lambda m, y: m.forward(y)[0])
    head_params = count_params(model.fc) + (count_params(model.final_bn) if model.final_bn is not None else 0)
    add("head", 0, model, head_params, ResNet.head_forward)
    rows.append(
        Row(
            "total",
            sum(r.blocks for r in rows),
            rows[-1].output_shape,
            sum(r.params for r in rows),
            sum(r.macs for r in rows),
        )
    )
    return rows


# --- CLI --------------------------------------------------------------------------------------


def format_count(n: float, unit: str = "") -> str:
    """``4089184256`` -> ``'4.09 G'``: three significant-ish digits with a K/M/G/T suffix."""
    for scale, suffix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "K")):
        if abs(n) >= scale:
            return f"{n / scale:.2f} {suffix}{unit}"
    return f"{n:.0f} {unit}".rstrip()


def format_table(rows: Sequence[Row]) -> str:
    """The rows as an aligned text table (the CLI's output, also used for the README)."""
    table = [("part", "blocks", "output", "params", "MACs")]
    for r in rows:
        table.append(
            (
                r.part,
                str(r.blocks) if r.blocks else "",
                "x".join(map(str, r.output_shape)),
                f"{r.params:,}",
                format_count(r.macs),
            )
        )
    widths = [max(len(line[i]) for line in table) for i in range(len(table[0]))]
    lines = []
    for k, line in enumerate(table):
        if k == len(table) - 1:
            lines.append("-" * (sum(widths) + 2 * (len(widths) - 1)))
        cells = [line[0].ljust(widths[0])] + [c.rjust(w) for c, w in zip(line[1:], widths[1:])]
        lines.append("  ".join(cells))
    return "\n".join(lines)


def _scan_flag(value: str) -> str | bool:
    choices = {"auto": "auto", "true": True, "false": False}
    if value.lower() not in choices:
        raise argparse.ArgumentTypeError(f"invalid value {value!r}; valid: auto, true, false")
    return choices[value.lower()]


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry point; returns the exit status (0, or 2 after a one-line ``error: ...``)."""
    parser = cli.ArgumentParser(prog="python -m resnet_jax.summary", description=__doc__.split("\n")[0])
    parser.add_argument("model", help="model name, e.g. resnet50, cifar_resnet110, cifar_preact_resnet1001")
    parser.add_argument("--image_size", type=int, default=None, help="input size (default 224; 32 for CIFAR nets)")
    parser.add_argument("--num_classes", type=int, default=None, help="classes (default 1000; 10 for CIFAR nets)")
    parser.add_argument("--shortcut", default=None, help="A, B, C, none, gated, shortcut_gated, scaled")
    parser.add_argument("--stride_in", default=None, help="3x3 (torchvision) or 1x1 (the paper's bottleneck)")
    parser.add_argument("--width", type=int, default=None, help="base width (channels of the first stage)")
    parser.add_argument("--scan_blocks", type=_scan_flag, default=None, help="auto, true or false")
    args = parser.parse_args(argv)
    options = {k: getattr(args, k) for k in ("shortcut", "stride_in", "width", "scan_blocks")}
    try:
        if args.num_classes is not None and args.num_classes < 1:
            raise ValueError(f"num_classes={args.num_classes}; must be a positive integer")
        rows = summarize(args.model, image_size=args.image_size, num_classes=args.num_classes, **options)
    except ValueError as e:
        print(f"error: {first_line(e)}", file=sys.stderr)
        return 2
    o = resolve_options(args.model, **options)
    size = "x".join(map(str, (args.image_size or (32 if o["family"].startswith("cifar") else 224),) * 2))
    print(
        f"{args.model}: {size} input, {rows[-1].output_shape[0]} classes, shortcut {o['shortcut']}, stride_in {o['stride_in']}, width {o['width']}"
    )
    print(format_table(rows))
    total = rows[-1]
    print(f"total: {total.params:,} parameters, {format_count(total.macs, 'MACs')} per image ({total.macs:,} MACs)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
