"""Plumbing shared by the analysis tools: argument parsing with one-line errors, output-file rules,
reading a run's directory, building or restoring models, getting a few batches, plot style.

JAX, Flax and the data pipelines are imported inside the functions that need them, so that the
tools that only read ``metrics.jsonl`` and ``config.json`` (curves, results_table) start fast.
"""

from __future__ import annotations

import contextlib
import copy
import json
import pathlib
import re
import sys
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from resnet_jax.cli import EXIT_USAGE, check_output_dir
from resnet_jax.errors import UserError, first_line
from resnet_jax.workdir import CONFIG_FILE, load_config_dict, read_run_info, require_workdir

# Paper-like figures: small, light grid, no top/right spines, readable at column width.
PLOT_STYLE = {
    "figure.dpi": 100,
    "savefig.dpi": 150,
    "font.size": 10,
    "axes.titlesize": 11,
    "axes.labelsize": 10,
    "legend.fontsize": 8,
    "axes.grid": True,
    "grid.alpha": 0.3,
    "axes.spines.top": False,
    "axes.spines.right": False,
}


def run_main(body: Callable[[], int | None]) -> int:
    """Runs a tool's body; a ``UserError`` becomes one ``error: ...`` line and status 2.

    Args:
      body: the tool's work; returns an exit status or None (0).

    Returns:
      The exit status.
    """
    try:
        return body() or 0
    except UserError as e:
        print(f"error: {first_line(e, default='bad input')}", file=sys.stderr)
        return EXIT_USAGE


def check_output(path: str | pathlib.Path, overwrite: bool, suffixes: Sequence[str] = (".png",)) -> pathlib.Path:
    """Validates an output path before any expensive work, and creates its parent directory.

    Args:
      path: where the tool will write.
      overwrite: whether an existing file may be replaced.
      suffixes: accepted file name endings (lower case).

    Returns:
      The path.

    Raises:
      UserError: the file exists (and ``overwrite`` is False), or its suffix is not accepted.
    """
    p = pathlib.Path(path)
    if p.suffix.lower() not in suffixes:
        raise UserError(f"output {p} must end in {' or '.join(suffixes)}")
    if p.exists() and not overwrite:
        raise UserError(f"{p} exists; pass --overwrite to replace it")
    if p.is_dir():
        raise UserError(f"{p} is a directory; give a file name")
    check_output_dir(p.parent.absolute(), f"the directory of output {p}:")
    try:
        p.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot create the directory of {p} ({e.strerror})") from None
    return p


def read_config(workdir: str | pathlib.Path) -> dict:
    """A run's configuration (its ``config.json``) as a plain dict.

    Raises:
      UserError: the file is missing or not valid JSON.
    """
    try:
        return load_config_dict(require_workdir(workdir))
    except json.JSONDecodeError as e:
        raise UserError(f"{pathlib.Path(workdir) / CONFIG_FILE} is not valid JSON ({e.msg})") from None


def load_config(workdir: str | pathlib.Path):
    """A run's configuration as the ``ml_collections.ConfigDict`` that trained it."""
    import ml_collections

    return ml_collections.ConfigDict(read_config(workdir))


# --- names and labels ---------------------------------------------------------------------------

_NAME = re.compile(r"(cifar_)?(preact_|bottleneck_)?(resnet|plain)(\d+)")


def pretty_model_name(name: str) -> str:
    """The paper's name of a zoo model: ``cifar_resnet56`` -> ``ResNet-56``, ``plain34`` -> ``plain-34``,
    ``cifar_preact_resnet164`` -> ``pre-act ResNet-164``, ``cifar_bottleneck_resnet164`` ->
    ``ResNet-164 (original)``. Unknown names are returned unchanged."""
    m = _NAME.fullmatch(name or "")
    if not m:
        return str(name)
    _, variant, kind, depth = m.groups()
    base = f"plain-{depth}" if kind == "plain" else f"ResNet-{depth}"
    # Paper 2 calls the post-activation bottleneck ResNet-164/1001 "original".
    return {"preact_": f"pre-act {base}", "bottleneck_": f"{base} (original)"}.get(variant, base)


