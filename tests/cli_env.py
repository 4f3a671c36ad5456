"""The environment of the CLI subprocesses that the tests start."""

from __future__ import annotations

import os


def env_for(cache: str, devices: int = 1) -> dict:
    """CPU only, ``devices`` simulated devices, and a JAX compilation cache shared by the
    subprocesses of one test session (``cache``: the ``jax_cache`` fixture)."""
    return dict(
        os.environ,
        JAX_PLATFORMS="cpu",
        XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
        JAX_COMPILATION_CACHE_DIR=cache,
        JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
        JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0",
    )
