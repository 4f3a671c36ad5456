"""CIFAR-10, CIFAR-100 and ImageNet (ILSVRC 2012) through TensorFlow Datasets and tf.data.

Importing this module imports TensorFlow (and hides every GPU from it: JAX owns the accelerators).
``resnet_jax.data`` imports it only when one of these datasets is asked for.

Preparation: a dataset missing from ``data_dir`` is prepared on first use by a single process.
CIFAR is downloaded (needs internet). Its servers are tried first with a 10 s connection: offline,
TFDS's own retries would take about 3.5 minutes (backoff) to give up.
ImageNet is built from ``ILSVRC2012_img_train.tar`` and ``ILSVRC2012_img_val.tar`` in
``manual_dir`` (hours for the real data: better run ``python -m resnet_jax.prepare imagenet2012``
once beforehand).
Multi-process runs must find the dataset prepared.

Training pipeline, per host:

1. The host reads only its contiguous share ``[p*n/P, (p+1)*n/P)`` of the training split (TFDS
   slicing; each host's share is fixed for the whole run) as *raw* records (the image stays
   encoded).
2. Epoch ``e`` is that share shuffled with seeds derived from (seed, host, e). CIFAR's share goes
   through a shuffle buffer as large as the share. ImageNet's 10,000-record buffer is <1% of a
   one-host share: alone it would keep every example within about one buffer of the place it had
   in the first epoch (the same images would open and close every epoch). So epoch ``e`` first
   reads the share's record files (its TFDS file instructions) in a permutation of their own,
   several files interleaved at a time, and then shuffles through the buffer (TFDS already shuffled
   the records across files when it prepared the dataset). Either way an epoch is a permutation of
   the share. The epochs are concatenated into one stream; an epoch may end in the middle of a
   batch.
3. Resuming at step ``k`` starts the stream at epoch ``k*b // n_host`` and skips the remaining
   ``k*b % n_host`` raw records (never more than one epoch, and before any parsing or decoding).
4. Record ``i`` of the stream is decoded and augmented with the stateless seed
   (hash(seed, host), i), so the same step always sees the same pixels.

Evaluation: each host reads its share of the eval split in order, pads it with masked zero images
to ``ceil(ceil(n/P) / b)`` batches (the same count on every host), so every example is counted
exactly once.
"""

from __future__ import annotations

import contextlib
import dataclasses
import glob
import math
import os
import pathlib
import socket
import tempfile
from collections.abc import Iterator
from typing import Any

import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds
from absl import logging

from resnet_jax import cli
from resnet_jax.config import IMAGENET_IMAGE_SIZE
from resnet_jax.data import augment, base
from resnet_jax.errors import UserError, describe
from resnet_jax.prepare import command as prepare_command

try:
    # JAX owns the accelerators; a TensorFlow that grabs GPU memory would starve it.
    tf.config.set_visible_devices([], "GPU")
except RuntimeError:  # TensorFlow already initialised its devices (someone imported it earlier).
    pass

IMAGENET_TARS = ("ILSVRC2012_img_train.tar", "ILSVRC2012_img_val.tar")
# The sizes of image-net.org's files, to tell a truncated download from a complete one.
IMAGENET_TAR_BYTES = "147,897,477,120 and 6,744,924,160 bytes"
# Paper 1's CIFAR validation protocol: train on the first 45k training images, test on the last 5k.
CIFAR_TRAIN_HOLDOUT = 45_000
_STREAM_END = 2**62  # "infinite" for tf.data ranges
_SHUFFLE_TAG, _AUGMENT_TAG = 1, 2


@dataclasses.dataclass(frozen=True)
class _Spec:
    """What differs between the TFDS datasets."""

    num_classes: int
    train_split: str
    eval_split: str
    # Split sizes of the real dataset: only used when TFDS reports none (tfds.testing.mock_data).
    known_sizes: dict[str, int]
    default_image_size: int
    shuffle_buffer: int | None  # None: the whole host share
    mean: tuple[float, ...] = ()
    std: tuple[float, ...] = ()
    # (host, port) of the servers TFDS downloads it from: its GCS mirror and the dataset's own
    download_from: tuple[tuple[str, int], ...] = ()


