"""Durations in steps and the learning-rate schedules: warm-up kinds, step boundaries, cosine, the
linear batch scaling, and the warnings for schedules that cannot be what was meant."""

from __future__ import annotations

import pytest

from resnet_jax.config import get_base_config
from resnet_jax.errors import UserError
from resnet_jax.schedules import Durations, learning_rate_schedule, peak_learning_rate


def config(**overrides):
    c = get_base_config()
    c.update(overrides)
    return c


def test_epochs_become_steps_once():
    """1000 images at batch 128: 8 steps per epoch (rounded up); every epoch duration scales by it."""
    c = config(
        batch_size=128, num_epochs=10.0, warmup_epochs=1.5, lr_boundaries_epochs=(5.0, 7.5), eval_every_epochs=2.0
    )
    d = Durations.from_config(c, num_train=1000)
    assert (d.steps_per_epoch, d.total_steps, d.warmup_steps, d.eval_every_steps) == (8, 80, 12, 16)
    assert d.boundaries == (40, 60)
    # Counts in steps win over epochs.
    c.update({"num_steps": 33, "warmup_steps": 0, "lr_boundaries_steps": (10, 20)})
    d = Durations.from_config(c, num_train=1000)
    assert (d.total_steps, d.warmup_steps, d.boundaries) == (33, 0, (10, 20))
    with pytest.raises(UserError, match="the run has no steps"):
        Durations.from_config(config(num_epochs=0.0), num_train=1000)


def test_linear_warmup_then_step_decay_at_the_boundaries():
    c = config(batch_size=512, learning_rate=0.1, num_steps=100, lr_boundaries_steps=(50, 80), warmup_steps=10)
    assert peak_learning_rate(c) == pytest.approx(0.2)  # 0.1 per 256 images
    lr = learning_rate_schedule(c, Durations.from_config(c, num_train=10_000))
    assert [float(lr(s)) for s in (0, 5, 10)] == pytest.approx([0.0, 0.1, 0.2])
    # The boundaries are the run's own steps, not counted from the end of the warm-up.
    assert [float(lr(s)) for s in (49, 50, 79, 80, 99)] == pytest.approx([0.2, 0.02, 0.02, 0.002, 0.002])


def test_constant_warmup_is_paper_1s_resnet110_recipe():
    """0.1 x lr until the warm-up ends, then the full rate (paper 1: 0.01 until 400 iterations)."""
    c = config(batch_size=128, learning_rate=0.2, num_steps=1000, lr_boundaries_steps=(500,), warmup_steps=400)
    c.warmup_kind = "constant"
    lr = learning_rate_schedule(c, Durations.from_config(c, num_train=50_000))
    assert [float(lr(s)) for s in (0, 399, 400, 499, 500)] == pytest.approx([0.01, 0.01, 0.1, 0.1, 0.01])


def test_cosine_decays_to_zero_at_the_end():
    c = config(batch_size=256, learning_rate=0.4, num_steps=110, warmup_steps=10, lr_schedule="cosine")
    lr = learning_rate_schedule(c, Durations.from_config(c, num_train=10_000))
    assert float(lr(10)) == pytest.approx(0.4)
    assert float(lr(60)) == pytest.approx(0.2)  # half way through the cosine
    assert float(lr(110)) == pytest.approx(0.0, abs=1e-9)


@pytest.mark.parametrize(
    "overrides, needles",
    [
        (dict(num_steps=10, warmup_steps=10, lr_schedule="cosine"), ["warm-up (10 steps) is not shorter than the run"]),
        (
            dict(num_steps=10, warmup_steps=20, lr_boundaries_steps=(30,)),
            ["warm-up (20 steps)", "no learning-rate boundary [30]"],
        ),
        (
            dict(num_steps=10, lr_boundaries_steps=(30, 60)),
            ["no learning-rate boundary [30, 60] falls within the run's 10"],
        ),
        (
            dict(num_steps=1000, warmup_steps=400, lr_boundaries_steps=(300, 600, 600)),
            ["boundaries [300] fall within the 400-step warm-up", "boundaries [600] are given twice"],
        ),
        (dict(num_steps=100, warmup_steps=5, lr_boundaries_steps=(50,)), []),
        (dict(num_steps=10, lr_schedule="cosine", lr_boundaries_steps=(30,)), []),  # cosine has no boundaries
    ],
)
def test_schedules_that_cannot_be_meant_are_warned_of(overrides, needles):
    """One warning per problem, in this order (the needle is a part of each)."""
    c = config(**overrides)
    warnings = Durations.from_config(c, num_train=1000).warnings(c)
    assert len(warnings) == len(needles)
    for warning, needle in zip(warnings, needles, strict=True):
        assert needle in warning


def test_epoch_boundaries_round_to_the_nearest_step():
    """An epoch boundary, warm-up or eval interval that falls between steps goes to the nearest
    step (0.9 and 1.9 epochs of 3 steps: steps 3 and 6), not always down (2 and 5)."""
    c = get_base_config()
    c.batch_size, c.num_epochs, c.lr_schedule = 10, 4.0, "step"
    c.lr_boundaries_epochs, c.warmup_epochs, c.eval_every_epochs = (0.9, 1.9), 0.3, 0.9
    d = Durations.from_config(c, num_train=30)
    assert d.steps_per_epoch == 3 and d.boundaries == (3, 6)
    assert (d.warmup_steps, d.eval_every_steps) == (1, 3)
