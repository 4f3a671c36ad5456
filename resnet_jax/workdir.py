"""The run directory: a lock against two live runs, the recorded config, and the compatibility
check that stops a run from resuming checkpoints made by a different model or dataset."""

from __future__ import annotations

import datetime
import fcntl
import json
import os
import pathlib
import subprocess

import resnet_jax
from resnet_jax.errors import UserError

CONFIG_FILE = "config.json"
RUN_INFO_FILE = "run_info.json"
LOCK_FILE = ".lock"
# Keys that must match to resume: other keys (lr, steps, logging) may change between restarts.
IDENTITY_KEYS = ("model", "dataset.name", "dataset.image_size", "dataset.num_classes")


def _get(cfg: dict, dotted: str):
    for part in dotted.split("."):
        cfg = cfg.get(part) if isinstance(cfg, dict) else None
    return cfg


def git_commit() -> str | None:
    """The commit of the package's checkout, or None outside git."""
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            cwd=pathlib.Path(resnet_jax.__file__).parent,
            capture_output=True,
            text=True,
            timeout=10,
        )
        return out.stdout.strip() or None if out.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        return None


class Workdir:
    """Prepares ``path`` for a run (process 0 only): checks it can be written, takes the lock,
    checks that existing checkpoints belong to this config, and records config and run info."""

    def __init__(self, path: str | os.PathLike):
        self.path = pathlib.Path(path).absolute()
        self._lock = None

    def open(self, config_dict: dict, *, fresh: bool = False, write: bool = True) -> None:
        try:
            self.path.mkdir(parents=True, exist_ok=True)
            probe = self.path / ".write_test"
            probe.write_text("ok")
            probe.unlink()
        except OSError as e:
            raise UserError(f"cannot write to workdir {self.path} ({e.strerror}); choose another --workdir") from None
        self._acquire_lock()
        old = self.path / CONFIG_FILE
        ckpts = self.path / "checkpoints"
        if old.exists() and ckpts.exists() and any(ckpts.iterdir()):
            previous = json.loads(old.read_text())
            diff = [k for k in IDENTITY_KEYS if _get(previous, k) != _get(config_dict, k)]
            if diff and not fresh:
                raise UserError(
                    f"workdir {self.path} holds checkpoints of a different run ({', '.join(diff)} differ); "
                    "use another --workdir, or pass --fresh to set them aside and start over"
                )
            if diff:
                stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
                for name in ("checkpoints", CONFIG_FILE, "metrics.jsonl"):
                    if (self.path / name).exists():
                        (self.path / name).rename(self.path / f"{name}.old-{stamp}")
        if write:
            (self.path / CONFIG_FILE).write_text(json.dumps(config_dict, indent=2, sort_keys=True))

    def write_run_info(self, **extra) -> None:
        info = {
            "version": resnet_jax.__version__,
            "git_commit": git_commit(),
            "started": datetime.datetime.now(datetime.UTC).isoformat(),
            **extra,
        }
        (self.path / RUN_INFO_FILE).write_text(json.dumps(info, indent=2))

    def _acquire_lock(self) -> None:
        # flock is released by the kernel when the process dies, even by SIGKILL: no stale locks.
        f = open(self.path / LOCK_FILE, "a+")  # noqa: SIM115 - held for the life of the run
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.close()
            raise UserError(
                f"workdir {self.path} is in use by another live run; wait for it or use another --workdir"
            ) from None
        f.seek(0)
        f.truncate()
        f.write(str(os.getpid()))
        f.flush()
        self._lock = f

    def close(self) -> None:
        if self._lock is not None:
            fcntl.flock(self._lock, fcntl.LOCK_UN)
            self._lock.close()
            self._lock = None


def load_config_dict(workdir) -> dict:
    path = pathlib.Path(workdir) / CONFIG_FILE
    if not path.exists():
        raise UserError(f"{path} not found: is {workdir} the --workdir of a training run?")
    return json.loads(path.read_text())
