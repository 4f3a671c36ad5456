"""Gradient flow: the norm of the loss gradient of every weight layer, against depth.

The vanishing-gradient picture behind paper 1: in a deep plain network the gradient reaching the
early layers is much smaller than at the top (BatchNorm keeps it from vanishing outright, which is
why the paper argues degradation is an optimisation difficulty); the identity shortcuts of a ResNet
carry it to every layer.

``gradient_norms`` returns the L2 (Frobenius) norm of d(loss)/d(kernel) of every convolution kernel
and of the fully connected layer's kernel, in network order: the stem conv, then each block's
branch convs (``conv1``, ``conv2``[, ``conv3``]) followed by its shortcut projection or gate if it
has one, stage by stage, and ``fc`` last. Biases and BatchNorm parameters are left out. The loss
is the mean softmax cross-entropy of one training batch (no weight decay, no label smoothing), in
train mode (BatchNorm normalises with the batch's statistics, as in a training step).

The plot shows the main path only (stem, branch convs, fc): its x axis is then the layer's depth,
1 to ``6n+2`` for a CIFAR net, identical for a plain net and a ResNet of the same depth.

Usage::

  # at initialisation, one training batch of the dataset
  python -m resnet_jax.analysis.gradient_flow --models cifar_plain56 cifar_resnet56 --dataset digits \
      --out grad.png [--batch_size 128] [--width 16] [--zero_init_last_bn false] [--json grad.json]
  # trained runs: at their initialisation (step 0) and at checkpoint steps (default: 0 and latest)
  python -m resnet_jax.analysis.gradient_flow --runs runs/plain20 runs/resnet20 [--steps 0 32000 64000] \
      --out grad.png

For a run, the batch at step ``s`` is the training batch of step ``s`` of that run (its seed and
augmentation), and step 0 is the network the run started from (its seed's initialisation, or
its ``init_from`` weights).

Library: ``gradient_norms(model, batch) -> [(layer_path, norm), ...]`` and ``plot_gradient_norms``.
"""

from __future__ import annotations

import functools
import json
import pathlib
from collections.abc import Collection, Mapping, Sequence

import jax
import numpy as np
import optax
from flax import nnx

from resnet_jax import cli
from resnet_jax.analysis import common
from resnet_jax.analysis.layer_responses import add_model_arguments, model_options
from resnet_jax.errors import UserError

# Order of a block's weights: the branch top to bottom, then the shortcut's projection and gate.
_BLOCK_ORDER = {("conv1",): 0, ("conv2",): 1, ("conv3",): 2, ("shortcut", "conv"): 3, ("shortcut", "gate"): 4}


def _layer_order(path: tuple) -> tuple:
    """A sort key putting a kernel's path (without the trailing 'kernel') in network order."""
    if path == ("conv1",):
        return (0,)
    if path == ("fc",):
        return (2,)
    if len(path) >= 3 and path[0] == "stages":
        # ('stages', i, 'blocks', j, ...): unrolled blocks come first, then the scanned stack.
        if path[2] == "blocks":
            return (1, path[1], 0, path[3], _BLOCK_ORDER.get(tuple(path[4:]), 9))
        if path[2] == "scanned":
            return (1, path[1], 1, 0, _BLOCK_ORDER.get(tuple(path[3:]), 9))
    return (3, tuple(map(str, path)))  # anything new still appears, after the known layers


def is_main_path(name: str) -> bool:
    """Whether a layer of ``gradient_norms`` is on the main path (not a shortcut projection or gate)."""
    return ".shortcut." not in name


@functools.partial(jax.jit, static_argnames=("graphdef",))
def _grads(graphdef, params, rest, images, labels):
    def loss_fn(p):
        # copy=True: fresh variables at this trace level, so BatchNorm may update its statistics.
        model = nnx.merge(graphdef, p, rest, copy=True)
        logits = model(images)
        return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

    return jax.grad(loss_fn)(params)


