"""Starting a run from trained weights (``config.init_from``): fine-tuning and transfer.

The source is either a training run's workdir (one of its checkpoints: ``init_from.checkpoint``
'latest', 'best' or a step) or a directory written by ``python -m resnet_jax.convert`` (torchvision
weights). Its parameters and BatchNorm statistics replace the fresh initialisation; the optimizer
state, the step count and the schedule start from zero. The linear head ``fc`` follows
``init_from.head``: 'auto' loads it when its shape fits (same number of classes) and keeps the
fresh one otherwise, 'load' insists on loading it, 'reset' always starts a new head.

Only a run with no checkpoint of its own reads the source: a resumed run continues from its own
checkpoint, so a preempted fine-tuning job does not need the source any more. Every other array
must match by name and shape, and the source's network must compute the same function (its
blocks, depth, shortcut and stride placement): a mismatch is one ``UserError`` before anything
is written. Stacked (``scan_blocks``) and unrolled stages convert into each other. Each process
of a multi-host run reads the source itself: it must be on a filesystem every host sees.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
import re
from collections.abc import Mapping
from typing import Any

import numpy as np

from resnet_jax.errors import UserError, first_line

HEADS = ("auto", "load", "reset")
HEAD = "fc"
# The function a network computes, beyond what the parameter shapes show (an option A shortcut
# and no shortcut have the same parameters; so do both stride placements of a bottleneck).
_FUNCTION_KEYS = ("block", "stage_sizes", "shortcut", "stride_in")
_SCANNED = re.compile(r"^(stages\.\d+)\.scanned\.(.+)$")


def check_choices(init_from) -> None:
    """The plain values of ``config.init_from`` (before JAX). Raises ValueError naming the key."""
    if init_from.head not in HEADS:
        raise ValueError(f"config.init_from.head={init_from.head!r}; use one of {', '.join(map(repr, HEADS))}")
    which = str(init_from.checkpoint)
    if which not in ("latest", "best") and not which.isdigit():
        raise ValueError(f"config.init_from.checkpoint={which!r}; use 'latest', 'best' or a step number")
    path = init_from.path
    if path is not None and ("://" in str(path) or not str(path).strip()):
        raise ValueError(f"config.init_from.path={path!r}; give the directory of a run or of converted weights")


@dataclasses.dataclass(frozen=True)
class Source:
    """Where the weights come from: ``kind`` 'run' (a checkpoint ``step``) or 'converted'."""

    path: pathlib.Path
    kind: str
    item_dir: pathlib.Path  # the Orbax checkpoint directory of the state
    step: int | None
    model: dict[str, Any]  # {"name": ..., options...} as the source recorded them

    def describe(self) -> str:
        what = f"checkpoint {self.step} of the run" if self.kind == "run" else "converted weights"
        return f"{what} {self.path} ({self.model.get('name', '?')})"

    def record(self) -> dict[str, Any]:
        """What run_info.json keeps of it."""
        return {"path": str(self.path), "kind": self.kind, "step": self.step, "model": self.model.get("name")}


def open_source(path: str | pathlib.Path, checkpoint: str | int = "latest") -> Source:
    """Finds the weights at ``path``; a missing or unrecognised directory is a ``UserError``."""
    from resnet_jax.convert import CHECKPOINT_SUBDIR, METADATA_FILE
    from resnet_jax.workdir import CONFIG_FILE

    root = pathlib.Path(path).expanduser().absolute()
    label = f"config.init_from.path={path}"
    if root.is_file():
        raise UserError(f"{label} is a file; give the directory of a run or of converted weights")
    if root.name.isdigit() and root.parent.name == "checkpoints":
        raise UserError(
            f"{label} is a checkpoint step folder; give the run's workdir ({root.parent.parent}) "
            f"and config.init_from.checkpoint={root.name}"
        )
    if not root.is_dir():
        raise UserError(
            f"{label}: no such directory; give a run's workdir or a directory written by resnet_jax.convert"
        )
    if (root / METADATA_FILE).is_file() and (root / CHECKPOINT_SUBDIR).is_dir():
        if str(checkpoint) != "latest":
            raise UserError(
                f"config.init_from.checkpoint={checkpoint}: {root} holds converted weights (one set, no steps); "
                "leave the key at 'latest'"
            )
        meta = _read_json(root / METADATA_FILE, label)
        options = meta.get("options") if isinstance(meta.get("options"), dict) else {}
        return Source(root, "converted", root / CHECKPOINT_SUBDIR, None, {**options, "name": meta.get("name")})
    if not (root / CONFIG_FILE).is_file():
        raise UserError(
            f"{label} is neither a run's workdir (config.json) nor converted weights ({METADATA_FILE}); "
            "give one of those directories"
        )
    from resnet_jax.checkpointing import resolve_step, step_item_dir

    step = resolve_step(root, checkpoint, label=label)
    model = dict(_read_json(root / CONFIG_FILE, label).get("model") or {})
    return Source(root, "run", step_item_dir(root, step), step, model)


def _read_json(path: pathlib.Path, label: str) -> dict:
    try:
        value = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise UserError(f"{label}: cannot read {path} ({first_line(e, limit=200)})") from None
    if not isinstance(value, dict):
        raise UserError(f"{label}: {path} is not a JSON object")
    return value


def _function(model: Mapping[str, Any]) -> dict[str, Any] | None:
    """The function-defining options of a recorded model (None when they cannot be resolved)."""
    from resnet_jax.models.spec import resolve_options

    given = {k: model.get(k) for k in ("shortcut", "stride_in")}
    try:
        o = resolve_options(str(model.get("name")), **given)
    except ValueError:
        return None
    return {k: o[k] for k in _FUNCTION_KEYS}


def _described(model: Mapping[str, Any]) -> str:
    """``cifar_resnet8 (width 16, shortcut A, stride_in 3x3)``: the name and the options that shape it."""
    from resnet_jax.models.spec import resolve_options

    keys = ("width", "shortcut", "stride_in")
    try:
        o = resolve_options(str(model.get("name")), **{k: model.get(k) for k in keys})
    except ValueError:
        o = model
    return f"{model.get('name')} ({', '.join(f'{k} {o.get(k)}' for k in keys)})"


def dotted(path) -> str:
    """A pytree key path as a dotted name: ``stages.0.blocks.1.conv1.kernel``."""
    return ".".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path)


def _stored_leaves(source: Source) -> dict[str, tuple[str, Any]]:
    """The source's parameters and statistics from the checkpoint's metadata (no array is read):
    ``{name: (stored name, metadata)}``, names as in the model (``stages.0.blocks.1.conv1.kernel``)."""
    import jax
    import orbax.checkpoint as ocp

    from resnet_jax.checkpointing import drained_event_loops, restore_problem

    try:
        # The handler reads the tree's metadata itself (a Checkpointer also looks for a
        # step-level metadata file, which a CheckpointManager writes one level up, and warns).
        with drained_event_loops():
            tree = dict(ocp.PyTreeCheckpointHandler().metadata(source.item_dir))
    except Exception as e:  # noqa: BLE001 - any unreadable checkpoint is the same answer
        raise UserError(f"cannot read {source.item_dir} ({restore_problem(e)}); is it damaged?") from None
    if source.kind == "run":
        tree = {k: tree[k] for k in ("params", "batch_stats") if k in tree}
    out = {}
    for path, meta in jax.tree_util.tree_flatten_with_path(tree)[0]:
        stored = dotted(path)
        name = stored
        if source.kind == "run":
            name = name.split(".", 1)[1]  # params. / batch_stats.
        elif name.endswith(".value"):  # nnx.state: each variable's value
            name = name[: -len(".value")]
        out[name] = (stored, meta)
    return out


def _block_names(name: str, n: int) -> list[str] | None:
    """The unrolled names of a stacked entry ``stages.i.scanned.x`` of ``n`` blocks:
    ``stages.i.blocks.1.x`` .. ``stages.i.blocks.n.x`` (block 0 is never stacked); None otherwise."""
    m = _SCANNED.match(name)
    return [f"{m.group(1)}.blocks.{j + 1}.{m.group(2)}" for j in range(n)] if m else None


def _unrolled(shapes: Mapping[str, tuple]) -> dict[str, tuple]:
    """Shapes by unrolled name: a stacked entry (leading axis n) becomes its n blocks'."""
    out = {}
    for name, shape in shapes.items():
        blocks = _block_names(name, shape[0]) if shape else None
        out.update(dict.fromkeys(blocks, tuple(shape[1:])) if blocks else {name: tuple(shape)})
    return out


