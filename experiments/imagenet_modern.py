"""ImageNet with a modern recipe: cosine, warmup, label smoothing, bf16, large batch (LARS option).

Recipe (resnet_jax.config.imagenet_modern_recipe): batch 1024, lr 0.4 (0.1 per 256), 5 warmup
epochs, cosine over 90, label smoothing 0.1, Nesterov momentum 0.9 and weight decay 1e-4 on the
weights only (not BN or biases), as the Flax ImageNet example; stride on the 3x3 conv (v1.5) and
the last BN of each block zero-initialised (Goyal et al.).

Command (argument: network, optionally ':lars' for batch 32k with LARS; default resnet50):
  python -m resnet_jax.train --config=experiments/imagenet_modern.py:resnet50 --workdir=runs/in_r50 \
      --config.dataset.manual_dir=/data/imagenet_tars
  large batch: --config=experiments/imagenet_modern.py:resnet50:lars (batch 32768, LARS, lr 29.0 at
  32k as in You et al.; pass --config.batch_size to match your machines)
Expected single-crop top-1 accuracy: about 76-77% for ResNet-50 in 90 epochs (torchvision's v1 weights
76.13; Goyal et al. 76.3 at batch 8k; MLPerf's target 75.9), ResNet-18 ~70, ResNet-101 ~78.
Compute: ResNet-50 ~24.5 GFLOP per training image; 90 epochs ~2.8 EFLOP (8 H100: a few hours).
"""

from resnet_jax.config import get_base_config, imagenet_modern_recipe


def get_config(arg: str = "resnet50"):
    name, _, opt = arg.partition(":")
    c = imagenet_modern_recipe(get_base_config())
    c.model.name = name
    if opt == "lars":
        c.optimizer = "lars"
        c.batch_size = 32768
        c.learning_rate = 29.0 * 256 / 32768  # You et al.: peak lr 29 at batch 32k, linear scaling here
        c.warmup_epochs = 25.0
    elif opt:
        raise ValueError(f"experiments/imagenet_modern.py:{arg}: the only option is ':lars'")
    return c