def gradient_norms(model, batch: Mapping) -> list[tuple[str, float]]:
    """The norm of the loss gradient of each conv kernel and of the fc kernel, in network order.

    Args:
      model: a ``ResNet`` of the zoo, in any mode; it is not modified (a train-mode copy is used).
      batch: ``{"image": [N, H, W, C], "label": [N]}`` (a training batch).

    Returns:
      ``[(layer_path, norm), ...]``: the parameter path (``"conv1.kernel"``,
      ``"stages.0.blocks.1.conv2.kernel"``, ``"stages.1.blocks.0.shortcut.conv.kernel"``,
      ``"fc.kernel"``; the k-th block of a scanned stack is ``"stages.2.scanned.conv1.kernel[k]"``)
      and the L2 norm of d(mean cross-entropy)/d(kernel) as a float.
    """
    model = nnx.clone(model)  # train mode and BN statistic updates stay on the copy
    model.train()
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    grads = _grads(graphdef, params, rest, np.asarray(batch["image"]), np.asarray(batch["label"], np.int32))
    entries = []
    for path, value in nnx.to_flat_state(grads):
        if path[-1] != "kernel":
            continue
        g = np.asarray(value.get_value() if hasattr(value, "get_value") else value, np.float64)
        layer, name = tuple(path[:-1]), ".".join(map(str, path))
        if "scanned" in layer:
            # A scanned stage stores blocks 2..n stacked along axis 0: one entry per block.
            for k in range(g.shape[0]):
                key = _layer_order(layer)
                key = key[:3] + (k,) + key[4:]
                entries.append((key, f"{name}[{k}]", float(np.linalg.norm(g[k]))))
        else:
            entries.append((_layer_order(layer), name, float(np.linalg.norm(g))))
    entries.sort(key=lambda e: e[0])
    return [(name, norm) for _, name, norm in entries]


def plot_gradient_norms(
    norms: Mapping[str, Sequence[tuple[str, float]]],
    out: str | pathlib.Path,
    *,
    plain_labels: Collection[str] = (),
    title: str | None = None,
) -> pathlib.Path:
    """Gradient norm against layer depth (main path only), log-scale y axis.

    Args:
      norms: label -> the ``gradient_norms`` of one network.
      out: the PNG to write (replaced if it exists).
      plain_labels: the labels of plain networks, drawn dashed (residual networks solid).
      title: an optional title.

    Returns:
      The path written.
    """
    out = pathlib.Path(out)
    with common.pyplot() as plt:
        from matplotlib.ticker import MaxNLocator

        fig, ax = plt.subplots(figsize=(6.4, 4.0))
        for i, (label, entries) in enumerate(norms.items()):
            values = np.asarray([n for name, n in entries if is_main_path(name)], np.float64)
            # A log axis cannot show 0 (e.g. the last conv of a block behind a zero-initialised BN):
            # such points are left out of the line rather than drawn at an arbitrary floor.
            values = np.where(values > 0, values, np.nan)
            ax.plot(
                np.arange(1, len(values) + 1),
                values,
                marker=".",
                markersize=3,
                linewidth=1.2,
                color=f"C{i % 10}",
                linestyle="--" if label in plain_labels else "-",
                label=label,
            )
        ax.set_yscale("log")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set(xlabel="layer (depth, input to output)", ylabel="gradient norm ||dL/dW||")
        ax.legend()
        if title:
            ax.set_title(title)
        fig.tight_layout()
        fig.savefig(out)
        plt.close(fig)
    return out


def _parser() -> cli.ArgumentParser:
    p = cli.ArgumentParser(prog="python -m resnet_jax.analysis.gradient_flow", description=__doc__.split("\n")[0])
    g = p.add_argument_group("trained runs")
    g.add_argument("--runs", "--workdir", nargs="+", default=[], metavar="DIR", help="training run directories")
    g.add_argument(
        "--steps",
        nargs="+",
        type=int,
        default=None,
        help="0 (initialisation) and/or checkpoint steps (default: 0 and latest)",
    )
    add_model_arguments(p)
    p.add_argument("--batch_size", type=int, default=128, help="images in the batch (default 128)")
    p.add_argument("--labels", nargs="+", default=None, help="one legend label per run, then per model")
    p.add_argument("--out", required=True, help="the PNG to write")
    p.add_argument("--json", default=None, help="also write every layer's norm as JSON to this file")
    p.add_argument("--overwrite", action="store_true", help="replace existing output files")
    return p


