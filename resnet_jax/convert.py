"""Import torchvision ResNet weights into our NNX ResNets, and a CLI that writes them as a checkpoint.

Library::

    model = abstract_model("resnet50", num_classes=1000)  # resnet_jax.summary: nnx.eval_shape, no init
    load_torchvision(model, torch.load("resnet50.pth"))  # fills every parameter and statistic

CLI (needs torch to read the ``.pth``)::

    python -m resnet_jax.convert --model resnet50 --pth resnet50.pth --out DIR [--num_classes 1000]

writes an Orbax checkpoint of ``nnx.state(model)`` to ``DIR/model`` and ``DIR/model.json``
(``{"name", "num_classes", "options"}``); ``load_converted(DIR)`` rebuilds the model from both.

Name mapping (torchvision -> ours): ``conv1``/``bn1``/``fc`` keep their names,
``layer{k}.{j}.*`` -> ``stages[k-1].blocks[j].*``, ``layer{k}.{j}.downsample.0/1`` ->
``stages[k-1].blocks[j].shortcut.conv/bn``. Convolutions OIHW -> HWIO, the fc weight is transposed,
BN ``weight/bias/running_mean/running_var`` -> ``scale/bias/mean/var``; ``num_batches_tracked``
is ignored. torch is imported only to read a ``.pth`` (``read_pth``), never on import.
"""

from __future__ import annotations

import importlib.util
import json
import pickle
import re
import sys
import tarfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from resnet_jax import cli
from resnet_jax.errors import UserError, first_line
from resnet_jax.models.blocks import Bottleneck
from resnet_jax.models.layers import BatchNorm, Shortcut
from resnet_jax.models.resnet import ResNet
from resnet_jax.summary import abstract_model, count_params

# Our leaf name -> torchvision's. Conv kernels and BN scales are both "weight" in torch.
_LEAVES = {"kernel": "weight", "scale": "weight", "bias": "bias", "mean": "running_mean", "var": "running_var"}
# Our module name inside a block -> torchvision's (only the shortcut is renamed).
_BLOCK_MODULES = {
    **{f"{kind}{i}": f"{kind}{i}" for kind in ("conv", "bn") for i in (1, 2, 3)},
    "shortcut.conv": "downsample.0",
    "shortcut.bn": "downsample.1",
}
_TOP_MODULES = ("conv1", "bn1", "fc")
_SUPPORTED = "resnet18/34/50/101/152 built with shortcut='B' and stride_in='3x3'"
# Names listed in an error message; the rest are counted, to keep the message on one line.
_MAX_LISTED = 5

CHECKPOINT_SUBDIR = "model"
METADATA_FILE = "model.json"


def _listing(names: Sequence[str]) -> str:
    names = sorted(names)
    more = f" (+{len(names) - _MAX_LISTED} more)" if len(names) > _MAX_LISTED else ""
    return ", ".join(names[:_MAX_LISTED]) + more


def _to_numpy(value: Any) -> np.ndarray:
    """A torch tensor (on any device, any float dtype) or array-like -> float32 numpy, without torch."""
    if hasattr(value, "detach"):  # a torch.Tensor; duck-typed so that torch stays optional
        value = value.detach().cpu()
        if value.is_floating_point():
            # .numpy() cannot represent bfloat16; float32 is what our parameters hold anyway.
            value = value.float()
        value = value.numpy()
    return np.asarray(value)


def _torch_keys(path: tuple[Any, ...], stacked: int | None) -> list[str]:
    """The torchvision key(s) holding our variable at ``path``.

    Args:
      path: the variable's path in ``nnx.state(model)``, e.g. ``('stages', 0, 'blocks', 1, 'bn2', 'var')``.
      stacked: for a scanned stage (``stages[i].scanned``), the number of stacked blocks.

    Returns:
      One key, or for stacked variables one key per stacked block (torchvision blocks 1..n).

    Raises:
      KeyError: the variable has no torchvision counterpart (e.g. ``final_bn``, a gate).
    """
    *module, leaf = (str(p) for p in path)
    if leaf not in _LEAVES:
        raise KeyError(path)
    tleaf = _LEAVES[leaf]
    if len(module) == 1 and module[0] in _TOP_MODULES:
        return [f"{module[0]}.{tleaf}"]
    if len(module) >= 3 and module[0] == "stages":
        stage = int(module[1]) + 1
        if module[2] == "blocks" and len(module) >= 5:
            inner, blocks = module[4:], [int(module[3])]
        elif module[2] == "scanned" and stacked is not None:
            # Scanned stages store blocks 1..n-1 stacked; block 0 stays in `blocks`.
            inner, blocks = module[3:], list(range(1, stacked + 1))
        else:
            raise KeyError(path)
        tmod = _BLOCK_MODULES.get(".".join(inner))
        if tmod is not None:
            return [f"layer{stage}.{j}.{tmod}.{tleaf}" for j in blocks]
    raise KeyError(path)


