"""Layer responses (paper 1, Fig. 7): the standard deviation of each convolutional layer's output.

Paper 1: "The responses are the outputs of each 3x3 layer, after BN and before other nonlinearity
(ReLU/addition)." One value per convolution on the main path, in network order
(``ResNet.conv_responses`` / ``conv_response_names``):

* the stem conv first (after its BN, before its ReLU; a CIFAR pre-activation stem has no BN: its
  bare output);
* then, block by block, each convolution of the residual branch after its BN and before the ReLU
  or the addition: for basic blocks (the CIFAR nets, ResNet-18/34) ``conv1`` (bn1's output, before
  the ReLU) and ``conv2`` (bn2's, the branch output before the addition). A 20-layer CIFAR net
  gives 1 + 2 x 9 = 19 values, a 56-layer one 55, a 110-layer one 109. In a plain network the
  same layers (the last one is before the block's ReLU).
* Bottleneck blocks (no Fig. 7 in paper 1): all three convolutions, ``conv1`` (1x1), ``conv2``
  (3x3) and ``conv3`` (1x1); the names in the JSON tell them apart.
* Pre-activation blocks (paper 2), where BN comes before the convolution: each convolution's
  output after the BN that follows it, before that BN's ReLU (``conv1`` -> ``bn2``), and the last
  convolution's bare output (it feeds the addition with no BN in between).

Projection shortcuts (1x1 convs) are not included.

Definition used here: the population standard deviation (ddof=0) of all ``N * H * W * C`` values
of a layer's response over the images (batch, spatial positions and channels pooled), computed in
eval mode (BatchNorm uses its running statistics, as at test time) unless ``train=True``. Images
are processed in chunks; the per-chunk means and variances are merged exactly (pooled variance).

For a freshly initialised network neither mode says much: the running statistics are still
mean 0, variance 1, so in eval mode BN passes the convolution output through nearly unchanged,
and in train mode each response is normalised to std ~1 (scale 1, bias 0) by construction. With
a zero-initialised last BN scale (the zoo's default) the last response of every residual block
is exactly 0.

Usage::

  # trained runs (latest checkpoint, or --checkpoint STEP), on a few eval batches of their dataset
  python -m resnet_jax.analysis.layer_responses --runs runs/plain20 runs/resnet20 runs/resnet56 \
      --out fig7.png [--labels plain-20 ResNet-20 ResNet-56] [--num_images 500] [--json fig7.json]
  python -m resnet_jax.analysis.layer_responses --workdir runs/resnet20    # -> runs/resnet20/layer_responses.png
  # freshly initialised networks
  python -m resnet_jax.analysis.layer_responses --models cifar_plain20 cifar_resnet20 --dataset digits \
      --out init.png [--width 16] [--zero_init_last_bn false] [--seed 0]

The JSON holds, per label, ``"layers"`` (the names, e.g. ``stem``, ``stage1.block1.conv1``) and
``"std"`` (one value per layer, the same order), with the run's workdir, step and model.

Library: ``layer_responses(model, images) -> np.ndarray [num_layers]`` (names:
``model.conv_response_names()``) and ``plot_layer_responses({label: values}, out, plain_labels=...)``.
"""

from __future__ import annotations

import functools
import json
import pathlib
from collections.abc import Collection, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from resnet_jax import cli
from resnet_jax.analysis import common
from resnet_jax.errors import UserError

DEFAULT_NUM_IMAGES = 500
DEFAULT_OUT = "layer_responses.png"


@functools.partial(jax.jit, static_argnames=("graphdef", "train"))
def _chunk_moments(graphdef, state, images, *, train: bool):
    """Per layer: the mean and (population) variance of the response over one chunk of images."""
    model = nnx.merge(graphdef, state)
    # The mode is set on this traced copy only: the caller's model is never switched or updated.
    if train:
        model.train()
    else:
        model.eval()
    _, responses = model.conv_responses(images)
    means, variances = [], []
    for r in responses:
        r = r.astype(jnp.float32)  # bf16 runs: the moments in float32
        m = jnp.mean(r)
        # Two-pass variance: exactly 0 for a zero response (zero-initialised last BN).
        means.append(m)
        variances.append(jnp.mean(jnp.square(r - m)))
    return jnp.stack(means), jnp.stack(variances)


