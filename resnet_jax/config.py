"""The base configuration every experiment file in experiments/ starts from.

All durations are converted to steps in one place (``resnet_jax.schedules.Durations``); a key
given in epochs is a convenience for the person writing the config.
"""

from __future__ import annotations

import difflib
import json
import math
from typing import Any

import ml_collections
from ml_collections import config_dict


def get_base_config() -> ml_collections.ConfigDict:
    """Defaults: torchvision's ImageNet recipe (batch 256, lr 0.1, momentum 0.9, wd 1e-4, 90 epochs,
    Inception crops); paper 1's own is ``imagenet_paper_recipe``."""
    c = ml_collections.ConfigDict()

    c.model = ml_collections.ConfigDict()
    c.model.name = "resnet50"
    # Every model option; placeholders (None) mean "the family's default" and keep a type.
    c.model.shortcut = config_dict.placeholder(str)  # A | B | C | none | gated | shortcut_gated | scaled
    c.model.stride_in = "3x3"  # 3x3: torchvision v1.5; 1x1: the paper's bottleneck
    c.model.zero_init_last_bn = True
    c.model.width = config_dict.placeholder(int)
    c.model.bn_momentum = 0.9
    c.model.bn_epsilon = 1e-5
    c.model.bn_group_size = config_dict.placeholder(int)  # None: BN over the global batch
    c.model.gate_bias_init = -6.0
    # auto | True | False; object-typed so that a config file may write True (the command line's
    # true/false parse to bools as well; old config.json files hold strings: scan_blocks_value).
    c.model.scan_blocks = config_dict.FieldReference("auto", field_type=object)
    c.model.remat = False
    # The ImageNet stem's 7x7 stride-2 convolution as space-to-depth + 4x4 stride-1: the same
    # function and parameters, +0.5-4% ResNet-50 train step on an H100 (benchmarks/RESULTS.md).
    c.model.space_to_depth_stem = False

    c.dataset = ml_collections.ConfigDict()
    c.dataset.name = "imagenet2012"  # digits | cifar10 | cifar100 | imagenet2012 | synthetic
    c.dataset.data_dir = config_dict.placeholder(str)  # TFDS data_dir (None: ~/tensorflow_datasets)
    c.dataset.manual_dir = config_dict.placeholder(str)  # where the ImageNet tars are
    c.dataset.validation_split = False  # CIFAR: train on 45k, evaluate on the held-out 5k
    c.dataset.augment = False  # digits only: random shifts by up to 1/8 of the side (CIFAR always pads and crops)
    c.dataset.image_size = config_dict.placeholder(int)  # None: the dataset's own
    c.dataset.num_classes = config_dict.placeholder(int)  # synthetic only
    c.dataset.num_examples = 1281167  # synthetic only: images per "epoch"
    c.dataset.eval_crops = 1  # 1: center crop; 10: the paper's 10-crop testing (ImageNet)
    # ImageNet eval crop side (None: image_size); paper 2 tests 224-trained nets on 320 crops.
    c.dataset.eval_image_size = config_dict.placeholder(int)
    # ImageNet training crops: antialiased resize (torchvision's); false: plain bilinear (the Flax
    # example's), 1.6-2.1x faster host decoding for input-bound runs (benchmarks/RESULTS.md 6).
    c.dataset.train_antialias = True
    # ImageNet training augmentation: inception (random-resized crops, 8-100% of the area:
    # torchvision's and the Flax example's) | scale (paper 1: shorter side in [256, 480], random
    # crop). lighting_std > 0 adds AlexNet's PCA colour augmentation to either (paper 1: 0.1).
    c.dataset.train_augment = "inception"
    c.dataset.lighting_std = 0.0

    # Start from trained weights instead of a random initialisation (resnet_jax/warm_start.py):
    # a run's workdir (its checkpoint 'latest' | 'best' | a step) or a resnet_jax.convert output
    # (torchvision weights). head: auto (load fc when the classes match, else a new one) | load |
    # reset. A run that has checkpoints of its own resumes from them instead.
    c.init_from = ml_collections.ConfigDict()
    c.init_from.path = config_dict.placeholder(str)
    c.init_from.checkpoint = "latest"
    c.init_from.head = "auto"
    # Which parameters train: all | head (a linear probe: the network frozen, BatchNorm on its
    # running statistics, only fc updated; usually with init_from).
    c.trainable = "all"

    c.batch_size = 256  # global, over all devices and hosts
    c.num_epochs = 90.0
    c.num_steps = -1  # > 0 overrides num_epochs
    c.learning_rate = 0.1  # for batch 256, scaled linearly with batch_size (Goyal et al. 2017)
    c.scale_lr = True
    c.lr_schedule = "step"  # step | cosine
    c.lr_boundaries_epochs = (30.0, 60.0, 80.0)  # step schedule, in epochs ...
    c.lr_boundaries_steps = config_dict.placeholder(tuple)  # ... or in steps (wins when set)
    c.lr_decay_factor = 0.1
    c.warmup_epochs = 0.0
    c.warmup_steps = -1  # >= 0 overrides warmup_epochs
    c.warmup_kind = "linear"  # linear (0 -> lr) | constant (paper 1's ResNet-110: lr/10 for a while)
    c.warmup_lr_factor = 0.1  # constant warmup runs at this fraction of the learning rate
    c.optimizer = "sgd"  # sgd | lars
    c.momentum = 0.9
    c.nesterov = False
    c.weight_decay = 1e-4
    c.decay_bn_and_bias = True  # the papers decay every parameter; modern recipes exclude BN/bias
    c.label_smoothing = 0.0
    c.seed = 0
    c.half_precision = False  # bf16 compute; float32 parameters and BN statistics

    c.checkpoint_every_steps = 1000
    c.keep_checkpoints = 3  # the latest N, plus the best by eval top-1
    c.eval_every_epochs = 1.0
    c.log_every_steps = 100
    c.skip_nonfinite = False  # True: skip steps with a non-finite loss, gradient or BN statistic
    # (a little slower: the update waits for the check; see train.train_step)
    c.shard_params = False  # FSDP-style: shard parameters and optimizer state over the data axis
    c.progress_bar = True
    c.plot_curves = True  # curves.png (loss and error) in the workdir when a run finishes
    return c


