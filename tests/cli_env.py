"""The environment of the CLI subprocesses that the tests start."""

from __future__ import annotations

import os

# tests/conftest.py adds this flag to XLA_FLAGS for the in-process tests (compile time); the
# subprocesses drop it, so that they compile as a user's process does.
FAST_LLVM = "--xla_backend_optimization_level=1"


def user_env(**overrides: str) -> dict:
    """``os.environ`` for a subprocess: CPU only, XLA_FLAGS without ``FAST_LLVM``, then ``overrides``."""
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    env["XLA_FLAGS"] = env.get("XLA_FLAGS", "").replace(FAST_LLVM, "").strip()
    env.update(overrides)
    return env


def env_for(cache: str, devices: int = 1) -> dict:
    """CPU only, ``devices`` simulated devices, and a JAX compilation cache shared by the
    subprocesses of one test session (``cache``: the ``jax_cache`` fixture)."""
    return user_env(
        XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
        JAX_COMPILATION_CACHE_DIR=cache,
        JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
        JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0",
    )
