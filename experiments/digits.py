"""CIFAR ResNet-20 on scikit-learn's 8x8 digits: the embedded default, no download.

Command:
  python -m resnet_jax.train --config=experiments/digits.py --workdir=/tmp/digits
Expected: >= 97.5% eval top-1 on the 360 held-out digits, within 120 s on a 2-core CPU
(compilation included). Compute: one CPU.
"""

from resnet_jax.config import get_base_config


def get_config():
    c = get_base_config()
    c.model.name = "cifar_resnet20"
    c.dataset.name = "digits"
    c.batch_size = 128
    c.num_epochs = 20.0
    c.learning_rate = 0.2  # for batch 256: 0.1 at batch 128
    c.lr_schedule = "cosine"
    c.warmup_epochs = 1.0
    c.weight_decay = 5e-4
    c.checkpoint_every_steps = 200
    c.eval_every_epochs = 10.0
    c.log_every_steps = 20
    return c
