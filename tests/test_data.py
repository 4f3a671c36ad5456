"""Tests of resnet_jax.data: every dataset's shapes, determinism, resume, host split and eval masks.

No network: digits ship with scikit-learn, CIFAR is mocked by ``tfds.testing.mock_data``, ImageNet
is prepared by TFDS's real builder from tiny fake tars (the ``imagenet_data_dir`` fixture).
"""

from __future__ import annotations

import dataclasses
import gc
import math
import os
import subprocess
import sys
import tempfile
import textwrap
import threading
import time

import jax
import ml_collections
import numpy as np
import pytest
from cli_env import user_env
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from resnet_jax import data
from resnet_jax.config import get_base_config
from resnet_jax.data import digits
from resnet_jax.errors import UserError

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def dataset_cfg(**overrides) -> ml_collections.ConfigDict:
    """``config.dataset`` of the base config with ``overrides`` (new keys allowed, e.g. augment)."""
    cfg = get_base_config().dataset
    for key, value in overrides.items():
        cfg[key] = value
    return cfg


def take(iterator, n):
    return [next(iterator) for _ in range(n)]


def assert_batches_equal(a: list[dict], b: list[dict]):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.keys() == y.keys()
        for key in x:
            np.testing.assert_array_equal(x[key], y[key], err_msg=key)


def concat_hosts(per_host: list[dict]) -> dict:
    return {key: np.concatenate([batch[key] for batch in per_host]) for key in per_host[0]}


# ----------------------------------------------------------------------------------------- digits


def test_digits_info_shapes_and_labels():
    info = data.get_info(dataset_cfg(name="digits"))
    assert info == data.DatasetInfo("digits", 10, (8, 8, 3), 1437, 360)
    batch = next(data.train_batches(dataset_cfg(name="digits"), global_batch_size=32, seed=0))
    assert batch["image"].shape == (32, 8, 8, 3) and batch["image"].dtype == np.float32
    assert batch["label"].shape == (32,) and batch["label"].dtype == np.int32
    assert batch["label"].min() >= 0 and batch["label"].max() < 10
    assert np.isfinite(batch["image"]).all()
    np.testing.assert_array_equal(batch["image"][..., 0], batch["image"][..., 2])  # grey replicated

    cfg16 = dataset_cfg(name="digits", image_size=16)
    assert data.get_info(cfg16).image_shape == (16, 16, 3)
    assert next(data.train_batches(cfg16, global_batch_size=4, seed=0))["image"].shape == (4, 16, 16, 3)


def test_digits_resize_matches_jax_linear_upsampling():
    x = np.random.default_rng(0).standard_normal((3, 8, 8))
    for size in (16, 32):
        w = digits._linear_resize_matrix(8, size)
        ours = np.einsum("ih,nhw,jw->nij", w, x, w)
        theirs = jax.image.resize(x, (3, size, size), "linear")
        np.testing.assert_allclose(ours, theirs, atol=1e-5)


def test_digits_deterministic_and_seeded():
    cfg = dataset_cfg(name="digits")
    a = take(data.train_batches(cfg, global_batch_size=64, seed=3), 3)
    b = take(data.train_batches(cfg, global_batch_size=64, seed=3), 3)
    c = take(data.train_batches(cfg, global_batch_size=64, seed=4), 3)
    assert_batches_equal(a, b)
    assert not np.array_equal(a[0]["label"], c[0]["label"])


@pytest.mark.parametrize("augment", [False, True])
def test_digits_resume_equals_advancing(augment):
    cfg = dataset_cfg(name="digits", augment=augment)
    # 1437 / 128: step 11 holds the end of epoch 0 and the start of epoch 1.
    advanced = take(data.train_batches(cfg, global_batch_size=128, seed=0), 14)[10:]
    resumed = take(data.train_batches(cfg, global_batch_size=128, seed=0, start_step=10), 4)
    assert_batches_equal(advanced, resumed)


def test_digits_augmentation_shifts_images():
    kwargs = dict(global_batch_size=64, seed=0)
    plain = next(data.train_batches(dataset_cfg(name="digits"), **kwargs))
    shifted = next(data.train_batches(dataset_cfg(name="digits", augment=True), **kwargs))
    np.testing.assert_array_equal(plain["label"], shifted["label"])  # same examples, other pixels
    assert not np.array_equal(plain["image"], shifted["image"])
    # A translation keeps the pixel values: the shifted image's pixels are background or from its source.
    background = digits._load(8)["background"]
    for src, dst in zip(plain["image"][..., 0], shifted["image"][..., 0]):
        assert set(np.round(dst.ravel(), 5)) <= set(np.round(src.ravel(), 5)) | {np.round(background, 5)}


def test_digits_epoch_is_a_permutation():
    cfg = dataset_cfg(name="digits")
    train_labels = digits._load(8)["train_label"]
    epoch = take(data.train_batches(cfg, global_batch_size=479, seed=0), 3)  # 3 * 479 == 1437
    np.testing.assert_array_equal(np.bincount(np.concatenate([b["label"] for b in epoch])), np.bincount(train_labels))


def test_digits_epochs_follow_the_documented_permutations():
    """Epoch ``e`` of the train stream is ``np.random.default_rng([seed, e]).permutation(n)`` of the
    training split (digits.py's docstring): epochs 0 and 1 each follow their own, different order."""
    seed, loaded = 5, digits._load(8)
    n = len(loaded["train_label"])
    epochs = take(data.train_batches(dataset_cfg(name="digits"), global_batch_size=n, seed=seed), 2)
    orders = [np.random.default_rng([seed, e]).permutation(n) for e in range(2)]
    for batch, order in zip(epochs, orders, strict=True):
        np.testing.assert_array_equal(batch["label"], loaded["train_label"][order])
        np.testing.assert_array_equal(batch["image"], loaded["train_image"][order])
    assert not np.array_equal(orders[0], orders[1])
    assert not np.array_equal(epochs[0]["label"], epochs[1]["label"])  # a new order, not epoch 0 again


@pytest.mark.parametrize("start_step, augment", [(0, False), (5, True)])
def test_digits_two_processes_see_the_one_process_batches(start_step, augment):
    cfg = dataset_cfg(name="digits", augment=augment)
    kwargs = dict(global_batch_size=64, seed=1, start_step=start_step)
    single = take(data.train_batches(cfg, process_index=0, process_count=1, **kwargs), 3)
    hosts = [take(data.train_batches(cfg, process_index=p, process_count=2, **kwargs), 3) for p in range(2)]
    for step in range(3):
        assert hosts[0][step]["label"].shape == (32,)
        assert_batches_equal([concat_hosts([hosts[0][step], hosts[1][step]])], [single[step]])


@pytest.mark.parametrize("process_count", [1, 2])
def test_digits_eval_counts_each_example_once(process_count):
    cfg = dataset_cfg(name="digits")
    test = digits._load(8)
    hosts = [
        list(data.eval_batches(cfg, global_batch_size=100, process_index=p, process_count=process_count))
        for p in range(process_count)
    ]
    assert {len(h) for h in hosts} == {math.ceil(360 / 100)}  # same count everywhere
    masks = [b["mask"] for h in hosts for b in h]
    assert sum(m.sum() for m in masks) == 360
    # Global batch j is the hosts' rows side by side; its masked rows walk the test split in order.
    labels, images = [], []
    for j in range(len(hosts[0])):
        batch = concat_hosts([h[j] for h in hosts])
        assert batch["mask"].dtype == np.float32
        labels.append(batch["label"][batch["mask"] == 1])
        images.append(batch["image"][batch["mask"] == 1])
    np.testing.assert_array_equal(np.concatenate(labels), test["test_label"])
    np.testing.assert_array_equal(np.concatenate(images), test["test_image"])


def test_bad_config_raises_user_error():
    with pytest.raises(UserError, match="digits.*cifar10.*imagenet2012.*synthetic"):
        data.get_info(dataset_cfg(name="mnist"))
    with pytest.raises(UserError, match="divisible"):
        data.train_batches(dataset_cfg(name="digits"), global_batch_size=63, seed=0, process_index=0, process_count=2)
    with pytest.raises(UserError, match="validation_split"):
        data.get_info(dataset_cfg(name="digits", validation_split=True))
    with pytest.raises(UserError, match="eval_crops"):
        data.eval_batches(dataset_cfg(name="digits", eval_crops=10), global_batch_size=8)


