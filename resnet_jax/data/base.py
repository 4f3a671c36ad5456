"""Pieces every dataset shares: ``DatasetInfo``, config access and the host/batch arithmetic.

Batch layout conventions (all datasets):

* ``global_batch_size`` B is split over ``process_count`` P hosts; each host gets ``B // P`` rows.
  B must be divisible by P.
* For in-memory datasets (digits, synthetic) host ``p`` takes rows ``[p*B/P, (p+1)*B/P)`` of the
  global batch, so a P-process run sees exactly the batches of a 1-process run.
* Eval passes are padded to whole batches; padded rows have ``mask == 0``.
"""

from __future__ import annotations

import atexit
import dataclasses
import math
import weakref
from typing import Any

from resnet_jax.config import DATASETS, eval_crops_supported
from resnet_jax.errors import UserError

#: Every value ``config.dataset.name`` accepts.
DATASET_NAMES = DATASETS


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
    """Static facts about a dataset, as configured.

    Attributes:
        name: The dataset name (one of ``DATASET_NAMES``).
        num_classes: Number of label classes.
        image_shape: ``(H, W, C)`` of one training image as yielded by ``train_batches``.
        num_train: Examples in the training split (one epoch).
        num_eval: Examples in the evaluation split; ``eval_batches`` counts each exactly once.
        pixel_mean, pixel_std: Per-channel statistics (0..1 scale) with which ``model_input``
            normalises the dataset's uint8 images on the device; ``None`` for a dataset that
            yields float images already normalised (digits).
    """

    name: str
    num_classes: int
    image_shape: tuple[int, int, int]
    num_train: int
    num_eval: int
    pixel_mean: tuple[float, ...] | None = None
    pixel_std: tuple[float, ...] | None = None

    @classmethod
    def from_dict(cls, d: dict) -> DatasetInfo:
        """The inverse of ``dataclasses.asdict`` through JSON (lists back to tuples)."""
        tupled = {k: tuple(v) if isinstance(v, list) else v for k, v in d.items()}
        return cls(**{f.name: tupled[f.name] for f in dataclasses.fields(cls) if f.name in tupled})

    @property
    def pixels(self) -> tuple[tuple[float, ...], tuple[float, ...]] | None:
        """``(pixel_mean, pixel_std)``, the argument of ``model_input``; None for float datasets."""
        return None if self.pixel_mean is None else (self.pixel_mean, self.pixel_std)


def model_input(images: Any, pixels: tuple[tuple[float, ...], tuple[float, ...]] | None) -> Any:
    """The float images a model takes, from a batch's images (numpy on the host, or traced in jit).

    The TFDS and synthetic pipelines yield uint8 pixels: a quarter of float32's bytes through
    tf.data's batching and the host-to-device copy, and no normalisation pass on the host (measured
    on 16 cores: ImageNet augmentation 2.6-2.7k -> 3.4-3.7k img/s, benchmarks/RESULTS.md). The
    train and eval steps normalise them here, where XLA fuses it into the first convolution's input.

    Args:
        images: ``[..., C]`` uint8 pixels, or float images already normalised (passed through).
        pixels: ``DatasetInfo.pixels``: ``(mean, std)`` per channel on the 0..1 scale.

    Returns:
        float32 ``(x / 255 - mean) / std`` for uint8 input, else ``images`` unchanged.
    """
    if images.dtype != "uint8":
        return images
    if pixels is None:
        raise ValueError("uint8 images need the dataset's pixel mean and std (DatasetInfo.pixels) to be normalised")
    import numpy as np

    mean, std = pixels
    scale = np.float32(1.0) / (np.asarray(std, np.float32) * np.float32(255.0))
    return (images.astype(np.float32) - np.asarray(mean, np.float32) * np.float32(255.0)) * scale


def cfg_get(dataset_cfg: Any, key: str, default: Any = None) -> Any:
    """Reads ``dataset_cfg.key``; a missing key or a ``None`` placeholder gives ``default``.

    Tolerating missing keys lets tests and tools pass a partial ``ConfigDict``, or a plain dict
    (``{"name": "digits"}``).
    """
    value = dataset_cfg.get(key) if isinstance(dataset_cfg, dict) else getattr(dataset_cfg, key, None)
    return default if value is None else value


def check_no_imagenet_augment(dataset_cfg: Any, own: str) -> None:
    """The ImageNet augmentation keys would silently mean nothing for another dataset's ``own``
    augmentation (the synthetic data takes them, so that any config can be timed on it)."""
    for key, default in (("train_augment", "inception"), ("lighting_std", 0.0), ("eval_image_size", None)):
        value = cfg_get(dataset_cfg, key, default)
        if value != default:
            raise UserError(
                f"config.dataset.{key}={value!r} is an ImageNet option; {dataset_name(dataset_cfg)} "
                f"trains with {own}: leave it unset."
            )


