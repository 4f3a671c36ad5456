"""Orbax checkpoints under ``WORKDIR/checkpoints``: one directory per step, async saves, keep the
latest N and the best by eval top-1, and a restore that survives damaged or incomplete steps."""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import logging
import pathlib
from collections.abc import Iterator

import jax
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers as cm

from resnet_jax.errors import DropMessages, UserError, first_line

log = logging.getLogger("resnet_jax")
# Orbax warns "Given directory is read only" whenever a checkpoint directory is opened for reading
# (evaluate, the analysis tools, load_model, init_from), which is what read_only asks for.
logging.getLogger("absl").addFilter(DropMessages("Given directory is read only"))

BEST_METRIC = "eval/top1_acc"


def _score(metrics: dict) -> float:
    return float(metrics.get(BEST_METRIC, -1.0))


def checkpoint_dir(workdir: str | pathlib.Path) -> pathlib.Path:
    return pathlib.Path(workdir).absolute() / "checkpoints"


# The name under which CheckpointManager stores a single-item state in each step directory.
ITEM = "default"


def step_item_dir(workdir: str | pathlib.Path, step: int) -> pathlib.Path:
    """The Orbax directory of the state saved at ``step`` (``checkpoints/<step>/default``)."""
    return checkpoint_dir(workdir) / str(step) / ITEM


def finalised_steps(workdir: str | pathlib.Path) -> list[int]:
    """The run's finalised checkpoint steps, as Orbax lists them (no manager opened), oldest first."""
    d = checkpoint_dir(workdir)
    return sorted(ocp.utils.checkpoint_steps(d)) if d.is_dir() else []


def has_checkpoints(workdir: str | pathlib.Path) -> bool:
    """Whether the run has a finalised checkpoint step."""
    return bool(finalised_steps(workdir))


def damaged_dir(workdir: str | pathlib.Path) -> pathlib.Path:
    """Where damaged checkpoints are set aside (kept for inspection, never deleted)."""
    return pathlib.Path(workdir).absolute() / "checkpoints-damaged"


def incomplete_steps(directory: pathlib.Path) -> list[pathlib.Path]:
    """Step directories a killed save left behind (no commit): Orbax writes to ``*.orbax-checkpoint-tmp*``."""
    return sorted(p for p in directory.glob("*") if ".orbax-checkpoint-tmp" in p.name) if directory.exists() else []


def restore_problem(e: BaseException) -> str:
    """The informative line of a failed Orbax restore: the innermost cause's first line (the
    outer ones repeat a TensorStore spec), at most 200 characters."""
    while e.__cause__ is not None:
        e = e.__cause__
    return first_line(e, limit=200)


# Failures of the machine or the storage, not of the checkpoint's files: setting the newest good
# checkpoints aside for them (and resuming from an older one) would throw away progress.
_NOT_DAMAGE = ("RESOURCE_EXHAUSTED", "Out of memory", "UNAVAILABLE", "DEADLINE_EXCEEDED")


def _not_damage(e: BaseException, problem: str) -> bool:
    return isinstance(e, MemoryError) or any(token in problem for token in _NOT_DAMAGE)


class _DrainingEventLoop(asyncio.SelectorEventLoop):
    """An event loop whose ``close`` first lets the tasks still on it finish.

    Orbax runs each restore on a fresh loop and closes it as soon as the restore raises: the
    sibling reads of a damaged checkpoint are then still in flight. TensorStore later calls into
    the closed loop ("RuntimeError: Event loop is closed") and the failed tasks are garbage
    collected unretrieved ("Task exception was never retrieved"): hundreds of lines after the
    one-line error, in some runs (timing).
    """

    def close(self) -> None:
        try:
            if not self.is_closed() and not self.is_running():
                pending = asyncio.all_tasks(self)
                if pending:
                    self.run_until_complete(asyncio.wait(pending, timeout=60))
                self.run_until_complete(asyncio.sleep(0))  # done callbacks queued before the stop
                for task in pending:
                    if task.done() and not task.cancelled():
                        task.exception()  # retrieved: the restore's own error is what is reported
        finally:
            super().close()


