"""The environment of the CLI subprocesses that the tests start, and the XLA flags of the tests
that run in-process."""

from __future__ import annotations

import os

# tests/conftest.py adds these flags to XLA_FLAGS for the in-process tests (compile time); the
# subprocesses drop them, so that they compile as a user's process does.
LIGHT_XLA_FLAGS = "--xla_backend_optimization_level=1 --xla_cpu_use_fusion_emitters=false"
# What XLA:CPU compiles with by default, for the in-process tests that check a default compile.
XLA_CPU_DEFAULTS = {"xla_backend_optimization_level": 3, "xla_cpu_use_fusion_emitters": True}


def user_env(**overrides: str) -> dict:
    """``os.environ`` for a subprocess: CPU only, XLA_FLAGS without ``LIGHT_XLA_FLAGS``, then ``overrides``."""
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    env["XLA_FLAGS"] = env.get("XLA_FLAGS", "").replace(LIGHT_XLA_FLAGS, "").strip()
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
