"""Evaluate a run's checkpoint on its eval split.

  python -m resnet_jax.evaluate --workdir=DIR [--checkpoint=latest|best|STEP] [--eval_crops=10]

Prints one JSON object (step, eval/loss, eval/top1_acc, eval/top5_acc) and writes it to
``DIR/eval_<step>.json``.
"""

from __future__ import annotations

import json
import pathlib

from absl import flags

from resnet_jax import cli
from resnet_jax.errors import UserError
from resnet_jax.workdir import load_config_dict

flags.DEFINE_string("workdir", None, "the training run's --workdir")
flags.DEFINE_string("checkpoint", "latest", "'latest', 'best' (by eval top-1) or a step number")
flags.DEFINE_integer("eval_crops", None, "ImageNet: 10 for the paper's 10-crop testing")


@cli.guarded
def _main(argv) -> None:
    f = flags.FLAGS
    if not f.workdir:
        raise UserError("--workdir is required")
    if not pathlib.Path(f.workdir).is_dir():
        raise UserError(f"workdir {f.workdir} does not exist")
    # What can be checked without JAX is, before JAX is imported: a mistyped path or checkpoint is
    # answered in a fraction of a second.
    load_config_dict(f.workdir)
    if f.checkpoint not in ("latest", "best") and not f.checkpoint.isdigit():
        raise UserError(f"--checkpoint={f.checkpoint!r}: use 'latest', 'best' or a step number")
    cli.setup_logging()
    from resnet_jax.train import evaluate_checkpoint

    overrides = {"eval_crops": f.eval_crops} if f.eval_crops else None
    step, metrics = evaluate_checkpoint(f.workdir, f.checkpoint, overrides)
    out = {"step": step, **metrics}
    (pathlib.Path(f.workdir) / f"eval_{step}.json").write_text(json.dumps(out, indent=2))
    print(json.dumps(out))


def main():
    cli.run(_main)


if __name__ == "__main__":
    main()
