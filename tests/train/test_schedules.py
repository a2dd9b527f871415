"""The learning-rate multiplier and the loss-weight schedules, as numbers at chosen steps."""

from __future__ import annotations

import math

import pytest

from pipeline.train.config import LossScheduleConfig, OptimizerConfig
from pipeline.train.schedules import (
    adversarial_ramp,
    anneal_factor,
    gradient_penalty_now,
    lr_multiplier,
    quantizer_weights,
)


def optim(**kw) -> OptimizerConfig:
    return OptimizerConfig(lr=1e-3, **kw)


def test_lr_warmup_is_linear_from_one_step_to_full():
    o = optim(warmup_steps=4, decay="constant")
    assert [lr_multiplier(s, o, 100) for s in range(6)] == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]


def test_lr_without_warmup_starts_at_full():
    assert lr_multiplier(0, optim(decay="constant"), 10) == 1.0
    assert lr_multiplier(0, optim(decay="cosine", min_lr_ratio=0.2), 10) == 1.0
    assert lr_multiplier(0, optim(decay="linear", min_lr_ratio=0.2), 10) == 1.0


def test_lr_linear_decay_to_the_floor():
    o = optim(warmup_steps=10, decay="linear", min_lr_ratio=0.1)
    # 90 steps of decay after the warm-up: progress (step - 10) / 90
    assert lr_multiplier(10, o, 100) == pytest.approx(1.0)
    assert lr_multiplier(55, o, 100) == pytest.approx(0.1 + 0.9 * 0.5)
    assert lr_multiplier(100, o, 100) == pytest.approx(0.1)
    assert lr_multiplier(500, o, 100) == pytest.approx(0.1)  # past the end: the floor


def test_lr_cosine_decay_to_the_floor():
    o = optim(warmup_steps=0, decay="cosine", min_lr_ratio=0.0)
    assert lr_multiplier(25, o, 100) == pytest.approx(0.5 * (1 + math.cos(math.pi / 4)))
    assert lr_multiplier(50, o, 100) == pytest.approx(0.5)
    assert lr_multiplier(100, o, 100) == pytest.approx(0.0, abs=1e-12)
    floored = optim(decay="cosine", min_lr_ratio=0.25)
    assert lr_multiplier(50, floored, 100) == pytest.approx(0.25 + 0.75 * 0.5)
    assert lr_multiplier(100, floored, 100) == pytest.approx(0.25)


def test_lr_decay_is_monotone_after_warmup():
    for decay in ("linear", "cosine"):
        o = optim(warmup_steps=5, decay=decay, min_lr_ratio=0.1)
        values = [lr_multiplier(s, o, 60) for s in range(5, 70)]
        assert all(a >= b for a, b in zip(values, values[1:], strict=False)), decay
        assert values[0] == pytest.approx(1.0) and values[-1] == pytest.approx(0.1)


def test_lr_warmup_longer_than_the_run_does_not_divide_by_zero():
    o = optim(warmup_steps=10, decay="linear", min_lr_ratio=0.5)
    assert lr_multiplier(9, o, 10) == 1.0
    assert lr_multiplier(10, o, 10) == 1.0  # the decay's span clamps to one step
    assert lr_multiplier(11, o, 10) == pytest.approx(0.5)


@pytest.mark.parametrize(
    "kw, message",
    [
        ({"decay": "step"}, "decay must be one of"),
        ({"min_lr_ratio": 1.5}, "min_lr_ratio must be in"),
        ({"min_lr_ratio": -0.1}, "min_lr_ratio must be in"),
        ({"warmup_steps": -1}, "warmup_steps must be >= 0"),
        ({"lr": 0.0}, "lr must be positive"),
        ({"gradient_clipping": -1.0}, "gradient_clipping must be >= 0"),
    ],
)
def test_bad_optimizer_values_raise(kw, message):
    with pytest.raises(ValueError, match=message):
        OptimizerConfig(**{"lr": 1e-3, **kw})


def test_quantizer_anneal_linear_and_cosine():
    linear = LossScheduleConfig(entropy_weight_start_factor=3.0, quantizer_anneal_steps=100)
    assert anneal_factor(0, 3.0, linear) == 3.0
    assert anneal_factor(25, 3.0, linear) == pytest.approx(2.5)
    assert anneal_factor(50, 3.0, linear) == pytest.approx(2.0)
    assert anneal_factor(100, 3.0, linear) == 1.0
    assert anneal_factor(10**6, 3.0, linear) == 1.0
    cosine = LossScheduleConfig(
        entropy_weight_start_factor=3.0, quantizer_anneal_steps=100, quantizer_anneal_shape="cosine"
    )
    assert anneal_factor(0, 3.0, cosine) == 3.0
    assert anneal_factor(25, 3.0, cosine) == pytest.approx(3.0 - 2.0 * 0.5 * (1 - math.sqrt(0.5)))
    assert anneal_factor(50, 3.0, cosine) == pytest.approx(2.0)
    assert anneal_factor(100, 3.0, cosine) == 1.0


def test_quantizer_weights_anneal_each_from_its_own_factor():
    schedule = LossScheduleConfig(
        entropy_weight_start_factor=3.0,
        commitment_weight_start_factor=0.5,
        quantizer_anneal_steps=10,
    )
    assert quantizer_weights(0, schedule, 0.1, 0.25) == pytest.approx((0.3, 0.125))
    assert quantizer_weights(5, schedule, 0.1, 0.25) == pytest.approx((0.2, 0.1875))
    assert quantizer_weights(10, schedule, 0.1, 0.25) == pytest.approx((0.1, 0.25))
    assert quantizer_weights(3, LossScheduleConfig(), 0.1, 0.25) == (0.1, 0.25)


def test_adversarial_ramp_and_lazy_gradient_penalty():
    schedule = LossScheduleConfig(
        discriminator_start_step=10, adversarial_warmup_steps=4, gradient_penalty_every=3
    )
    ramp = [adversarial_ramp(s, schedule) for s in (0, 9, 10, 11, 12, 13, 14, 50)]
    assert ramp == [0.0, 0.0, 0.25, 0.5, 0.75, 1.0, 1.0, 1.0]
    assert adversarial_ramp(10, LossScheduleConfig(discriminator_start_step=10)) == 1.0
    applied = [s for s in range(20) if gradient_penalty_now(s, schedule)[0]]
    assert applied == [10, 13, 16, 19]
    assert gradient_penalty_now(13, schedule)[1] == 3.0


@pytest.mark.parametrize(
    "kw, message",
    [
        ({"quantizer_anneal_shape": "exp"}, "quantizer_anneal_shape must be one of"),
        ({"entropy_weight_start_factor": 2.0}, "need quantizer_anneal_steps > 0"),
        ({"commitment_weight_start_factor": 0.0}, "must be a positive number"),
        ({"quantizer_anneal_steps": -1}, "quantizer_anneal_steps must be >= 0"),
        ({"gradient_penalty_every": 0}, "gradient_penalty_every must be >= 1"),
        ({"discriminator_start_step": -1}, "must be >= 0"),
    ],
)
def test_bad_loss_schedule_values_raise(kw, message):
    with pytest.raises(ValueError, match=message):
        LossScheduleConfig(**kw)
