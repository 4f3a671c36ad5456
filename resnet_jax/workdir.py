"""The run directory: a lock against two live runs, the recorded config, and the compatibility
check that stops a run from resuming checkpoints made by a different model or dataset."""

from __future__ import annotations

import datetime
import fcntl
import json
import logging
import os
import pathlib
import subprocess

import resnet_jax
from resnet_jax.errors import UserError
from resnet_jax.logbook import METRICS_FILE, write_atomic

CONFIG_FILE = "config.json"
RUN_INFO_FILE = "run_info.json"
LOCK_FILE = ".lock"
# Keys that must match to resume (with every key below them): other keys (lr, steps, logging) may
# change between restarts. trainable and optimizer: the optimizer state has another structure.
IDENTITY_KEYS = ("model", "dataset.name", "dataset.image_size", "dataset.num_classes", "trainable", "optimizer")
# Below an identity key, but free to change on resume: per-block rematerialisation computes the
# same function with the same parameters (a run that ran out of memory resumes with it on).
_NOT_IDENTITY = ("model.remat",)
# Keys a resume may change without a warning: those that do not change what a run computes
# (config.NON_RESULT_KEYS), but for the seed (a resumed run's data order) and skip_nonfinite.
_LOUD_NON_RESULT_KEYS = ("seed", "skip_nonfinite")
# What --fresh sets aside (into ``old-<time>/``): everything a run writes, so the new one starts clean.
RUN_OUTPUTS = ("checkpoints", "checkpoints-damaged", CONFIG_FILE, RUN_INFO_FILE, "metrics.jsonl", "curves.png")
RUN_OUTPUT_PATTERNS = ("events.out.tfevents.*", "eval_*.json")


def read_run_info(workdir: str | os.PathLike) -> dict:
    """A run's ``run_info.json`` ({} when it is missing or unreadable: its facts are re-derived)."""
    try:
        info = json.loads((pathlib.Path(workdir) / RUN_INFO_FILE).read_text())
    except (OSError, ValueError):
        return {}
    return info if isinstance(info, dict) else {}


def _identity_key(key: str) -> str | None:
    """The identity key that the flat config ``key`` is or lies below, None if a resume may change it."""
    if key in _NOT_IDENTITY:
        return None
    return next((i for i in IDENTITY_KEYS if key == i or key.startswith(i + ".")), None)


def refused_on_resume(key: str) -> bool:
    """Whether a change of the flat config ``key`` stops a resume: an identity key or one below it."""
    return _identity_key(key) is not None


def _changes(previous: dict, config_dict: dict) -> tuple[list[str], dict[str, tuple]]:
    """How ``config_dict`` differs from the recorded ``previous``: the identity keys (or keys below
    them) whose values differ, and the other keys worth a warning, ``{key: (old, new)}`` (values
    as recorded). A key the recorded config lacks (a run from before the key existed) counts as
    its default (``config.flat_settings``)."""
    from resnet_jax.config import NON_RESULT_KEYS, flat_settings

    old, new = flat_settings(previous), flat_settings(config_dict)
    changed = sorted(k for k in old.keys() | new.keys() if old.get(k) != new.get(k))
    refused = {_identity_key(k) for k in changed}
    identity = [i for i in IDENTITY_KEYS if i in refused]
    quiet = NON_RESULT_KEYS - set(_LOUD_NON_RESULT_KEYS)
    # (init_from is not read on resume: the trainer says so)
    loud = [k for k in changed if k not in quiet and not k.startswith("init_from.")]
    return identity, {k: (json.loads(old.get(k, "null")), json.loads(new.get(k, "null"))) for k in loud}


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


def check_filesystem_path(path: str | os.PathLike) -> None:
    """Refuses a URL (``gs://``, ``s3://``): the workdir is locked with ``fcntl`` and written with
    atomic renames, which object stores do not have; ``pathlib`` would also silently turn
    ``gs://b/x`` into a local folder ``gs:/b/x``."""
    if "://" in str(path):
        raise UserError(
            f"--workdir={path}: a workdir must be a filesystem path (local disk, NFS, or a bucket mounted "
            "with gcsfuse), not a URL; dataset.data_dir may be a gs:// URL"
        )