def _convert_value(value: np.ndarray, leaf: str) -> np.ndarray:
    """torch layout -> ours: conv OIHW -> HWIO, linear [out, in] -> [in, out], vectors as they are."""
    if leaf == "kernel" and value.ndim == 4:
        return value.transpose(2, 3, 1, 0)
    if leaf == "kernel" and value.ndim == 2:
        return value.T
    return value


TORCH_BN_EPSILON = 1e-5  # torch.nn.BatchNorm2d's default, which torchvision's ResNets keep


def _check_architecture(model: ResNet) -> None:
    """Refuses models whose shapes would match torchvision's but whose computation would not."""
    if not isinstance(model, ResNet):
        raise UserError(f"load_torchvision needs a resnet_jax ResNet, got {type(model).__name__}")
    if model.stem != "imagenet":
        raise UserError(
            f"torchvision weights need the ImageNet stem; this model has stem {model.stem!r} ({_SUPPORTED})"
        )
    for _, node in nnx.iter_graph(model):
        # Same parameter shapes, different network: torchvision ("v1.5") strides the 3x3 conv;
        # shortcut 'scaled' has option B's parameters; BatchNorm's epsilon has none.
        if isinstance(node, Bottleneck) and tuple(node.conv1.strides) != (1, 1):
            raise UserError("torchvision bottlenecks stride the 3x3 conv: build the model with stride_in='3x3'")
        if isinstance(node, Shortcut) and node.kind != "B":
            raise UserError(
                f"torchvision ResNets project where the shape changes (shortcut 'B'); this model has {node.kind!r}"
            )
        if isinstance(node, BatchNorm) and node.epsilon != TORCH_BN_EPSILON:
            raise UserError(
                f"torchvision's BatchNorm uses epsilon {TORCH_BN_EPSILON}; this model has bn_epsilon={node.epsilon}"
            )


def _clean_state_dict(state_dict: Mapping[str, Any]) -> dict[str, Any]:
    if not isinstance(state_dict, Mapping):
        raise UserError(f"expected a state_dict (a mapping of names to tensors), got {type(state_dict).__name__}")
    keys = [str(k) for k in state_dict]
    # nn.DataParallel / DistributedDataParallel checkpoints prefix every key with "module.".
    prefix = "module." if keys and all(k.startswith("module.") for k in keys) else ""
    return {str(k)[len(prefix) :]: v for k, v in state_dict.items() if not str(k).endswith("num_batches_tracked")}


def load_torchvision(model: ResNet, state_dict: Mapping[str, Any], *, keep_head: bool = False) -> ResNet:
    """Loads a torchvision ResNet ``state_dict`` into ``model`` in place.

    Every parameter and batch statistic of ``model`` is filled exactly once, so ``model`` may be an
    abstract one from ``nnx.eval_shape`` (nothing is initialised only to be overwritten). Scanned
    stages (``scan_blocks=True``) are filled by stacking torchvision's blocks.

    Args:
      model: a ``resnet18/34/50/101/152`` from ``create_model`` with ``shortcut='B'`` (the default)
        and ``stride_in='3x3'``; ``num_classes`` must match the state_dict's ``fc`` unless
        ``keep_head``.
      state_dict: torchvision's ``model.state_dict()``, or ``torch.load`` of a ``.pth``; values are
        torch tensors or numpy arrays. A ``module.`` prefix on every key is removed.
      keep_head: leave ``model.fc`` as it is and ignore torchvision's ``fc`` (fine-tuning on
        another number of classes); ``model`` must then be an initialised one (``create_model``).

    Returns:
      ``model``, for chaining.

    Raises:
      UserError: missing or leftover keys, a shape mismatch, or an unsupported architecture (one line).
    """
    _check_architecture(model)
    source = _clean_state_dict(state_dict)
    flat = nnx.to_flat_state(nnx.state(model))
    if keep_head:
        if any(isinstance(v.get_value(), jax.ShapeDtypeStruct) for p, v in flat if p[0] == "fc"):
            raise UserError("keep_head=True keeps model.fc, which is abstract here: build the model with create_model")
        used_head = {k for k in source if k.startswith("fc.")}
        flat = [(p, v) for p, v in flat if p[0] != "fc"]
    filled, used, missing, unmapped, errors = [], set(), set(), [], []
    for path, var in flat:
        target = var.get_value()
        dotted = ".".join(str(p) for p in path)
        is_scanned = len(path) > 2 and path[0] == "stages" and path[2] == "scanned"
        try:
            keys = _torch_keys(path, target.shape[0] if is_scanned else None)
        except KeyError:
            unmapped.append(dotted)
            continue
        if used.intersection(keys):  # a bug in the mapping, not in the user's input
            raise RuntimeError(f"torchvision key(s) {_listing(used.intersection(keys))} mapped to two variables")
        used.update(keys)
        absent = [k for k in keys if k not in source]
        if absent:
            missing.update(absent)
            continue
        values = [_convert_value(_to_numpy(source[k]), str(path[-1])) for k in keys]
        value = np.stack(values) if is_scanned else values[0]
        if value.shape != tuple(target.shape):
            torch_shape = tuple(_to_numpy(source[keys[0]]).shape)
            errors.append(f"{keys[0]} has shape {torch_shape}, which does not fit {dotted} {tuple(target.shape)}")
            continue
        # Copy: tensor.numpy() shares torch's memory and jnp.asarray may alias a host buffer on
        # CPU, so torch's in-place updates (running stats in train mode) would leak into our model.
        filled.append((path, var.replace(jnp.asarray(np.array(value, dtype=target.dtype, copy=True)))))
    if unmapped:
        raise UserError(
            f"model variables with no torchvision counterpart: {_listing(unmapped)} (supported: {_SUPPORTED})"
        )
    if missing:
        raise UserError(f"state_dict lacks {len(missing)} key(s) the model needs: {_listing(missing)}")
    leftover = set(source) - used - (used_head if keep_head else set())
    if leftover:
        raise UserError(f"state_dict has {len(leftover)} key(s) the model does not use: {_listing(leftover)}")
    if errors:
        more = f" (+{len(errors) - 1} more)" if len(errors) > 1 else ""
        raise UserError(
            f"shape mismatch: {errors[0]}{more}; check the model name and --num_classes "
            "(in Python, keep_head=True loads all but the head into a model with other classes)"
        )
    assert len(filled) == len(flat), "every variable is either filled or reported above"
    nnx.update(model, nnx.from_flat_state(filled))
    return model


