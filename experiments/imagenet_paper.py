"""Paper 1, Tables 2 and 3: plain and residual nets on ImageNet with the paper's recipe.

Command (argument: network and shortcut option; default resnet50):
  python -m resnet_jax.train --config=experiments/imagenet_paper.py:resnet34_B --workdir=runs/in_r34B \
      --config.dataset.manual_dir=/data/imagenet_tars
  networks: plain18 plain34 resnet18_A resnet34_A resnet34_B resnet34_C resnet50 resnet101 resnet152
  10-crop testing (the paper's protocol): python -m resnet_jax.evaluate --workdir=runs/in_r34B --eval_crops=10
Expected 10-crop top-1 error, % (paper 1): plain-18 27.94, ResNet-18 (A) 27.88, plain-34 28.54,
ResNet-34 A 25.03 / B 24.52 / C 24.19, ResNet-50 22.85, ResNet-101 21.75, ResNet-152 21.43.
Recipe: batch 256, lr 0.1 /10 at epochs 30, 60 and 90, stop at 120 (the paper's 60e4 iterations),
wd 1e-4, momentum 0.9; bottleneck stride on the first 1x1 conv (stride_in='1x1') as in the paper;
the paper's scale augmentation (shorter side in [256, 480], random 224 crop, flip) and AlexNet's
PCA colour augmentation (dataset.train_augment='scale', dataset.lighting_std=0.1). Differences:
per-channel mean/std normalisation instead of per-pixel mean subtraction, and BatchNorm over the
global batch unless --config.model.bn_group_size=32 (the paper's per-GPU statistics).
Compute: ResNet-50 3.86 GMACs per image forward, about 3.6 EFLOP for 120 epochs (forward +
backward = 3x forward, 2 FLOP per multiply-add).
"""

from resnet_jax.config import get_base_config, imagenet_paper_recipe

NETWORKS = (
    "plain18",
    "plain34",
    "resnet18_A",
    "resnet34_A",
    "resnet34_B",
    "resnet34_C",
    "resnet50",
    "resnet101",
    "resnet152",
)


def get_config(arg: str = "resnet50"):
    if arg not in NETWORKS:
        raise ValueError(f"experiments/imagenet_paper.py:{arg}: use one of {', '.join(NETWORKS)}")
    name, _, shortcut = arg.partition("_")
    c = imagenet_paper_recipe(get_base_config())
    c.model.name = name
    if shortcut:
        c.model.shortcut = shortcut
    c.model.zero_init_last_bn = False
    if name in ("resnet50", "resnet101", "resnet152"):
        c.model.stride_in = "1x1"
    return c
