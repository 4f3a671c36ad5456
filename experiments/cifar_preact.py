"""Paper 2: full pre-activation ResNet-164 and ResNet-1001 (bottleneck, 9n+2) on CIFAR-10/100,
and the original (post-activation) nets of the same depths they are compared with.

Command (argument: depth, dataset, and ':original' for the baseline; default 164:cifar10):
  python -m resnet_jax.train --config=experiments/cifar_preact.py:1001:cifar100 --workdir=runs/pre1001_c100
  python -m resnet_jax.train --config=experiments/cifar_preact.py:1001:cifar100:original --workdir=runs/org1001_c100
Expected test error, % (paper 2): pre-act ResNet-164 CIFAR-10 5.46, CIFAR-100 24.33; pre-act
ResNet-1001 CIFAR-10 4.92 (4.89 +/- 0.14), CIFAR-100 22.71 (22.68 +/- 0.22). Original ResNet-164
5.93 / 25.16, original ResNet-1001 7.61 / 27.82. Parameters 1.7M / 10.2M.
Recipe: batch 128, lr 0.1 (0.01 for the first 400 iterations), /10 at 32k and 48k, stop at 64k,
wd 1e-4, momentum 0.9; 1x1 projection shortcuts where the width changes, reading the
pre-activated input; the stride on the first 1x1 conv of a bottleneck (stride_in='1x1'), as in the
paper's own code (KaimingHe/resnet-1k-layers, resnet-pre-act.lua), whose projections are bare
1x1 convolutions (no BN after), as the cifar_preact_resnet family's are.
Compute: ResNet-164 about 0.25 GMACs per image; ResNet-1001 about 1.5 GMACs per image and, at batch
128, about 30 GB of activations (use --config.model.remat=true below 40 GB). ResNet-1001 is scanned
(scan_blocks='auto') so its train step compiles in seconds.
"""

from resnet_jax.config import cifar_paper_recipe, get_base_config


def get_config(arg: str = "164:cifar10"):
    parts = arg.split(":")
    depth, dataset, variant = [*parts, "", ""][:3]
    dataset = dataset or "cifar10"
    valid = depth in ("164", "1001") and dataset in ("cifar10", "cifar100") and variant in ("", "original")
    if len(parts) > 3 or not valid:
        raise ValueError(
            f"experiments/cifar_preact.py:{arg}: use 164 or 1001, then :cifar10 or :cifar100, then optionally :original"
        )
    c = cifar_paper_recipe(get_base_config())
    c.model.name = f"cifar_{'bottleneck' if variant else 'preact'}_resnet{depth}"
    c.model.zero_init_last_bn = False
    c.model.stride_in = "1x1"  # the paper's code (and paper 1's bottleneck) strides the first 1x1
    c.dataset.name = dataset
    c.warmup_steps = 400
    c.warmup_kind = "constant"
    c.warmup_lr_factor = 0.1
    return c