@dataclasses.dataclass
class WarmStart:
    """A checked plan: which of the target's arrays come from ``source``, and from where."""

    source: Source
    stored: dict[str, tuple[str, Any]]  # source name -> (stored name, metadata)
    targets: dict[str, tuple]  # target name (as the Trainer's state names it) -> shape
    new_head: bool

    def record(self) -> dict[str, Any]:
        """What run_info.json keeps of where step 0's weights came from."""
        return {**self.source.record(), "head": "new" if self.new_head else "loaded"}

    def load(self) -> dict[str, np.ndarray]:
        """The source's arrays on the host, named and shaped as the target's (stacked where it
        scans): ``{name: float32 array}`` for ``Trainer.init_state``."""
        import jax
        import orbax.checkpoint as ocp
        from flax import traverse_util

        from resnet_jax.checkpointing import drained_event_loops, restore_problem

        wanted = {stored: name for name, (stored, _) in self.stored.items() if not (self.new_head and _is_head(name))}
        metas = {tuple(stored.split(".")): self.stored[name][1] for stored, name in wanted.items()}
        zeros = traverse_util.unflatten_dict({k: np.zeros(m.shape, m.dtype) for k, m in metas.items()})
        args = traverse_util.unflatten_dict({k: ocp.RestoreArgs(restore_type=np.ndarray) for k in metas})
        try:
            # (As Checkpointer.restore: the failed reads of a damaged file end before the error.)
            with drained_event_loops(), ocp.PyTreeCheckpointer() as checkpointer:
                restored = checkpointer.restore(
                    self.source.item_dir,
                    args=ocp.args.PyTreeRestore(item=zeros, restore_args=args, partial_restore=True),
                )
        except Exception as e:  # noqa: BLE001 - truncated or missing files
            raise UserError(
                f"cannot read the weights in {self.source.item_dir} ({restore_problem(e)}); is it damaged?"
            ) from None
        arrays = {}  # by unrolled name
        for path, value in jax.tree_util.tree_flatten_with_path(restored)[0]:
            name, value = wanted[dotted(path)], np.asarray(value)
            blocks = _block_names(name, value.shape[0]) if value.ndim else None
            arrays.update(zip(blocks, value) if blocks else [(name, value)])
        out = {}
        for name, shape in self.targets.items():
            if self.new_head and _is_head(name):
                continue
            blocks = _block_names(name, shape[0]) if shape else None
            value = np.stack([arrays[b] for b in blocks]) if blocks else arrays[name]
            out[name] = value.astype(np.float32)
        return out