def _cifar(num_classes: int, mean: tuple[float, ...], std: tuple[float, ...]) -> _Spec:
    # TFDS tries its GCS mirror first, then the dataset's own server.
    servers = (("storage.googleapis.com", 443), ("www.cs.toronto.edu", 443))
    return _Spec(num_classes, "train", "test", {"train": 50_000, "test": 10_000}, 32, None, mean, std, servers)


_SPECS = {
    "cifar10": _cifar(10, augment.CIFAR10_MEAN, augment.CIFAR10_STD),
    "cifar100": _cifar(100, augment.CIFAR100_MEAN, augment.CIFAR100_STD),
    "imagenet2012": _Spec(
        1000,
        "train",
        "validation",
        {"train": 1_281_167, "validation": 50_000},
        IMAGENET_IMAGE_SIZE,
        10_000,
        augment.IMAGENET_MEAN,
        augment.IMAGENET_STD,
    ),
}


@dataclasses.dataclass(frozen=True)
class _Slice:
    """``split[start:end]`` of a TFDS split."""

    split: str
    start: int
    end: int

    @property
    def size(self) -> int:
        return self.end - self.start

    def host_share(self, process_index: int, process_count: int) -> _Slice:
        a, b = base.host_share(self.size, process_index, process_count)
        return _Slice(self.split, self.start + a, self.start + b)

    def __str__(self) -> str:
        return f"{self.split}[{self.start}:{self.end}]"


def _spec(name: str) -> _Spec:
    return _SPECS[name]


def _manual_dir(dataset_cfg: Any, builder) -> str:
    """The configured manual_dir, else TFDS's default ``<data_dir>/downloads/manual``."""
    manual_dir = base.cfg_get(dataset_cfg, "manual_dir")
    return os.fspath(manual_dir or os.path.join(os.fspath(builder.data_dir_root), "downloads", "manual"))


def make_builder(name: str, data_dir: str | None = None):
    """``tfds.builder``, without the empty ``tmp*tfds`` directory it leaves for an unprepared dataset.

    TFDS 4.9 (``DatasetInfo.initialize_from_bucket``) makes that directory before it finds its GCS
    access disabled, and then never uses it: every run and test left one in the temp directory. Only
    directories that appeared during the call and are still empty are removed (``os.rmdir``).
    """
    pattern = os.path.join(tempfile.gettempdir(), "tmp*tfds")
    before = set(glob.glob(pattern))
    made = tfds.builder(name, data_dir=data_dir)
    for path in set(glob.glob(pattern)) - before:
        with contextlib.suppress(OSError):  # not empty, or gone already: not ours to remove
            os.rmdir(path)
    return made


