"""Train-step time of a linear probe (``config.trainable='head'``) against training the whole
network, with the Trainer's own jitted step on one synthetic batch, interleaved.

    python benchmarks/probe_step.py [--model cifar_resnet20] [--batch_size 128] [--steps 5] [--repeats 2]

Prints the median seconds per step of each, for each repeat. README (fine-tuning) and
resnet_jax/optim.py quote it.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def step_seconds(model: str, batch_size: int, trainable: str, steps: int) -> float:
    """Median wall time of ``steps`` train steps after one warm-up (compile) step."""
    import jax

    from resnet_jax import data
    from resnet_jax.config import get_base_config
    from resnet_jax.train import Trainer

    c = get_base_config()
    c.model.name, c.batch_size, c.trainable = model, batch_size, trainable
    c.dataset.name, c.dataset.image_size, c.dataset.num_classes = "synthetic", 32, 10
    c.dataset.num_examples = 10 * batch_size
    trainer = Trainer.for_config(c)
    state = trainer.init_state()
    batch = data.to_global(
        next(data.train_batches(c.dataset, global_batch_size=batch_size, seed=0)), trainer.batch_sharding
    )
    state, metrics = trainer.train_step(state, batch)
    jax.block_until_ready(metrics)
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        state, metrics = trainer.train_step(state, batch)
        jax.block_until_ready(metrics)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="cifar_resnet20")
    p.add_argument("--batch_size", type=int, default=128)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--repeats", type=int, default=2)
    args = p.parse_args()
    for r in range(args.repeats):
        whole = step_seconds(args.model, args.batch_size, "all", args.steps)
        probe = step_seconds(args.model, args.batch_size, "head", args.steps)
        print(f"repeat {r}: all {whole:.3f} s/step, head {probe:.3f} s/step, {whole / probe:.1f}x")


if __name__ == "__main__":
    main()