def layer_responses(model, images, *, train: bool = False, batch_size: int = 256) -> np.ndarray:
    """The standard deviation of each convolutional layer's response (after BN, before ReLU/addition).

    Args:
      model: a ``ResNet`` of the zoo (residual or plain), in any mode; it is not modified.
      images: ``[N, H, W, C]`` float images (numpy or JAX).
      train: use batch statistics in BatchNorm (each chunk normalised by its own statistics, as in
        a training step) instead of the running statistics (test time, the default).
      batch_size: images per forward pass; the moments of the chunks are pooled exactly.

    Returns:
      ``float64 [num_layers]``, in network order (the names: ``model.conv_response_names()``):
      the population std (ddof=0) over all ``N * H * W * C`` values of each layer's response:
      the stem conv's, then each block's convolutions', after their BN and before the ReLU or
      the addition (see the module docstring; 1 + 2 per block for basic blocks).

    Raises:
      ValueError: no images, or ``batch_size < 1``.
    """
    images = np.asarray(images, np.float32)
    if images.ndim != 4 or not len(images):
        raise ValueError(f"images must be a non-empty [N, H, W, C] array, got shape {images.shape}")
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size}; must be positive")
    graphdef, state = nnx.split(model)
    weights, means, variances = [], [], []
    for start in range(0, len(images), batch_size):
        chunk = images[start : start + batch_size]
        m, v = _chunk_moments(graphdef, state, chunk, train=train)
        weights.append(len(chunk))  # every layer sees the same H*W*C per image: weight by images
        means.append(np.asarray(m, np.float64))
        variances.append(np.asarray(v, np.float64))
    w = np.asarray(weights, np.float64)[:, None] / sum(weights)
    means, variances = np.stack(means), np.stack(variances)  # [chunks, layers]
    mean = (w * means).sum(0)
    # Pooled variance: within-chunk variance plus the spread of the chunk means.
    var = (w * (variances + (means - mean) ** 2)).sum(0)
    return np.sqrt(var)


def plot_layer_responses(
    responses: Mapping[str, Sequence[float]],
    out: str | pathlib.Path,
    *,
    plain_labels: Collection[str] = (),
    title: str | None = None,
) -> pathlib.Path:
    """Fig. 7 of paper 1: the responses by layer index (top) and sorted by magnitude (bottom).

    Args:
      responses: label -> one std per layer, in network order (``layer_responses``: the stem conv
        first, then each block's convolutions).
      out: the PNG to write (replaced if it exists).
      plain_labels: the labels of plain networks, drawn dashed (residual networks solid).
      title: an optional figure title.

    Returns:
      The path written.
    """
    out = pathlib.Path(out)
    with common.pyplot() as plt:
        from matplotlib.ticker import MaxNLocator

        fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(6.4, 6.0))
        for i, (label, values) in enumerate(responses.items()):
            values = np.asarray(values, np.float64)
            style = dict(color=f"C{i % 10}", linestyle="--" if label in plain_labels else "-", linewidth=1.2)
            x = np.arange(1, len(values) + 1)
            legend = f"{label} ({len(values)} layers)"
            ax1.plot(x, values, label=legend, **style)
            ax2.plot(x, np.sort(values)[::-1], label=legend, **style)
        ylabel = "std (after BN, before ReLU/addition)"
        ax1.set(xlabel="conv layer index (original: 1 = stem, then the blocks' convs)", ylabel=ylabel)
        ax2.set(xlabel="conv layer index (sorted by magnitude)", ylabel=ylabel)
        for ax in (ax1, ax2):
            ax.set_ylim(bottom=0)
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
            ax.legend(loc="best")
        if title:
            fig.suptitle(title)
        fig.tight_layout()
        fig.savefig(out)
        plt.close(fig)
    return out


def _bool(value: str) -> bool:
    choices = {"true": True, "false": False, "1": True, "0": False}
    if value.lower() not in choices:
        import argparse

        raise argparse.ArgumentTypeError(f"invalid value {value!r}; valid: true, false")
    return choices[value.lower()]


def add_model_arguments(parser) -> None:
    """Flags that build freshly initialised networks (shared with ``gradient_flow``)."""
    from resnet_jax.data import DATASET_NAMES

    g = parser.add_argument_group("freshly initialised networks")
    g.add_argument("--models", "--model", nargs="+", default=[], metavar="NAME", help="zoo names, e.g. cifar_plain20")
    g.add_argument("--dataset", default="digits", choices=DATASET_NAMES, help="data for --models (default digits)")
    g.add_argument("--image_size", type=int, default=None, help="resize the dataset's images (default: native)")
    g.add_argument("--data_dir", default=None, help="TFDS data_dir for cifar10/cifar100/imagenet2012")
    g.add_argument("--width", type=int, default=None, help="base width of --models (default: the family's)")
    g.add_argument("--shortcut", default=None, help="shortcut kind of residual --models (default: the family's)")
    # Paper 1 did not zero-initialise the last BN of each block; the zoo does by default, which
    # makes every residual branch (and the gradient of its last conv) exactly 0 at initialisation.
    g.add_argument(
        "--zero_init_last_bn",
        type=_bool,
        default=False,
        metavar="{true,false}",
        help="zero-initialise each residual block's last BN scale (default false, as in paper 1)",
    )
    g.add_argument("--seed", type=int, default=0, help="initialisation seed of --models")


def model_options(args) -> dict:
    """The ``create_model`` options given on the command line (None = the family's default)."""
    opts = {"width": args.width, "zero_init_last_bn": args.zero_init_last_bn}
    if args.shortcut is not None:
        opts["shortcut"] = args.shortcut
    return opts


