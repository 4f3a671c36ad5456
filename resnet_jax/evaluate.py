"""Evaluate a run's checkpoint on its eval split.

  python -m resnet_jax.evaluate --workdir=DIR [--checkpoint=latest|best|STEP] [--eval_crops=10]
      [--eval_image_size=320]

Prints one JSON object (step, eval/loss, eval/top1_acc, eval/top5_acc) and writes it to
``DIR/eval_<step>.json`` (``DIR/eval_<step>_<crops>crop.json`` with more than one crop, and
``..._<size>px.json`` for crops of another size than the run's, so that the result of each
protocol for the same step is kept).
"""

from __future__ import annotations

import json

from absl import flags

from resnet_jax import cli
from resnet_jax.config import EVAL_CROPS
from resnet_jax.errors import UserError
from resnet_jax.logbook import write_atomic
from resnet_jax.workdir import load_config_dict, other_size, require_workdir, result_path

flags.DEFINE_string("workdir", None, "the training run's --workdir")
flags.DEFINE_string("checkpoint", "latest", "'latest', 'best' (by eval top-1) or a step number")
flags.DEFINE_integer("eval_crops", None, "1 (centre crop) or 10 (the paper's 10-crop testing, ImageNet only)")
flags.DEFINE_integer("eval_image_size", None, "ImageNet: side of the eval crops (default: the run's own)")


@cli.guarded
def _main(argv) -> None:
    if len(argv) > 1:
        raise UserError(f"unexpected arguments {argv[1:]}; evaluate takes flags only, e.g. --workdir=DIR")
    f = flags.FLAGS
    if not f.workdir:
        raise UserError("--workdir is required")
    require_workdir(f.workdir)
    if f.eval_crops is not None and f.eval_crops not in EVAL_CROPS:
        raise UserError(
            f"--eval_crops={f.eval_crops}: use 1 (centre crop) or 10 (the paper's 10-crop testing, imagenet2012 only)"
        )
    # What can be checked without JAX is, before JAX is imported: a mistyped path or checkpoint is
    # answered in a fraction of a second.
    run_config = load_config_dict(f.workdir)
    if f.checkpoint not in ("latest", "best") and not f.checkpoint.isdigit():
        raise UserError(f"--checkpoint={f.checkpoint!r}: use 'latest', 'best' or a step number")
    dataset = run_config.get("dataset", {})
    if f.eval_image_size is not None and (f.eval_image_size < 1 or dataset.get("name") != "imagenet2012"):
        raise UserError(
            f"--eval_image_size={f.eval_image_size}: give a positive size, for an imagenet2012 run "
            f"(this run's dataset: {dataset.get('name')})"
        )
    cli.check_environment()
    cli.setup_logging()
    from resnet_jax.train import evaluate_checkpoint

    overrides = {k: v for k, v in (("eval_crops", f.eval_crops), ("eval_image_size", f.eval_image_size)) if v}
    step, metrics = evaluate_checkpoint(f.workdir, f.checkpoint, overrides)
    out = {"step": step, **metrics}
    # The crops the evaluation used (the run's own setting unless --eval_crops; valid by now).
    crops = f.eval_crops or int(dataset.get("eval_crops", 1))
    print(json.dumps(out))  # first: a result that cannot be saved is not lost with it
    path = result_path(f.workdir, step, crops, other_size(dataset, f.eval_image_size))
    try:
        write_atomic(path, json.dumps(out, indent=2))
    except OSError as e:
        raise UserError(f"cannot write {path} ({e.strerror}); the result is the line above") from None


def main():
    cli.run(_main)


if __name__ == "__main__":
    main()
