"""Baseline for the benchmarks: a plain Flax Linen ResNet, written the way the Flax ImageNet example
writes its model and train step.

``nn.Module`` classes with ``nn.compact``; conv and norm bound once with ``functools.partial`` and
passed down; ``nn.BatchNorm`` keeping its running statistics in the ``batch_stats`` collection; a
``TrainState`` with ``batch_stats``; one ``jax.jit`` train step with the state donated; SGD with
momentum (and L2 weight decay added to the gradient) from optax; float32 or bfloat16 compute with
float32 parameters.

It is the *same architecture* as ``resnet_jax.models`` for the layouts it covers (same layers,
same parameter count, same padding and strides, same FLOPs), so that ``python -m resnet_jax.bench
--compare`` measures the implementation, not the network:

* ImageNet ResNets (``resnet18/34/50/101/152/200``): 7x7 stem + max-pool, basic or bottleneck
  blocks (stride on the 3x3 conv, torchvision's v1.5), 1x1 conv + BN projection shortcuts where the
  shape changes (option B).
* CIFAR ResNets (``cifar_resnet{6n+2}``): 3x3 stem, three stages of n basic blocks with 16/32/64
  channels, parameter-free option-A shortcuts (subsample, zero-pad the channels).

Library: ``create_model``, ``count_params``, ``create_train_state``, ``make_train_step``.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from flax.training import train_state

ModuleDef = Any

# ImageNet depth -> (block, blocks per stage), paper 1's Table 1.
IMAGENET_LAYOUTS = {
    18: ("basic", (2, 2, 2, 2)),
    34: ("basic", (3, 4, 6, 3)),
    50: ("bottleneck", (3, 4, 6, 3)),
    101: ("bottleneck", (3, 4, 23, 3)),
    152: ("bottleneck", (3, 8, 36, 3)),
    200: ("bottleneck", (3, 24, 36, 3)),
}

conv_init = nn.initializers.variance_scaling(2.0, "fan_out", "normal")


def _pad(kernel: int) -> tuple[tuple[int, int], tuple[int, int]]:
    # Symmetric k // 2 padding (PyTorch's), as resnet_jax does: same output sizes as "SAME".
    return ((kernel // 2, kernel // 2),) * 2


def option_a_shortcut(x: jax.Array, filters: int, strides: tuple[int, int]) -> jax.Array:
    """Paper 1's parameter-free CIFAR shortcut: subsample, then append zero channels."""
    x = x[:, :: strides[0], :: strides[1], :]  # [N, H/s, W/s, C]
    return jnp.pad(x, ((0, 0), (0, 0), (0, 0), (0, filters - x.shape[-1])))


class ResNetBlock(nn.Module):
    """Two 3x3 convolutions."""

    filters: int
    conv: ModuleDef
    norm: ModuleDef
    act: Callable
    strides: tuple[int, int] = (1, 1)
    shortcut: str = "B"

    @nn.compact
    def __call__(self, x):
        residual = x
        y = self.conv(self.filters, (3, 3), self.strides, padding=_pad(3))(x)
        y = self.norm()(y)
        y = self.act(y)
        y = self.conv(self.filters, (3, 3), padding=_pad(3))(y)
        y = self.norm(scale_init=nn.initializers.zeros_init())(y)
        if residual.shape != y.shape:
            if self.shortcut == "A":
                residual = option_a_shortcut(residual, self.filters, self.strides)
            else:
                residual = self.conv(self.filters, (1, 1), self.strides, name="conv_proj")(residual)
                residual = self.norm(name="norm_proj")(residual)
        return self.act(residual + y)


class BottleneckResNetBlock(nn.Module):
    """1x1 reduce, 3x3 (with the stride), 1x1 expand x4."""

    filters: int
    conv: ModuleDef
    norm: ModuleDef
    act: Callable
    strides: tuple[int, int] = (1, 1)
    shortcut: str = "B"

    @nn.compact
    def __call__(self, x):
        residual = x
        y = self.conv(self.filters, (1, 1))(x)
        y = self.norm()(y)
        y = self.act(y)
        y = self.conv(self.filters, (3, 3), self.strides, padding=_pad(3))(y)
        y = self.norm()(y)
        y = self.act(y)
        y = self.conv(self.filters * 4, (1, 1))(y)
        y = self.norm(scale_init=nn.initializers.zeros_init())(y)
        if residual.shape != y.shape:
            residual = self.conv(self.filters * 4, (1, 1), self.strides, name="conv_proj")(residual)
            residual = self.norm(name="norm_proj")(residual)
        return self.act(residual + y)


