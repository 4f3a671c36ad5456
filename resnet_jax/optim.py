"""The optimizer: SGD with momentum (Nesterov option) or LARS, with decoupled-from-BN weight decay.

A ``scan_blocks=True`` model is the same network as the unrolled one, so it gets the same optimizer:
its stacked parameters (under a ``scanned`` path element, one leading axis over the blocks) are
judged by their per-block rank, and LARS's trust ratio is taken block by block.
"""

from __future__ import annotations

import jax
import optax

from resnet_jax.errors import UserError

STACKED = "scanned"  # the path element under which a stage's stacked blocks' parameters live


def _name(key) -> object:
    return getattr(key, "key", getattr(key, "name", getattr(key, "idx", key)))


def is_stacked(path) -> bool:
    """Whether the leaf at key path ``path`` is stacked over blocks (its leading axis)."""
    return any(_name(k) == STACKED for k in path)


def block_ndim(path, p) -> int:
    """The rank of one block's share of the leaf ``p`` at key path ``path``."""
    return p.ndim - 1 if is_stacked(path) else p.ndim


def decay_mask(params, decay_bn_and_bias: bool):
    """True for parameters that get weight decay. The papers decay everything; modern recipes
    (Goyal et al., timm) skip BN scales/biases and biases, i.e. every parameter whose per-block
    rank (see ``block_ndim``) is <= 1."""
    return jax.tree_util.tree_map_with_path(lambda path, p: decay_bn_and_bias or block_ndim(path, p) > 1, params)


def blockwise(inner: optax.GradientTransformation) -> optax.GradientTransformation:
    """``inner`` (stateless, elementwise over leaves, e.g. ``optax.scale_by_trust_ratio``) applied
    to each leaf on its own, and to each block of a stacked leaf on its own (vmapped over the
    stacking axis), as it would be to the unrolled model's leaves."""

    def leaf_update(u, p):
        return inner.update(u, inner.init(p), p)[0]

    def update_fn(updates, state, params=None):
        if params is None:
            raise ValueError("blockwise needs the parameters: pass params to update")

        def one(path, u, p):
            return jax.vmap(leaf_update)(u, p) if is_stacked(path) else leaf_update(u, p)

        return jax.tree_util.tree_map_with_path(one, updates, params), state

    return optax.GradientTransformation(optax.init_empty_state, update_fn)


HEAD = "fc"  # the parameters config.trainable='head' trains


def head_labels(params):
    """'train' for the head's parameters, 'frozen' for the others (top-level keys of ``params``)."""
    return {k: jax.tree.map(lambda _, k=k: "train" if k == HEAD else "frozen", v) for k, v in params.items()}


def make_optimizer(config, schedule: optax.Schedule) -> optax.GradientTransformation:
    """Builds the optimizer described by ``config`` (``optimizer``, ``momentum``, ``nesterov``,
    ``weight_decay``, ``decay_bn_and_bias``, ``trainable``)."""
    tx = _optimizer(config, schedule)
    if config.get("trainable", "all") == "head":
        # A linear probe: only the head is updated (and decayed); the frozen parameters get zero
        # updates and no optimizer state, and XLA drops the backward pass that only they need
        # (cifar_resnet20, batch 128, 2-core CPU: 0.048 s a step against 0.29 s for all;
        # python benchmarks/probe_step.py).
        return optax.multi_transform({"train": tx, "frozen": optax.set_to_zero()}, head_labels)
    return tx


def _optimizer(config, schedule: optax.Schedule) -> optax.GradientTransformation:
    mask = lambda params: decay_mask(params, config.decay_bn_and_bias)  # noqa: E731
    if config.optimizer == "sgd":
        # L2 added to the gradient before momentum, as in the papers (PyTorch's SGD weight_decay).
        return optax.chain(
            optax.add_decayed_weights(config.weight_decay, mask=mask),
            optax.sgd(schedule, momentum=config.momentum, nesterov=config.nesterov),
        )
    if config.optimizer == "lars":
        # LARS (You et al. 2017) for very large batches; BN/bias are excluded from the trust ratio.
        # optax.lars's chain (its defaults: trust_coefficient 0.001, eps 0) with the trust ratio
        # taken per block of a stacked leaf rather than over the whole stage.
        return optax.chain(
            optax.add_decayed_weights(config.weight_decay, mask=mask),
            optax.masked(
                blockwise(optax.scale_by_trust_ratio(trust_coefficient=0.001, eps=0.0)),
                mask=lambda p: decay_mask(p, False),
            ),
            optax.scale_by_learning_rate(schedule),
            optax.trace(decay=config.momentum, nesterov=config.nesterov),
        )
    raise UserError(f"optimizer={config.optimizer!r}; valid: 'sgd', 'lars'")