def _is_head(name: str) -> bool:
    return name.split(".")[0] == HEAD


def plan(source: Source, target_model: Mapping[str, Any], targets: Mapping[str, tuple], head: str) -> WarmStart:
    """Checks that ``source`` fits the target network and decides the head.

    Args:
      source: from ``open_source``.
      target_model: the run's ``config.model`` as a dict (name and options).
      targets: the target's parameters and statistics, ``{name: shape}``.
      head: ``config.init_from.head``.

    Raises:
      UserError: another architecture, a missing, extra or differently shaped array, or a head
        that ``head='load'`` cannot load.
    """
    label = f"config.init_from.path={source.path}"
    theirs, ours = _function(source.model), _function(target_model)
    if theirs is not None and ours is not None and theirs != ours:
        diff = [f"{k} {theirs[k]} there, {ours[k]} here" for k in _FUNCTION_KEYS if theirs[k] != ours[k]]
        raise UserError(
            f"{label} holds a {source.model.get('name')} that computes another function than this run's "
            f"{target_model.get('name')} ({'; '.join(diff)}); set config.model to match it"
        )
    stored = _stored_leaves(source)
    src = _unrolled({n: tuple(m.shape) for n, (_, m) in stored.items()})
    tgt = _unrolled(targets)
    head_fits = all(src.get(n) == s for n, s in tgt.items() if _is_head(n)) and any(map(_is_head, src))
    if head == "load" and not head_fits:
        shapes = {n: src.get(n, "absent") for n in tgt if _is_head(n)}
        raise UserError(
            f"{label}: config.init_from.head='load', but its head does not fit "
            f"({', '.join(f'{n} {s} there, {tgt[n]} here' for n, s in shapes.items())}); "
            "use 'auto' or 'reset' to train a new head"
        )
    new_head = head == "reset" or not head_fits
    body_src = {n: s for n, s in src.items() if not _is_head(n)}
    body_tgt = {n: s for n, s in tgt.items() if not _is_head(n)}
    problems = [f"{n} is missing there" for n in body_tgt if n not in body_src]
    problems += [
        f"{n} is {body_src[n]} there, {s} here" for n, s in body_tgt.items() if n in body_src and body_src[n] != s
    ]
    problems += [f"{n} there has no place here" for n in body_src if n not in body_tgt]
    if problems:
        more = f" (+{len(problems) - 1} more)" if len(problems) > 1 else ""
        raise UserError(
            f"{label} does not fit this run's {target_model.get('name')}: {problems[0]}{more}; "
            f"it holds a {_described(source.model)}: set config.model (name, width, shortcut) to match it"
        )
    return WarmStart(source, stored, dict(targets), new_head)