def model_depth(name: str) -> int | None:
    """The depth in a model name (``cifar_resnet110`` -> 110), or None."""
    m = _NAME.fullmatch(name or "")
    return int(m.group(4)) if m else None


def is_plain(config: dict) -> bool:
    """Whether a run's network has no shortcuts (a plain family, or ``shortcut='none'``)."""
    model = config.get("model", {})
    return "plain" in str(model.get("name", "")) or model.get("shortcut") == "none"


def resolved_shortcut(config: dict) -> str:
    """The shortcut kind a run used: the configured one, or its family's default.

    Reads the family defaults from their single source, ``models.spec`` (plain Python, no JAX).
    """
    model = config.get("model", {})
    if model.get("shortcut"):
        return str(model["shortcut"])
    try:
        from resnet_jax.models.spec import FAMILIES, parse_name

        return FAMILIES[parse_name(model.get("name", ""))[0]]["shortcut"]
    except ValueError:
        return "?"


def run_label(config: dict) -> str:
    """A short legend label for a run: the paper's name of its model and a non-default shortcut."""
    model = config.get("model", {})
    label = pretty_model_name(model.get("name", "?"))
    if model.get("shortcut") == "none" and "plain" not in str(model.get("name", "")):
        label += " (no shortcuts)"  # a residual family made plain: not the ResNet its name says
    elif model.get("shortcut") and not is_plain(config):
        label += f" ({model['shortcut']})"
    return label


def unique_labels(labels: Sequence[str], workdirs: Sequence[str | pathlib.Path]) -> list[str]:
    """Makes repeated labels (several seeds of one model) unique by adding the end of each run's
    path: its folder name, or as many folders as it takes (a sweep's runs are all ``seed<k>``:
    ``r8_B/seed0`` against ``r8_C/seed0``)."""
    parts = [pathlib.Path(wd).absolute().parts for wd in workdirs]
    out = list(labels)
    for label in set(labels):
        group = [i for i, lb in enumerate(labels) if lb == label]
        if len(group) < 2:
            continue
        for depth in range(1, max(len(parts[i]) for i in group) + 1):
            tails = ["/".join(parts[i][-depth:]) for i in group]
            if len(set(tails)) == len(tails):
                break
        for i, tail in zip(group, tails, strict=True):
            out[i] = f"{label} [{tail}]"
    return out


def labels_for(runs: Sequence[str], labels: Sequence[str] | None) -> list[str]:
    """The user's ``--labels`` (one per run) or labels made from each run's config.

    Raises:
      UserError: a different number of labels than runs.
    """
    if labels:
        if len(labels) != len(runs):
            raise UserError(f"--labels has {len(labels)} entries for {len(runs)} runs; give one label per run")
        return list(labels)
    return unique_labels([run_label(read_config(r)) for r in runs], runs)


def check_distinct_runs(runs: Sequence[str | pathlib.Path]) -> None:
    """Raises a ``UserError`` naming a run directory given twice (as the same or another path):
    it would be plotted twice, or counted as two seeds."""
    seen: dict[pathlib.Path, str | pathlib.Path] = {}
    for run in runs:
        key = pathlib.Path(run).resolve()
        if key in seen:
            also = "" if str(seen[key]) == str(run) else f" (as {seen[key]} and {run})"
            raise UserError(f"the run {run} is given twice{also}; give each run directory once")
        seen[key] = run


def check_distinct(labels: Sequence[str]) -> None:
    """Raises a ``UserError`` naming a legend label given twice (the lines would be confused)."""
    seen = set()
    for label in labels:
        if label in seen:
            raise UserError(f"the label {label!r} is used twice; give distinct --labels")
        seen.add(label)


