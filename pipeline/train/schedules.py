"""Learning-rate and loss schedules as pure functions of the optimizer step."""

from __future__ import annotations

import math

from pipeline.train.config import LossScheduleConfig, OptimizerConfig


def lr_multiplier(step: int, optim: OptimizerConfig, num_steps: int) -> float:
    """Warm-up then decay, as a multiple of optim.lr; a pure function of the optimizer step."""
    if optim.warmup_steps and step < optim.warmup_steps:
        return (step + 1) / optim.warmup_steps
    if optim.decay == "constant":
        return 1.0
    span = max(1, num_steps - optim.warmup_steps)
    progress = min(1.0, (step - optim.warmup_steps) / span)
    floor = optim.min_lr_ratio
    if optim.decay == "linear":
        return floor + (1 - floor) * (1 - progress)
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))


def discriminator_active(step: int, schedule: LossScheduleConfig) -> bool:
    return step >= schedule.discriminator_start_step


def adversarial_ramp(step: int, schedule: LossScheduleConfig) -> float:
    """0 before the discriminator starts, then a linear ramp to 1 over the warm-up."""
    if not discriminator_active(step, schedule):
        return 0.0
    if schedule.adversarial_warmup_steps == 0:
        return 1.0
    done = step - schedule.discriminator_start_step + 1
    return min(1.0, done / schedule.adversarial_warmup_steps)


def gradient_penalty_now(step: int, schedule: LossScheduleConfig) -> tuple[bool, float]:
    """(apply it this step, its scale): lazy regularisation every N steps, scaled by N so the
    penalty's average strength does not depend on N."""
    every = schedule.gradient_penalty_every
    apply = discriminator_active(step, schedule) and (
        (step - schedule.discriminator_start_step) % every == 0
    )
    return apply, float(every)


def anneal_factor(step: int, start_factor: float, schedule: LossScheduleConfig) -> float:
    """A loss-weight multiplier: `start_factor` at step 0, then linearly (or along half a
    cosine) to 1 at `quantizer_anneal_steps`, and 1 after."""
    steps = schedule.quantizer_anneal_steps
    if steps == 0 or step >= steps:
        return 1.0
    progress = step / steps
    if schedule.quantizer_anneal_shape == "cosine":
        progress = 0.5 * (1 - math.cos(math.pi * progress))
    return start_factor + (1.0 - start_factor) * progress


def quantizer_weights(
    step: int, schedule: LossScheduleConfig, entropy_weight: float, commitment_weight: float
) -> tuple[float, float]:
    """(LFQ entropy weight, commitment weight) at `step`, from the model's base weights."""
    return (
        entropy_weight * anneal_factor(step, schedule.entropy_weight_start_factor, schedule),
        commitment_weight * anneal_factor(step, schedule.commitment_weight_start_factor, schedule),
    )
