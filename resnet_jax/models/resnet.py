"""The ResNet network: a stem, stages of blocks, global average pooling and a linear head."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from resnet_jax.models.blocks import BLOCKS, BlockOptions
from resnet_jax.models.layers import conv, max_pool, space_to_depth_conv


class Stage(nnx.Module):
    """A run of blocks at one resolution; only the first block changes the shape.

    With ``scan`` the identical blocks 2..n are stored stacked (leading axis n-1) and applied with
    ``nnx.scan``, so compile time does not grow with depth. Unrolled, ``blocks`` holds them all.
    On XLA:CPU the backward pass of a convolution inside a loop is much slower (jax-ml/jax#12868),
    hence the choice is per network (see ``scan_blocks`` in the factory).
    ``remat`` recomputes each block's activations in the backward pass to save memory.
    """

    def __init__(
        self,
        block: str,
        in_ch: int,
        planes: int,
        num_blocks: int,
        stride: int,
        opts: BlockOptions,
        *,
        scan: bool,
        remat: bool,
        rngs: nnx.Rngs,
        preactivate_first: bool = True,
    ):
        cls = BLOCKS[block]
        out_ch = planes * cls.expansion
        # Only pre-activation blocks know the flag (see ResNet: the first block after an ImageNet stem).
        first = cls(in_ch, planes, stride, opts, rngs=rngs, **({} if preactivate_first else {"preactivate": False}))
        self.remat = remat
        if scan and num_blocks > 1:
            self.blocks = nnx.List([first])

            @nnx.split_rngs(splits=num_blocks - 1)
            @nnx.vmap(in_axes=(0,), out_axes=0)
            def make(r):
                return cls(out_ch, planes, 1, opts, rngs=r)

            self.scanned = make(rngs)
        else:
            rest = [cls(out_ch, planes, 1, opts, rngs=rngs) for _ in range(num_blocks - 1)]
            self.blocks = nnx.List([first, *rest])
            self.scanned = None
        self.out_ch = out_ch
        self.num_blocks = num_blocks

    def _apply(self, block, x):
        if self.remat:
            return nnx.remat(lambda b, y: b.forward(y))(block, x)
        return block.forward(x)

    def forward(self, x: jax.Array, capture: bool = False) -> tuple[jax.Array, list[dict]]:
        """Returns the stage output and, with ``capture``, each block's
        ``{"residual", "shortcut", "responses", "output"}`` (without, ``[]``)."""
        parts = []
        for block in self.blocks:
            x, p = self._apply(block, x)
            if capture:  # (not kept otherwise: eagerly, they would stay alive to the end of the stage)
                parts.append({**p, "output": x})
        if self.scanned is not None:
            # Only stack the parts when asked: a scan keeps its outputs alive (n x activations).
            @nnx.scan(in_axes=(nnx.Carry, 0), out_axes=(nnx.Carry, 0))
            def body(y, block):
                y, p = self._apply(block, y)
                return y, ({**p, "output": y} if capture else None)

            x, stacked = body(x, self.scanned)
            if capture:
                n = jax.tree.leaves(stacked)[0].shape[0]
                parts += [jax.tree.map(lambda a, i=i: a[i], stacked) for i in range(n)]
        return x, parts


class ResNet(nnx.Module):
    """A residual (or plain) network. Build it with ``resnet_jax.models.create_model``.

    Input: NHWC float images. Output: float32 logits. ``model.train()`` / ``model.eval()`` switch
    BatchNorm between batch and running statistics. Parameter names: ``conv1``, ``bn1`` (stem),
    ``stages[i].blocks[j]`` (``stages[i].scanned`` for stacked blocks), ``final_bn`` (pre-activation
    only), ``fc``.
    """

    def __init__(
        self,
        *,
        block: str,
        stage_sizes: tuple[int, ...],
        stem: str,
        width: int,
        num_classes: int,
        opts: BlockOptions,
        scan: bool,
        remat: bool,
        rngs: nnx.Rngs,
        space_to_depth_stem: bool = False,
    ):
        self.stem = stem
        self.space_to_depth_stem = space_to_depth_stem
        self.dtype = opts.dtype
        if stem == "imagenet":
            self.conv1 = conv(3, width, 7, 2, dtype=opts.dtype, rngs=rngs)
        else:
            self.conv1 = conv(3, width, 3, 1, dtype=opts.dtype, rngs=rngs)
        # A pre-activation CIFAR net's first block normalises the stem output itself.
        self.bn1 = opts.norm(width) if stem != "cifar_preact" else None
        stages, in_ch = [], width
        # Pre-activation after an ImageNet stem (conv-BN-ReLU-max-pool): the first block does not
        # normalise and rectify again, as in the paper's code (fb.resnet.torch preresnet.lua,
        # "no_preact"). A CIFAR pre-act stem is a bare conv, so its first block does.
        stem_preactivated = stem == "imagenet" and block.startswith("preact")
        for i, n in enumerate(stage_sizes):
            stage = Stage(
                block,
                in_ch,
                width * 2**i,
                n,
                1 if i == 0 else 2,
                opts,
                scan=scan,
                remat=remat,
                rngs=rngs,
                preactivate_first=not (i == 0 and stem_preactivated),
            )
            stages.append(stage)
            in_ch = stage.out_ch
        self.stages = nnx.List(stages)
        # Pre-activation blocks end on a convolution: normalise before pooling.
        self.final_bn = opts.norm(in_ch) if block.startswith("preact") else None
        self.fc = nnx.Linear(in_ch, num_classes, dtype=opts.dtype, param_dtype=jnp.float32, rngs=rngs)
        self.num_features = in_ch

    def _stem(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
        """The stem's output and its response: the conv output after the stem's BN, before the
        ReLU (a CIFAR pre-activation stem has no BN: the bare conv output)."""
        x = x.astype(self.dtype)
        if self.space_to_depth_stem and x.shape[1] % 2 == 0 and x.shape[2] % 2 == 0:
            x = space_to_depth_conv(x, self.conv1.kernel[...].astype(self.dtype))
        else:
            x = self.conv1(x)
        response = x
        if self.bn1 is not None:
            response = self.bn1(x)
            x = nnx.relu(response)
        if self.stem == "imagenet":
            x = max_pool(x, 3, stride=2, padding=1)
        return x, response

    def stem_forward(self, x: jax.Array) -> jax.Array:
        return self._stem(x)[0]

    def pool(self, x: jax.Array) -> jax.Array:
        """The last stage's output -> the pooled features ``[N, num_features]`` the head reads."""
        if self.final_bn is not None:
            x = nnx.relu(self.final_bn(x))
        return jnp.mean(x, axis=(1, 2))

    def head_forward(self, x: jax.Array) -> jax.Array:
        return self.fc(self.pool(x)).astype(jnp.float32)

    def _check_input(self, x: jax.Array) -> None:
        if x.ndim != 4 or x.shape[-1] != 3:
            # A shape error from the first convolution names its dimension numbers, not the cause.
            raise ValueError(
                f"expected a batch of RGB images [N, H, W, 3] (NHWC), got shape {tuple(x.shape)}"
                + ("; a single image needs x[None]" if x.ndim == 3 and x.shape[-1] == 3 else "")
                + ("; NCHW input needs x.transpose(0, 2, 3, 1)" if x.ndim == 4 and x.shape[1] == 3 else "")
            )

    def _trunk(self, x: jax.Array, capture: bool) -> tuple[jax.Array, jax.Array, list[dict]]:
        """Stem and stages: the last stage's output, the stem's response and, with ``capture``,
        every block's parts."""
        self._check_input(x)
        x, stem_response = self._stem(x)
        parts = []
        for stage in self.stages:
            x, p = stage.forward(x, capture)
            parts += p
        return x, stem_response, parts

    def _forward(self, x: jax.Array, capture: bool) -> tuple[jax.Array, list[dict]]:
        x, _, parts = self._trunk(x, capture)
        return self.head_forward(x), parts

    def features(self, x: jax.Array) -> jax.Array:
        """The globally pooled features the linear head reads, ``[N, num_features]`` float32
        (after the final BN-ReLU of a pre-activation network): for linear probes and retrieval."""
        return self.pool(self._trunk(x, capture=False)[0]).astype(jnp.float32)

    def block_outputs(self, x: jax.Array) -> tuple[jax.Array, list[dict]]:
        """Logits and, for every block in order, ``{"residual", "shortcut", "responses", "output"}``.

        ``residual`` is the branch output before the addition (after its last BN; in pre-activation
        blocks, its last conv); ``shortcut`` is ``None`` in a plain network; ``responses`` is a
        tuple with one response per convolution of the branch (after its BN, before the ReLU or the
        addition; see ``resnet_jax.models.blocks``), the last being ``residual``; ``output`` is what
        the block passes on (after the addition and, post-activation, the ReLU). Works under jit and
        for scanned stages. ``conv_responses`` adds the stem's and flattens them (paper 1, Fig. 7).
        """
        return self._forward(x, capture=True)

    def conv_responses(self, x: jax.Array) -> tuple[jax.Array, list[jax.Array]]:
        """Logits and the response of every convolution on the main path, in network order, named
        by ``conv_response_names()``: the stem's, then each block's (``block_outputs``'
        ``responses``). A response is the conv output after its BN and before the nonlinearity
        (ReLU or the addition): paper 1's "layer responses" (Fig. 7), whose 3x3 layers are these
        for basic blocks. Projection shortcuts are not included. Works under jit and for scanned
        stages.
        """
        x, stem_response, parts = self._trunk(x, capture=True)
        return self.head_forward(x), [stem_response, *(r for p in parts for r in p["responses"])]

    def conv_response_names(self) -> list[str]:
        """The names of ``conv_responses``: ``stem``, then ``stage{i}.block{j}.conv{k}`` (1-based)."""
        names = ["stem"]
        for i, stage in enumerate(self.stages):
            layers = type(stage.blocks[0]).response_layers
            names += [f"stage{i + 1}.block{j + 1}.{c}" for j in range(stage.num_blocks) for c in layers]
        return names

    def __call__(self, x: jax.Array) -> jax.Array:
        return self._forward(x, capture=False)[0]
