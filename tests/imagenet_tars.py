"""Tiny stand-ins for the ILSVRC 2012 tars, so TFDS's real imagenet2012 builder can run offline.

The layout is the real one:

* ``ILSVRC2012_img_train.tar`` holds one tar per class, named ``<synset>.tar`` (real synset ids,
  the first ``num_classes`` of the label file TFDS ships), each with JPEGs ``<synset>_<i>.JPEG``.
* ``ILSVRC2012_img_val.tar`` holds ``ILSVRC2012_val_00000001.JPEG`` ...; TFDS labels them with the
  first lines of the validation label file it ships (sorted file names -> labels).

Images are small random JPEGs of varying sizes (80x60 up to 120x90, landscape and portrait), so
the crops and the shorter-side resize see real aspect ratios.
"""

from __future__ import annotations

import io
import os
import tarfile

import numpy as np
from PIL import Image

TRAIN_TAR = "ILSVRC2012_img_train.tar"
VAL_TAR = "ILSVRC2012_img_val.tar"
_SIZES = ((80, 60), (120, 90), (60, 80), (100, 75), (90, 120), (96, 96))  # (width, height)


def _jpeg(rng: np.random.Generator, width: int, height: int) -> bytes:
    # Smooth gradients plus noise: compresses like a photo, decodes to a varied image.
    yy, xx = np.mgrid[0:height, 0:width]
    base = np.stack([xx * 255 // max(width - 1, 1), yy * 255 // max(height - 1, 1), (xx + yy) % 256], axis=-1)
    pixels = np.clip(base + rng.integers(-40, 40, base.shape), 0, 255).astype(np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels, "RGB").save(out, format="JPEG", quality=85)
    return out.getvalue()


def _add(tar: tarfile.TarFile, name: str, payload: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(payload)
    tar.addfile(info, io.BytesIO(payload))


def imagenet_synsets() -> list[str]:
    """The 1,000 synset ids in TFDS's label order (from the label file inside the package)."""
    from resnet_jax.data.tfds_datasets import make_builder

    return make_builder("imagenet2012").info.features["label"].names


def make_fake_imagenet_tars(manual_dir: str, num_classes: int = 2, images_per_class: int = 3, num_val: int = 4) -> dict:
    """Writes a tiny ``ILSVRC2012_img_train.tar`` and ``ILSVRC2012_img_val.tar`` into ``manual_dir``.

    Args:
        manual_dir: Directory to write the two tars into (created if missing).
        num_classes: Class sub-tars in the train tar (the first synsets of TFDS's label list).
        images_per_class: JPEGs per class.
        num_val: Validation JPEGs.

    Returns:
        ``{'synsets': [...], 'num_train': int, 'num_val': int}``.
    """
    os.makedirs(manual_dir, exist_ok=True)
    rng = np.random.default_rng(0)
    synsets = imagenet_synsets()[:num_classes]
    with tarfile.open(os.path.join(manual_dir, TRAIN_TAR), "w") as train_tar:
        for synset in synsets:
            inner = io.BytesIO()
            with tarfile.open(fileobj=inner, mode="w") as class_tar:
                for i in range(images_per_class):
                    width, height = _SIZES[i % len(_SIZES)]
                    _add(class_tar, f"{synset}_{i + 1}.JPEG", _jpeg(rng, width, height))
            _add(train_tar, f"{synset}.tar", inner.getvalue())
    with tarfile.open(os.path.join(manual_dir, VAL_TAR), "w") as val_tar:
        for i in range(num_val):
            width, height = _SIZES[(i + 1) % len(_SIZES)]
            _add(val_tar, f"ILSVRC2012_val_{i + 1:08d}.JPEG", _jpeg(rng, width, height))
    return {"synsets": synsets, "num_train": num_classes * images_per_class, "num_val": num_val}


def prepare_fake_imagenet(data_dir: str, manual_dir: str, *, num_shards: int | None = None, **tar_kwargs) -> dict:
    """Writes the fake tars, then prepares imagenet2012 from them with TFDS's real builder (~10 s).

    The preparation goes through ``resnet_jax.data.get_info``, the path a first real run takes
    (it calls the builder's ``download_and_prepare`` with ``manual_dir``), unless ``num_shards``
    is given: then the builder is called directly, to write every split in ``num_shards`` record
    files (each split needs at least that many images).

    Returns:
        What ``make_fake_imagenet_tars`` returns.
    """
    import ml_collections

    from resnet_jax import data

    made = make_fake_imagenet_tars(manual_dir, **tar_kwargs)
    if num_shards is not None:
        import tensorflow_datasets as tfds

        from resnet_jax.data.tfds_datasets import make_builder

        config = tfds.download.DownloadConfig(manual_dir=manual_dir, num_shards=num_shards)
        builder = make_builder("imagenet2012", data_dir=data_dir)
        builder.download_and_prepare(download_config=config)
        assert builder.info.splits["train"].num_shards == num_shards, builder.info.splits
        return made
    data.get_info(ml_collections.ConfigDict({"name": "imagenet2012", "data_dir": data_dir, "manual_dir": manual_dir}))
    return made