def _prepared_builder(dataset_cfg: Any):
    """A TFDS builder whose data is prepared, preparing it (download / manual tars) if needed."""
    name = base.dataset_name(dataset_cfg)
    configured = base.cfg_get(dataset_cfg, "data_dir")
    if configured and "://" not in os.fspath(configured):  # a local path: TFDS fails deep inside
        cli.check_output_dir(pathlib.Path(configured).expanduser().absolute(), "config.dataset.data_dir")
    builder = make_builder(name, configured)
    if builder.is_prepared():
        return builder
    data_dir = os.fspath(builder.data_dir_root)

    import jax

    if jax.process_count() > 1:
        # Several hosts preparing into one (shared) data_dir would race; prepare it once beforehand.
        raise UserError(
            f"{name} is not prepared in data_dir {data_dir}: prepare it once before a multi-process run "
            f"(`{prepare_command(name, data_dir)}`)."
        )
    if name == "imagenet2012":
        manual_dir = _manual_dir(dataset_cfg, builder)
        missing = [tar for tar in IMAGENET_TARS if not tf.io.gfile.exists(os.path.join(manual_dir, tar))]
        if missing:
            raise UserError(
                f"imagenet2012 is not prepared in data_dir {data_dir}, and manual_dir {manual_dir} lacks "
                f"{', '.join(missing)}: download {' and '.join(IMAGENET_TARS)} from "
                f"https://image-net.org/download-images into {manual_dir} (or set config.dataset.manual_dir "
                "to their directory); the next run then prepares the dataset (hours)."
            )
        logging.warning(
            "Preparing imagenet2012 in %s from the tars in %s (hours for the full dataset).", data_dir, manual_dir
        )
        try:
            builder.download_and_prepare(download_config=tfds.download.DownloadConfig(manual_dir=manual_dir))
        except Exception as error:  # noqa: BLE001 - truncated, empty or foreign tars fail in many ways
            raise UserError(
                f"cannot prepare imagenet2012 from the tars in {manual_dir} ({describe(error, 200)}): check that they are "
                f"the complete downloads ({IMAGENET_TAR_BYTES}), then run again: the next run prepares "
                f"data_dir {data_dir} anew."
            ) from None
        return builder

    def cannot_download(why: str) -> UserError:
        return UserError(
            f"{name} is not prepared in data_dir {data_dir} and could not be downloaded "
            f"({why}): run `{prepare_command(name, data_dir)}` on a machine with "
            f"internet (or copy its ~/tensorflow_datasets/{name} there), then set config.dataset.data_dir."
        )

    servers = _spec(name).download_from
    if servers and not _proxied():
        failures = [f for f in map(_connect, servers) if f]
        if len(failures) == len(servers):  # fail now, not after TFDS's minutes of retries
            raise cannot_download("; ".join(failures))
    logging.warning("%s is not in %s: downloading and preparing it (needs internet).", name, data_dir)
    try:
        builder.download_and_prepare()
    except Exception as error:  # Any download failure has the same remedy.
        raise cannot_download(type(error).__name__) from error
    return builder


def _connect(server: tuple[str, int]) -> str | None:
    """None if ``server`` accepts a connection within 10 s, else why not."""
    try:
        socket.create_connection(server, timeout=10).close()
        return None
    except OSError as error:
        return f"{server[0]}: {error.strerror or type(error).__name__}"


def _proxied() -> bool:
    """Whether downloads go through a proxy (then a direct connection proves nothing)."""
    names = ("https_proxy", "http_proxy", "all_proxy")
    return any(os.environ.get(n) or os.environ.get(n.upper()) for n in names)


def _split_sizes(builder, name: str) -> dict[str, int]:
    splits = builder.info.splits
    if not splits:
        # Only under tfds.testing.mock_data: the wheel ships no metadata, TFDS then knows no splits.
        logging.warning("TFDS reports no splits for %s (mocked?): using the real split sizes.", name)
        return dict(_spec(name).known_sizes)
    return {split_name: split.num_examples for split_name, split in splits.items()}


def _check_shards(builder, name: str, splits: tuple[str, ...]) -> None:
    """Every record file of ``splits`` is in the prepared data_dir: a deleted or lost shard would
    otherwise stop the run mid-epoch (or at its first evaluation) with TensorFlow's NotFoundError."""
    if not builder.info.splits:  # mocked (tfds.testing.mock_data): no files to check
        return
    present = set(tf.io.gfile.listdir(os.fspath(builder.data_dir)))
    for split in splits:
        missing = [f for f in builder.info.splits[split].filenames if f not in present]
        if missing:
            raise UserError(
                f"{name} in {builder.data_dir} is damaged: {len(missing)} file(s) of its {split!r} split are "
                f"missing (e.g. {missing[0]}); delete {builder.data_dir} and run again to prepare it anew."
            )


TRAIN_AUGMENTS = ("inception", "scale")


def imagenet_augment_options(dataset_cfg: Any) -> tuple[bool, str, float]:
    """Validated (train_antialias, train_augment, lighting_std) of an ImageNet config."""
    antialias = base.cfg_get(dataset_cfg, "train_antialias", True)
    if not isinstance(antialias, bool):
        raise UserError(f"config.dataset.train_antialias={antialias!r}; use true or false")
    recipe = base.cfg_get(dataset_cfg, "train_augment", "inception")
    if recipe not in TRAIN_AUGMENTS:
        raise UserError(
            f"config.dataset.train_augment={recipe!r}; use 'inception' (random-resized crops) "
            "or 'scale' (paper 1's [256, 480] scale augmentation)"
        )
    lighting_std = base.cfg_get(dataset_cfg, "lighting_std", 0.0)
    if isinstance(lighting_std, bool) or not isinstance(lighting_std, int | float) or not lighting_std >= 0:
        raise UserError(f"config.dataset.lighting_std={lighting_std!r}; use a number >= 0 (paper 1: 0.1; 0: none)")
    return antialias, recipe, float(lighting_std)


