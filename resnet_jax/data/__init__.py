"""Input pipelines: every dataset behind one small API, plus the host-to-device step.

Datasets (``config.dataset.name``):

* ``digits``: scikit-learn's bundled 8x8 digits (1,437 train / 360 test), in memory, numpy only.
* ``cifar10`` / ``cifar100``: TFDS + tf.data; ``validation_split=True`` trains on 45k, tests on 5k.
* ``imagenet2012``: TFDS, built from the ILSVRC 2012 tars in ``manual_dir``; ``eval_crops=10``
  gives paper 1's 10-crop testing.
* ``synthetic``: random data of any shape; ``synthetic_global_batch`` makes it on the devices.

Usage in a trainer::

    info = data.get_info(config.dataset)
    batches = data.train_batches(config.dataset, global_batch_size=B, seed=config.seed, start_step=step)
    for batch in data.prefetch(batches, sharding):  # global jax.Arrays
        ...

Each host's iterator yields only that host's rows of the global batch (``B / process_count``);
``to_global`` / ``prefetch`` assemble the global arrays. Training iterators are infinite and
deterministic given the seed: the batch of step ``k`` is the same whether the iterator started at
0 or at ``start_step=k``. Eval iterators make one pass, padded with ``mask == 0`` rows, and every
host yields the same number of batches.

Importing this package (and using digits or synthetic) never imports TensorFlow; the TFDS datasets
import it on first use.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from resnet_jax.data.base import DATASET_NAMES, DatasetInfo, dataset_name, model_input, resolve_processes
from resnet_jax.data.device import prefetch, to_global
from resnet_jax.data.synthetic import synthetic_global_batch

__all__ = [
    "DATASET_NAMES",
    "DatasetInfo",
    "eval_batches",
    "get_info",
    "model_input",
    "prefetch",
    "synthetic_global_batch",
    "to_global",
    "train_batches",
]

_TFDS_NAMES = ("cifar10", "cifar100", "imagenet2012")


def _module(dataset_cfg: Any):
    """The module implementing the configured dataset (TensorFlow is imported only for TFDS ones)."""
    name = dataset_name(dataset_cfg)
    if name == "digits":
        from resnet_jax.data import digits

        return digits
    if name == "synthetic":
        from resnet_jax.data import synthetic

        return synthetic
    assert name in _TFDS_NAMES, name
    from resnet_jax.data import tfds_datasets

    return tfds_datasets


def get_info(dataset_cfg: Any) -> DatasetInfo:
    """Returns the static facts of the configured dataset.

    For a TFDS dataset this prepares it if needed (downloads CIFAR; builds ImageNet from the tars).

    Args:
        dataset_cfg: ``config.dataset`` (its keys and their meaning: ``resnet_jax.config``).

    Returns:
        The ``DatasetInfo``: name, classes, training image shape and split sizes.

    Raises:
        UserError: Unknown name, inconsistent options, or a dataset that is not prepared and cannot
            be (no internet, ImageNet tars missing).
    """
    return _module(dataset_cfg).get_info(dataset_cfg)


def train_batches(
    dataset_cfg: Any,
    *,
    global_batch_size: int,
    seed: int,
    start_step: int = 0,
    process_index: int | None = None,
    process_count: int | None = None,
) -> Iterator[dict]:
    """An infinite iterator over this host's share of the training batches.

    Args:
        dataset_cfg: ``config.dataset``.
        global_batch_size: Examples per step over all hosts; must be divisible by ``process_count``.
        seed: Run seed: fixes the example order and the augmentation.
        start_step: Global step of the first batch (resume): the result equals an iterator started
            at 0 and advanced ``start_step`` times. Free for digits/synthetic; TFDS datasets skip at
            most one epoch of raw records.
        process_index: This host; defaults to ``jax.process_index()``.
        process_count: Number of hosts; defaults to ``jax.process_count()``.

    Returns:
        An iterator of ``{'image': [B/P, H, W, C], 'label': int32 [B/P]}`` numpy batches. Images
        are uint8 pixels (TFDS datasets, synthetic) or float32 already normalised (digits); feed
        them to a model through ``model_input(images, info.pixels)``, as the train step does.
        Setup (and any UserError) happens in this call, before the first batch is requested.
    """
    process_index, process_count = resolve_processes(process_index, process_count)
    return _module(dataset_cfg).train_batches(
        dataset_cfg,
        global_batch_size=global_batch_size,
        seed=seed,
        start_step=start_step,
        process_index=process_index,
        process_count=process_count,
    )


def eval_batches(
    dataset_cfg: Any,
    *,
    global_batch_size: int,
    process_index: int | None = None,
    process_count: int | None = None,
) -> Iterator[dict]:
    """One pass over this host's share of the evaluation split.

    Args:
        dataset_cfg: ``config.dataset``.
        global_batch_size: Examples per eval step over all hosts; divisible by ``process_count``.
        process_index: This host; defaults to ``jax.process_index()``.
        process_count: Number of hosts; defaults to ``jax.process_count()``.

    Returns:
        An iterator of ``{'image', 'label', 'mask'}`` numpy batches of ``B/P`` rows; ``mask`` is
        float32, 0 on padding rows. Over all hosts each eval example has mask 1 exactly once (the
        masks sum to ``num_eval``), and every host yields the same number of batches.
        ``image`` is [B/P, H, W, C], or [B/P, 10, H, W, C] for ImageNet with ``eval_crops=10``,
        of the dtype ``train_batches`` yields.
    """
    process_index, process_count = resolve_processes(process_index, process_count)
    return _module(dataset_cfg).eval_batches(
        dataset_cfg,
        global_batch_size=global_batch_size,
        process_index=process_index,
        process_count=process_count,
    )
