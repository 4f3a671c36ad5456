"""The degradation demo (paper 1, Fig. 6) on the embedded digits: plain vs residual, 20 vs 56 layers.

Command (all four runs, the figure and the tables):
  python -m resnet_jax.demo --workdir=runs/demo          # or: make demo
One run of it:
  python -m resnet_jax.train --config=experiments/degradation_digits.py --workdir=/tmp/p56 \
      --config.model.name=cifar_plain56
Expected: cifar_plain56 ends with a far higher training error than cifar_plain20 (tens of %), while
cifar_resnet56 ends within a fraction of a percent of cifar_resnet20, both near 0 (the numbers of
a measured run are in the README). Both kinds start from the paper's initialisation (no zero-init
of the last BN of a block, which would start the residual nets as identities and favour them).
Compute: 1.5 to 5 minutes for the four runs on a 2-core CPU, by the kind of CPU.
"""

from resnet_jax.config import get_base_config


def get_config():
    c = get_base_config()
    c.model.name = "cifar_resnet20"
    c.dataset.name = "digits"
    c.model.zero_init_last_bn = False  # the paper's initialisation, for residual and plain nets alike
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