def eval_image_size(dataset_cfg: Any, size: int) -> int:
    """The side of the ImageNet eval crops: ``dataset.eval_image_size``, else the training ``size``
    (paper 2 tests its 224-trained ResNet-200 on 320 crops)."""
    value = base.cfg_get(dataset_cfg, "eval_image_size")
    if value is None:
        return size
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise UserError(f"config.dataset.eval_image_size={value!r}; use a positive number of pixels, or unset")
    return value


def _layout(dataset_cfg: Any) -> tuple[Any, _Slice, _Slice, int, int]:
    """Prepares the dataset and returns (builder, train slice, eval slice, image size, eval crops)."""
    name = base.dataset_name(dataset_cfg)
    spec = _spec(name)
    base.check_num_classes(dataset_cfg, spec.num_classes)
    crops = base.eval_crops(dataset_cfg)
    size = int(base.cfg_get(dataset_cfg, "image_size", spec.default_image_size))
    validation_split = bool(base.cfg_get(dataset_cfg, "validation_split", False))
    if name.startswith("cifar"):
        if size != spec.default_image_size:
            raise UserError(f"{name} images are 32x32: leave config.dataset.image_size unset (or 32), not {size}.")
        base.check_no_imagenet_augment(dataset_cfg, "paper 1's pad-and-crop")
        base.check_no_digits_augment(dataset_cfg, "paper 1's pad-and-crop")
    else:
        base.check_no_digits_augment(dataset_cfg, "config.dataset.train_augment's crops")
        imagenet_augment_options(dataset_cfg)
        eval_image_size(dataset_cfg, size)
        if validation_split:
            base.check_no_validation_split(dataset_cfg)
        if size < 1:
            raise UserError(f"config.dataset.image_size must be positive, got {size}.")

    builder = _prepared_builder(dataset_cfg)
    sizes = _split_sizes(builder, name)
    for split in (spec.train_split, spec.eval_split):
        if split not in sizes:
            raise UserError(
                f"{name} in {builder.data_dir} has no {split!r} split (found: {', '.join(sizes)}); "
                "rebuild it with all its source files present."
            )
    _check_shards(builder, name, (spec.train_split, spec.eval_split))
    if validation_split:
        n = sizes[spec.train_split]
        train = _Slice(spec.train_split, 0, min(CIFAR_TRAIN_HOLDOUT, n))
        evaluation = _Slice(spec.train_split, train.end, n)
    else:
        train = _Slice(spec.train_split, 0, sizes[spec.train_split])
        evaluation = _Slice(spec.eval_split, 0, sizes[spec.eval_split])
    return builder, train, evaluation, size, crops


def get_info(dataset_cfg: Any) -> base.DatasetInfo:
    """See ``resnet_jax.data.get_info``."""
    _, train, evaluation, size, _ = _layout(dataset_cfg)
    name = base.dataset_name(dataset_cfg)
    return base.DatasetInfo(
        name=name,
        num_classes=_spec(name).num_classes,
        image_shape=(size, size, 3),
        num_train=train.size,
        num_eval=evaluation.size,
        pixel_mean=_spec(name).mean,
        pixel_std=_spec(name).std,
    )


def _options() -> tf.data.Options:
    options = tf.data.Options()
    options.deterministic = True  # parallel maps keep order: the same seed gives the same batches
    return options


def _raw_records(builder, piece: _Slice) -> tf.data.Dataset:
    """(encoded image, int32 label) pairs of ``piece``, in file order, nothing decoded."""
    if piece.size == 0:
        return tf.data.Dataset.from_tensor_slices((tf.constant([], tf.string), tf.constant([], tf.int32)))
    ds = builder.as_dataset(
        split=str(piece),
        shuffle_files=False,  # order comes from our own seeded per-epoch shuffle
        decoders={"image": tfds.decode.SkipDecoding()},  # decode after skipping, inside the map
        read_config=tfds.ReadConfig(options=_options()),
    )
    return ds.map(_image_and_label)


