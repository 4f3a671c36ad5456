"""Building blocks shared by every network: convolutions, BatchNorm and the shortcut.

Parameter names (checkpoints and the torchvision converter depend on them):
  Conv: ``kernel`` [kh, kw, in, out];  BatchNorm: ``scale``, ``bias`` (Param), ``mean``, ``var``
  (BatchStat);  Shortcut: ``conv`` and ``bn`` (projection), ``gate`` (gating kinds).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

# He et al. initialise convolutions with N(0, 2 / fan_out) (torchvision: kaiming_normal_,
# mode="fan_out"); the ReLU gain keeps activations' variance constant with depth.
conv_init = nnx.initializers.variance_scaling(2.0, "fan_out", "normal")


def conv(
    in_ch: int, out_ch: int, kernel: int, stride: int = 1, *, dtype, rngs: nnx.Rngs, bias: bool = False
) -> nnx.Conv:
    """A bias-free convolution padded like PyTorch (symmetric ``kernel // 2``).

    Explicit padding rather than "SAME": for stride 2 on even inputs "SAME" pads (k//2 - 1, k//2),
    which shifts the sampling grid by a pixel relative to torchvision and breaks weight import.
    """
    pad = kernel // 2
    return nnx.Conv(
        in_ch,
        out_ch,
        kernel_size=(kernel, kernel),
        strides=(stride, stride),
        padding=((pad, pad), (pad, pad)),
        use_bias=bias,
        kernel_init=conv_init,
        bias_init=nnx.initializers.zeros_init(),
        dtype=dtype,
        param_dtype=jnp.float32,
        rngs=rngs,
    )


class BatchNorm(nnx.Module):
    """BatchNorm over N, H, W with float32 statistics and optional grouped batch statistics.

    ``group_size`` splits the batch into groups of that many images and normalises each group with
    its own statistics, as one GPU of the paper's 8-GPU runs did (32 images each). It is a reshape
    inside jit, so it works on a batch sharded over any mesh. ``None`` normalises over the whole
    batch, which under sharded jit is the global batch (synchronised BN).

    Running statistics follow Flax's convention: ``ra = momentum * ra + (1 - momentum) * batch``
    with the biased batch variance (PyTorch's momentum 0.1 is our 0.9). With groups, ``batch`` is
    the mean of the groups' means and variances: what averaging each GPU's own running statistics
    would give. It is not the whole batch's variance, which would also count the spread between
    the group means, a spread the groups never normalised with.
    """

    def __init__(
        self,
        num_features: int,
        *,
        momentum: float = 0.9,
        epsilon: float = 1e-5,
        group_size: int | None = None,
        scale_init: float = 1.0,
        dtype=jnp.float32,
    ):
        self.scale = nnx.Param(jnp.full((num_features,), scale_init, jnp.float32))
        self.bias = nnx.Param(jnp.zeros((num_features,), jnp.float32))
        self.mean = nnx.BatchStat(jnp.zeros((num_features,), jnp.float32))
        self.var = nnx.BatchStat(jnp.ones((num_features,), jnp.float32))
        self.momentum = momentum
        self.epsilon = epsilon
        self.group_size = group_size
        self.dtype = dtype
        # Switched by model.train() / model.eval().
        self.use_running_average = False

    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32)
        n = x.shape[0]
        if self.use_running_average:
            mean, var = self.mean[...], self.var[...]
        elif self.group_size and self.group_size != n:
            return self._grouped(x32, self.group_size).astype(self.dtype)
        else:  # global statistics over (N, H, W)
            mean, var = _moments(x32, tuple(range(x.ndim - 1)))
            self._update_running(mean, var)
        # Fold the scale into one per-channel multiplier: normalising first and scaling after
        # keeps an extra full-size tensor alive for the backward pass (measured: +33% XLA
        # buffers and ~4% slower than the Flax Linen reference on cifar_resnet56).
        # The order of the operations here and in _moments is Flax's own: it steers XLA:CPU's
        # fusion. Computing `mul` before `x - mean` made XLA duplicate each BN backward into two
        # fusions (measured: +2.7% bytes accessed, 6% slower on cifar_resnet56).
        y = x32 - mean
        mul = jax.lax.rsqrt(var + self.epsilon) * self.scale[...]
        return (y * mul + self.bias[...]).astype(self.dtype)

    def _grouped(self, x32: jax.Array, g: int) -> jax.Array:
        """Each group of ``g`` images normalised with its own statistics (a reshape, no collective)."""
        n = x32.shape[0]
        if n % g:
            raise ValueError(f"batch of {n} images is not divisible by bn_group_size={g}")
        xg = x32.reshape((n // g, g) + x32.shape[1:])  # [groups, g, H, W, C]
        gmean, gvar = _moments(xg, tuple(range(1, xg.ndim - 1)), keepdims=True)
        self._update_running(gmean.mean(axis=tuple(range(xg.ndim - 1))), gvar.mean(axis=tuple(range(xg.ndim - 1))))
        y = xg - gmean
        y = y * (jax.lax.rsqrt(gvar + self.epsilon) * self.scale[...]) + self.bias[...]
        return y.reshape(x32.shape)

    def _update_running(self, mean: jax.Array, var: jax.Array) -> None:
        m = self.momentum
        # set_value, not `self.mean[...] = v`: under tracing, flax's indexed assignment reads
        # the tracer's `.sharding`, which makes JAX walk every equation traced so far; that
        # made tracing quadratic in depth (ResNet-152 training: 4.4 s -> 0.45 s to trace).
        self.mean.set_value(m * self.mean[...] + (1 - m) * mean)
        self.var.set_value(m * self.var[...] + (1 - m) * var)


def _moments(x: jax.Array, axes: tuple[int, ...], keepdims: bool = False) -> tuple[jax.Array, jax.Array]:
    """Mean and biased variance in one pass (E[x^2] - E[x]^2, so XLA fuses both reductions), with
    the rounding error clamped at zero. (Squaring first, as Flax does: see BatchNorm.__call__.)"""
    x2 = jnp.square(x)
    mean = jnp.mean(x, axis=axes, keepdims=keepdims)
    return mean, jnp.maximum(0.0, jnp.mean(x2, axis=axes, keepdims=keepdims) - jnp.square(mean))


def space_to_depth_conv(x: jax.Array, kernel: jax.Array) -> jax.Array:
    """``conv(x, kernel)`` of a stride-2 convolution padded ``k // 2`` (the ImageNet stem's 7x7),
    computed as a 2x2 space-to-depth of the padded input and a stride-1 convolution with
    ``ceil(k / 2)`` taps of the same kernel, zero-padded to even size and regrouped.

    The same function of the same parameters (up to float summation order). A 3-channel stride-2
    convolution uses tensor cores poorly; the 12-channel stride-1 one uses them better (MLPerf's
    trick; measured on an H100: ResNet-50 train step +0.5-4% over two runs, benchmarks/RESULTS.md).

    Args:
        x: ``[N, H, W, C]`` with H and W even.
        kernel: ``[k, k, C, O]``, k odd.
    """
    n, h, w, c = x.shape
    k, out = kernel.shape[0], kernel.shape[-1]
    pad, taps = k // 2, (k + 1) // 2
    x = jnp.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
    hp, wp = (h + 2 * pad) // 2, (w + 2 * pad) // 2
    # A batch sharded under explicit mesh axes (the Trainer's) makes a reshape name its output
    # sharding; the batch axis keeps its sharding.
    sharding = jax.typeof(x).sharding
    spec = getattr(sharding, "spec", ())
    lead = spec[0] if len(spec) else None

    def reshape(a, shape):
        if lead is None:
            return a.reshape(shape)
        out_sharding = jax.sharding.NamedSharding(sharding.mesh, jax.sharding.PartitionSpec(lead))
        return jax.lax.reshape(a, shape, out_sharding=out_sharding)

    # [N, hp, 2, wp, 2, C] -> [N, hp, wp, (2, 2, C)]: channel index = 2C * row parity + C * column parity + c
    x = reshape(reshape(x, (n, hp, 2, wp, 2, c)).transpose(0, 1, 3, 2, 4, 5), (n, hp, wp, 4 * c))
    kernel = jnp.pad(kernel, ((0, 2 * taps - k), (0, 2 * taps - k), (0, 0), (0, 0)))
    kernel = kernel.reshape(taps, 2, taps, 2, c, out).transpose(0, 2, 1, 3, 4, 5).reshape(taps, taps, 4 * c, out)
    return jax.lax.conv_general_dilated(x, kernel, (1, 1), "VALID", dimension_numbers=("NHWC", "HWIO", "NHWC"))


def max_pool(x: jax.Array, window: int = 3, stride: int = 2, padding: int = 1) -> jax.Array:
    """``nnx.max_pool(x, (window, window), (stride, stride), padding)`` on ``[N, H, W, C]``: the same
    values and the same gradient, which goes to the first maximum of each window in row-major
    order (as XLA's select-and-scatter sends it), but computed from the ``window**2`` strided
    slices of the padded input.

    Why: XLA compiles the gradient of ``lax.reduce_window`` (select-and-scatter) into an
    argmax reduce-window over an iota plus a scatter. On a 2-core CPU that cost 100 ms of
    resnet18's 890 ms train step (112px, batch 32); the slices' maxima, selects and pads fuse into
    a few elementwise loops (19 ms). (In bfloat16 XLA:CPU emulates the arithmetic in float32
    around every op and the backward fuses badly; bfloat16 is a GPU/TPU setting.)
    """
    n, h, w, c = x.shape
    xp = jnp.pad(x, ((0, 0), (padding, padding), (padding, padding), (0, 0)), constant_values=-jnp.inf)
    oh, ow = (h + 2 * padding - window) // stride + 1, (w + 2 * padding - window) // stride + 1
    windows = [
        jax.lax.slice(
            xp, (0, i, j, 0), (n, i + stride * (oh - 1) + 1, j + stride * (ow - 1) + 1, c), (1, stride, stride, 1)
        )
        for i in range(window)
        for j in range(window)
    ]
    # Where the maximum is decides nothing about the gradient; only the selected input carries it.
    peak = windows[0]
    for s in windows[1:]:
        peak = jnp.maximum(peak, s)
    peak = jax.lax.stop_gradient(peak)
    out, taken = jnp.zeros_like(peak), jnp.zeros(peak.shape, bool)
    for s in windows:
        first = ~taken & (s == peak)
        out, taken = jnp.where(first, s, out), taken | first
    # A NaN window equals nothing: pass the NaN on, as reduce_window does, so the loss shows it.
    return jnp.where(taken, out, peak)


def subsample_and_pad(x: jax.Array, out_ch: int, stride: int) -> jax.Array:
    """Option A's parameter-free shortcut: stride-s subsampling, then zero channels appended."""
    if stride > 1:
        x = x[:, ::stride, ::stride, :]
    extra = out_ch - x.shape[-1]
    if extra:
        x = jnp.pad(x, ((0, 0), (0, 0), (0, 0), (0, extra)))
    return x


class Shortcut(nnx.Module):
    """The shortcut path of a block and how it is merged with the residual branch.

    kinds (papers 1 and 2):
      'A'  identity; where the shape changes, subsample and zero-pad (no parameters).
      'B'  identity; a 1x1 conv + BN projection only where the shape changes.
      'C'  a 1x1 conv + BN projection on every block.
    (``norm=None``: projections without the BN, as paper 2's pre-activation CIFAR code has them.)
      'none'  no shortcut: a plain network.
      'gated'  exclusive gating, (1 - g) * x + g * F(x), g = sigmoid(conv1x1(x) + b).
      'shortcut_gated'  shortcut-only gating, (1 - g) * x + F(x).
      'scaled'  constant scaling, 0.5 * x + 0.5 * F(x).
    For the gating and scaling kinds, ``x`` is the identity where shapes match and otherwise the
    family's own downsampling shortcut (``downsample``: 'A' or 'B').
    """

    def __init__(
        self,
        kind: str,
        in_ch: int,
        out_ch: int,
        stride: int,
        *,
        downsample: str,
        gate_bias_init: float,
        norm,
        dtype,
        rngs: nnx.Rngs,
    ):
        self.kind = kind
        self.out_ch = out_ch
        self.stride = stride
        reshapes = stride != 1 or in_ch != out_ch
        ident = kind if kind in ("A", "B", "C") else downsample
        self.project = kind != "none" and (ident == "C" or (ident == "B" and reshapes))
        if self.project:
            self.conv = conv(in_ch, out_ch, 1, stride, dtype=dtype, rngs=rngs)
            self.bn = norm(out_ch) if norm is not None else None
        if kind in ("gated", "shortcut_gated"):
            self.gate = nnx.Conv(
                in_ch,
                out_ch,
                kernel_size=(1, 1),
                strides=(stride, stride),
                padding="VALID",
                kernel_init=conv_init,
                bias_init=nnx.initializers.constant(gate_bias_init),
                dtype=dtype,
                param_dtype=jnp.float32,
                rngs=rngs,
            )

    def identity(self, x: jax.Array) -> jax.Array:
        """The shortcut's own output (before merging), ``None`` for a plain block."""
        if self.kind == "none":
            return None
        if self.project:
            y = self.conv(x)
            return y if self.bn is None else self.bn(y)
        return subsample_and_pad(x, self.out_ch, self.stride)

    def merge(self, x: jax.Array, shortcut: jax.Array | None, residual: jax.Array) -> jax.Array:
        """Combine the branch output ``residual`` with ``shortcut``; ``x`` feeds the gate."""
        if self.kind == "none":
            return residual
        if self.kind == "scaled":
            return 0.5 * shortcut + 0.5 * residual
        if self.kind in ("gated", "shortcut_gated"):
            g = jax.nn.sigmoid(self.gate(x).astype(jnp.float32)).astype(residual.dtype)
            gated_residual = g * residual if self.kind == "gated" else residual
            return (1 - g) * shortcut + gated_residual
        return shortcut + residual
