"""Paper 2 on ImageNet: the original and the full pre-activation ResNet-200, tested on 320 crops.

Command (argument: network; default preact_resnet200):
  python -m resnet_jax.train --config=experiments/imagenet_preact.py:preact_resnet200 --workdir=runs/in_pre200 \
      --config.dataset.manual_dir=/data/imagenet_tars
  networks: resnet152 resnet200 preact_resnet152 preact_resnet200
  the paper's single 320x320 crop test (training and the eval during it use 224 crops):
  python -m resnet_jax.evaluate --workdir=runs/in_pre200 --eval_image_size=320   # -> eval_<step>_320px.json
Expected single-crop 320x320 top-1 / top-5 error, % (paper 2): pre-act ResNet-200 20.7 / 5.3,
original ResNet-200 21.8 / 6.0.
Recipe: paper 1's, as paper 2 says it uses "the same hyper-parameters and implementations":
batch 256, lr 0.1 /10 at epochs 30, 60, 90 of 120, wd 1e-4, momentum 0.9, scale augmentation
[256, 480] with AlexNet's colour augmentation, the bottleneck stride on the first 1x1 conv. The
320 crops are taken as the 224 ones are: the shorter side resized to 320 * 256 / 224 = 366, then
the centre crop (the paper does not say how it resized). The results table shows the 224 (or
10-crop) error and, in a row of its own, the 320 one (eval_<step>_320px.json) beside the paper's.
Compute: ResNet-200 14.78 GMACs per 224 image forward (30.15 at 320), 64.7M parameters; about
13.6 EFLOP for 120 epochs (forward + backward = 3x forward, 2 FLOP per multiply-add). Activations
at batch 256 are large: --config.model.remat=true trades compute for memory.
"""

from resnet_jax.config import get_base_config, imagenet_paper_recipe

NETWORKS = ("resnet152", "resnet200", "preact_resnet152", "preact_resnet200")


def get_config(arg: str = "preact_resnet200"):
    if arg not in NETWORKS:
        raise ValueError(f"experiments/imagenet_preact.py:{arg}: use one of {', '.join(NETWORKS)}")
    c = imagenet_paper_recipe(get_base_config())
    c.model.name = arg
    c.model.zero_init_last_bn = False  # the papers' initialisation
    c.model.stride_in = "1x1"
    return c
