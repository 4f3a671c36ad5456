"""ResNet model zoo (Flax NNX): ``create_model(name, num_classes=..., rngs=..., **options)``.

The model knows nothing about training. For analysis, ``model.block_outputs(x)`` returns the
logits and, per block, the residual branch output (before the addition: after its last BN, or its
last conv in pre-activation blocks), the shortcut output, each branch conv's response and the
block's output; ``model.conv_responses(x)`` every conv's response on the main path (paper 1,
Fig. 7); ``model.features(x)`` the pooled features the linear head reads.

The names, the depth table and the options (``resnet_jax.models.spec``) are plain Python and
import no JAX; the networks' modules load on first use of ``create_model`` or ``ResNet``, so that
the command line can check a model before it imports JAX.
"""

import importlib

from resnet_jax.models.spec import DEFAULT_OPTIONS, IMAGENET_DEPTHS, SHORTCUTS, list_models, parse_name, resolve_options

_LAZY = {"ResNet": "resnet_jax.models.resnet", "create_model": "resnet_jax.models.zoo"}

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


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
