"""Paper 1, Fig. 6 and Table 6: plain and residual nets on CIFAR-10 (option A shortcuts).

Command (the argument after ':' picks the network; default resnet20):
  python -m resnet_jax.train --config=experiments/cifar10.py:resnet110 --workdir=runs/cifar10_resnet110
  networks: resnet20 resnet32 resnet44 resnet56 resnet110 resnet1202, plain20 plain32 plain44 plain56 plain110
  (and plain1202, which the paper does not train)
  model selection on paper 1's 45k/5k split: add --config.dataset.validation_split=true
Expected test error, % (paper 1, Table 6): ResNet-20 8.75, 32 7.51, 44 7.17, 56 6.97, 110 6.43
(best of 5; mean 6.61 +/- 0.16), 1202 7.93. Plain nets: Fig. 6 only; deeper plain nets have higher
training error (plain-110 above 60%).
Recipe: batch 128, lr 0.1 /10 at 32k and 48k iterations, stop at 64k, wd 1e-4, momentum 0.9, pad-4
crop + flip; the 110- and 1202-layer nets (plain-110 too) warm up at lr 0.01 for the first 400
iterations; the paper's initialisation (no zero-init of the last BN). Differences: inputs are
normalised per channel (mean and std), not per pixel (mean only), and the padding is black in
pixel space (torchvision's RandomCrop) where the paper's zero padding after mean subtraction is
the mean colour.
Compute: 64k steps of batch 128; ResNet-110 0.253 GMACs per image forward, about 12 PFLOP in all
(forward + backward = 3x forward, 2 FLOP per multiply-add); ResNet-1202 2.83 GMACs, about 11x that,
and about 20 GB of activations at batch 128 (set --config.model.remat=true on small GPUs).
Sweep over seeds: experiments/sweep_cifar10.py.
"""

from resnet_jax.config import cifar_paper_recipe, get_base_config

DEPTHS = (20, 32, 44, 56, 110, 1202)


def get_config(arg: str = "resnet20"):
    kind, depth = arg.rstrip("0123456789"), int(arg[len(arg.rstrip("0123456789")) :] or 20)
    if kind not in ("resnet", "plain") or depth not in DEPTHS:
        raise ValueError(f"experiments/cifar10.py:{arg}: use resnet or plain followed by one of {DEPTHS}")
    c = cifar_paper_recipe(get_base_config())
    c.model.name = f"cifar_{kind}{depth}"
    c.model.zero_init_last_bn = False  # the paper's initialisation
    if depth >= 110:
        # "0.1 is slightly too large to start converging": 0.01 until training error < 80% (~400 it).
        c.warmup_steps = 400
        c.warmup_kind = "constant"
        c.warmup_lr_factor = 0.1
    return c