def test_a_plain_dict_config_is_read_like_a_config_dict():
    """Library callers may pass ``{"name": ...}``; before, every key read as missing ("Unknown
    dataset None")."""
    info = data.get_info({"name": "synthetic", "image_size": 6, "num_classes": 3, "num_examples": 12})
    assert (info.name, info.num_classes, info.image_shape, info.num_train) == ("synthetic", 3, (6, 6, 3), 12)
    first = next(data.train_batches({"name": "digits"}, global_batch_size=4, seed=0))
    np.testing.assert_array_equal(
        first["image"], next(data.train_batches(dataset_cfg(name="digits"), global_batch_size=4, seed=0))["image"]
    )


# -------------------------------------------------------------------------------------- synthetic


def test_synthetic_batches():
    cfg = dataset_cfg(name="synthetic", image_size=16, num_classes=7, num_examples=50)
    info = data.get_info(cfg)
    assert info == data.DatasetInfo("synthetic", 7, (16, 16, 3), 50, 50, (0.5,) * 3, (0.25,) * 3)
    single = next(data.train_batches(cfg, global_batch_size=8, seed=0, start_step=2, process_index=0, process_count=1))
    assert single["image"].shape == (8, 16, 16, 3) and single["image"].dtype == np.uint8
    assert single["label"].dtype == np.int32 and single["label"].max() < 7
    hosts = [
        next(data.train_batches(cfg, global_batch_size=8, seed=0, start_step=2, process_index=p, process_count=2))
        for p in range(2)
    ]
    assert_batches_equal([concat_hosts(hosts)], [single])
    assert sum(b["mask"].sum() for b in data.eval_batches(cfg, global_batch_size=16)) == 50

    mesh = jax.make_mesh((1,), ("data",))
    sharding = NamedSharding(mesh, P("data"))
    batch = data.synthetic_global_batch(cfg, 8, sharding, seed=0)
    assert batch["image"].shape == (8, 16, 16, 3) and batch["label"].shape == (8,)
    assert batch["image"].sharding == sharding and batch["label"].dtype == np.int32
    assert batch["image"].dtype == np.uint8
    few = dataset_cfg(name="synthetic", image_size=4, num_classes=3)  # every class is drawn, none other
    assert set(np.asarray(data.synthetic_global_batch(few, 64, sharding, seed=0)["label"])) == {0, 1, 2}
    assert set(next(data.train_batches(few, global_batch_size=64, seed=0))["label"]) == {0, 1, 2}
    # What the model sees: about [-2, 2], like normalised pixels.
    x = np.asarray(data.model_input(batch["image"], info.pixels))
    assert x.dtype == np.float32 and -2.01 < x.min() < -1.5 and 1.5 < x.max() < 2.01


