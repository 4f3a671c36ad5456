"""The environment of the CLI subprocesses that the tests start, what the tests assert about a
refused command (one error line, files untouched), and the XLA flags of the tests that run
in-process."""

from __future__ import annotations

import hashlib
import json
import os
import pathlib
import subprocess
from collections.abc import Iterator

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


def snapshot(wd: pathlib.Path) -> dict[str, tuple]:
    """Every file under ``wd``: (size, mtime in ns, sha256)."""
    out = {}
    for p in sorted(wd.rglob("*")):
        if p.is_file():
            st = p.stat()
            out[str(p.relative_to(wd))] = (st.st_size, st.st_mtime_ns, hashlib.sha256(p.read_bytes()).hexdigest())
    return out


def assert_one_line_error(p: subprocess.CompletedProcess, *needles: str, max_lines: int = 6) -> str:
    """A refused command: exit status 2, no traceback, at most ``max_lines`` non-blank lines of
    stderr of which the last, and only it, is ``error: ...`` holding every needle; returns it."""
    err = p.stderr
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert p.returncode == 2, (p.returncode, err[-3000:])
    assert "Traceback" not in err, err[-3000:]
    assert lines and lines[-1].startswith("error: "), err[-3000:]
    assert sum(ln.startswith("error:") for ln in lines) == 1, err[-3000:]
    assert len(lines) <= max_lines, err[-3000:]
    for needle in needles:
        assert needle in lines[-1], (needle, lines[-1])
    return lines[-1]


def tree(path: pathlib.Path) -> dict[str, tuple]:
    """Every file and directory under ``path`` (a directory's entry: None)."""
    files = snapshot(path)
    return {str(p.relative_to(path)): files.get(str(p.relative_to(path))) for p in sorted(path.rglob("*"))}


def write_metrics(workdir, rows: list[dict]) -> None:
    """``rows`` as ``workdir``'s metrics.jsonl, one JSON object a line, as the logbook writes them."""
    (pathlib.Path(workdir) / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def tensorboard_events(wd) -> Iterator:
    """The Events of ``wd``'s TensorBoard event files, in file order, read as TFRecords (8-byte
    length, 4-byte CRC, the Event, 4-byte CRC) without TensorFlow."""
    from tensorboardX.proto import event_pb2

    for path in sorted(pathlib.Path(wd).glob("events.out.tfevents.*")):
        data, i = path.read_bytes(), 0
        while i + 12 <= len(data):
            n = int.from_bytes(data[i : i + 8], "little")
            yield event_pb2.Event.FromString(data[i + 12 : i + 12 + n])
            i += 12 + n + 4