def _summary(entries: Sequence[tuple[str, float]]) -> str:
    main = [n for name, n in entries if is_main_path(name)]
    return f"{len(entries)} weights, first layer {main[0]:.3g}, last {main[-1]:.3g}, min {min(main):.3g}"


def _run(args) -> int:
    n_sources = len(args.runs) + len(args.models)
    if not n_sources:
        raise UserError("nothing to analyse: give --runs DIR... and/or --models NAME...")
    if args.labels is not None and len(args.labels) != n_sources:
        raise UserError(f"--labels has {len(args.labels)} entries for {n_sources} runs and models")
    for r in args.runs:
        common.require_workdir(r)
    common.check_distinct_runs(args.runs)
    out = common.check_output(args.out, args.overwrite)
    json_out = common.check_output(args.json, args.overwrite, (".json",)) if args.json else None
    if args.batch_size < 1:
        raise UserError(f"--batch_size={args.batch_size}; must be positive")
    if args.steps is not None and any(s < 0 for s in args.steps):
        raise UserError(f"--steps {args.steps}: steps are >= 0 (0 is the initialisation)")

    from resnet_jax import data

    labels = list(args.labels or [])
    results: dict[str, dict] = {}
    plain: set[str] = set()

    def analyse(label, network, batch, is_plain, **meta):
        try:
            entries = gradient_norms(network, batch)
        except ValueError as e:  # e.g. a batch not divisible by the run's bn_group_size
            raise UserError(str(e)) from None
        results[label] = {**meta, "norms": entries}
        if is_plain:
            plain.add(label)
        print(f"{label}: {_summary(entries)}")

    run_labels = common.labels_for(args.runs, labels[: len(args.runs)] or None) if args.runs else []
    model_labels = labels[len(args.runs) :] or [f"{common.pretty_model_name(m)}, init" for m in args.models]
    common.check_distinct(run_labels + model_labels)
    # Every run and step is checked, and every checkpoint restored, before the first (slow)
    # gradient: a typo or a damaged checkpoint fails at once.
    plan = []
    for workdir in args.runs:
        loader = common.RunLoader(workdir)
        steps = args.steps if args.steps is not None else [0, loader.resolve_step("latest")]
        plan.append((loader, [s if s == 0 else loader.resolve_step(s) for s in dict.fromkeys(steps)]))
    restored = [{s: loader.model(s) for s in steps if s != 0} for loader, steps in plan]
    for workdir, base, (loader, steps), models in zip(args.runs, run_labels, plan, restored):
        cfg = loader.config.to_dict()
        for step in steps:
            model = loader.init() if step == 0 else models.pop(step)
            batch = common.train_batch(loader.config.dataset, args.batch_size, seed=loader.config.seed, step=step)
            label = f"{base}, init" if step == 0 else f"{base}, iter {step}"
            analyse(label, model, batch, common.is_plain(cfg), workdir=str(workdir), step=step)

    if args.models:
        dataset_cfg = common.dataset_config(args.dataset, image_size=args.image_size, data_dir=args.data_dir)
        info = data.get_info(dataset_cfg)
        batch = common.train_batch(dataset_cfg, args.batch_size, seed=args.seed)
        for name, label in zip(args.models, model_labels):
            model = common.init_model(name, info.num_classes, seed=args.seed, **model_options(args))
            plain_net = common.is_plain({"model": {"name": name, "shortcut": args.shortcut}})
            analyse(label, model, batch, plain_net, model=name, step=0)

    plot_gradient_norms({k: r["norms"] for k, r in results.items()}, out, plain_labels=plain)
    print(f"wrote {out}")
    if json_out is not None:
        json_out.write_text(json.dumps(results, indent=2))
        print(f"wrote {json_out}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry point; returns the exit status (0, or 2 after a one-line ``error: ...``)."""
    args = _parser().parse_args(argv)
    cli.setup_logging()
    return common.run_main(lambda: _run(args))


if __name__ == "__main__":
    import sys

    sys.exit(main())
