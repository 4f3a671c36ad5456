"""Random images and labels of any shape, for benchmarks and smoke tests.

``image_size`` (default 224) and ``num_classes`` (default 1000) come from the config;
``num_examples`` sets the length of an "epoch" (default: ImageNet's 1,281,167); the eval split has
``min(num_examples, 10_000)`` examples. Images are uint8 pixels, uniform over 0..255, like the
TFDS datasets' (``DatasetInfo.pixels``: mean 0.5, std 0.25, so the model sees about [-2, 2]).

Two ways to get batches:

* ``train_batches`` / ``eval_batches`` yield numpy, like every other dataset. Example ``i`` of
  global step ``k`` is drawn from ``default_rng([seed, k, i])``, so the values do not depend on the
  process count and resuming at step ``k`` is free.
* ``synthetic_global_batch`` builds a global batch directly on the devices with a jitted function
  whose ``out_shardings`` is the batch sharding: no host work and no host-to-device copy, which is
  what a throughput benchmark wants.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator
from typing import Any

import numpy as np

from resnet_jax.data import base
from resnet_jax.errors import UserError

NAME = "synthetic"
DEFAULT_IMAGE_SIZE = 224
DEFAULT_NUM_CLASSES = 1000
MAX_EVAL_EXAMPLES = 10_000
# Keeps the eval stream's values apart from the train stream's for the same seed.
_EVAL_TAG = 0xE7A1
PIXEL_MEAN = (0.5, 0.5, 0.5)
PIXEL_STD = (0.25, 0.25, 0.25)


def get_info(dataset_cfg: Any) -> base.DatasetInfo:
    """See ``resnet_jax.data.get_info``."""
    base.check_no_validation_split(dataset_cfg)
    base.eval_crops(dataset_cfg)
    size = int(base.cfg_get(dataset_cfg, "image_size", DEFAULT_IMAGE_SIZE))
    num_classes = int(base.cfg_get(dataset_cfg, "num_classes", DEFAULT_NUM_CLASSES))
    num_examples = int(base.cfg_get(dataset_cfg, "num_examples", 1_281_167))
    if size < 1 or num_classes < 1 or num_examples < 1:
        raise UserError(
            f"synthetic data needs positive image_size, num_classes and num_examples, "
            f"got {size}, {num_classes}, {num_examples}."
        )
    return base.DatasetInfo(
        name=NAME,
        num_classes=num_classes,
        image_shape=(size, size, 3),
        num_train=num_examples,
        num_eval=min(num_examples, MAX_EVAL_EXAMPLES),
        pixel_mean=PIXEL_MEAN,
        pixel_std=PIXEL_STD,
    )


def _examples(info: base.DatasetInfo, key: tuple[int, ...], rows: np.ndarray) -> dict[str, np.ndarray]:
    """Draws the examples ``rows`` of the batch named by ``key``, each from its own generator."""
    images = np.empty((len(rows), *info.image_shape), np.uint8)
    labels = np.empty(len(rows), np.int32)
    for out, row in enumerate(rows):
        rng = np.random.default_rng([*key, int(row)])
        labels[out] = rng.integers(info.num_classes)
        images[out] = rng.integers(0, 256, info.image_shape, dtype=np.uint8)
    return {"image": images, "label": labels}


def train_batches(
    dataset_cfg: Any, *, global_batch_size: int, seed: int, start_step: int, process_index: int, process_count: int
) -> Iterator[dict[str, np.ndarray]]:
    """See ``resnet_jax.data.train_batches``."""
    info = get_info(dataset_cfg)
    b = base.host_batch_size(global_batch_size, process_count)
    rows = process_index * b + np.arange(b)

    def generate() -> Iterator[dict[str, np.ndarray]]:
        step = start_step
        while True:
            yield _examples(info, (seed, step), rows)
            step += 1

    return generate()


def eval_batches(
    dataset_cfg: Any, *, global_batch_size: int, process_index: int, process_count: int
) -> Iterator[dict[str, np.ndarray]]:
    """See ``resnet_jax.data.eval_batches``."""
    info = get_info(dataset_cfg)
    b = base.host_batch_size(global_batch_size, process_count)
    offsets = process_index * b + np.arange(b)

    def generate() -> Iterator[dict[str, np.ndarray]]:
        for j in range(base.num_eval_batches_global(info.num_eval, global_batch_size)):
            positions = j * global_batch_size + offsets
            batch = _examples(info, (_EVAL_TAG, j), positions)
            batch["mask"] = (positions < info.num_eval).astype(np.float32)
            yield batch

    return generate()


@functools.lru_cache(maxsize=16)
def _make_batch_fn(batch_shape: tuple[int, ...], num_classes: int, sharding: Any):
    """One compiled generator per (shape, classes, sharding): jitted once, reused every call."""
    import jax
    import jax.numpy as jnp

    def make(key):
        image_key, label_key = jax.random.split(key)
        return {
            "image": jax.random.randint(image_key, batch_shape, 0, 256, jnp.int32).astype(jnp.uint8),
            "label": jax.random.randint(label_key, batch_shape[:1], 0, num_classes, jnp.int32),
        }

    # out_shardings makes each device generate only its own shard: nothing goes through the host.
    return jax.jit(make, out_shardings={"image": sharding, "label": sharding})


def synthetic_global_batch(dataset_cfg: Any, global_batch_size: int, sharding: Any, seed: int = 0) -> dict[str, Any]:
    """A global batch of random data made on the devices, already laid out with ``sharding``.

    Args:
        dataset_cfg: ``config.dataset`` (``image_size`` and ``num_classes`` are read).
        global_batch_size: Rows of the global batch.
        sharding: A ``jax.sharding.Sharding`` for the batch, e.g.
            ``NamedSharding(mesh, PartitionSpec("data"))``; it shards the leading (batch) axis of
            both the images and the labels.
        seed: Seed of the random values.

    Returns:
        ``{'image': uint8 [B, H, W, C], 'label': int32 [B]}`` as global ``jax.Array``s.
    """
    import jax

    info = get_info(dataset_cfg)
    fn = _make_batch_fn((global_batch_size, *info.image_shape), info.num_classes, sharding)
    return fn(jax.random.key(seed))
