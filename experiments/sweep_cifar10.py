"""Sweep: paper 1, Fig. 6 and Table 6 on CIFAR-10, plain vs residual at 20-110 layers, plus 1202.

Command:
  python -m resnet_jax.sweep experiments/sweep_cifar10.py --seeds 5 --root runs/cifar10
  on a SLURM cluster: add --slurm runs/cifar10.sbatch, then `sbatch runs/cifar10.sbatch`
Then the figure and the table:
  python -m resnet_jax.analysis.curves --runs runs/cifar10/plain20/seed0 ... --out fig6.png
  python -m resnet_jax.analysis.results_table --root runs/cifar10 --markdown table6.md
Expected: Table 6 of paper 1 (see experiments/cifar10.py), mean +/- std over seeds.
Compute: 11 networks x seeds runs of 64k steps (about 1-2 GPU-hours each; 1202 about 10x).
"""


def get_sweep():
    runs = [
        dict(name=f"{kind}{d}", config=f"experiments/cifar10.py:{kind}{d}")
        for kind in ("plain", "resnet")
        for d in (20, 32, 44, 56, 110)
    ]
    runs.append(dict(name="resnet1202", config="experiments/cifar10.py:resnet1202"))
    return runs