class _DrainingPolicy(asyncio.DefaultEventLoopPolicy):
    _loop_factory = _DrainingEventLoop


@contextlib.contextmanager
def drained_event_loops() -> Iterator[None]:
    """Within the block, the event loops that Orbax creates finish their tasks before closing
    (see ``_DrainingEventLoop``): a failed restore then raises quietly."""
    previous = asyncio.get_event_loop_policy()
    asyncio.set_event_loop_policy(_DrainingPolicy())
    try:
        yield
    finally:
        asyncio.set_event_loop_policy(previous)


class Checkpointer:
    """A thin wrapper over ``ocp.CheckpointManager`` with this project's policies.

    Args:
      workdir: the run's directory; checkpoints go to ``workdir/checkpoints/<step>``.
      keep: how many of the latest checkpoints to keep (the best by eval top-1 is kept too).
      async_save: save in a background thread (errors surface at the next save or ``wait``).
      read_only: open for restoring only (``evaluate``).
    """

    def __init__(self, workdir, *, keep: int = 3, async_save: bool = True, read_only: bool = False):
        self.directory = checkpoint_dir(workdir)
        self.read_only = read_only
        for tmp in incomplete_steps(self.directory):
            log.warning(
                "ignoring incomplete checkpoint %s (a save was interrupted)%s",
                tmp,
                "" if read_only else "; it is removed",
            )
        policy = cm.AnyPreservationPolicy(
            [
                cm.LatestN(n=keep),
                # Best alone could delete the latest checkpoint that a resume needs: keep both.
                cm.BestN(get_metric_fn=_score, n=1, keep_checkpoints_without_metrics=False),
            ]
        )
        options = ocp.CheckpointManagerOptions(
            preservation_policy=policy,
            # Orbax writes a step's metrics only when best_fn is set; every step gets a (possibly
            # empty) metrics dict, ranked -1 when it was not evaluated.
            best_fn=_score,
            best_mode="max",
            enable_async_checkpointing=async_save,
            save_interval_steps=0 if read_only else 1,
            cleanup_tmp_directories=not read_only,
            create=not read_only,
            read_only=read_only,
        )
        self.manager = ocp.CheckpointManager(self.directory, options=options)

    def all_steps(self) -> list[int]:
        return sorted(self.manager.all_steps())

    def save(self, step: int, state, *, metrics: dict | None = None, force: bool = False) -> bool:
        """Saves ``state`` as ``step`` (asynchronously). ``metrics`` with eval top-1 rank it for 'best'."""
        if step in self.all_steps():
            return False
        return self.manager.save(step, args=ocp.args.StandardSave(state), metrics=metrics or {}, force=force)

    def restore(self, step: int, abstract_state):
        """Restores ``step`` onto the shardings of ``abstract_state`` (any mesh)."""
        with drained_event_loops():  # a damaged step: its failed reads end before we go on
            return self.manager.restore(step, args=ocp.args.StandardRestore(abstract_state))

    def restore_latest(self, abstract_state):
        """The newest complete checkpoint that restores, as ``(state, step)``, or ``(None, 0)``.

        A damaged step (truncated or missing files) is skipped with a warning naming it, and the
        previous one is tried, so a crash during or after a save never makes a resume fail. Once an
        older step restores, the damaged newer ones are moved to ``WORKDIR/checkpoints-damaged``
        (so that their step numbers can be saved again). If no step restores, nothing is moved and
        a ``UserError`` says so: that is a code or config change, not a crash.
        """
        damaged: list[tuple[int, str]] = []
        for step in reversed(self.all_steps()):
            try:
                state = self.restore(step, abstract_state)
            except Exception as e:  # noqa: BLE001 - any failure to read means "damaged" ...
                first = restore_problem(e)
                if _not_damage(e, first):  # ... but a full device or a storage hiccup is no damage
                    raise UserError(
                        f"cannot restore {self.directory / str(step)} now ({first}); nothing was moved: "
                        "free the memory or wait for the storage, then start again"
                    ) from None
                log.warning(
                    "checkpoint %s is damaged (%s); falling back to the previous one", self.directory / str(step), first
                )
                damaged.append((step, first))
                continue
            if damaged:
                self._set_aside([s for s, _ in damaged])
            return state, step
        if damaged:
            step, why = damaged[0]
            raise UserError(
                f"no checkpoint in {self.directory} can be restored (the latest, {self.directory / str(step)}: {why}); "
                "if they come from another version of the code or config, pass --fresh to set them aside"
            )
        return None, 0

    def _set_aside(self, steps: list[int]) -> None:
        """Moves damaged step directories out of the manager's directory (process 0) and reloads."""
        if not self.read_only and jax.process_index() == 0:
            dest = damaged_dir(self.directory.parent)
            dest.mkdir(parents=True, exist_ok=True)
            stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
            for step in steps:
                target = dest / f"{step}-{stamp}"
                (self.directory / str(step)).rename(target)
                log.warning("moved damaged checkpoint %s to %s", self.directory / str(step), target)
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            multihost_utils.sync_global_devices("resnet_jax: damaged checkpoints set aside")
        self.manager.reload()

    def metrics(self, step: int) -> dict:
        """The eval metrics saved with ``step`` (empty if it was not evaluated or does not exist)."""
        try:
            return dict(self.manager.metrics(step) or {})
        except Exception:  # noqa: BLE001 - no metrics file: not evaluated
            return {}

    def best_step(self) -> int | None:
        """The step with the highest eval top-1 among kept checkpoints, if any was evaluated."""
        scored = [(_score(self.manager.metrics(s) or {}), s) for s in self.all_steps()]
        best = max(scored, default=(-1.0, None))
        return best[1] if best[0] >= 0 else None

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


