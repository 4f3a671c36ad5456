"""The degradation demo (paper 1, Fig. 6) on the embedded digits: plain vs residual, 20 vs 56 layers.

Command (all four runs, the figure and the tables):
  python -m resnet_jax.demo --workdir=runs/demo          # or: make demo
One run of it:
  python -m resnet_jax.train --config=experiments/degradation_digits.py --workdir=/tmp/p56 \
      --config.model.name=cifar_plain56
Expected: cifar_plain56 ends with a higher training error than cifar_plain20, while cifar_resnet56
does not end higher than cifar_resnet20 (the numbers of a measured run are in the README).
Compute: about 5 minutes for the four runs on a 2-core CPU.
"""

from resnet_jax.config import get_base_config


def get_config():
    c = get_base_config()
    c.model.name = "cifar_resnet20"
    c.dataset.name = "digits"
    c.batch_size = 128
    c.num_epochs = 20.0
    c.learning_rate = 0.2  # for batch 256; 0.1 at batch 128 as in the paper
    c.lr_schedule = "cosine"
    c.warmup_epochs = 1.0  # without it the 56-layer nets spend the short budget recovering from lr 0.1
    c.weight_decay = 1e-4
    c.checkpoint_every_steps = 10_000  # the end of the run only
    c.eval_every_epochs = 20.0
    c.log_every_steps = 6  # two points per epoch for the curves
    c.progress_bar = False
    return c
