"""Durations and the learning-rate schedule. Every duration is converted to steps here, once."""

from __future__ import annotations

import dataclasses
import math

import optax

from resnet_jax.errors import UserError


@dataclasses.dataclass(frozen=True)
class Durations:
    """A run's clock, in steps.

    Attributes:
      steps_per_epoch: optimizer steps per pass over the training split (rounded up).
      total_steps: length of the run.
      warmup_steps: steps of warmup at the start.
      eval_every_steps: evaluate whenever ``step % eval_every_steps == 0`` (and at the end).
      boundaries: step schedule boundaries (steps at which the lr is multiplied by the decay factor).
    """

    steps_per_epoch: int
    total_steps: int
    warmup_steps: int
    eval_every_steps: int
    boundaries: tuple[int, ...]

    @classmethod
    def from_config(cls, config, num_train: int) -> Durations:
        spe = max(1, math.ceil(num_train / config.batch_size))
        total = config.num_steps if config.num_steps > 0 else math.ceil(config.num_epochs * spe)
        if total <= 0:
            raise UserError("the run has no steps: set --config.num_steps or --config.num_epochs to a positive value")
        warmup = config.warmup_steps if config.warmup_steps >= 0 else round(config.warmup_epochs * spe)
        if config.lr_boundaries_steps is not None:
            boundaries = tuple(int(b) for b in config.lr_boundaries_steps)
        else:
            boundaries = tuple(round(e * spe) for e in config.lr_boundaries_epochs)
        return cls(
            steps_per_epoch=spe,
            total_steps=int(total),
            warmup_steps=int(warmup),
            eval_every_steps=max(1, round(config.eval_every_epochs * spe)),
            boundaries=boundaries,
        )

    def warnings(self, config) -> list[str]:
        """Schedules that cannot be what was meant: a warm-up as long as the run (the learning
        rate never reaches its peak), a step schedule none of whose boundaries falls in the run,
        boundaries inside the warm-up (ignored) or given twice (one decay)."""
        out = []
        if self.warmup_steps >= self.total_steps:
            out.append(
                f"the warm-up ({self.warmup_steps} steps) is not shorter than the run ({self.total_steps} steps): "
                "the learning rate never reaches its peak; shorten warmup_epochs or warmup_steps"
            )
        if config.lr_schedule == "step" and self.boundaries and min(self.boundaries) >= self.total_steps:
            out.append(
                f"no learning-rate boundary {list(self.boundaries)} falls within the run's {self.total_steps} steps: "
                "the learning rate never decays"
            )
        if config.lr_schedule == "step":
            inside = [b for b in self.boundaries if b <= self.warmup_steps]
            if inside and self.warmup_steps > 0:
                out.append(
                    f"the learning-rate boundaries {inside} fall within the {self.warmup_steps}-step warm-up "
                    "and are ignored: the decay starts after it"
                )
            twice = sorted({b for b in self.boundaries if self.boundaries.count(b) > 1})
            if twice:
                out.append(f"the learning-rate boundaries {twice} are given twice: the rate decays once at each")
        return out


def is_time(step: int, every: int, total_steps: int | None = None) -> bool:
    """True when ``step`` (1-based count of finished steps) is a multiple of ``every`` or the last."""
    return (every > 0 and step % every == 0) or (total_steps is not None and step == total_steps)


def peak_learning_rate(config) -> float:
    """The configured lr is for batch 256 and scales linearly with the global batch (Goyal et al.)."""
    return config.learning_rate * (config.batch_size / 256 if config.scale_lr else 1.0)


def learning_rate_schedule(config, durations: Durations) -> optax.Schedule:
    """Warmup ('linear' from 0, or 'constant' at ``warmup_lr_factor`` x lr as paper 1 did for
    ResNet-110), then 'step' (multiply by ``lr_decay_factor`` at each boundary) or 'cosine'."""
    lr = peak_learning_rate(config)
    w = durations.warmup_steps
    if config.lr_schedule == "step":
        main = optax.piecewise_constant_schedule(
            lr, {b - w: config.lr_decay_factor for b in durations.boundaries if b > w}
        )
    elif config.lr_schedule == "cosine":
        main = optax.cosine_decay_schedule(lr, max(1, durations.total_steps - w))
    else:
        raise UserError(f"lr_schedule={config.lr_schedule!r}; valid: 'step', 'cosine'")
    if w <= 0:
        return main
    if config.warmup_kind == "linear":
        warm = optax.linear_schedule(0.0, lr, w)
    elif config.warmup_kind == "constant":
        warm = optax.constant_schedule(lr * config.warmup_lr_factor)
    else:
        raise UserError(f"warmup_kind={config.warmup_kind!r}; valid: 'linear', 'constant'")
    return optax.join_schedules([warm, main], [w])