def _parser() -> cli.ArgumentParser:
    p = cli.ArgumentParser(prog="python -m resnet_jax.analysis.layer_responses", description=__doc__.split("\n")[0])
    g = p.add_argument_group("trained runs")
    g.add_argument("--runs", "--workdir", nargs="+", default=[], metavar="DIR", help="training run directories")
    g.add_argument("--checkpoint", default="latest", help="'latest' or a checkpoint step (default latest)")
    add_model_arguments(p)
    p.add_argument("--num_images", type=int, default=DEFAULT_NUM_IMAGES, help="eval images to use (default 500)")
    p.add_argument("--batch_size", type=int, default=250, help="images per forward pass (default 250)")
    p.add_argument("--train_mode", action="store_true", help="BatchNorm with batch statistics instead of running")
    p.add_argument("--labels", nargs="+", default=None, help="one legend label per run, then per model")
    p.add_argument("--out", default=None, help=f"the PNG (default with one run: DIR/{DEFAULT_OUT})")
    p.add_argument("--json", default=None, help="also write the values as JSON to this file")
    p.add_argument("--overwrite", action="store_true", help="replace existing output files")
    return p


def _run(args) -> int:
    n_sources = len(args.runs) + len(args.models)
    if not n_sources:
        raise UserError("nothing to analyse: give --runs DIR... and/or --models NAME...")
    if args.out is None:
        if n_sources != 1 or not args.runs:
            raise UserError("--out is required with several runs or with --models")
        args.out = str(pathlib.Path(args.runs[0]) / DEFAULT_OUT)
    if args.labels is not None and len(args.labels) != n_sources:
        raise UserError(f"--labels has {len(args.labels)} entries for {n_sources} runs and models")
    for r in args.runs:
        common.require_workdir(r)
    common.check_distinct_runs(args.runs)
    out = common.check_output(args.out, args.overwrite)
    json_out = common.check_output(args.json, args.overwrite, (".json",)) if args.json else None
    if args.checkpoint != "latest" and not args.checkpoint.isdigit():
        raise UserError(f"--checkpoint={args.checkpoint!r}: use 'latest' or a checkpoint step number")
    if args.num_images < 1:
        raise UserError(f"--num_images={args.num_images}; must be positive")
    if args.batch_size < 1:
        raise UserError(f"--batch_size={args.batch_size}; must be positive")

    from resnet_jax import data

    labels = list(args.labels or [])
    results: dict[str, dict] = {}
    plain: set[str] = set()
    image_cache: dict[str, np.ndarray] = {}

    def images_for(dataset_cfg) -> np.ndarray:
        key = json.dumps(dataset_cfg.to_dict(), sort_keys=True, default=str)
        if key not in image_cache:
            image_cache[key] = common.eval_images(dataset_cfg, args.num_images)[0]
        return image_cache[key]

    def responses(model, images) -> dict:
        try:
            values = layer_responses(model, images, train=args.train_mode, batch_size=args.batch_size)
        except ValueError as e:  # e.g. train mode with chunks not divisible by the run's bn_group_size
            raise UserError(str(e)) from None
        return {"layers": model.conv_response_names(), "std": values}

    run_labels = common.labels_for(args.runs, labels[: len(args.runs)] or None) if args.runs else []
    model_labels = labels[len(args.runs) :] or [f"{common.pretty_model_name(m)} (init)" for m in args.models]
    common.check_distinct(run_labels + model_labels)
    # Every run and checkpoint is checked, and restored, before the first (slow) forward pass.
    plan = [(common.RunLoader(w), label) for w, label in zip(args.runs, run_labels)]
    plan = [(loader, loader.resolve_step(args.checkpoint), label) for loader, label in plan]
    plan = [(loader, step, label, loader.model(step)) for loader, step, label in plan]
    for loader, step, label, model in plan:
        values = responses(model, images_for(loader.config.dataset))
        cfg = loader.config.to_dict()
        results[label] = {"workdir": str(loader.workdir), "step": step, "model": cfg["model"]["name"], **values}
        if common.is_plain(cfg):
            plain.add(label)

    if args.models:
        dataset_cfg = common.dataset_config(args.dataset, image_size=args.image_size, data_dir=args.data_dir)
        info = data.get_info(dataset_cfg)
        for name, label in zip(args.models, model_labels):
            model = common.init_model(name, info.num_classes, seed=args.seed, **model_options(args))
            values = responses(model, images_for(dataset_cfg))
            results[label] = {"model": name, "step": 0, **values}
            if common.is_plain({"model": {"name": name, "shortcut": args.shortcut}}):
                plain.add(label)

    mode = "train mode, BN batch statistics" if args.train_mode else "eval mode, BN running statistics"
    for label, r in results.items():
        v = r["std"]
        print(f"{label}: {len(v)} conv layers, std mean {v.mean():.4f} (min {v.min():.4f}, max {v.max():.4f})")
    plot_layer_responses({k: r["std"] for k, r in results.items()}, out, plain_labels=plain)
    print(f"wrote {out} ({mode})")
    if json_out is not None:
        payload = {k: {**r, "std": [float(x) for x in r["std"]]} for k, r in results.items()}
        json_out.write_text(json.dumps(payload, indent=2))
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