def test_model_input_normalises_uint8_pixels_only():
    """uint8 pixels become (x / 255 - mean) / std per channel, on the host and inside jit alike;
    float images pass through untouched; uint8 without statistics is an error, not raw pixels."""
    pixels = ((0.5, 0.25, 0.0), (0.5, 0.25, 1.0))
    images = np.array([[[[0, 0, 0], [255, 64, 51]]]], np.uint8)  # [1, 1, 2, 3]
    want = (images / 255.0 - np.array(pixels[0])) / np.array(pixels[1])
    np.testing.assert_allclose(data.model_input(images, pixels), want, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(jax.jit(data.model_input, static_argnums=1)(images, pixels), want, rtol=1e-6, atol=1e-6)
    floats = np.random.default_rng(0).normal(size=(2, 4, 4, 3)).astype(np.float32)
    assert data.model_input(floats, pixels) is floats
    assert data.model_input(floats, None) is floats
    with pytest.raises(ValueError, match="pixel mean and std"):
        data.model_input(images, None)


# ------------------------------------------------------------------------------- to_global/prefetch


def test_to_global_and_prefetch():
    mesh = jax.make_mesh((1,), ("data",))
    sharding = NamedSharding(mesh, P("data"))
    batches = take(data.train_batches(dataset_cfg(name="digits"), global_batch_size=16, seed=0), 3)

    global_batch = data.to_global(batches[0], sharding)
    assert isinstance(global_batch["image"], jax.Array) and global_batch["image"].sharding == sharding
    np.testing.assert_array_equal(np.asarray(global_batch["label"]), batches[0]["label"])
    assert data.to_global(global_batch, sharding)["image"] is global_batch["image"]  # passes through

    fetched = list(data.prefetch(iter(batches), sharding, size=2))
    assert len(fetched) == 3
    for got, want in zip(fetched, batches):
        assert got["image"].sharding == sharding
        np.testing.assert_array_equal(np.asarray(got["image"]), want["image"])

    def failing():
        yield batches[0]
        raise RuntimeError("boom")

    stream = data.prefetch(failing(), sharding)
    next(stream)
    with pytest.raises(RuntimeError, match="boom"):
        next(stream)

    source = data.train_batches(dataset_cfg(name="digits"), global_batch_size=16, seed=0)
    infinite = data.prefetch(source, sharding)
    next(infinite)
    infinite.close()  # stops the producer thread, which closes the source, and waits for it
    assert not any(t.name == "resnet_jax-prefetch" for t in threading.enumerate())
    with pytest.raises(StopIteration):
        next(source)


def _counting_source(pulled: list, closed: threading.Event | None = None):
    """An infinite source of tiny batches that appends to ``pulled`` per batch read and sets
    ``closed`` when it is closed."""
    try:
        while True:
            pulled.append(1)
            yield {"image": np.zeros((2, 4), np.float32)}
    finally:
        if closed is not None:
            closed.set()


def _prefetched_count(pulled: list, settled_at: int) -> int:
    """How many batches the producer has read once it reaches ``settled_at`` (polled, for a busy
    machine) and has had time to read more if it were not held back."""
    deadline = time.monotonic() + 20
    while len(pulled) < settled_at and time.monotonic() < deadline:
        time.sleep(0.02)
    time.sleep(0.5)
    return len(pulled)


def test_prefetch_reads_ahead_size_batches_and_no_more():
    """Device memory is bounded: with ``size`` batches waiting, the producer holds one more (blocked
    in its put) and reads no further, however long the consumer takes. The default is 2."""
    sharding = NamedSharding(jax.make_mesh((1,), ("data",)), P("data"))
    for size in (1, 3, None):
        pulled: list = []
        stream = data.prefetch(_counting_source(pulled), sharding, **({} if size is None else {"size": size}))
        next(stream)
        ahead = (size or 2) + 2  # the one handed out, `size` waiting, one in the producer's hands
        assert _prefetched_count(pulled, ahead) == ahead, size
        stream.close()
    for size in (0, -1):
        with pytest.raises(ValueError, match=rf"prefetch size must be >= 1, got {size}"):
            data.prefetch(iter([]), sharding, size=size)


def test_a_prefetcher_dropped_unstarted_stops_and_closes_its_source():
    """Dropped before its first batch was asked for (no ``finally`` of the consumer ever runs), a
    prefetcher still stops its thread, which closes the source."""
    sharding = NamedSharding(jax.make_mesh((1,), ("data",)), P("data"))
    pulled, closed = [], threading.Event()
    stream = data.prefetch(_counting_source(pulled, closed), sharding)
    _prefetched_count(pulled, 3)  # the queue is full: the producer waits in its put
    del stream
    gc.collect()
    assert closed.wait(10), "the producer kept running after its consumer was dropped"
    deadline = time.monotonic() + 10
    while any(t.name == "resnet_jax-prefetch" for t in threading.enumerate()) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not any(t.name == "resnet_jax-prefetch" for t in threading.enumerate())


@pytest.mark.parametrize("how", ["closed_and_left_open", "dropped_unstarted"])
def test_exit_waits_for_the_prefetcher_to_close_its_source(tmp_path, how):
    """A process that exits right after closing a prefetcher still lets the producer thread finish
    closing its source (a slow tf.data iterator's close, here a sleep): the exit hook waits for it.
    Killing a thread inside TensorFlow's C++ at exit aborts the process (seen on a GPU machine).
    The same for one dropped before it was started: only the exit hook's own wait holds the exit."""
    done = tmp_path / "closed"
    use = {
        "closed_and_left_open": """
        batches = data.prefetch(source(), sharding)
        next(batches)
        batches.close()
        # One left open (a caller that stops iterating and exits): the exit hook closes it.
        left_open = data.prefetch(source(), sharding)
        next(left_open)
        """,
        "dropped_unstarted": """
        dropped = data.prefetch(source(), sharding)
        time.sleep(0.3)
        del dropped  # never started: no consumer joins the thread
        gc.collect()
        """,
    }[how]
    code = textwrap.dedent(
        f"""
        import gc, time
        import jax
        import numpy as np
        from jax.sharding import NamedSharding, PartitionSpec as P
        from resnet_jax import data

        def source():
            try:
                while True:
                    yield {{"image": np.zeros((2, 4), np.float32)}}
            finally:
                time.sleep(1.0)  # a slow close
                open({str(done)!r}, "w").write("ok")

        sharding = NamedSharding(jax.make_mesh((1,), ("data",)), P("data"))
        """
    ) + textwrap.dedent(use)
    env = user_env()
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert done.exists(), "the process exited before the producer thread closed its source"
    # Before: the open one's generator was closed during finalisation and printed a traceback.
    assert "Exception ignored" not in result.stderr and "Traceback" not in result.stderr, result.stderr[-3000:]


def test_digits_are_scikit_learns_with_its_split():
    """The file read without scikit-learn holds load_digits()'s images and labels, and the stored
    split is train_test_split's for the module's seed (train and test, in its order)."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    reference = load_digits()
    raw, target = digits._raw_digits()
    np.testing.assert_array_equal(raw, reference.images)
    np.testing.assert_array_equal(target, reference.target)
    train, test = train_test_split(
        np.arange(len(target)), test_size=digits.NUM_TEST, stratify=target, random_state=digits._SPLIT_SEED
    )
    stored_train, stored_test = digits.split_indices()
    np.testing.assert_array_equal(stored_train, train)
    np.testing.assert_array_equal(stored_test, test)
    loaded = digits._load(8)
    np.testing.assert_array_equal(loaded["train_label"], reference.target[train])
    np.testing.assert_array_equal(loaded["test_label"], reference.target[test])


def test_digits_without_scikit_learns_file_fall_back_to_load_digits(monkeypatch):
    """Without the CSV file, load_digits() gives the same arrays (values and dtypes) as the file."""
    import importlib.util

    import sklearn.datasets

    from_file, file_target = digits._raw_digits()
    calls = []
    load_digits = sklearn.datasets.load_digits
    monkeypatch.setattr(sklearn.datasets, "load_digits", lambda: calls.append(1) or load_digits())
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    raw, target = digits._raw_digits()
    assert calls == [1]  # the fallback was taken
    assert raw.shape == (1797, 8, 8) and target.shape == (1797,) and raw.max() == 16
    assert raw.dtype == from_file.dtype and target.dtype == file_target.dtype
    np.testing.assert_array_equal(raw, from_file)
    np.testing.assert_array_equal(target, file_target)


def test_importing_data_and_digits_does_not_import_tensorflow():
    code = textwrap.dedent(
        """
        import sys
        import ml_collections
        from resnet_jax import data
        for name in ("digits", "synthetic"):
            cfg = ml_collections.ConfigDict({"name": name, "image_size": 8, "num_examples": 16})
            data.get_info(cfg)
            next(data.train_batches(cfg, global_batch_size=8, seed=0))
            next(data.eval_batches(cfg, global_batch_size=8))
        loaded = sorted(m for m in sys.modules if m.split(".")[0] in ("tensorflow", "tensorflow_datasets", "sklearn"))
        assert not loaded, loaded
        """
    )
    env = user_env()
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr[-3000:]


# ------------------------------------------------------------------------------------------- CIFAR


def test_cifar10_under_mock_data(tmp_path, monkeypatch):
    import tensorflow_datasets as tfds

    from resnet_jax.data import tfds_datasets
    from resnet_jax.data.augment import CIFAR10_MEAN, CIFAR10_STD  # (imports TensorFlow)

    # TensorFlow came without Keras (see resnet_jax/__init__.py): 2.5 CPU seconds per process.
    assert "keras" not in sys.modules, "import tensorflow loaded Keras"
    for name in ("cifar10", "cifar100"):  # the mock replaces the download: no server to try first
        monkeypatch.setitem(
            tfds_datasets._SPECS, name, dataclasses.replace(tfds_datasets._SPECS[name], download_from=())
        )
    cfg = dataset_cfg(name="cifar10", data_dir=str(tmp_path))
    num_mock = 20
    with tfds.testing.mock_data(num_examples=num_mock):
        # The mock knows no split sizes (the wheel ships no metadata): get_info falls back to the
        # real ones, while every split/slice yields `num_mock` random examples.
        info = data.get_info(cfg)
        assert info == data.DatasetInfo("cifar10", 10, (32, 32, 3), 50_000, 10_000, CIFAR10_MEAN, CIFAR10_STD)

        batches = take(data.train_batches(cfg, global_batch_size=8, seed=0), 4)  # wraps the 20-example epoch
        batch = batches[0]
        assert batch["image"].shape == (8, 32, 32, 3) and batch["image"].dtype == np.uint8
        assert batch["label"].dtype == np.int32 and batch["label"].max() < 10
        # Normalised on the device: mock pixels are uniform 0..255 (plus black padding), so about
        # zero mean, unit scale.
        x = data.model_input(batch["image"], info.pixels)
        assert abs(x.mean()) < 0.5 and 0.7 < x.std() < 1.6
        resumed = take(data.train_batches(cfg, global_batch_size=8, seed=0, start_step=2), 2)
        assert_batches_equal(batches[2:], resumed)
        other_seed = next(data.train_batches(cfg, global_batch_size=8, seed=1))
        assert not np.array_equal(other_seed["image"], batch["image"])

        evals = list(data.eval_batches(cfg, global_batch_size=2000))
        assert len(evals) == 5  # ceil(10_000 / 2000): sized by the real split
        assert evals[0]["image"].shape == (2000, 32, 32, 3)
        assert sum(b["mask"].sum() for b in evals) == num_mock  # the examples the mock really yields
        assert evals[-1]["mask"].sum() == 0

        held_out = dataset_cfg(name="cifar10", data_dir=str(tmp_path), validation_split=True)
        assert data.get_info(held_out).num_train == 45_000 and data.get_info(held_out).num_eval == 5_000
        assert len(list(data.eval_batches(held_out, global_batch_size=2000))) == 3  # ceil(5_000 / 2000)

        assert data.get_info(dataset_cfg(name="cifar100", data_dir=str(tmp_path))).num_classes == 100


def test_cifar_errors(tmp_path, monkeypatch):
    import tensorflow_datasets as tfds

    def offline(self, *args, **kwargs):
        raise ConnectionError("no network")

    monkeypatch.setattr(tfds.core.DatasetBuilder, "download_and_prepare", offline)
    temp = tmp_path / "temp"  # TFDS's own temp directories land here (tempfile.mkdtemp)
    temp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(temp))
    with pytest.raises(
        UserError, match=rf"cifar10 is not prepared in data_dir {tmp_path}.*python -m resnet_jax\.prepare cifar10"
    ):
        data.get_info(dataset_cfg(name="cifar10", data_dir=str(tmp_path)))
    assert list(temp.iterdir()) == []  # no empty tmp*tfds left behind ...
    tfds.builder("cifar10", data_dir=str(tmp_path))
    assert [p.name.endswith("tfds") for p in temp.iterdir()] == [True]  # ... which tfds.builder leaves
    with pytest.raises(UserError, match="image_size"):
        data.get_info(dataset_cfg(name="cifar10", image_size=64))
    with pytest.raises(UserError, match="eval_crops"):
        data.get_info(dataset_cfg(name="cifar10", eval_crops=10))


def test_cifar_fails_fast_when_its_server_cannot_be_reached(tmp_path, monkeypatch):
    """Offline, the download server is tried once (refused here at once) instead of through TFDS's
    minutes of retries; behind a proxy that direct try proves nothing and TFDS is asked instead."""
    import socket

    import tensorflow_datasets as tfds

    from resnet_jax.data import tfds_datasets

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    spec = dataclasses.replace(tfds_datasets._SPECS["cifar10"], download_from=(("127.0.0.1", port),) * 2)
    monkeypatch.setitem(tfds_datasets._SPECS, "cifar10", spec)
    downloads = []

    def download(self, *args, **kwargs):
        downloads.append(self.name)
        raise ConnectionError("no network")

    monkeypatch.setattr(tfds.core.DatasetBuilder, "download_and_prepare", download)
    for name in ("https_proxy", "http_proxy", "all_proxy"):
        monkeypatch.delenv(name, raising=False)
        monkeypatch.delenv(name.upper(), raising=False)
    t = time.perf_counter()
    with pytest.raises(
        UserError,
        match=r"could not be downloaded \(127\.0\.0\.1: .*refused; 127.*python -m resnet_jax\.prepare cifar10",
    ):
        data.get_info(dataset_cfg(name="cifar10", data_dir=str(tmp_path)))
    assert time.perf_counter() - t < 10 and downloads == []

    monkeypatch.setenv("HTTPS_PROXY", "http://proxy.invalid:3128")
    with pytest.raises(UserError, match=r"could not be downloaded \(ConnectionError\)"):
        data.get_info(dataset_cfg(name="cifar10", data_dir=str(tmp_path)))
    assert downloads == ["cifar10"]


def _cifar_train_draws(image: np.ndarray, n: int) -> np.ndarray:
    """``augment.cifar_train`` of one uint8 [32, 32, 3] image with ``n`` per-example seeds: [n, 32, 32, 3]."""
    import tensorflow as tf

    from resnet_jax.data import augment

    png = tf.io.encode_png(tf.constant(image))
    return np.stack([augment.cifar_train(png, tf.constant([11, k], tf.int64)).numpy() for k in range(n)])


def test_cifar_crops_take_every_offset_of_the_4_pixel_padding():
    """Paper 1's 4-pixel padding on each side then a random 32x32 crop: on an image without black
    pixels, the black border of a crop is 0..4 rows at the top or bottom and 0..4 columns at the
    left or right (never on both opposite sides), every width drawn on every side, and the rest
    of the crop is the image."""
    out = _cifar_train_draws(np.full((32, 32, 3), 200, np.uint8), 200)
    assert out.shape == (200, 32, 32, 3) and out.dtype == np.uint8
    assert set(np.unique(out)) == {0, 200}
    black = (out == 0).all(axis=-1)  # [n, 32, 32]

    def border(lines: np.ndarray) -> np.ndarray:
        """Leading all-black lines of each [n, lines, ...] crop."""
        full = lines.all(axis=2)  # [n, 32]
        return np.where(full.all(axis=1), 32, np.argmin(full, axis=1))

    widths = {
        "top": border(black),
        "bottom": border(black[:, ::-1]),
        "left": border(black.transpose(0, 2, 1)),
        "right": border(black.transpose(0, 2, 1)[:, ::-1]),
    }
    for side, w in widths.items():
        assert set(w) == {0, 1, 2, 3, 4}, (side, sorted(set(w)))
    assert not ((widths["top"] > 0) & (widths["bottom"] > 0)).any()
    assert not ((widths["left"] > 0) & (widths["right"] > 0)).any()
    # Symmetric: each side is black in about as many crops as its opposite.
    for a, b in (("top", "bottom"), ("left", "right")):
        assert abs(int((widths[a] > 0).sum()) - int((widths[b] > 0).sum())) < 50, (a, b)
    for i in range(len(out)):  # black exactly outside the image's rectangle
        rows = slice(widths["top"][i], 32 - widths["bottom"][i])
        cols = slice(widths["left"][i], 32 - widths["right"][i])
        assert (out[i, rows, cols] == 200).all()
        assert black[i].sum() == 32 * 32 - (rows.stop - rows.start) * (cols.stop - cols.start)


def test_cifar_flips_about_half_the_crops():
    """The random horizontal flip: on an image dark on the left half and bright on the right, a
    crop shifted by at most 4 pixels keeps column 11 in the left half and column 20 in the right
    one unless it is flipped; about half of 200 draws are flipped, and both outcomes occur."""
    image = np.full((32, 32, 3), 50, np.uint8)
    image[:, 16:] = 200
    out = _cifar_train_draws(image, 200)
    left, right = out[:, 16, 11, 0], out[:, 16, 20, 0]
    assert set(left) | set(right) <= {50, 200} and (left != right).all()
    flipped = left == 200
    assert 0.3 < flipped.mean() < 0.7, flipped.mean()
    assert flipped.any() and not flipped.all()


def test_slice_host_shares_split_the_slice_itself():
    """A host's share of ``split[start:end]`` is its part of that range (offset by ``start``): the
    second of 2 shares of train[45000:50000] is train[47500:50000]; for any process count the
    shares are contiguous, disjoint and cover exactly [start, end)."""
    from resnet_jax.data.tfds_datasets import _Slice

    piece = _Slice("train", 45_000, 50_000)
    assert piece.host_share(1, 2) == _Slice("train", 47_500, 50_000)
    assert str(piece.host_share(0, 2)) == "train[45000:47500]"
    for count in (1, 2, 3, 7):
        shares = [piece.host_share(p, count) for p in range(count)]
        assert {s.split for s in shares} == {"train"}
        assert shares[0].start == 45_000 and shares[-1].end == 50_000
        assert all(a.end == b.start for a, b in zip(shares, shares[1:]))
        assert (
            sum(s.size for s in shares) == piece.size and max(s.size for s in shares) - min(s.size for s in shares) <= 1
        )
    assert _Slice("test", 0, 10).host_share(1, 2) == _Slice("test", 5, 10)


def _indexed_cifar(requested: list[str], per_slice: int = 4):
    """A mock ``_as_dataset`` whose examples name their index in the split: the first ``per_slice``
    examples of ``split[start:end]`` are constant images whose pixel is (i // 256, i % 256, 255) for
    i = start, start + 1, ...; each requested split string is appended to ``requested``."""
    import re

    import tensorflow as tf

    def as_dataset(self, split, decoders=None, read_config=None, shuffle_files=False, **kwargs):
        requested.append(str(split))
        name, start, end = re.fullmatch(r"(\w+)\[(\d+):(\d+)\]", str(split)).groups()
        indices = list(range(int(start), min(int(start) + per_slice, int(end))))
        pixels = [np.broadcast_to(np.array([i // 256, i % 256, 255], np.uint8), (32, 32, 3)) for i in indices]
        return tf.data.Dataset.from_tensor_slices(
            {
                "id": tf.constant([f"{name}_{i}" for i in indices]),
                "image": tf.stack([tf.io.encode_png(tf.constant(p)) for p in pixels]),
                "label": tf.constant([i % 10 for i in indices], tf.int64),
            }
        )

    return as_dataset


def test_cifar_validation_split_evaluates_on_the_last_5000_training_images(tmp_path, monkeypatch):
    """``validation_split=True`` (paper 1's protocol): training reads train[0:45000] and evaluation
    train[45000:50000], disjoint slices of the training split; the eval examples are the held-out
    ones (index >= 45000), none of the training stream's."""
    import tensorflow_datasets as tfds

    from resnet_jax.data import tfds_datasets
    from resnet_jax.data.tfds_datasets import _Slice

    monkeypatch.setitem(
        tfds_datasets._SPECS, "cifar10", dataclasses.replace(tfds_datasets._SPECS["cifar10"], download_from=())
    )
    cfg = dataset_cfg(name="cifar10", data_dir=str(tmp_path), validation_split=True)
    requested = []
    with tfds.testing.mock_data(as_dataset_fn=_indexed_cifar(requested)):
        _, train, evaluation, _, _ = tfds_datasets._layout(cfg)
        assert train == _Slice("train", 0, 45_000) and evaluation == _Slice("train", 45_000, 50_000)
        evals = list(data.eval_batches(cfg, global_batch_size=1000))
        batches = take(data.train_batches(cfg, global_batch_size=4, seed=0), 2)
    assert requested == ["train[45000:50000]", "train[0:45000]"]
    valid = np.concatenate([b["image"][b["mask"] == 1] for b in evals])
    eval_index = valid[:, 0, 0, 0].astype(int) * 256 + valid[:, 0, 0, 1]
    assert list(eval_index) == [45_000, 45_001, 45_002, 45_003]  # in order, from the held-out slice
    images = np.concatenate([b["image"] for b in batches])  # augmented: the centre is always the image
    train_index = images[:, 16, 16, 0].astype(int) * 256 + images[:, 16, 16, 1]
    assert sorted(train_index) == [0, 0, 1, 1, 2, 2, 3, 3]  # two epochs of train[0:45000]'s first four
    assert not set(eval_index) & set(train_index)


# ---------------------------------------------------------------------------------------- ImageNet


def imagenet_cfg(data_dir, manual_dir, **overrides):
    overrides = {"image_size": 64, **overrides}
    return dataset_cfg(name="imagenet2012", data_dir=data_dir, manual_dir=manual_dir, **overrides)


def test_imagenet_train_and_eval(imagenet_data_dir):
    from resnet_jax.data.augment import IMAGENET_MEAN, IMAGENET_STD  # (imports TensorFlow)

    data_dir, manual_dir = imagenet_data_dir
    cfg = imagenet_cfg(data_dir, manual_dir)
    info = data.get_info(cfg)
    assert info == data.DatasetInfo("imagenet2012", 1000, (64, 64, 3), 6, 4, IMAGENET_MEAN, IMAGENET_STD)

    batches = take(data.train_batches(cfg, global_batch_size=4, seed=0), 3)
    batch = batches[0]
    assert batch["image"].shape == (4, 64, 64, 3) and batch["image"].dtype == np.uint8
    assert batch["label"].dtype == np.int32 and set(batch["label"]) <= {0, 1}  # the first two synsets
    assert abs(data.model_input(batch["image"], info.pixels).mean()) < 1.5
    assert_batches_equal(batches[1:], take(data.train_batches(cfg, global_batch_size=4, seed=0, start_step=1), 2))
    host = next(data.train_batches(cfg, global_batch_size=4, seed=0, process_index=1, process_count=2))
    assert host["image"].shape == (2, 64, 64, 3)

    one = list(data.eval_batches(cfg, global_batch_size=3))
    assert [b["image"].shape for b in one] == [(3, 64, 64, 3)] * 2
    assert sum(b["mask"].sum() for b in one) == 4

    ten_crop_cfg = imagenet_cfg(data_dir, manual_dir, eval_crops=10)
    ten = list(data.eval_batches(ten_crop_cfg, global_batch_size=3))
    assert [b["image"].shape for b in ten] == [(3, 10, 64, 64, 3)] * 2
    assert ten[0]["image"].dtype == one[0]["image"].dtype == np.uint8
    np.testing.assert_array_equal(ten[0]["image"][:, 4], one[0]["image"])  # view 4: the centre crop
    np.testing.assert_array_equal(ten[0]["image"][:, 9], one[0]["image"][:, :, ::-1])  # its flip
    np.testing.assert_array_equal(ten[0]["label"], one[0]["label"])


def test_imagenet_train_antialias_option(imagenet_data_dir):
    """train_antialias=False resizes the same crops (same seed) without the antialiasing filter:
    different pixels, the same picture; a non-boolean value is a one-line error."""
    data_dir, manual_dir = imagenet_data_dir

    def batch(**option):
        # 16x16 outputs: the crops of the 80x60-120x90 test images are shrunk, where antialiasing acts.
        cfg = dataset_cfg(name="imagenet2012", data_dir=data_dir, manual_dir=manual_dir, image_size=16).to_dict()
        # A plain ConfigDict: the base config's typed field would refuse a string before we see it.
        cfg = ml_collections.ConfigDict({**cfg, **option})
        return next(data.train_batches(cfg, global_batch_size=4, seed=0))

    smooth, plain = batch(), batch(train_antialias=False)
    np.testing.assert_array_equal(plain["label"], smooth["label"])
    a, b = smooth["image"].astype(np.float32), plain["image"].astype(np.float32)
    assert plain["image"].dtype == np.uint8 and not np.array_equal(a, b)
    assert np.abs(a.mean(axis=(1, 2, 3)) - b.mean(axis=(1, 2, 3))).max() < 8.0  # same crops, same flips
    with pytest.raises(UserError, match="train_antialias='no'; use true or false"):
        batch(train_antialias="no")


def test_imagenet_scale_augmentation(imagenet_data_dir):
    """train_augment='scale' (paper 1): uint8 crops of the size asked, the same batches on resume
    and different ones from the Inception crops; lighting shifts each image by one RGB offset (the
    same crops and flips otherwise)."""
    data_dir, manual_dir = imagenet_data_dir

    def batches(n=3, start_step=0, **option):
        cfg = imagenet_cfg(data_dir, manual_dir, **option)
        return take(data.train_batches(cfg, global_batch_size=4, seed=0, start_step=start_step), n)

    scale = batches(train_augment="scale")
    assert [b["image"].shape for b in scale] == [(4, 64, 64, 3)] * 3 and scale[0]["image"].dtype == np.uint8
    assert_batches_equal(scale[1:], batches(2, start_step=1, train_augment="scale"))
    inception = batches(1)[0]
    np.testing.assert_array_equal(inception["label"], scale[0]["label"])
    assert not np.array_equal(inception["image"], scale[0]["image"])

    # Lighting, with either crop recipe (fb.resnet.torch adds it to the Inception crops).
    for recipe, unlit in (("scale", scale[0]), ("inception", inception)):
        lit = batches(1, train_augment=recipe, lighting_std=0.1)[0]["image"].astype(np.float32)
        plain = unlit["image"].astype(np.float32)
        inside = (plain > 20) & (plain < 235)  # away from clipping at 0 and 255
        shifts = []
        for i in range(4):
            for c in range(3):
                d = (lit - plain)[i, ..., c][inside[i, ..., c]]
                assert d.max() - d.min() <= 1.0, (recipe, i, c)  # one offset per channel; only rounding differs
                shifts.append(float(np.median(d)))
        # alpha ~ N(0, 0.1) of eigenvalues up to 0.2175: a few levels of 255, none without lighting
        assert max(abs(s) for s in shifts) >= 1.0, recipe


def test_scale_augmentation_draws_the_papers_scales(monkeypatch):
    """The shorter side is a uniform integer of scale_range(size), both ends included: for 16 the
    paper's [256, 480] at 16/224, (18, 34). Each drawn side (recorded where the image is resized)
    is what the crop shows: resizing a horizontal ramp 0..255 (100x100) so that its shorter side is
    s makes the slope of the crop about 255 / (s - 1) per pixel. Over 200 seeds every side of
    18..34 is drawn, 18 and 34 included, and no other."""
    import tensorflow as tf

    from resnet_jax.data import augment

    assert augment.scale_range(224) == (256, 480) and augment.scale_range(16) == (18, 34)
    drawn = []
    resize = augment._resize_shorter_side

    def recording_resize(image, shorter, antialias=True):
        drawn.append(int(shorter))
        return resize(image, shorter, antialias)

    monkeypatch.setattr(augment, "_resize_shorter_side", recording_resize)
    ramp = np.tile(np.linspace(0, 255, 100, dtype=np.float32)[None, :, None], (100, 1, 3))
    png = tf.io.encode_png(tf.constant(np.round(ramp).astype(np.uint8)))
    sides = []
    for k in range(200):
        out = augment.imagenet_scale_train(png, tf.constant([7, k], tf.int64), 16, antialias=False).numpy()
        assert out.shape == (16, 16, 3) and out.dtype == np.uint8
        slope = abs(float(out[8, -1, 0]) - float(out[8, 0, 0])) / 15
        sides.append(255 / slope + 1)
    assert len(drawn) == 200
    assert set(drawn) == set(range(18, 35)), sorted(set(drawn))  # 18 and 34 included
    error = np.abs(np.array(sides) - np.array(drawn))
    assert error.max() < 1.5, (error.max(), drawn[int(error.argmax())])  # the image was resized to it


def test_imagenet_statistics_are_torchvisions_in_rgb_order(imagenet_data_dir):
    """ImageNet's pixel statistics are torchvision's, in RGB order: mean (0.485, 0.456, 0.406),
    std (0.229, 0.224, 0.225). The dataset's info carries them, and model_input with it maps an
    image of the mean colour to about 0 (up to the uint8 rounding of mean * 255) and the mean plus
    one std in each channel to about 1."""
    from resnet_jax.data import augment

    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    assert augment.IMAGENET_MEAN == mean and augment.IMAGENET_STD == std
    info = data.get_info(imagenet_cfg(*imagenet_data_dir))
    assert info.pixels == (mean, std)
    for level, want in ((np.array(mean), 0.0), (np.array(mean) + np.array(std), 1.0)):
        image = np.tile(np.round(level * 255).astype(np.uint8), (1, 2, 2, 1))  # [1, 2, 2, 3]
        x = np.asarray(data.model_input(image, info.pixels))
        # A uint8 level is within 0.5 of level * 255: within 0.5 / (255 * 0.224) = 0.009 of want.
        np.testing.assert_allclose(x, want, atol=0.5 / (255 * min(std)) + 1e-6)


def _coordinate_jpeg(side: int = 256):
    """A ``side`` x ``side`` JPEG (quality 100, no chroma subsampling) whose red channel is the
    column and green the row (blue 128): its pixels say where they came from, to a few levels."""
    import tensorflow as tf

    rows, cols = np.mgrid[0:side, 0:side]
    image = np.stack([cols, rows, np.full_like(cols, 128)], axis=-1).astype(np.uint8)
    return tf.io.encode_jpeg(tf.constant(image), quality=100, chroma_downsampling=False)


def test_inception_crop_areas_and_aspect_ratios_span_the_papers_ranges():
    """The Inception crop's window covers 8%-100% of the image with aspect ratio (width / height)
    3/4-4/3. Measured from 300 crops of a 256x256 image whose pixels encode their coordinates
    (resized to 32x32 without antialiasing, the column ramp's slope is the window's width / 32, the
    row ramp's its height / 32): the areas reach down to near 8% and no lower, the aspect ratios
    reach near both 3/4 and 4/3 and not beyond."""
    import tensorflow as tf

    from resnet_jax.data import augment

    jpeg, size = _coordinate_jpeg(256), 32
    j = np.arange(size)
    areas, aspects = [], []
    for k in range(300):
        out = augment.imagenet_train(jpeg, tf.constant([3, k], tf.int64), size, antialias=False).numpy()
        assert out.shape == (size, size, 3) and out.dtype == np.uint8
        out = out.astype(np.float64)
        width = abs(np.polyfit(j, out[..., 0].mean(axis=0), 1)[0]) * size  # abs: the flips
        height = abs(np.polyfit(j, out[..., 1].mean(axis=1), 1)[0]) * size
        areas.append(width * height / 256**2)
        aspects.append(width / height)
    assert 0.07 < min(areas) < 0.11, min(areas)  # the 8% end is drawn
    assert max(areas) > 0.8, max(areas)
    assert 0.72 < min(aspects) < 0.78, min(aspects)  # 3/4
    assert 1.29 < max(aspects) < 1.38, max(aspects)  # 4/3


def _ramp_png(height: int, width: int):
    """A PNG whose red channel is 4 x column and green 4 x row (blue 0); the sides at most 64."""
    import tensorflow as tf

    rows, cols = np.mgrid[0:height, 0:width]
    image = np.stack([4 * cols, 4 * rows, np.zeros_like(cols)], axis=-1).astype(np.uint8)
    return tf.io.encode_png(tf.constant(image))


def _resized_ramp(height: int, width: int, shorter: int) -> tuple[np.ndarray, int, int]:
    """The ``_ramp_png`` image with its shorter side resized to ``shorter`` as a float [H', W', 2]
    (red, green) of what a linear resize gives away from the border: output pixel c samples the
    source at (c + 0.5) / scale - 0.5, and a ramp stays a ramp. Also H', W'."""
    scale = shorter / min(height, width)
    new_h, new_w = round(height * scale), round(width * scale)
    src_rows = (np.arange(new_h) + 0.5) / scale - 0.5
    src_cols = (np.arange(new_w) + 0.5) / scale - 0.5
    red = np.broadcast_to(4 * src_cols[None, :], (new_h, new_w))
    green = np.broadcast_to(4 * src_rows[:, None], (new_h, new_w))
    return np.stack([red, green], axis=-1), new_h, new_w


def test_imagenet_eval_crops_the_centre_of_the_image_resized_to_256_over_224():
    """The eval view: the image resized so that its shorter side is round(size * 256 / 224) (256
    for 224), then the centre size x size crop. On ramps whose pixels encode their coordinates,
    landscape and portrait, at sizes 14 (shorter side 16) and 20 (23), each crop pixel holds the
    coordinate it samples in that resized image's centre crop (to the uint8 rounding)."""
    from resnet_jax.data import augment

    for size in (14, 20):
        shorter = round(size * 256 / 224)
        for height, width in ((32, 64), (64, 32)):
            out = augment.imagenet_eval(_ramp_png(height, width), size).numpy()
            assert out.shape == (size, size, 3) and out.dtype == np.uint8
            resized, new_h, new_w = _resized_ramp(height, width, shorter)
            top, left = (new_h - size) // 2, (new_w - size) // 2
            want = resized[top : top + size, left : left + size]
            np.testing.assert_allclose(out[..., :2], want, atol=0.75, err_msg=f"{size=} {height}x{width}")


def test_imagenet_ten_crops_are_the_corners_and_centre_then_their_flips():
    """Paper 1's 10-crop testing, in the documented order: views 0-4 are the top-left, top-right,
    bottom-left and bottom-right corners and the centre of the image resized to shorter side
    round(size * 256 / 224), views 5-9 the same views flipped horizontally. Checked on a 32x64 ramp
    encoding coordinates at size 14 (the resized image 16x32: the corners 2 rows and 18 columns
    apart), inside each view's 1-pixel border (where the antialiasing filter meets the image edge)."""
    from resnet_jax.data import augment

    size = 14
    views = augment.imagenet_eval(_ramp_png(32, 64), size, crops=10).numpy()
    assert views.shape == (10, size, size, 3) and views.dtype == np.uint8
    resized, new_h, new_w = _resized_ramp(32, 64, round(size * 256 / 224))
    assert (new_h, new_w) == (16, 32)
    origins = [
        (0, 0),  # top left
        (0, new_w - size),  # top right
        (new_h - size, 0),  # bottom left
        (new_h - size, new_w - size),  # bottom right
        ((new_h - size) // 2, (new_w - size) // 2),  # centre
    ]
    for k, (top, left) in enumerate(origins):
        want = resized[top : top + size, left : left + size]
        np.testing.assert_allclose(views[k, 1:-1, 1:-1, :2], want[1:-1, 1:-1], atol=0.75, err_msg=f"view {k}")
    np.testing.assert_array_equal(views[5:], views[:5, :, ::-1])  # their horizontal flips
    np.testing.assert_array_equal(views[4], augment.imagenet_eval(_ramp_png(32, 64), size).numpy())


def test_lighting_shifts_by_the_published_pca_of_imagenets_colours():
    """AlexNet's PCA lighting with fb.resnet.torch's figures: eigenvalues (0.2175, 0.0188, 0.0045)
    and eigenvectors (the columns of its 3x3 matrix) of ImageNet's RGB covariance on the 0..1 scale.
    Each image is shifted by EIGVEC @ (alpha * EIGVAL) * 255 (uint8 levels), added, with alpha ~
    N(0, lighting_std) drawn from the example seed (scale recipe: the 4th of 4 splits; Inception
    crop: the seed with 1 folded in). On a uniform grey image (crops, flips and resizes leave it
    grey), both recipes output exactly round(128 + shift) per channel for several seeds."""
    import tensorflow as tf

    from resnet_jax.data import augment

    eigval = np.array([0.2175, 0.0188, 0.0045])
    eigvec = np.array([[-0.5675, 0.7192, 0.4009], [-0.5808, -0.0045, -0.8140], [-0.5836, -0.6948, 0.4203]])
    np.testing.assert_array_equal(np.array(augment.LIGHTING_EIGVAL), eigval)
    np.testing.assert_array_equal(np.array(augment.LIGHTING_EIGVEC), eigvec)
    grey = np.full((40, 40, 3), 128, np.uint8)
    png, jpeg = tf.io.encode_png(tf.constant(grey)), tf.io.encode_jpeg(tf.constant(grey), quality=100)
    assert (tf.io.decode_jpeg(jpeg).numpy() == 128).all()
    std = 0.5
    for k in range(4):
        seed = tf.constant([5, k], tf.int64)
        recipes = {
            "scale": (
                augment.imagenet_scale_train(png, seed, 16, lighting_std=std),
                tf.unstack(tf.random.experimental.stateless_split(seed, 4))[3],
            ),
            "inception": (
                augment.imagenet_train(jpeg, seed, 16, lighting_std=std),
                tf.random.experimental.stateless_fold_in(seed, 1),
            ),
        }
        for recipe, (out, light_seed) in recipes.items():
            alpha = tf.random.stateless_normal([3], light_seed, stddev=std).numpy().astype(np.float64)
            shift = 255.0 * eigvec @ (alpha * eigval)
            want = np.clip(np.round(128 + shift), 0, 255)
            assert np.abs(shift).max() > 2, (recipe, k, shift)  # a sign or order error would show
            out = out.numpy()
            assert out.shape == (16, 16, 3) and out.dtype == np.uint8
            np.testing.assert_allclose(out.reshape(-1, 3), np.tile(want, (256, 1)), atol=1, err_msg=f"{recipe} {k}")


def test_imagenet_eval_image_size(imagenet_data_dir):
    """eval_image_size: the eval crops (1 or 10) at another size than training's; the training
    batches are unchanged."""
    data_dir, manual_dir = imagenet_data_dir
    cfg = imagenet_cfg(data_dir, manual_dir, eval_image_size=48)
    assert data.get_info(cfg).image_shape == (64, 64, 3)  # the training images
    assert next(data.train_batches(cfg, global_batch_size=4, seed=0))["image"].shape == (4, 64, 64, 3)
    assert next(data.eval_batches(cfg, global_batch_size=3))["image"].shape == (3, 48, 48, 3)
    cfg.eval_crops = 10
    assert next(data.eval_batches(cfg, global_batch_size=3))["image"].shape == (3, 10, 48, 48, 3)


def test_imagenet_augment_options_are_checked():
    for option, needle in [
        ({"eval_image_size": 0}, "eval_image_size=0; use a positive number of pixels"),
        ({"train_augment": "crop"}, "train_augment='crop'; use 'inception'"),
        ({"lighting_std": -0.1}, "lighting_std=-0.1; use a number >= 0"),
        ({"lighting_std": True}, "lighting_std=True"),
    ]:
        cfg = ml_collections.ConfigDict({**dataset_cfg(name="imagenet2012").to_dict(), **option})
        with pytest.raises(UserError, match=needle):
            data.get_info(cfg)
    # On CIFAR they would mean nothing: refused before the dataset is looked for.
    for option in ({"train_augment": "scale"}, {"lighting_std": 0.1}, {"eval_image_size": 64}):
        key = next(iter(option))
        with pytest.raises(UserError, match=f"config.dataset.{key}=.* is an ImageNet option; cifar10"):
            data.get_info(dataset_cfg(name="cifar10", **option))
        with pytest.raises(UserError, match=f"config.dataset.{key}=.* is an ImageNet option; digits"):
            data.get_info(dataset_cfg(name="digits", **option))
        # The synthetic data takes them: any config can be timed on it.
        assert data.get_info(dataset_cfg(name="synthetic", **option)).name == "synthetic"


def test_digits_augment_is_a_config_key_other_datasets_refuse():
    """``dataset.augment`` reaches the digits from the command line (a base-config key); CIFAR and
    ImageNet refuse it before their data is looked for, since their own augmentation ignores it."""
    from resnet_jax.cli import experiment_config

    cfg = experiment_config(os.path.join(REPO_ROOT, "experiments/digits.py"), "--config.dataset.augment=true").dataset
    kwargs = dict(global_batch_size=16, seed=0)
    plain = next(data.train_batches(dataset_cfg(name="digits"), **kwargs))["image"]
    assert not np.array_equal(next(data.train_batches(cfg, **kwargs))["image"], plain)
    for name, own in (("cifar10", "pad-and-crop"), ("imagenet2012", "train_augment's crops")):
        with pytest.raises(UserError, match=f"augment=True is the digits' random shifts; {name} trains with .*{own}"):
            data.get_info(dataset_cfg(name=name, augment=True))
    assert data.get_info(dataset_cfg(name="synthetic", augment=True)).name == "synthetic"


def test_prepare_command_builds_imagenet_once(tmp_path):
    """``python -m resnet_jax.prepare`` builds imagenet2012 from the tars with TFDS's real builder
    (the step a multi-process run asks for), says so again without rebuilding, and refuses bad
    input with one line."""
    from imagenet_tars import make_fake_imagenet_tars

    manual, data_dir = tmp_path / "tars", tmp_path / "tfds"
    make_fake_imagenet_tars(str(manual))

    def prepare(*args):
        argv = [sys.executable, "-m", "resnet_jax.prepare", *args]
        return subprocess.run(argv, cwd=REPO_ROOT, env=user_env(), capture_output=True, text=True, timeout=300)

    p = prepare("imagenet2012", f"--manual_dir={manual}", f"--data_dir={data_dir}")
    assert p.returncode == 0, p.stderr[-3000:]
    summary = "imagenet2012 is prepared: 6 training and 4 eval images, 1000 classes"
    assert p.stdout.strip().splitlines()[-1] == summary  # after TFDS's own "Downloading and preparing"
    records = sorted(str(f.relative_to(data_dir)) for f in data_dir.rglob("*.tfrecord*"))
    assert records and all(r.startswith("imagenet2012/") for r in records)
    mtimes = {f: f.stat().st_mtime_ns for f in data_dir.rglob("*.tfrecord*")}
    (manual / "ILSVRC2012_img_train.tar").unlink()  # prepared: the tars are no longer read
    again = prepare("imagenet2012", f"--data_dir={data_dir}")
    assert again.returncode == 0 and again.stdout.strip() == summary, again.stderr[-3000:]
    assert {f: f.stat().st_mtime_ns for f in data_dir.rglob("*.tfrecord*")} == mtimes

    for args, needle in [
        (
            ["imagenet2012", f"--manual_dir={manual}", f"--data_dir={tmp_path / 'other'}"],
            "lacks ILSVRC2012_img_train.tar",
        ),
        (["cifar10", f"--manual_dir={manual}"], "--manual_dir is for imagenet2012"),
        (["mnist"], "invalid choice: 'mnist'"),
    ]:
        bad = prepare(*args)
        lines = bad.stderr.strip().splitlines()
        assert bad.returncode == 2 and "Traceback" not in bad.stderr and needle in lines[-1], bad.stderr[-3000:]


def test_prepare_takes_every_tfds_dataset_and_the_errors_quote_its_exact_command(capsys):
    """Every TFDS dataset the trainer reads can be prepared on its own, and the command that the
    trainer's errors quote is the whole one: data_dir, and the tars' directory for ImageNet only."""
    from resnet_jax import prepare
    from resnet_jax.data import tfds_datasets

    assert set(prepare.TFDS_DATASETS) == set(tfds_datasets._SPECS)
    assert prepare.command("cifar100") == "python -m resnet_jax.prepare cifar100"
    assert prepare.command("cifar10", "/d") == "python -m resnet_jax.prepare cifar10 --data_dir=/d"
    assert prepare.command("imagenet2012", "/d") == (
        "python -m resnet_jax.prepare imagenet2012 --data_dir=/d --manual_dir=DIR_OF_THE_TARS"
    )
    with pytest.raises(SystemExit) as e:  # cifar100 is a choice: refused for the flag, not the name
        prepare.main(["cifar100", "--manual_dir=/x"])
    assert e.value.code == 2
    assert "--manual_dir is for imagenet2012 (its tars), not cifar100" in capsys.readouterr().err


@pytest.mark.parametrize("process_count, global_batch_size", [(2, 2), (3, 3)])
def test_imagenet_eval_over_processes(imagenet_data_dir, process_count, global_batch_size):
    cfg = imagenet_cfg(*imagenet_data_dir)
    single = list(data.eval_batches(cfg, global_batch_size=4, process_index=0, process_count=1))
    hosts = [
        list(data.eval_batches(cfg, global_batch_size=global_batch_size, process_index=p, process_count=process_count))
        for p in range(process_count)
    ]
    assert len({len(h) for h in hosts}) == 1

    def examples(batches):
        """The valid examples as (label, image bytes), sorted: a multiset of whole examples."""
        return sorted(
            (int(label), image.tobytes())
            for b in batches
            for image, label, valid in zip(b["image"], b["label"], b["mask"], strict=True)
            if valid == 1
        )

    reference = examples(single)
    assert len(reference) == 4 and len(set(reference)) == 4  # 4 distinct validation images
    # Together the processes' valid examples are exactly the 4, each once: images and labels.
    assert examples([b for h in hosts for b in h]) == reference


# ImageNet's shuffle buffer (10,000 records) is <1% of a one-host share; the tests below shrink it
# to 3 records against a fake ImageNet of 48 training images in 16 record files of 3.
_SHARDED = {"num_classes": 4, "images_per_class": 12, "num_val": 16, "num_shards": 16}


@pytest.fixture(scope="module")
def sharded_imagenet_data_dir(tmp_path_factory):
    """(data_dir, manual_dir) of an imagenet2012 whose splits are written in 16 record files each."""
    from imagenet_tars import prepare_fake_imagenet

    root = tmp_path_factory.mktemp("imagenet_sharded")
    data_dir, manual_dir = str(root / "data"), str(root / "manual")
    prepare_fake_imagenet(data_dir, manual_dir, **_SHARDED)
    return data_dir, manual_dir


def _small_shuffle_buffer(monkeypatch, records: int = 3) -> None:
    from resnet_jax.data import tfds_datasets

    spec = dataclasses.replace(tfds_datasets._SPECS["imagenet2012"], shuffle_buffer=records)
    monkeypatch.setitem(tfds_datasets._SPECS, "imagenet2012", spec)


def _image_hashes(monkeypatch) -> None:
    """The training "images" become a 62-bit hash of each example's encoded image bytes."""
    import tensorflow as tf

    from resnet_jax.data import augment

    monkeypatch.setattr(
        augment, "imagenet_train", lambda image_bytes, *_: tf.strings.to_hash_bucket_fast(image_bytes, 2**62)
    )


def _train_records(data_dir: str, split: str = "train") -> list[tuple[int, int]]:
    """(image hash, label) of each example of ``split`` as TFDS's as_dataset reads it, sorted."""
    import tensorflow as tf
    import tensorflow_datasets as tfds

    from resnet_jax.data import tfds_datasets

    ds = tfds_datasets.make_builder("imagenet2012", data_dir=data_dir).as_dataset(
        split=split, decoders={"image": tfds.decode.SkipDecoding()}
    )
    ds = ds.map(lambda ex: (tf.strings.to_hash_bucket_fast(ex["image"], 2**62), ex["label"]))
    return sorted((int(h), int(label)) for h, label in ds.as_numpy_iterator())


def _examples(batches: list[dict]) -> list[tuple[int, int]]:
    """The stream of (image hash, label) pairs of hashed training batches."""
    return [(int(h), int(label)) for b in batches for h, label in zip(b["image"], b["label"], strict=True)]


def test_imagenet_epochs_read_the_record_files_in_new_orders(sharded_imagenet_data_dir, monkeypatch):
    """A shuffle buffer smaller than the host's share: each epoch reads the share's record files in
    an order of its own, so an example's place in one epoch says little about its place in the next
    (before: the same file order every epoch, and only the buffer to move an example: position
    correlation 0.97 between epochs here). Every epoch is still a permutation of the share, exactly
    the (image bytes, label) records TFDS's as_dataset reads; the same seed gives the same batches,
    and resuming in the middle of epoch 2 gives the uninterrupted ones."""
    _small_shuffle_buffer(monkeypatch)
    _image_hashes(monkeypatch)
    data_dir, manual_dir = sharded_imagenet_data_dir
    cfg = imagenet_cfg(data_dir, manual_dir, image_size=16)
    reference = _train_records(data_dir)
    n, b, num_epochs = len(reference), 5, 4  # the batch divides no epoch: epochs end mid-batch
    assert n == 48 and len(set(reference)) == n

    steps = math.ceil(num_epochs * n / b)
    batches = take(data.train_batches(cfg, global_batch_size=b, seed=0), steps)
    stream = _examples(batches)
    epochs = [stream[e * n : (e + 1) * n] for e in range(num_epochs)]
    for e, epoch in enumerate(epochs):
        assert sorted(epoch) == reference, f"epoch {e} is not a permutation of the share"
    places = np.array([[epoch.index(x) for x in reference] for epoch in epochs])  # [epoch, example]
    correlation = np.corrcoef(places)[np.triu_indices(num_epochs, 1)]  # of every pair of epochs
    assert correlation.max() < 0.8 and correlation.mean() < 0.4, correlation

    assert_batches_equal(batches[:3], take(data.train_batches(cfg, global_batch_size=b, seed=0), 3))
    other_seed = _examples(take(data.train_batches(cfg, global_batch_size=b, seed=1), 10))[:n]
    assert sorted(other_seed) == reference and other_seed != epochs[0]
    k = 22  # example 110: the 15th of epoch 2
    assert 2 * n < k * b < 3 * n
    assert_batches_equal(
        batches[k:], take(data.train_batches(cfg, global_batch_size=b, seed=0, start_step=k), steps - k)
    )


def test_imagenet_hosts_shuffle_disjoint_shares_of_the_record_files(sharded_imagenet_data_dir, monkeypatch):
    """Two processes: each shuffles its own contiguous half (24 examples in 8 record files, more
    than the buffer), every epoch a permutation of it in a new order; together they cover the
    training split, each example once."""
    _small_shuffle_buffer(monkeypatch)
    _image_hashes(monkeypatch)
    data_dir, manual_dir = sharded_imagenet_data_dir
    cfg = imagenet_cfg(data_dir, manual_dir, image_size=16)
    shares = []
    for p in range(2):
        share = _train_records(data_dir, f"train[{24 * p}:{24 * (p + 1)}]")
        batches = take(data.train_batches(cfg, global_batch_size=4, seed=0, process_index=p, process_count=2), 24)
        assert batches[0]["label"].shape == (2,)
        stream = _examples(batches)
        epochs = [stream[:24], stream[24:]]
        assert sorted(epochs[0]) == sorted(epochs[1]) == share and epochs[0] != epochs[1]
        shares.append(set(share))
    assert not shares[0] & shares[1]
    assert sorted(shares[0] | shares[1]) == _train_records(data_dir)


def test_imagenet_file_shuffled_epochs_decode_and_resume(sharded_imagenet_data_dir, monkeypatch):
    """The records read from the files themselves decode into uint8 training crops, and resuming
    in the middle of epoch 2 gives the same pixels as the uninterrupted stream."""
    _small_shuffle_buffer(monkeypatch)
    cfg = imagenet_cfg(*sharded_imagenet_data_dir, image_size=16)
    batches = take(data.train_batches(cfg, global_batch_size=5, seed=0), 24)  # 120 examples: into epoch 2
    assert batches[0]["image"].shape == (5, 16, 16, 3) and batches[0]["image"].dtype == np.uint8
    assert batches[0]["label"].dtype == np.int32 and set(np.concatenate([b["label"] for b in batches])) == {0, 1, 2, 3}
    assert_batches_equal(batches[21:], take(data.train_batches(cfg, global_batch_size=5, seed=0, start_step=21), 3))


def _break_train_tar(path, how: str) -> None:
    import tarfile

    if how == "truncated":
        path.write_bytes(path.read_bytes()[:20000])
    elif how == "not_a_tar":
        path.write_text("this is not a tar\n")
    else:  # a valid tar with nothing in it
        tarfile.open(path, "w").close()


@pytest.mark.parametrize("how", ["truncated", "not_a_tar", "empty_tar"])
def test_imagenet_broken_tars_raise_user_error(tmp_path, how):
    """A truncated, foreign or empty train tar: one UserError naming the tars and their expected
    sizes (before: tarfile.ReadError or TFDS's "No examples were yielded" tracebacks)."""
    from imagenet_tars import make_fake_imagenet_tars

    manual_dir = tmp_path / "manual"
    make_fake_imagenet_tars(str(manual_dir))
    _break_train_tar(manual_dir / "ILSVRC2012_img_train.tar", how)
    cfg = imagenet_cfg(str(tmp_path / "data"), str(manual_dir))
    with pytest.raises(UserError, match=rf"cannot prepare imagenet2012 from the tars in {manual_dir} \(") as e:
        data.get_info(cfg)
    assert "147,897,477,120 and 6,744,924,160 bytes" in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize("name", ["imagenet2012", "cifar10"])
@pytest.mark.parametrize("where", ["is_a_file", "under_a_file"])
def test_a_data_dir_that_cannot_be_a_directory_raises_user_error(tmp_path, name, where):
    """Before: NotADirectoryError from deep in TFDS (ImageNet), or "not prepared ... could not be
    downloaded" (CIFAR), which did not say why."""
    afile = tmp_path / "afile"
    afile.write_text("mine")
    data_dir = afile if where == "is_a_file" else afile / "sub"
    cfg = dataset_cfg(name=name, data_dir=str(data_dir), manual_dir=str(tmp_path))
    with pytest.raises(UserError, match=r"config\.dataset\.data_dir .*afile.* a file, not a directory"):
        data.get_info(cfg)
    assert afile.read_text() == "mine"


@pytest.mark.parametrize("split", ["train", "validation"])
def test_a_prepared_dataset_missing_a_shard_raises_user_error(imagenet_data_dir, tmp_path, split):
    """A record file of a prepared split deleted afterwards: refused when the run starts (before:
    TensorFlow's NotFoundError mid-epoch, or at the first evaluation after training)."""
    import shutil

    data_dir = tmp_path / "data"
    shutil.copytree(imagenet_data_dir[0], data_dir)
    (shard,) = data_dir.glob(f"imagenet2012/*/imagenet2012-{split}.tfrecord-*")
    shard.unlink()
    cfg = imagenet_cfg(str(data_dir), imagenet_data_dir[1])
    with pytest.raises(UserError, match=rf"is damaged: 1 file\(s\) of its '{split}' split are missing"):
        data.get_info(cfg)


def test_imagenet_missing_tars_raise_user_error(tmp_path):
    manual_dir = tmp_path / "manual"
    manual_dir.mkdir()
    cfg = imagenet_cfg(str(tmp_path / "data"), str(manual_dir))
    pattern = rf"ILSVRC2012_img_train\.tar.*ILSVRC2012_img_val\.tar.*{manual_dir}"
    with pytest.raises(UserError, match=pattern):
        data.get_info(cfg)
    with pytest.raises(UserError, match=pattern):
        data.train_batches(cfg, global_batch_size=4, seed=0)