def from_config(config, targets: Mapping[str, tuple]) -> WarmStart | None:
    """The checked plan for ``config.init_from`` (None when it names no source)."""
    init = config.get("init_from") or {}  # (a run recorded before the key existed: none)
    if init.get("path") is None:
        return None
    source = open_source(init["path"], init.get("checkpoint", "latest"))
    return plan(source, config.model.to_dict(), targets, init.get("head", "auto"))


def from_record(record: Mapping[str, Any], config, targets: Mapping[str, tuple]) -> WarmStart:
    """The plan that reproduces a run's step 0 from its run_info.json ``init_from`` record: the
    same checkpoint step (not the source's 'latest' of today) and the same head decision."""
    checkpoint = record.get("step") if record.get("kind") == "run" else "latest"
    if not pathlib.Path(record["path"]).is_dir():
        raise UserError(
            f"step 0 of this run came from {record['path']} (run_info.json's init_from), which is no longer "
            "there; the network at initialisation needs it: put it back, or analyse later steps"
        )
    source = open_source(record["path"], "latest" if checkpoint is None else checkpoint)
    return plan(source, config.model.to_dict(), targets, "reset" if record.get("head") == "new" else "load")


def check_not_set_aside(warm: WarmStart, workdir) -> None:
    """Refuses a source inside the workdir that ``--fresh`` sets aside: the record of where step 0
    came from would name files that are no longer there."""
    wd = pathlib.Path(workdir).absolute()
    if warm.source.path == wd or wd in warm.source.path.parents:
        raise UserError(
            f"config.init_from.path={warm.source.path} is inside --workdir, whose files --fresh sets aside; "
            "move that run elsewhere first (mv) and point config.init_from.path there"
        )


def agree_on_source(warm: WarmStart | None) -> None:
    """Refuses a start where the processes of a multi-host run chose different source steps
    ('latest' or 'best' of a run that saved a new checkpoint meanwhile): their replicas of the
    weights would silently differ. All processes call it together (it is a collective)."""
    import jax

    if jax.process_count() == 1:
        return
    from jax.experimental import multihost_utils

    step = -1 if warm is None or warm.source.step is None else warm.source.step
    steps = np.ravel(multihost_utils.process_allgather(np.int64(step)))
    if len(set(steps.tolist())) > 1:
        raise UserError(
            f"the processes read different checkpoints of config.init_from.path (steps {steps.tolist()}): "
            "it saved a new one meanwhile; start again, or name a step with config.init_from.checkpoint"
        )


def describe(warm: WarmStart) -> str:
    head = "a new head" if warm.new_head else "its head"
    return f"initialised from {warm.source.describe()}, with {head}"