@contextlib.contextmanager
def pyplot() -> Iterator[Any]:
    """``matplotlib.pyplot`` on the Agg backend (no display needed) with the paper-like style."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with plt.rc_context(PLOT_STYLE):
        yield plt


# --- models and data (JAX) ----------------------------------------------------------------------


def dataset_config(name: str, *, image_size: int | None = None, data_dir: str | None = None):
    """``config.dataset`` for ``name`` with the base config's defaults (as a training run has it)."""
    from resnet_jax.config import get_base_config

    cfg = get_base_config().dataset
    cfg.name = name
    if image_size is not None:
        cfg.image_size = image_size
    if data_dir is not None:
        cfg.data_dir = data_dir
    return cfg


def single_crop(dataset_cfg):
    """A copy of ``dataset_cfg`` that tests one centre crop (analyses want ``[N, H, W, C]`` images)."""
    cfg = copy.deepcopy(dataset_cfg)
    if getattr(cfg, "eval_crops", None) is not None:
        cfg.eval_crops = 1
    return cfg


def eval_images(dataset_cfg, num_images: int, batch_size: int = 256):
    """The first ``num_images`` images of the eval split (fewer if the split is smaller).

    Returns:
      ``(images [N, H, W, C] float32, labels [N] int32)`` numpy arrays; the images normalised as
      the model takes them (``data.model_input``).
    """
    import numpy as np

    from resnet_jax import data

    if num_images < 1:
        raise UserError(f"--num_images={num_images}; must be positive")
    images, labels, have = [], [], 0
    dataset_cfg = single_crop(dataset_cfg)
    batches = data.eval_batches(dataset_cfg, global_batch_size=batch_size, process_index=0, process_count=1)
    for batch in batches:
        keep = batch["mask"] > 0  # padding rows repeat example 0; they are not data
        images.append(batch["image"][keep])
        labels.append(batch["label"][keep])
        have += int(keep.sum())
        if have >= num_images:
            break
    if not have:
        raise UserError("the eval split is empty")
    images = data.model_input(np.concatenate(images)[:num_images], data.get_info(dataset_cfg).pixels)
    return images, np.concatenate(labels)[:num_images]


def train_batch(dataset_cfg, batch_size: int, *, seed: int, step: int = 0) -> dict:
    """The training batch of global step ``step`` of a run with ``seed`` (augmented as in training),
    its images normalised as the model takes them (``data.model_input``)."""
    from resnet_jax import data

    if batch_size < 1:
        raise UserError(f"--batch_size={batch_size}; must be positive")
    it = data.train_batches(
        dataset_cfg, global_batch_size=batch_size, seed=seed, start_step=step, process_index=0, process_count=1
    )
    batch = next(it)
    return dict(batch, image=data.model_input(batch["image"], data.get_info(dataset_cfg).pixels))


def init_model(name: str, num_classes: int, *, seed: int = 0, **options):
    """A freshly initialised zoo model; a bad name or option is a one-line ``UserError``.

    The initialisation runs as one compiled program (with the Trainer's initialisation compiler
    options), not op by op: eagerly, every parameter shape compiles its own random kernels, which
    takes seconds per shape on a CPU.
    """
    import jax
    from flax import nnx

    from resnet_jax.models import create_model
    from resnet_jax.train import init_compiler_options

    def create():
        return create_model(name, num_classes=num_classes, rngs=nnx.Rngs(seed), **options)

    try:
        graphdef = nnx.graphdef(nnx.eval_shape(create))
    except ValueError as e:
        raise UserError(str(e)) from None
    state = jax.jit(lambda: nnx.state(create()), compiler_options=init_compiler_options())()
    return nnx.merge(graphdef, state)


