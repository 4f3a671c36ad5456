"""Paper 2, Table 1: shortcut variants of ResNet-110 on CIFAR-10.

Command (argument: the variant; default original):
  python -m resnet_jax.train --config=experiments/preact_shortcuts.py:exclusive_gating --workdir=runs/t1_excl
  variants: original, constant_scaling, exclusive_gating, shortcut_gating, conv_shortcut
Expected CIFAR-10 test error, % (paper 2, Table 1): original 6.61; constant scaling 0.5/0.5 12.35;
exclusive gating, b_g init -6: 8.70; shortcut-only gating, b_g init -6: 6.91; 1x1 conv shortcut 12.22.
Recipe: paper 1's CIFAR recipe (batch 128, lr 0.1 /10 at 32k/48k, 64k iterations, wd 1e-4) with
lr 0.01 for the first 400 iterations.
Compute: as experiments/cifar10.py:resnet110 (about an hour or two on one GPU per run).
"""

from resnet_jax.config import cifar_paper_recipe, get_base_config

VARIANTS = {
    "original": dict(shortcut="A"),
    "constant_scaling": dict(shortcut="scaled"),
    "exclusive_gating": dict(shortcut="gated", gate_bias_init=-6.0),
    "shortcut_gating": dict(shortcut="shortcut_gated", gate_bias_init=-6.0),
    "conv_shortcut": dict(shortcut="C"),
}


def get_config(arg: str = "original"):
    if arg not in VARIANTS:
        raise ValueError(f"experiments/preact_shortcuts.py:{arg}: use one of {', '.join(VARIANTS)}")
    c = cifar_paper_recipe(get_base_config())
    c.model.name = "cifar_resnet110"
    c.model.zero_init_last_bn = False
    for k, v in VARIANTS[arg].items():
        setattr(c.model, k, v)
    c.warmup_steps = 400
    c.warmup_kind = "constant"
    c.warmup_lr_factor = 0.1
    return c
