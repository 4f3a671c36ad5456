"""Sweep: paper 2, Table 1 (ResNet-110 shortcut variants) and pre-act ResNet-164/1001 on CIFAR-10/100
against the original (post-activation) nets of the same depths (paper 2, Tables 2 and 3).

Command:
  python -m resnet_jax.sweep experiments/sweep_preact.py --seeds 3 --root runs/preact [--slurm runs/preact.sbatch]
  python -m resnet_jax.analysis.results_table --root runs/preact --markdown preact.md
Expected: the numbers in experiments/preact_shortcuts.py and experiments/cifar_preact.py.
Compute: 5 + 8 configurations x seeds, each 64k steps of batch 128 (the 1001-layer nets about 6x
a 164-layer one).
"""

VARIANTS = ("original", "constant_scaling", "exclusive_gating", "shortcut_gating", "conv_shortcut")


def get_sweep():
    runs = [dict(name=f"r110_{v}", config=f"experiments/preact_shortcuts.py:{v}") for v in VARIANTS]
    runs += [
        dict(name=f"{kind}{d}_{ds}", config=f"experiments/cifar_preact.py:{d}:{ds}{suffix}")
        for kind, suffix in (("preact", ""), ("original", ":original"))
        for d in (164, 1001)
        for ds in ("cifar10", "cifar100")
    ]
    return runs