def load_model(workdir: str | pathlib.Path, checkpoint: str | int = "latest"):
    """A trained run's network, for inference or fine-tuning: ``(model, step)``.

    The model is a Flax NNX ``ResNet`` in eval mode (BatchNorm uses its running statistics; call
    ``model.train()`` to fine-tune), built from the run's ``config.json``. The dataset is not
    needed: the run recorded what the model needs of it in ``run_info.json`` (runs from before
    that record read it from the dataset, which must then be prepared). Inputs are the dataset's
    images as the pipelines yield them; ``resnet_jax.data.model_input`` normalises uint8 ones.

    Args:
      workdir: the training run's directory.
      checkpoint: 'latest', 'best' (by eval top-1) or a kept step.

    Raises:
      UserError: not a run, no such checkpoint, or a damaged one.
    """
    loader = RunLoader(workdir)
    step = loader.resolve_step(checkpoint)
    return loader.model(step), step


class RunLoader:
    """Restores a run's checkpoints as models (a Flax NNX ``ResNet`` in eval mode).

    Builds the run's ``Trainer`` once (for the abstract state and the model graph), as
    ``resnet_jax.train.evaluate_checkpoint`` does, from the dataset facts the run recorded.

    Args:
      workdir: the training run's directory.
    """

    def __init__(self, workdir: str | pathlib.Path):
        from resnet_jax import data
        from resnet_jax.checkpointing import Checkpointer
        from resnet_jax.schedules import Durations
        from resnet_jax.train import Trainer

        self.workdir = require_workdir(workdir)
        self.config = load_config(self.workdir)
        recorded = read_run_info(self.workdir).get("dataset_info")
        self.info = data.DatasetInfo.from_dict(recorded) if recorded else data.get_info(self.config.dataset)
        self.trainer = Trainer(self.config, self.info, Durations.from_config(self.config, self.info.num_train))
        if not (self.workdir / "checkpoints").is_dir():
            self.steps: list[int] = []
        else:
            ckpt = Checkpointer(self.workdir, read_only=True)
            self.steps = ckpt.all_steps()
            ckpt.close()

    def resolve_step(self, step: str | int | None) -> int:
        """``None``/'latest' -> the newest checkpoint's step; 'best' -> the best by eval top-1; a
        number must be a kept checkpoint.

        Raises:
          UserError: no checkpoint, or the step is not kept.
        """
        from resnet_jax.checkpointing import resolve_step

        return resolve_step(self.workdir, step, steps=self.steps)

    def model(self, step: int):
        """The network of checkpoint ``step`` (eval mode: BatchNorm uses its running statistics).

        Raises:
          UserError: the checkpoint cannot be restored (damaged or missing files).
        """
        from resnet_jax.checkpointing import Checkpointer, restore_problem

        step = self.resolve_step(step)  # a step that is not kept is not "damaged"
        ckpt = Checkpointer(self.workdir, read_only=True)
        try:
            state = ckpt.restore(step, self.trainer.abstract_state)
        except Exception as e:  # noqa: BLE001 - any failure to read is a damaged checkpoint here
            others = [s for s in self.steps if s != step]
            hint = f"analyse another step (kept: {others})" if others else "train the run again"
            raise UserError(
                f"{self.workdir}: checkpoint {step} cannot be restored ({restore_problem(e)}); "
                f"it is damaged or incomplete: {hint}"
            ) from None
        finally:
            ckpt.close()
        return self.trainer.network(state)

    def init(self):
        """The network as the run initialised it (the Trainer's own initialisation, from the run's
        seed, or the weights it started from: ``config.init_from``), before step 1, in eval mode.

        Raises:
          UserError: the run started from weights that are no longer where it found them.
        """
        from resnet_jax import warm_start

        targets = self.trainer.weight_shapes()
        record = read_run_info(self.workdir).get("init_from")  # the step it read then, not today's latest
        if record:
            warm = warm_start.from_record(record, self.config, targets)
        else:
            warm = warm_start.from_config(self.config, targets)
        return self.trainer.network(self.trainer.start_state(warm))