class ResNet(nn.Module):
    """ResNet: stem, stages of blocks, global average pooling, dense head."""

    stage_sizes: tuple[int, ...]
    block_cls: ModuleDef
    num_classes: int
    num_filters: int = 64
    stem: str = "imagenet"  # imagenet: 7x7/2 conv + 3x3/2 max-pool; cifar: 3x3 conv
    shortcut: str = "B"
    dtype: Any = jnp.float32
    act: Callable = nn.relu

    @nn.compact
    def __call__(self, x, train: bool = True):
        conv = functools.partial(
            nn.Conv, use_bias=False, dtype=self.dtype, param_dtype=jnp.float32, kernel_init=conv_init
        )
        norm = functools.partial(
            nn.BatchNorm,
            use_running_average=not train,
            momentum=0.9,
            epsilon=1e-5,
            dtype=self.dtype,
            param_dtype=jnp.float32,
        )
        x = jnp.asarray(x, self.dtype)
        if self.stem == "imagenet":
            x = conv(self.num_filters, (7, 7), (2, 2), padding=_pad(7), name="conv_init")(x)
        else:
            x = conv(self.num_filters, (3, 3), padding=_pad(3), name="conv_init")(x)
        x = norm(name="bn_init")(x)
        x = self.act(x)
        if self.stem == "imagenet":
            x = nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
        for i, block_size in enumerate(self.stage_sizes):
            for j in range(block_size):
                strides = (2, 2) if i > 0 and j == 0 else (1, 1)
                x = self.block_cls(
                    self.num_filters * 2**i,
                    strides=strides,
                    conv=conv,
                    norm=norm,
                    act=self.act,
                    shortcut=self.shortcut,
                )(x)
        x = jnp.mean(x, axis=(1, 2))
        x = nn.Dense(self.num_classes, dtype=self.dtype, param_dtype=jnp.float32)(x)
        return jnp.asarray(x, jnp.float32)


def create_model(name: str, *, num_classes: int, dtype: Any = jnp.float32, width: int | None = None) -> ResNet:
    """``resnet18``..``resnet200`` or ``cifar_resnet{6n+2}``; ``width`` overrides the base channels.

    Raises:
      ValueError: a name this baseline does not cover.
    """
    m = re.fullmatch(r"(resnet|cifar_resnet)(\d+)", name)
    if m and m.group(1) == "resnet" and int(m.group(2)) in IMAGENET_LAYOUTS:
        block, sizes = IMAGENET_LAYOUTS[int(m.group(2))]
        return ResNet(
            stage_sizes=sizes,
            block_cls=ResNetBlock if block == "basic" else BottleneckResNetBlock,
            num_classes=num_classes,
            num_filters=width or 64,
            stem="imagenet",
            shortcut="B",
            dtype=dtype,
        )
    if m and m.group(1) == "cifar_resnet" and (int(m.group(2)) - 2) % 6 == 0 and int(m.group(2)) >= 8:
        n = (int(m.group(2)) - 2) // 6
        return ResNet(
            stage_sizes=(n, n, n),
            block_cls=ResNetBlock,
            num_classes=num_classes,
            num_filters=width or 16,
            stem="cifar",
            shortcut="A",
            dtype=dtype,
        )
    raise ValueError(f"the Linen baseline has no model {name!r}: resnet18..resnet200 or cifar_resnet{{6n+2}}")


def count_params(variables: Any) -> int:
    """Elements of the ``params`` collection (BatchNorm statistics excluded)."""
    return sum(x.size for x in jax.tree.leaves(variables["params"]))


class TrainState(train_state.TrainState):
    batch_stats: Any


def create_train_state(
    model: ResNet,
    image_size: int,
    *,
    learning_rate: float = 0.1,
    momentum: float = 0.9,
    weight_decay: float = 1e-4,
    seed: int = 0,
    rng: jax.Array | None = None,
) -> TrainState:
    """Initialises the variables and an SGD-momentum optimizer (L2 decay on every parameter).

    ``rng`` (default ``jax.random.key(seed)``) may be of any PRNG implementation; an ``rbg`` key
    compiles the initialisers much faster on the CPU.
    """

    @jax.jit
    def init(rng):
        variables = model.init(rng, jnp.ones((1, image_size, image_size, 3), model.dtype), train=False)
        tx = optax.chain(optax.add_decayed_weights(weight_decay), optax.sgd(learning_rate, momentum=momentum))
        return TrainState.create(
            apply_fn=model.apply, params=variables["params"], tx=tx, batch_stats=variables["batch_stats"]
        )

    return init(jax.random.key(seed) if rng is None else rng)


def cross_entropy_loss(logits, labels, num_classes: int):
    one_hot = jax.nn.one_hot(labels, num_classes)
    return jnp.mean(optax.softmax_cross_entropy(logits=logits, labels=one_hot))


def train_step(state: TrainState, batch: dict, num_classes: int):
    """One SGD step; ``batch = {"image": [N, H, W, 3], "label": [N]}``."""

    def loss_fn(params):
        logits, new_model_state = state.apply_fn(
            {"params": params, "batch_stats": state.batch_stats}, batch["image"], mutable=["batch_stats"]
        )
        return cross_entropy_loss(logits, batch["label"], num_classes), (new_model_state, logits)

    (loss, (new_model_state, logits)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    new_state = state.apply_gradients(grads=grads, batch_stats=new_model_state["batch_stats"])
    metrics = {"loss": loss, "accuracy": jnp.mean(jnp.argmax(logits, -1) == batch["label"])}
    return new_state, metrics


def make_train_step(num_classes: int):
    """The jitted train step, state donated (call ``.lower(state, batch).compile()`` to time compilation)."""
    return jax.jit(functools.partial(train_step, num_classes=num_classes), donate_argnums=0)