def dataset_name(dataset_cfg: Any) -> str:
    """The configured dataset name, validated."""
    name = cfg_get(dataset_cfg, "name")
    if name not in DATASET_NAMES:
        raise UserError(f"Unknown dataset {name!r}: config.dataset.name must be one of {', '.join(DATASET_NAMES)}.")
    return name


def eval_crops(dataset_cfg: Any) -> int:
    """Validated ``config.dataset.eval_crops`` (1, or 10 where the dataset supports it)."""
    crops = int(cfg_get(dataset_cfg, "eval_crops", 1))
    name = dataset_name(dataset_cfg)
    if eval_crops_supported(crops, name):
        return crops
    allowed = "1 or 10" if eval_crops_supported(10, name) else "1 (10-crop testing is for imagenet2012 only)"
    raise UserError(f"config.dataset.eval_crops={crops} is not supported for {name}: use {allowed}.")


def check_no_digits_augment(dataset_cfg: Any, own: str) -> None:
    """``augment`` turns on the digits' random shifts; another dataset's ``own`` augmentation would
    silently ignore it."""
    if cfg_get(dataset_cfg, "augment", False):
        raise UserError(
            f"config.dataset.augment=True is the digits' random shifts; {dataset_name(dataset_cfg)} "
            f"trains with {own}: set it to False."
        )


def check_no_validation_split(dataset_cfg: Any) -> None:
    """``validation_split`` is a CIFAR option (45k/5k); elsewhere it would silently mean nothing."""
    if cfg_get(dataset_cfg, "validation_split", False):
        raise UserError(
            f"config.dataset.validation_split=True is only supported for cifar10/cifar100, "
            f"not {dataset_name(dataset_cfg)}: set it to False."
        )


def check_num_classes(dataset_cfg: Any, actual: int) -> None:
    """A ``num_classes`` set for a real dataset must agree with it (the key is meant for synthetic)."""
    wanted = cfg_get(dataset_cfg, "num_classes")
    if wanted is not None and int(wanted) != actual:
        raise UserError(
            f"config.dataset.num_classes={wanted} but {dataset_name(dataset_cfg)} has {actual} classes: "
            "leave num_classes unset (it is for the synthetic dataset)."
        )


def resolve_processes(process_index: int | None, process_count: int | None) -> tuple[int, int]:
    """Fills in ``jax.process_index()`` / ``jax.process_count()`` and validates the pair."""
    if process_index is None or process_count is None:
        import jax  # Imported here so that pure-numpy callers that pass both never need a backend.

        process_index = jax.process_index() if process_index is None else process_index
        process_count = jax.process_count() if process_count is None else process_count
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index={process_index} is not in [0, process_count={process_count}).")
    return int(process_index), int(process_count)


def host_batch_size(global_batch_size: int, process_count: int) -> int:
    """``global_batch_size // process_count``, or a UserError if it does not divide evenly."""
    if global_batch_size <= 0:
        raise UserError(f"The batch size must be positive, got {global_batch_size}.")
    if global_batch_size % process_count:
        raise UserError(
            f"The global batch size {global_batch_size} is not divisible by the number of processes "
            f"{process_count}: choose a multiple of {process_count}."
        )
    return global_batch_size // process_count


def num_eval_batches_global(num_eval: int, global_batch_size: int) -> int:
    """Eval batches when the global batch walks the split in order (in-memory datasets)."""
    return math.ceil(num_eval / global_batch_size)


def host_share(num_examples: int, process_index: int, process_count: int) -> tuple[int, int]:
    """The ``[start, end)`` slice of a split that one host reads (sizes differ by at most one)."""
    start = num_examples * process_index // process_count
    end = num_examples * (process_index + 1) // process_count
    return start, end


# Iterators over tf.data pipelines that nobody else will close. Those still open when Python exits
# are closed by an atexit hook: left to interpreter finalisation, deleting a tf.data iterator whose
# pipeline runs Python (e.g. `from_generator`, which `tfds.testing.mock_data` uses) can hang the
# process after its last line. An owner (``prefetch``) takes an iterator out of this set and closes
# it from the thread that runs it: closing it from here at the same time can crash TensorFlow.
_CLOSE_AT_EXIT: weakref.WeakSet = weakref.WeakSet()


def close_at_exit(iterator):
    """Registers a generator to be closed at exit unless an owner claims it; returns it."""
    _CLOSE_AT_EXIT.add(iterator)
    return iterator


def claim(iterator) -> None:
    """The caller now closes ``iterator`` itself: the exit hook must leave it alone."""
    try:
        _CLOSE_AT_EXIT.discard(iterator)
    except TypeError:  # not weak-referenceable, so never registered
        pass


@atexit.register
def _close_open_iterators() -> None:
    for iterator in list(_CLOSE_AT_EXIT):
        try:
            iterator.close()
        except Exception:  # noqa: BLE001 - best effort at exit
            pass
