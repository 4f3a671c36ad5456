"""Residual blocks. Each has one data path: branch top to bottom, then the shortcut merges.

``forward(x)`` returns ``(out, parts)`` where ``parts = {"residual": F(x), "shortcut": s(x),
"responses": (...)}``, for the layer-response analysis of paper 1, Fig. 7: the residual branch's
output (after its last BN, before the addition), the shortcut's, and one response per convolution
of the branch, in order (named by the class's ``response_layers``). A response is the convolution's
output after the BN that follows it and before the nonlinearity (ReLU or the addition): ``bn1`` and
``bn2`` of a basic block (its two 3x3 convs, Fig. 7's layers), ``bn1, bn2, bn3`` of a bottleneck
(1x1, 3x3, 1x1: all three are kept). A pre-activation block's convolutions are followed by the
*next* BN (``conv1`` -> ``bn2`` -> ReLU): its responses are that BN's output before the ReLU, and
for the last convolution, which feeds the addition with no BN, the bare convolution output (which
is ``residual``). The responses are values the forward computes anyway: ``__call__`` returns
``out`` only and XLA drops ``parts``.
Parameter names: ``conv1, bn1, conv2, bn2[, conv3, bn3]`` and ``shortcut`` (torchvision's names,
with ``shortcut`` for its ``downsample``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
from flax import nnx

from resnet_jax.models.layers import BatchNorm, Shortcut, conv


@dataclasses.dataclass(frozen=True)
class BlockOptions:
    """Options shared by every block of a network (resolved and validated by the factory)."""

    shortcut: str
    downsample: str  # the family's shortcut where shapes change, for gating/scaling kinds
    stride_in: str
    gate_bias_init: float
    zero_init_last_bn: bool
    bn_momentum: float
    bn_epsilon: float
    bn_group_size: int | None
    dtype: Any
    projection_bn: bool = True  # a BN after a projection shortcut's 1x1 conv (the family's choice)

    def norm(self, features: int, zero: bool = False) -> BatchNorm:
        return BatchNorm(
            features,
            momentum=self.bn_momentum,
            epsilon=self.bn_epsilon,
            group_size=self.bn_group_size,
            scale_init=0.0 if zero else 1.0,
            dtype=self.dtype,
        )

    def zero_last(self) -> bool:
        # Zero-initialising the last BN makes each block start as the identity (Goyal et al. 2017).
        # A plain block has no identity to fall back on: zeroing it would zero the whole network.
        return self.zero_init_last_bn and self.shortcut != "none"

    def make_shortcut(self, in_ch: int, out_ch: int, stride: int, rngs: nnx.Rngs) -> Shortcut:
        return Shortcut(
            self.shortcut,
            in_ch,
            out_ch,
            stride,
            downsample=self.downsample,
            gate_bias_init=self.gate_bias_init,
            norm=self.norm if self.projection_bn else None,
            dtype=self.dtype,
            rngs=rngs,
        )


class Block(nnx.Module):
    """Base: ``__call__`` drops the analysis parts of ``forward``."""

    expansion = 1
    # The branch's convolutions, in order: one entry of ``parts["responses"]`` each.
    response_layers: tuple[str, ...] = ()

    def forward(self, x: jax.Array) -> tuple[jax.Array, dict]:
        raise NotImplementedError

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.forward(x)[0]


class BasicBlock(Block):
    """Two 3x3 convolutions (ResNet-18/34 and the CIFAR nets)."""

    expansion = 1
    response_layers = ("conv1", "conv2")

    def __init__(self, in_ch: int, planes: int, stride: int, opts: BlockOptions, *, rngs: nnx.Rngs):
        self.conv1 = conv(in_ch, planes, 3, stride, dtype=opts.dtype, rngs=rngs)
        self.bn1 = opts.norm(planes)
        self.conv2 = conv(planes, planes, 3, dtype=opts.dtype, rngs=rngs)
        self.bn2 = opts.norm(planes, zero=opts.zero_last())
        self.shortcut = opts.make_shortcut(in_ch, planes, stride, rngs)

    def forward(self, x):
        h1 = self.bn1(self.conv1(x))
        r = self.bn2(self.conv2(nnx.relu(h1)))
        s = self.shortcut.identity(x)
        return nnx.relu(self.shortcut.merge(x, s, r)), {"residual": r, "shortcut": s, "responses": (h1, r)}


class Bottleneck(Block):
    """1x1 reduce, 3x3, 1x1 expand (x4). ``stride_in`` puts the stride on the 3x3 conv
    (torchvision's "v1.5", better accuracy) or on the first 1x1 conv (the paper and its Caffe models).
    """

    expansion = 4
    response_layers = ("conv1", "conv2", "conv3")

    def __init__(self, in_ch: int, planes: int, stride: int, opts: BlockOptions, *, rngs: nnx.Rngs):
        out_ch = planes * self.expansion
        s1, s3 = (1, stride) if opts.stride_in == "3x3" else (stride, 1)
        self.conv1 = conv(in_ch, planes, 1, s1, dtype=opts.dtype, rngs=rngs)
        self.bn1 = opts.norm(planes)
        self.conv2 = conv(planes, planes, 3, s3, dtype=opts.dtype, rngs=rngs)
        self.bn2 = opts.norm(planes)
        self.conv3 = conv(planes, out_ch, 1, dtype=opts.dtype, rngs=rngs)
        self.bn3 = opts.norm(out_ch, zero=opts.zero_last())
        self.shortcut = opts.make_shortcut(in_ch, out_ch, stride, rngs)

    def forward(self, x):
        h1 = self.bn1(self.conv1(x))
        h2 = self.bn2(self.conv2(nnx.relu(h1)))
        r = self.bn3(self.conv3(nnx.relu(h2)))
        s = self.shortcut.identity(x)
        return nnx.relu(self.shortcut.merge(x, s, r)), {"residual": r, "shortcut": s, "responses": (h1, h2, r)}


def _preact_shortcut_input(shortcut: Shortcut, x: jax.Array, a: jax.Array) -> jax.Array:
    # Paper 2 (and its reference code): a projection shortcut reads the pre-activated input, so
    # that the identity path stays a clean identity everywhere else.
    return a if shortcut.project else x


def _preactivate(bn: BatchNorm | None, x: jax.Array) -> jax.Array:
    return x if bn is None else nnx.relu(bn(x))


class PreActBasicBlock(Block):
    """Full pre-activation (paper 2): BN -> ReLU -> conv, twice; nothing after the addition.

    ``preactivate=False`` (no ``bn1``): the input is already normalised and rectified, as the first
    block after an ImageNet stem's conv-BN-ReLU-max-pool is in the paper's code ("no_preact").
    """

    expansion = 1
    response_layers = ("conv1", "conv2")

    def __init__(
        self, in_ch: int, planes: int, stride: int, opts: BlockOptions, *, rngs: nnx.Rngs, preactivate: bool = True
    ):
        self.bn1 = opts.norm(in_ch) if preactivate else None
        self.conv1 = conv(in_ch, planes, 3, stride, dtype=opts.dtype, rngs=rngs)
        self.bn2 = opts.norm(planes)
        self.conv2 = conv(planes, planes, 3, dtype=opts.dtype, rngs=rngs)
        self.shortcut = opts.make_shortcut(in_ch, planes, stride, rngs)

    def forward(self, x):
        a = _preactivate(self.bn1, x)
        h1 = self.bn2(self.conv1(a))
        r = self.conv2(nnx.relu(h1))
        s = self.shortcut.identity(_preact_shortcut_input(self.shortcut, x, a))
        return self.shortcut.merge(x, s, r), {"residual": r, "shortcut": s, "responses": (h1, r)}


class PreActBottleneck(Block):
    """Full pre-activation bottleneck (paper 2's ResNet-164/1001 and pre-act ResNet-200).
    ``preactivate``: see ``PreActBasicBlock``."""

    expansion = 4
    response_layers = ("conv1", "conv2", "conv3")

    def __init__(
        self, in_ch: int, planes: int, stride: int, opts: BlockOptions, *, rngs: nnx.Rngs, preactivate: bool = True
    ):
        out_ch = planes * self.expansion
        s1, s3 = (1, stride) if opts.stride_in == "3x3" else (stride, 1)
        self.bn1 = opts.norm(in_ch) if preactivate else None
        self.conv1 = conv(in_ch, planes, 1, s1, dtype=opts.dtype, rngs=rngs)
        self.bn2 = opts.norm(planes)
        self.conv2 = conv(planes, planes, 3, s3, dtype=opts.dtype, rngs=rngs)
        self.bn3 = opts.norm(planes)
        self.conv3 = conv(planes, out_ch, 1, dtype=opts.dtype, rngs=rngs)
        self.shortcut = opts.make_shortcut(in_ch, out_ch, stride, rngs)

    def forward(self, x):
        a = _preactivate(self.bn1, x)
        h1 = self.bn2(self.conv1(a))
        h2 = self.bn3(self.conv2(nnx.relu(h1)))
        r = self.conv3(nnx.relu(h2))
        s = self.shortcut.identity(_preact_shortcut_input(self.shortcut, x, a))
        return self.shortcut.merge(x, s, r), {"residual": r, "shortcut": s, "responses": (h1, h2, r)}


BLOCKS: dict[str, Callable[..., Block]] = {
    "basic": BasicBlock,
    "bottleneck": Bottleneck,
    "preact_basic": PreActBasicBlock,
    "preact_bottleneck": PreActBottleneck,
}