class Workdir:
    """Prepares ``path`` for a run (process 0 only): checks it can be written, takes the lock,
    checks that existing checkpoints belong to this config, and records config and run info."""

    def __init__(self, path: str | os.PathLike):
        check_filesystem_path(path)
        self.path = pathlib.Path(path).absolute()
        self._lock = None
        # Set by open: the settings (not identity keys) that differ from the recorded config.
        self.changed_settings: dict[str, tuple] = {}

    def open(self, config_dict: dict, *, fresh: bool = False, write: bool = True) -> None:
        """Checks, locks and (``write``) records the config; nothing existing is modified until
        every check has passed. ``fresh``: set the previous run's outputs aside and start over."""
        try:
            self.path.mkdir(parents=True, exist_ok=True)
            probe = self.path / ".write_test"
            probe.write_text("ok")
            probe.unlink()
        except OSError as e:
            raise UserError(f"cannot write to workdir {self.path} ({e.strerror}); choose another --workdir") from None
        self._acquire_lock()
        try:
            old = self.path / CONFIG_FILE
            ckpts = self.path / "checkpoints"
            for d in (ckpts, self.path / "checkpoints-damaged"):
                if not fresh and d.exists() and not d.is_dir():
                    raise UserError(
                        f"{d} is a file, not the run's checkpoint directory; move it away or choose another --workdir"
                    )
            if not fresh and old.exists() and self._has_outputs():
                try:
                    previous = json.loads(old.read_text())
                    if not isinstance(previous, dict):
                        raise ValueError("not a JSON object")
                except (OSError, ValueError) as e:
                    raise UserError(
                        f"{old} cannot be read ({e}); pass --fresh to set this run aside and start over"
                    ) from None
                diff, settings = _changes(previous, config_dict)
                if diff:
                    what = "checkpoints" if ckpts.is_dir() and any(ckpts.iterdir()) else "the outputs"
                    raise UserError(
                        f"workdir {self.path} holds {what} of a different run ({', '.join(diff)} differ); "
                        "use another --workdir, or pass --fresh to set them aside and start over"
                    )
                self.changed_settings = settings
            if fresh:
                self.set_aside()
                write = True  # nothing is left to refuse: the workdir is a run's from here on
        except BaseException:
            self.close()
            raise
        self._lock.seek(0)
        self._lock.truncate()
        self._lock.write(str(os.getpid()))
        self._lock.flush()
        if write:
            self.write_config(config_dict)

    def _has_outputs(self) -> bool:
        """Whether an earlier run left checkpoints, metrics, event files or results here (a run
        stopped before its first checkpoint restarts from step 0 over its own outputs)."""
        ckpts = self.path / "checkpoints"
        if ckpts.is_dir() and any(ckpts.iterdir()):
            return True
        metrics = self.path / METRICS_FILE
        if metrics.is_file() and metrics.stat().st_size > 0:
            return True
        return any(next(self.path.glob(pattern), None) for pattern in RUN_OUTPUT_PATTERNS)

    def write_config(self, config_dict: dict) -> None:
        """Records the run's config (``config.json``, what evaluate and the analyses read)."""
        write_atomic(self.path / CONFIG_FILE, json.dumps(config_dict, indent=2, sort_keys=True))

    def set_aside(self) -> pathlib.Path | None:
        """Moves the outputs of an earlier run into ``old-<time>/`` (never deletes them)."""
        found = [self.path / n for n in RUN_OUTPUTS if (self.path / n).exists()]
        found += sorted(p for pattern in RUN_OUTPUT_PATTERNS for p in self.path.glob(pattern))
        if not found:
            return None
        stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
        dest = self.path / f"old-{stamp}"
        n = 1
        while dest.exists():
            n += 1
            dest = self.path / f"old-{stamp}-{n}"
        dest.mkdir()
        for p in found:
            p.rename(dest / p.name)
        logging.getLogger("resnet_jax").warning("--fresh: moved the previous run's files to %s", dest)
        return dest

    def write_run_info(self, keep: tuple[str, ...] = (), **extra) -> None:
        """Records this start of the run; ``keep``: keys of the previous record to carry over
        (what a resumed run learnt at its first start)."""
        previous = read_run_info(self.path)
        kept = {k: previous[k] for k in keep if k in previous}
        info = {
            "version": resnet_jax.__version__,
            "git_commit": git_commit(),
            "started": datetime.datetime.now(datetime.UTC).isoformat(),
            **kept,
            **extra,
        }
        write_atomic(self.path / RUN_INFO_FILE, json.dumps(info, indent=2))

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
        self._lock = f  # the pid is written once every check has passed (open)

    def close(self) -> None:
        if self._lock is not None:
            fcntl.flock(self._lock, fcntl.LOCK_UN)
            self._lock.close()
            self._lock = None


def require_workdir(path: str | pathlib.Path) -> pathlib.Path:
    """The run directory ``path``, which must exist and hold the run's ``config.json``.

    Raises:
      UserError: it does not exist, or is not a training run's directory.
    """
    check_filesystem_path(path)
    p = pathlib.Path(path)
    if p.exists() and not p.is_dir():
        raise UserError(f"workdir {p} is not a directory; give the --workdir (folder) of a training run")
    if not p.is_dir():
        raise UserError(f"workdir {p} does not exist")
    if not (p / CONFIG_FILE).is_file():
        raise UserError(f"{p / CONFIG_FILE} not found: is {p} the --workdir of a training run?")
    return p


def result_path(workdir: str | pathlib.Path, step: int, crops: int = 1, image_size: int | None = None) -> pathlib.Path:
    """Where ``python -m resnet_jax.evaluate`` writes the result of evaluating ``step`` with
    ``crops`` crops of ``image_size`` pixels (None: the run's own size), so that no protocol's
    result replaces another's (the results table reads the 10-crop ones)."""
    suffix = ("" if crops == 1 else f"_{crops}crop") + ("" if image_size is None else f"_{image_size}px")
    return pathlib.Path(workdir) / f"eval_{step}{suffix}.json"


def other_size(dataset: dict, eval_image_size: int | None) -> int | None:
    """``eval_image_size`` when it is not the run's own eval crop side (``result_path`` then names
    it ``_<N>px``), else None. Only imagenet2012 runs are evaluated at a size; theirs defaults to
    eval_image_size, else image_size, else 224."""
    from resnet_jax.config import IMAGENET_IMAGE_SIZE

    own = dataset.get("eval_image_size") or dataset.get("image_size") or IMAGENET_IMAGE_SIZE
    return eval_image_size if eval_image_size not in (None, own) else None


def load_config_dict(workdir) -> dict:
    path = pathlib.Path(workdir) / CONFIG_FILE
    if not path.exists():
        raise UserError(f"{path} not found: is {workdir} the --workdir of a training run?")
    try:
        cfg = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise UserError(f"{path} cannot be read ({e}); is {workdir} the --workdir of a training run?") from None
    if not isinstance(cfg, dict) or not all(isinstance(cfg.get(k, {}), dict) for k in ("model", "dataset")):
        raise UserError(f"{path} is not a run's config (a JSON object with model and dataset); is {workdir} a run?")
    return cfg