def resolve_step(
    workdir: str | pathlib.Path,
    which: str | int | None,
    *,
    steps: list[int] | None = None,
    label: str | None = None,
    checkpointer: Checkpointer | None = None,
) -> int:
    """A run's checkpoint step: ``None``/'latest' -> the newest, 'best' -> the best by eval top-1,
    a number -> that step if it is kept. ``steps``: the kept steps, if already listed;
    ``checkpointer``: the run's open Checkpointer, if the caller has one (it is not closed).

    The one rule for every command that names a checkpoint (evaluate, warm starts, the analyses).

    Raises:
      UserError: no checkpoint, none evaluated ('best'), or the step is not kept; the message
        starts with ``label`` (default: the workdir).
    """
    label = label or str(workdir)
    needed = steps is None or which == "best"  # 'latest' or a step of listed steps: no manager to open
    own = checkpointer is None and needed and checkpoint_dir(workdir).is_dir()
    ckpt = Checkpointer(workdir, read_only=True) if own else checkpointer
    try:
        if steps is None:
            steps = ckpt.all_steps() if ckpt is not None else []
        if not steps:
            raise UserError(f"{label}: no complete checkpoint in {checkpoint_dir(workdir)}; train first")
        if which is None or which == "latest":
            return steps[-1]
        if which == "best":
            best = ckpt.best_step()
            if best is None:
                raise UserError(f"{label}: no evaluated checkpoint; use 'latest' or a step")
            return best
        if str(which).isdigit() and int(which) in steps:
            return int(which)
        shown = which if str(which).isdigit() else repr(which)
        raise UserError(f"{label}: no checkpoint at step {shown}; kept steps: {steps}")
    finally:
        if own:
            ckpt.close()


def abstract_with_shardings(state, shardings):
    """ShapeDtypeStructs carrying target shardings, for restoring onto another mesh."""
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), state, shardings)