def _abstract_model(name: str, num_classes: int, options: Mapping[str, Any]) -> ResNet:
    try:
        return abstract_model(name, num_classes=num_classes, **options)
    except ValueError as e:  # the factory's message names what is allowed
        raise UserError(str(e)) from None


def _check_out_dir(out_dir: str | Path) -> None:
    out = Path(out_dir).expanduser()
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UserError(f"--out {out_dir} already exists and is not an empty directory; refusing to overwrite it")
    cli.check_output_dir(out.absolute(), "--out")  # creatable: no file on the way


def save_converted(
    model: ResNet, out_dir: str | Path, *, name: str, num_classes: int, options: Mapping[str, Any]
) -> None:
    """Writes ``nnx.state(model)`` as an Orbax checkpoint to ``out_dir/model`` plus ``out_dir/model.json``.

    Raises:
      UserError: ``out_dir`` exists and is not an empty directory (nothing is ever overwritten).
    """
    import orbax.checkpoint as ocp  # imported on use: it is slow to import and not needed otherwise

    out = Path(out_dir).expanduser().resolve()  # Orbax needs absolute paths
    _check_out_dir(out_dir)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot create --out {out_dir}: {e.strerror or first_line(e, limit=300)}") from None
    with ocp.StandardCheckpointer() as checkpointer:
        checkpointer.save(out / CHECKPOINT_SUBDIR, nnx.state(model))
        checkpointer.wait_until_finished()
    meta = {"name": name, "num_classes": num_classes, "options": dict(options)}
    (out / METADATA_FILE).write_text(json.dumps(meta, indent=2) + "\n")


def load_converted(directory: str | Path) -> ResNet:
    """Rebuilds a model written by the convert CLI (or ``save_converted``).

    The model is built abstractly from ``model.json`` and its state restored from the Orbax
    checkpoint, so no parameter is initialised twice.

    Args:
      directory: the CLI's ``--out`` directory.

    Returns:
      The restored ``ResNet``, in eval mode (BatchNorm uses the imported running statistics).

    Raises:
      UserError: the directory, ``model.json`` or the checkpoint is missing or unreadable.
    """
    import orbax.checkpoint as ocp

    root = Path(directory).expanduser().resolve()
    meta_path = root / METADATA_FILE
    try:
        meta = json.loads(meta_path.read_text())
        name, num_classes, options = meta["name"], int(meta["num_classes"]), dict(meta.get("options", {}))
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise UserError(f"cannot read {meta_path}: {first_line(e, limit=300)}") from None
    if not (root / CHECKPOINT_SUBDIR).is_dir():
        raise UserError(f"no checkpoint at {root / CHECKPOINT_SUBDIR}")
    model = _abstract_model(name, num_classes, options)
    graphdef, abstract_state = nnx.split(model)
    try:
        with ocp.StandardCheckpointer() as checkpointer:
            state = checkpointer.restore(root / CHECKPOINT_SUBDIR, abstract_state)
    except (ValueError, KeyError, OSError) as e:  # e.g. model.json edited to another architecture
        raise UserError(f"cannot restore {root / CHECKPOINT_SUBDIR}: {first_line(e, limit=300)}") from None
    model = nnx.merge(graphdef, state)
    model.eval()
    return model


