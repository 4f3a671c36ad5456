"""The model zoo: ``create_model``, from the depth table, names and options of ``spec``."""

from __future__ import annotations

import numbers

import jax.numpy as jnp
from flax import nnx

from resnet_jax.models.blocks import BlockOptions
from resnet_jax.models.resnet import ResNet
from resnet_jax.models.spec import AUTO_SCAN_MIN_BLOCKS, FAMILIES, dtype_name, resolve_options

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


def create_model(name: str, *, num_classes: int, rngs: nnx.Rngs, **options) -> ResNet:
    """Builds a network of the zoo.

    Args:
      name: e.g. ``resnet50``, ``plain34``, ``cifar_resnet110``, ``cifar_preact_resnet164``,
        ``cifar_bottleneck_resnet164`` (see ``list_models``).
      num_classes: size of the linear head.
      rngs: ``nnx.Rngs`` for parameter initialisation.
      **options: ``shortcut`` ('A', 'B', 'C', 'none', 'gated', 'shortcut_gated', 'scaled'),
        ``stride_in`` ('3x3' | '1x1'), ``zero_init_last_bn``, ``width`` (base channels), ``dtype``
        (compute dtype; parameters stay float32), ``bn_momentum``, ``bn_epsilon``,
        ``bn_group_size`` (images per BN statistics group in training; None = whole batch),
        ``gate_bias_init`` (gating kinds), ``scan_blocks`` ('auto' | True | False), ``remat``,
        ``space_to_depth_stem`` (the ImageNet stem's convolution computed in a layout faster on
        GPUs; the same function and parameters; an odd image size falls back to the plain conv).
        ``None`` means the default.

    Returns:
      The ``ResNet`` module, in training mode.

    Raises:
      ValueError: a bad name, depth, option value or combination, naming what is allowed.
    """
    # Any integer type (a NumPy count from a label array too), but not a bool or a float.
    if isinstance(num_classes, bool) or not isinstance(num_classes, numbers.Integral) or num_classes < 1:
        raise ValueError(f"num_classes={num_classes!r}; must be a positive integer")
    num_classes = int(num_classes)
    if not isinstance(rngs, nnx.Rngs):
        raise ValueError(f"rngs is a {type(rngs).__name__}; pass nnx.Rngs(seed), e.g. rngs=nnx.Rngs(0)")
    o = resolve_options(name, **options)
    # The shortcut of gating/scaling kinds where shapes change: option A in the CIFAR nets of
    # paper 1, the 1x1 projection (B) in the bottleneck CIFAR nets of paper 2 and on ImageNet.
    fam = FAMILIES[o["family"]]
    downsample = "A" if o["family"].startswith("cifar") and fam["shortcut"] != "B" else "B"
    opts = BlockOptions(
        shortcut=o["shortcut"],
        downsample=downsample,
        stride_in=o["stride_in"],
        gate_bias_init=o["gate_bias_init"],
        zero_init_last_bn=o["zero_init_last_bn"],
        bn_momentum=o["bn_momentum"],
        bn_epsilon=o["bn_epsilon"],
        bn_group_size=o["bn_group_size"],
        dtype=DTYPES[dtype_name(o["dtype"])],
        projection_bn=fam.get("projection_bn", True),
    )
    scan = o["scan_blocks"]
    if scan == "auto":
        scan = max(o["stage_sizes"]) >= AUTO_SCAN_MIN_BLOCKS
    model = ResNet(
        block=o["block"],
        stage_sizes=o["stage_sizes"],
        stem=FAMILIES[o["family"]]["stem"],
        width=o["width"],
        num_classes=num_classes,
        opts=opts,
        scan=scan,
        remat=o["remat"],
        rngs=rngs,
        space_to_depth_stem=o["space_to_depth_stem"],
    )
    model.train()
    return model
