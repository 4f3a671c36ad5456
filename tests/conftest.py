"""Shared pytest fixtures."""

import os
import shutil
import sys
import tempfile
from pathlib import PurePosixPath

import pytest
from cli_env import LIGHT_XLA_FLAGS

# In-process tests compile with LLVM's -O1 instead of XLA:CPU's default -O3, and without XLA:CPU's
# MLIR fusion emitters (set before JAX starts its backend). Why: the random initialisers' kernels
# take -O3 seconds per parameter shape to compile (an eager create_model of a width-4
# cifar_resnet8: 20 s against 4 s), and these tests build hundreds of tiny models; the emitters
# off took test_models from 206 to 176 CPU seconds and the other in-process files from 301 to 279
# (each pair run side by side). The computed values are the same (resnet_jax.train uses -O1 for
# its initialisation and tests/test_train_step.py checks it bit for bit against XLA's defaults).
# The subprocesses that tests start (their environment from cli_env.user_env) keep XLA's
# defaults, as a user's run has them.
if LIGHT_XLA_FLAGS not in os.environ.get("XLA_FLAGS", ""):  # (xdist workers inherit the controller's)
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {LIGHT_XLA_FLAGS}".strip()
_OWN_CACHE: list[str] = []

# torch imports its optional GPU compiler, triton, on first use of torchvision; in a process where
# TensorFlow is already loaded that import segfaults (seen when xdist ran tests/test_data.py before
# tests/test_convert.py in one worker). The CPU tests never need triton: make it unimportable.
sys.modules.setdefault("triton", None)


def pytest_configure(config):
    """One persistent JAX compilation cache for the whole test run: the tests in both xdist
    workers and the CLI subprocesses they start. Why: many tests compile the same programs (the
    same tiny train step under several guards, the same CLI run in several reliability tests);
    a compile served from the cache costs its tracing only. Made by the first pytest process (the
    xdist controller, or pytest alone), inherited by the workers through the environment (they
    start later), removed when that process ends. The cache key covers the XLA flags and compile
    options, so programs compiled with other options never share an entry.

    In the workers only programs that took a second or more to compile are written: test_models
    alone compiles about 700 programs (most of them eager ops and initialisers of new shapes) and
    found 4 of them in the cache, while serialising and writing them all took 6.5 s (cProfile). The CLI
    subprocesses write every program (tests/cli_env.py).
    """
    if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
        _OWN_CACHE.append(tempfile.mkdtemp(prefix="resnet_jax-tests-jax-cache-"))
        os.environ["JAX_COMPILATION_CACHE_DIR"] = _OWN_CACHE[0]
        os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "1"
        os.environ["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"] = "0"


# Files whose tests share no fixture and little compiled code: make test (--dist loadgroup) hands
# them to the two workers one test at a time. Every other file is one xdist group, so that its
# module-scoped fixtures (shared training runs) run once. Why: xdist schedules the groups first
# (largest first) and the single tests last, and these fill whichever worker finishes early. With
# whole files only (--dist loadfile) the workers' test times were 425 and 468 s and pytest took
# 8 min 2 s; with this 438 and 441 s, 7 min 41 s (one run each, this session's 2-core machine).
SPREAD_ONE_BY_ONE = {"test_counts.py", "test_summary.py"}


@pytest.hookimpl(tryfirst=True)  # before xdist's own hook, which reads the groups
def pytest_collection_modifyitems(config, items):
    for item in items:
        if item.path.name not in SPREAD_ONE_BY_ONE:
            item.add_marker(pytest.mark.xdist_group(item.path.name))


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_node_collection_finished(node, ids):
    """In the xdist controller: stop at once if the groups did not reach a worker's node ids (xdist's
    way of passing them to its scheduler; pytest 9.2 with xdist 3.8 drops them silently)."""
    if node.config.getoption("dist") != "loadgroup":
        return
    grouped = [nodeid for nodeid in ids if PurePosixPath(nodeid.split("::")[0]).name not in SPREAD_ONE_BY_ONE]
    if grouped and not any("@" in nodeid for nodeid in grouped):
        pytest.exit("pytest-xdist ignored the xdist_group marks: install the pytest pinned in pyproject.toml", 4)


def pytest_unconfigure(config):
    for path in _OWN_CACHE:
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="module")
def jax_cache() -> str:
    """The run's JAX compilation cache, for the CLI subprocesses (see tests/cli_env.py)."""
    return os.environ["JAX_COMPILATION_CACHE_DIR"]


@pytest.fixture(scope="session")
def imagenet_data_dir(tmp_path_factory):
    """A tiny imagenet2012 prepared by TFDS's real builder from fake tars (about 10 s), once per
    worker (test_data and test_train only read it).

    2 classes x 3 train JPEGs, 4 validation JPEGs (see tests/imagenet_tars.py).

    Returns:
        (data_dir, manual_dir) as strings.
    """
    from imagenet_tars import prepare_fake_imagenet

    root = tmp_path_factory.mktemp("imagenet")
    data_dir, manual_dir = str(root / "data"), str(root / "manual")
    prepare_fake_imagenet(data_dir, manual_dir)
    return data_dir, manual_dir