def _image_and_label(ex: dict) -> tuple[tf.Tensor, tf.Tensor]:
    """A TFDS example (image left encoded) as the (encoded image, int32 label) the pipelines take."""
    return ex["image"], tf.cast(ex["label"], tf.int32)


def _file_instructions(builder, piece: _Slice, buffer_size: int | None) -> list | None:
    """The TFDS file instructions of ``piece`` when its epochs must also shuffle the files: a
    TFRecord dataset whose shuffle buffer is smaller than ``piece``; else None (shuffle the records
    of ``_raw_records`` through the buffer alone: CIFAR, a mocked dataset, another file format)."""
    if buffer_size is None or buffer_size >= piece.size or not builder.info.splits:
        return None
    if builder.info.file_format != tfds.core.FileFormat.TFRECORD:
        return None
    return [f for f in builder.info.splits[str(piece)].file_instructions if f.take > 0]


def _file_shuffled_epochs(files: list, seed: int, buffer_size: int):
    """``epoch(e)``: the serialized records of ``files`` (TFDS file instructions), read in a
    permutation of the files seeded by (seed, e) with several files interleaved, then shuffled
    through a ``buffer_size`` buffer seeded by ``seed + e`` (``e``: an int64 tensor)."""
    names = tf.constant([f.filename for f in files], tf.string)
    skips = tf.constant([f.skip for f in files], tf.int64)
    takes = tf.constant([f.take for f in files], tf.int64)
    # Interleaving every file at once would put record j of each file near place j * n_files in
    # every epoch, whatever the file order. With at least 4 turns of files per epoch, an example's
    # place is set by its file's random turn instead (16 files read at once on a whole ImageNet).
    cycle_length = max(1, min(16, len(files) // 4))

    def read(name, skip, take):
        return tf.data.TFRecordDataset(name, buffer_size=8 << 20).skip(skip).take(take)  # TFDS's buffer

    def epoch(e):
        order = tf.random.experimental.stateless_shuffle(
            tf.range(len(files)), seed=tf.stack([tf.constant(seed, tf.int64), e])
        )
        ds = tf.data.Dataset.from_tensor_slices(
            (tf.gather(names, order), tf.gather(skips, order), tf.gather(takes, order))
        )
        ds = ds.interleave(
            read, cycle_length=cycle_length, block_length=1, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True
        )
        return ds.shuffle(buffer_size, seed=seed + e, reshuffle_each_iteration=False)

    return epoch


def _record_parser(builder):
    """Serialized TFDS example -> (encoded image, int32 label), as ``_raw_records`` yields them."""

    def parse(serialized):
        return _image_and_label(
            builder.info.features.deserialize_example(serialized, decoders={"image": tfds.decode.SkipDecoding()})
        )

    return parse


def _derived_seed(seed: int, process_index: int, tag: int) -> int:
    """A well-mixed 31-bit seed for one (run seed, host, purpose)."""
    return int(np.random.SeedSequence([seed, process_index, tag]).generate_state(1, np.uint32)[0] >> 1)


def train_batches(
    dataset_cfg: Any, *, global_batch_size: int, seed: int, start_step: int, process_index: int, process_count: int
) -> Iterator[dict[str, np.ndarray]]:
    """See ``resnet_jax.data.train_batches``."""
    name = base.dataset_name(dataset_cfg)
    spec = _spec(name)
    builder, train, _, size, _ = _layout(dataset_cfg)
    b = base.host_batch_size(global_batch_size, process_count)
    share = train.host_share(process_index, process_count)
    if share.size == 0:
        raise UserError(
            f"{name}: the training split has fewer examples ({train.size}) than processes ({process_count})."
        )
    shuffle_seed = _derived_seed(seed, process_index, _SHUFFLE_TAG)
    augment_seed = tf.constant(_derived_seed(seed, process_index, _AUGMENT_TAG), tf.int64)
    files = _file_instructions(builder, share, spec.shuffle_buffer)
    if files:  # ImageNet: each epoch reads the files in an order of its own (module docstring, step 2)
        epoch_size = sum(f.take for f in files)
        epoch = _file_shuffled_epochs(files, shuffle_seed, spec.shuffle_buffer)
    else:
        raw = _raw_records(builder, share)
        # The real record count (TFDS asserts cardinality); differs from the slice only when mocked.
        cardinality = int(raw.cardinality())
        epoch_size = cardinality if cardinality > 0 else share.size
        buffer_size = min(spec.shuffle_buffer or epoch_size, epoch_size)

        def epoch(e):  # e: int64 tensor. shuffle() takes a tensor seed, so each epoch is reseeded in-graph.
            return raw.shuffle(buffer_size, seed=shuffle_seed + e, reshuffle_each_iteration=False)

    start = start_step * b  # position of the first example in this host's stream
    start_epoch, offset = divmod(start, epoch_size)
    stream = tf.data.Dataset.range(start_epoch, _STREAM_END).flat_map(epoch).skip(offset)
    if files:  # serialized records: parsed only after the resume's skip
        stream = stream.map(_record_parser(builder), num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    positions = tf.data.Dataset.range(start, _STREAM_END)

    if name == "imagenet2012":
        antialias, recipe, lighting_std = imagenet_augment_options(dataset_cfg)

        def preprocess(position, image_bytes, label):
            example_seed = tf.stack([augment_seed, position])
            if recipe == "scale":
                image = augment.imagenet_scale_train(image_bytes, example_seed, size, lighting_std, antialias)
            else:
                image = augment.imagenet_train(image_bytes, example_seed, size, antialias, lighting_std)
            return {"image": image, "label": label}
    else:

        def preprocess(position, image_bytes, label):
            example_seed = tf.stack([augment_seed, position])
            return {"image": augment.cifar_train(image_bytes, example_seed), "label": label}

    ds = tf.data.Dataset.zip((positions, stream)).map(
        lambda position, record: preprocess(position, *record),
        num_parallel_calls=tf.data.AUTOTUNE,
        deterministic=True,
    )
    ds = ds.batch(b, drop_remainder=True).prefetch(tf.data.AUTOTUNE).with_options(_options())
    return _numpy_batches(ds)


def eval_batches(
    dataset_cfg: Any, *, global_batch_size: int, process_index: int, process_count: int
) -> Iterator[dict[str, np.ndarray]]:
    """See ``resnet_jax.data.eval_batches``."""
    name = base.dataset_name(dataset_cfg)
    builder, _, evaluation, size, crops = _layout(dataset_cfg)
    b = base.host_batch_size(global_batch_size, process_count)
    share = evaluation.host_share(process_index, process_count)
    # Every host runs the same number of batches: enough for the largest share.
    num_batches = math.ceil(math.ceil(evaluation.size / process_count) / b)

    if name == "imagenet2012":
        size = eval_image_size(dataset_cfg, size)
        image_shape = [size, size, 3] if crops == 1 else [crops, size, size, 3]

        def preprocess(image_bytes, label):
            image = augment.imagenet_eval(image_bytes, size, crops)
            return {"image": image, "label": label, "mask": tf.constant(1.0)}
    else:
        image_shape = [size, size, 3]

        def preprocess(image_bytes, label):
            image = augment.cifar_eval(image_bytes)
            return {"image": image, "label": label, "mask": tf.constant(1.0)}

    padding = tf.data.Dataset.from_tensors(
        {"image": tf.zeros(image_shape, tf.uint8), "label": tf.constant(0, tf.int32), "mask": tf.constant(0.0)}
    ).repeat()
    ds = _raw_records(builder, share).map(preprocess, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    ds = ds.concatenate(padding).take(num_batches * b)
    ds = ds.batch(b, drop_remainder=True).prefetch(tf.data.AUTOTUNE).with_options(_options())
    return _numpy_batches(ds)


def _numpy_batches(ds: tf.data.Dataset) -> Iterator[dict[str, np.ndarray]]:
    # A generator of its own so that the callers above do all their setup (and raise their
    # UserErrors) when called, not at the first next().
    def generate():
        yield from ds.as_numpy_iterator()

    return base.close_at_exit(generate())