def _check_torch_file(p: Path, path: str | Path) -> None:
    """Refuses, without importing torch, a file that ``torch.save`` cannot have written: it writes
    a zip archive (torch >= 1.6), or else a pickle (protocol 2 and up start with 0x80) or a tar."""
    try:
        with p.open("rb") as f:
            head = f.read(4)
        if head.startswith((b"PK\x03\x04", b"\x80")) or tarfile.is_tarfile(p):
            return
    except OSError as e:
        raise UserError(f"cannot read --pth {path}: {e.strerror or first_line(e, limit=300)}") from None
    what = "an empty file" if not head else "neither a zip archive nor a pickle"
    raise UserError(f"--pth {path} is not a PyTorch file saved with torch.save ({what}); pass a state_dict .pth")


def read_pth(path: str | Path) -> Mapping[str, Any]:
    """``torch.load`` of a ``.pth`` on the CPU, unwrapping ``{"state_dict": ...}``-style checkpoints.

    Raises:
      UserError: torch is not installed, or the file is missing or unreadable.
    """
    p = Path(path).expanduser()
    if p.is_dir():
        raise UserError(f"--pth {path} is a directory; pass the .pth file itself")
    if not p.is_file():
        raise UserError(f"--pth {path}: no such file")
    needs_torch = "reading a .pth needs torch: pip install 'resnet_jax[torch]'"
    if importlib.util.find_spec("torch") is None:  # without importing it (seconds)
        raise UserError(needs_torch)
    _check_torch_file(p, path)  # before torch's import, so that a wrong file costs nothing
    try:
        import torch
    except ImportError:
        raise UserError(needs_torch) from None
    try:
        # weights_only: a .pth is a pickle; never execute code from a downloaded file.
        obj = torch.load(p, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        # torch's message is a paragraph suggesting weights_only=False; keep only the cause.
        m = re.search(r"WeightsUnpickler error:\s*(.+?)(?:\.\s|\n\n|$)", str(e), re.DOTALL)
        cause = " ".join(m.group(1).split()) if m else first_line(e, limit=300)
        raise UserError(f"cannot read {path} as a state_dict of tensors ({cause}); save model.state_dict()") from None
    except Exception as e:  # torch raises many types (zip, runtime, OS); all mean "unreadable"
        cause = f"{type(e).__name__}: {first_line(e, limit=120)}"
        raise UserError(
            f"cannot read {path}: not a PyTorch file saved with torch.save, or a damaged one ({cause})"
        ) from None
    if isinstance(obj, Mapping):
        for key in ("state_dict", "model"):  # training-script checkpoints wrap the weights
            if isinstance(obj.get(key), Mapping):
                return obj[key]
        return obj
    raise UserError(f"{path} holds a {type(obj).__name__}, not a state_dict")


def convert(model_name: str, pth: str | Path, out: str | Path, num_classes: int = 1000) -> ResNet:
    """The CLI's work: read ``pth``, load it into ``model_name``, write ``out``. Raises UserError."""
    out_path = Path(out).expanduser()
    _check_out_dir(out_path)  # before the (slow) read, so that a mistake costs nothing
    state_dict = read_pth(pth)
    options = {"shortcut": "B"}
    model = _abstract_model(model_name, num_classes, options)
    load_torchvision(model, state_dict)
    save_converted(model, out_path, name=model_name, num_classes=num_classes, options=options)
    return model


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry point; returns the exit status (0, or 2 after a one-line ``error: ...``)."""
    parser = cli.ArgumentParser(
        prog="python -m resnet_jax.convert",
        description="Convert a torchvision ResNet .pth into a resnet_jax Orbax checkpoint.",
    )
    parser.add_argument("--model", required=True, help="resnet18, resnet34, resnet50, resnet101 or resnet152")
    parser.add_argument("--pth", required=True, help="torchvision state_dict (.pth)")
    parser.add_argument("--out", required=True, help="output directory (must not exist or be empty)")
    parser.add_argument("--num_classes", type=int, default=1000, help="classes of the fc layer (default 1000)")
    args = parser.parse_args(argv)
    try:
        model = convert(args.model, args.pth, args.out, args.num_classes)
    except UserError as e:
        print(f"error: {first_line(e, limit=300)}", file=sys.stderr)
        return 2
    print(f"wrote {args.out}: {args.model}, {count_params(model):,} parameters")
    return 0


if __name__ == "__main__":
    sys.exit(main())
