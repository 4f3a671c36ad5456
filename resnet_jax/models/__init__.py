"""ResNet model zoo (Flax NNX): ``create_model(name, num_classes=..., rngs=..., **options)``.

The model knows nothing about training. For analysis, ``model.block_outputs(x)`` returns the
logits and, per block, the residual branch output (after its last BN, before the addition) and the
shortcut output.
"""

from resnet_jax.models.layers import SHORTCUTS
from resnet_jax.models.resnet import ResNet
from resnet_jax.models.zoo import (
    DEFAULT_OPTIONS,
    IMAGENET_DEPTHS,
    create_model,
    list_models,
    parse_name,
    resolve_options,
)

__all__ = [
    "SHORTCUTS",
    "DEFAULT_OPTIONS",
    "IMAGENET_DEPTHS",
    "ResNet",
    "create_model",
    "list_models",
    "parse_name",
    "resolve_options",
]
