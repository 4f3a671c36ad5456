"""Prepare a TFDS dataset once, in one process, before training on it.

  python -m resnet_jax.prepare cifar10 [--data_dir DIR]
  python -m resnet_jax.prepare imagenet2012 --manual_dir /data/imagenet_tars [--data_dir DIR]

The first training run prepares a missing dataset itself (CIFAR is downloaded; ImageNet is built
from the two tars in ``manual_dir``, hours for the real data), but a multi-process run refuses to,
since its processes would race on one data_dir. This is that step on its own, with the trainer's
code and checks (TFDS's ``tfds build`` needs Apache Beam, which this project does not install).
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

from resnet_jax import cli
from resnet_jax.errors import UserError, first_line

TFDS_DATASETS = ("cifar10", "cifar100", "imagenet2012")


def command(name: str, data_dir: str | None = None) -> str:
    """The command that prepares ``name`` (for error messages that ask for it)."""
    where = f" --data_dir={data_dir}" if data_dir else ""
    manual = " --manual_dir=DIR_OF_THE_TARS" if name == "imagenet2012" else ""
    return f"python -m resnet_jax.prepare {name}{where}{manual}"


def prepare(name: str, data_dir: str | None = None, manual_dir: str | None = None) -> str:
    """Prepares ``name`` if needed; returns a line saying what is there. Raises UserError."""
    from resnet_jax import data
    from resnet_jax.config import get_base_config

    cfg = get_base_config().dataset
    cfg.name, cfg.data_dir, cfg.manual_dir = name, data_dir, manual_dir
    info = data.get_info(cfg)
    return (
        f"{name} is prepared: {info.num_train:,} training and {info.num_eval:,} eval images, {info.num_classes} classes"
    )


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry point; 0, or 2 after a one-line ``error: ...``."""
    parser = cli.ArgumentParser(prog="python -m resnet_jax.prepare", description=__doc__.split("\n")[0])
    parser.add_argument("dataset", choices=TFDS_DATASETS, help="the TFDS dataset")
    parser.add_argument("--data_dir", default=None, help="TFDS data_dir (default ~/tensorflow_datasets)")
    parser.add_argument("--manual_dir", default=None, help="imagenet2012: the directory of the two ImageNet tars")
    args = parser.parse_args(argv)
    if args.manual_dir and args.dataset != "imagenet2012":
        parser.error(f"--manual_dir is for imagenet2012 (its tars), not {args.dataset}")
    cli.setup_logging()
    try:
        print(prepare(args.dataset, args.data_dir, args.manual_dir))
    except UserError as e:
        print(f"error: {first_line(e)}", file=sys.stderr)
        return cli.EXIT_USAGE
    return 0


if __name__ == "__main__":
    sys.exit(main())
