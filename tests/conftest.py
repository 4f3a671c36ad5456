"""Shared pytest fixtures."""

import sys

import pytest

# torch imports its optional GPU compiler, triton, on first use of torchvision; in a process where
# TensorFlow is already loaded that import segfaults (seen when xdist ran tests/test_data.py before
# tests/test_convert.py in one worker). The CPU tests never need triton: make it unimportable.
sys.modules.setdefault("triton", None)


@pytest.fixture(scope="module")
def jax_cache(tmp_path_factory) -> str:
    """A JAX compilation cache for the CLI subprocesses (see tests/cli_env.py)."""
    return str(tmp_path_factory.getbasetemp() / "jax-cache")


@pytest.fixture(scope="module")
def imagenet_data_dir(tmp_path_factory):
    """A tiny imagenet2012 prepared by TFDS's real builder from fake tars (about 10 s).

    2 classes x 3 train JPEGs, 4 validation JPEGs (see tests/imagenet_tars.py).

    Returns:
        (data_dir, manual_dir) as strings.
    """
    from imagenet_tars import prepare_fake_imagenet

    root = tmp_path_factory.mktemp("imagenet")
    data_dir, manual_dir = str(root / "data"), str(root / "manual")
    prepare_fake_imagenet(data_dir, manual_dir)
    return data_dir, manual_dir
