"""What the ImageNet training pipeline's choices cost on the host, interleaved, img/s and per core.

    python benchmarks/pipeline_variants.py [--images 256] [--batches 10] [--repeats 2] [--batch_size 128]

The variants of ``resnet_jax.data.augment.imagenet_train`` on generated 500x375 JPEGs (those of
``python -m resnet_jax.bench --input_pipeline``), through the same tf.data pipeline:

* ``uint8``: as committed: uint8 pixels out, normalised later on the device;
* ``float32_host_normalised``: the previous design: normalised to float32 on the host (4x the
  bytes through batching and the host-to-device copy);
* ``uint8_no_antialias``: ``config.dataset.train_antialias=False`` (plain bilinear resize).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import tensorflow as tf  # noqa: E402

from resnet_jax import bench  # noqa: E402
from resnet_jax.data import augment  # noqa: E402


def host_normalised(image: tf.Tensor) -> tf.Tensor:
    mean = tf.constant(augment.IMAGENET_MEAN, tf.float32) * 255.0
    std = tf.constant(augment.IMAGENET_STD, tf.float32) * 255.0
    return (tf.cast(image, tf.float32) - mean) / std


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--images", type=int, default=256)
    p.add_argument("--batches", type=int, default=10)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--batch_size", type=int, default=128)
    p.add_argument("--size", type=int, default=224)
    a = p.parse_args(argv)
    size = a.size
    variants = {
        "uint8": lambda img, seed: augment.imagenet_train(img, seed, size),
        "float32_host_normalised": lambda img, seed: host_normalised(augment.imagenet_train(img, seed, size)),
        "uint8_no_antialias": lambda img, seed: augment.imagenet_train(img, seed, size, antialias=False),
    }
    encoded = bench._encoded_images("imagenet", a.images)
    rates: dict[str, list[float]] = {k: [] for k in variants}
    for rep in range(a.repeats):
        for name in variants if rep % 2 == 0 else reversed(list(variants)):
            ds = bench._augmented_batches(encoded, variants[name], a.batch_size)
            rates[name].append(bench._time_batches(ds.as_numpy_iterator(), a.batches, a.batch_size))
    cores = bench.cpu_cores()
    base = statistics.median(rates["uint8"])
    print(f"ImageNet-style training pipeline, {cores} CPU cores, batch {a.batch_size}, {a.repeats} repeats")
    summary = {}
    for name, r in rates.items():
        med = statistics.median(r)
        summary[name] = {"img_per_s": med, "per_core": med / cores, "vs_uint8": med / base, "all": r}
        print(f"  {name:26s} {med:9.1f} img/s  {med / cores:8.1f} per core  {med / base:5.2f}x uint8")
    print(json.dumps({"cpu_cores": cores, "batch_size": a.batch_size, "variants": summary}))


if __name__ == "__main__":
    main()