def cifar_paper_recipe(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """Paper 1, section 4.2: batch 128, lr 0.1 divided by 10 at 32k and 48k iterations, stop at
    64k, weight decay 1e-4, momentum 0.9, pad-4 crop and flip; option A shortcuts."""
    c.dataset.name = "cifar10"
    c.batch_size = 128
    c.learning_rate = 0.2  # for batch 256: 0.1 at the paper's batch 128
    c.num_steps = 64_000
    c.lr_schedule = "step"
    c.lr_boundaries_steps = (32_000, 48_000)
    c.weight_decay = 1e-4
    c.momentum = 0.9
    c.checkpoint_every_steps = 2_000
    c.eval_every_epochs = 10.0
    c.log_every_steps = 100
    return c


def imagenet_paper_recipe(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """Paper 1, section 3.4: batch 256, lr 0.1 divided by 10 on plateaus (fixed here at epochs 30,
    60 and 90 of 120 = the paper's 60e4 iterations), weight decay 1e-4, momentum 0.9; scale
    augmentation (shorter side in [256, 480], random 224 crop, flip) and AlexNet's colour
    augmentation."""
    c.dataset.name = "imagenet2012"
    c.dataset.train_augment = "scale"
    c.dataset.lighting_std = 0.1
    c.batch_size = 256
    c.learning_rate = 0.1
    c.num_epochs = 120.0
    c.lr_schedule = "step"
    c.lr_boundaries_epochs = (30.0, 60.0, 90.0)
    c.weight_decay = 1e-4
    c.momentum = 0.9
    c.checkpoint_every_steps = 5_000
    c.eval_every_epochs = 1.0
    return c


def imagenet_modern_recipe(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """A modern recipe (Goyal et al. 2017; the Flax ImageNet example; torchvision/timm practice):
    batch 1024 with the lr scaled linearly (0.1 per 256), 5 warmup epochs, cosine decay over 90
    epochs, label smoothing 0.1, Nesterov momentum 0.9, weight decay 1e-4 on the weights but not on
    BN and biases, bf16 compute."""
    c.dataset.name = "imagenet2012"
    c.batch_size = 1024
    c.learning_rate = 0.1
    c.num_epochs = 90.0
    c.lr_schedule = "cosine"
    c.warmup_epochs = 5.0
    c.label_smoothing = 0.1
    # The Flax example's penalty 1e-4 * 0.5 * sum(w**2) over the kernels has the gradient 1e-4 * w:
    # add_decayed_weights(1e-4), not 5e-5.
    c.weight_decay = 1e-4
    c.decay_bn_and_bias = False
    c.nesterov = True
    c.half_precision = True
    c.checkpoint_every_steps = 2_500
    c.eval_every_epochs = 1.0
    return c


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


# Keys that do not change what a run computes, or that every run has its own value of: the
# results table groups runs over the others, and a sweep checks that a run directory it would
# skip or resume holds a run of the same settings.
NON_RESULT_KEYS = frozenset(
    {
        "seed",
        "progress_bar",
        "plot_curves",
        "log_every_steps",
        "checkpoint_every_steps",
        "keep_checkpoints",
        "skip_nonfinite",
        "shard_params",  # the same arithmetic, laid out differently
        "dataset.data_dir",
        "dataset.manual_dir",
        "model.scan_blocks",  # the same network, compiled differently
        "model.remat",
    }
)


def flatten_config(cfg: dict, prefix: str = "") -> dict[str, str]:
    """``{"model": {"name": x}}`` -> ``{"model.name": json(x)}`` (JSON text: lists compare and hash)."""
    out = {}
    for k, v in cfg.items():
        if isinstance(v, dict):
            out.update(flatten_config(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = json.dumps(v, sort_keys=True)
    return out


def flat_settings(cfg: dict) -> dict[str, str]:
    """``flatten_config`` of a run's recorded config with the keys it lacks at their defaults: a
    run recorded before a key existed ran as that key's default does (keys are added that way),
    so it compares equal to a new run that leaves the key alone."""
    flat = {**flatten_config(get_base_config().to_dict()), **flatten_config(cfg)}
    flat["model.scan_blocks"] = json.dumps(scan_blocks_value(json.loads(flat["model.scan_blocks"])))
    return flat


def scan_blocks_value(value):
    """``model.scan_blocks`` as the model takes it: the strings of a config.json written when the
    field was a string ('auto', 'true', 'false', any case) as 'auto', True, False; else as is."""
    if isinstance(value, str):
        return {"auto": "auto", "true": True, "false": False}.get(value.lower(), value)
    return value


# Test views: 1, the centre crop; 10, paper 1's 10-crop testing, which only the imagenet2012
# pipeline has. The one statement of the rule (checked here, in evaluate and in resnet_jax.data).
EVAL_CROPS = (1, 10)


def eval_crops_supported(crops, dataset: str) -> bool:
    """Whether ``dataset``'s eval pipeline can test with ``crops`` views."""
    return crops == 1 or (crops == 10 and dataset == "imagenet2012")


# The values the trainer's choices take (schedules.py, optim.py, resnet_jax.data), checked here
# before JAX so that a sweep refuses a typo before its first run.
DATASETS = ("digits", "cifar10", "cifar100", "imagenet2012", "synthetic")
# ImageNet's crop side when config.dataset.image_size is unset.
IMAGENET_IMAGE_SIZE = 224
CHOICES = {
    "lr_schedule": ("step", "cosine"),
    "warmup_kind": ("linear", "constant"),
    "optimizer": ("sgd", "lars"),
    "trainable": ("all", "head"),
}


def check_run_config(config) -> None:
    """The run-level keys that no later step refuses in time (model options: ``models.spec``;
    dataset keys: ``resnet_jax.data``). Plain Python, before JAX is imported: raises
    ``ValueError`` with one line naming the key and what is allowed."""
    # The command line refuses unknown keys (its config is locked); a config built in Python is
    # not, and a typo there (num_step=20) would silently leave the default in force.
    known = set(flatten_config(get_base_config().to_dict()))
    given = flatten_config(config.to_dict())
    unknown = sorted(set(given) - known)
    if unknown:
        key = unknown[0]
        close = difflib.get_close_matches(key, known, n=1)
        hint = f"did you mean config.{close[0]}? " if close else ""
        if key == "model.dtype":
            hint = "the compute dtype is config.half_precision (bf16); "
        raise ValueError(f"config.{key} is not a config key; {hint}the keys and defaults are in resnet_jax/config.py")
    missing = sorted(known - set(given))
    if missing:
        more = f" (+{len(missing) - 1} more)" if len(missing) > 1 else ""
        raise ValueError(
            f"config.{missing[0]} is missing{more}; build the config on resnet_jax.config.get_base_config() "
            "and change only what differs"
        )
    for key in ("num_epochs", "eval_every_epochs", "warmup_epochs", "learning_rate", "weight_decay"):
        if not (_is_number(config[key]) and math.isfinite(config[key])):
            hint = " (above num_epochs: only at the end)" if key == "eval_every_epochs" else ""
            raise ValueError(f"config.{key}={config[key]!r}; use a finite number{hint}")
    checks = [
        ("batch_size", config.batch_size >= 1, "a positive number of images (the global batch)"),
        # JAX's keys take 32-bit seeds (larger ones wrap around onto smaller ones).
        ("seed", 0 <= config.seed < 2**31, "an integer in [0, 2**31)"),
        ("keep_checkpoints", config.keep_checkpoints >= 1, "at least 1 (the latest N checkpoints are kept)"),
        (
            "eval_every_epochs",
            config.eval_every_epochs > 0,
            "a positive number of epochs (> num_epochs: only at the end)",
        ),
        ("label_smoothing", 0 <= config.label_smoothing < 1, "a number in [0, 1)"),
        ("learning_rate", config.learning_rate > 0, "a positive number (for batch 256)"),
        ("momentum", 0 <= config.momentum < 1, "a number in [0, 1)"),
        ("weight_decay", config.weight_decay >= 0, "a non-negative number"),
        ("lr_decay_factor", config.lr_decay_factor > 0, "a positive number"),
        ("warmup_epochs", config.warmup_epochs >= 0, "a non-negative number of epochs"),
    ]
    for key, ok, allowed in checks:
        if not ok:
            raise ValueError(f"config.{key}={getattr(config, key)!r}; use {allowed}")
    for key, values in CHOICES.items():
        if config[key] not in values:
            raise ValueError(f"config.{key}={config[key]!r}; use one of {', '.join(map(repr, values))}")
    if config.dataset.name not in DATASETS:
        raise ValueError(f"config.dataset.name={config.dataset.name!r}; use one of {', '.join(DATASETS)}")
    crops = config.dataset.get("eval_crops", 1)
    if not eval_crops_supported(crops, config.dataset.name):
        raise ValueError(
            f"config.dataset.eval_crops={crops!r}; use 1, or 10 (the paper's 10-crop testing) for imagenet2012"
        )
    boundaries = config.lr_boundaries_steps
    if boundaries is not None and not all(
        (_is_int(b) or (isinstance(b, float) and b.is_integer())) and b >= 0 for b in boundaries
    ):
        raise ValueError(f"config.lr_boundaries_steps={tuple(boundaries)!r}; use step numbers, e.g. (32000, 48000)")
    if not all(_is_number(e) and e >= 0 for e in config.lr_boundaries_epochs):
        raise ValueError(
            f"config.lr_boundaries_epochs={tuple(config.lr_boundaries_epochs)!r}; use epochs, e.g. (30, 60, 80)"
        )
    from resnet_jax.warm_start import check_choices

    check_choices(config.init_from)
    group = config.model.bn_group_size
    if group and group > 0 and config.batch_size % group:
        raise ValueError(
            f"config.model.bn_group_size={group} does not divide config.batch_size={config.batch_size}; "
            "use a divisor of the global batch (the paper: 32 images per group)"
        )


def model_options(config) -> dict[str, Any]:
    """The model options of ``config.model`` as ``create_model`` keyword arguments."""
    opts = {k: v for k, v in config.model.items() if k != "name"}
    opts["scan_blocks"] = scan_blocks_value(opts.get("scan_blocks", "auto"))
    opts["dtype"] = "bfloat16" if config.half_precision else "float32"
    return opts
