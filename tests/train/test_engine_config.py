"""The DeepSpeed config dict `engine_config` derives from TrainConfig (no DeepSpeed process)."""

from __future__ import annotations

from dataclasses import replace

import pytest
from trainrun import CONFIG

from pipeline.train.config import OptimizerConfig, load_config
from pipeline.train.engines import engine_config


@pytest.fixture(scope="module")
def base():
    return load_config(CONFIG)


def fp16_ready(config):
    """fp16 needs the GAN and the perceptual loss off (TrainConfig refuses it otherwise)."""
    model = replace(config.model, use_gan=False, perceptual_loss_weight=0.0)
    return replace(config, model=model, precision="fp16")


def test_batch_sizes_and_accumulation_follow_the_config(base):
    config = replace(base, micro_batch_size=3, gradient_accumulation_steps=5)
    ds = engine_config(config, config.generator_optim, 2, world_size=8)
    assert ds["train_micro_batch_size_per_gpu"] == 3
    assert ds["gradient_accumulation_steps"] == 5
    assert ds["train_batch_size"] == 3 * 5 * 8


def test_gradient_clipping_is_always_explicit(base):
    for clip in (0.0, 0.5, 2.0):
        optim = OptimizerConfig(lr=1e-4, gradient_clipping=clip)
        assert engine_config(base, optim, 1, 1)["gradient_clipping"] == clip
    # each engine its own optimizer's clipping
    config = replace(
        base,
        generator_optim=OptimizerConfig(lr=1e-4, gradient_clipping=1.0),
        discriminator_optim=OptimizerConfig(lr=1e-4, gradient_clipping=0.25),
    )
    assert engine_config(config, config.generator_optim, 2, 1)["gradient_clipping"] == 1.0
    assert engine_config(config, config.discriminator_optim, 2, 1)["gradient_clipping"] == 0.25


@pytest.mark.parametrize("stage", [0, 1, 2])
def test_zero_stage(base, stage):
    zero = engine_config(base, base.generator_optim, stage, 2)["zero_optimization"]
    assert zero["stage"] == stage
    if stage == 0:
        assert zero == {"stage": 0}
    else:
        assert zero["contiguous_gradients"] is True
        assert zero["reduce_bucket_size"] == 5e7
        assert zero["allgather_bucket_size"] == 5e7
        assert zero["overlap_comm"] is False  # tiny_cpu runs on device: cpu


def test_bf16_with_fp32_reduction(base):
    config = replace(base, precision="bf16", fp32_gradient_reduction=True)
    ds = engine_config(config, config.generator_optim, 2, 1)
    assert ds["bf16"] == {"enabled": True, "check_grad_overflow": True}
    assert ds["communication_data_type"] == "fp32"
    assert ds["data_types"] == {"grad_accum_dtype": "fp32"}
    assert "fp16" not in ds


def test_bf16_with_bf16_reduction(base):
    config = replace(base, precision="bf16", fp32_gradient_reduction=False)
    ds = engine_config(config, config.generator_optim, 2, 1)
    assert ds["bf16"]["enabled"] is True
    assert "communication_data_type" not in ds and "data_types" not in ds


def test_fp16_uses_dynamic_loss_scaling(base):
    config = fp16_ready(base)
    ds = engine_config(config, config.generator_optim, 2, 1)
    assert ds["fp16"] == {
        "enabled": True,
        "loss_scale": 0,  # 0: dynamic
        "initial_scale_power": 16,
        "loss_scale_window": 1000,
        "hysteresis": 2,
        "min_loss_scale": 1,
    }
    assert "bf16" not in ds


def test_fp32_enables_neither_half_precision(base):
    config = replace(base, precision="fp32")
    ds = engine_config(config, config.generator_optim, 1, 4)
    assert "bf16" not in ds and "fp16" not in ds and "communication_data_type" not in ds
    assert (
        ds["train_batch_size"] == config.micro_batch_size * config.gradient_accumulation_steps * 4
    )


def test_our_logging_replaces_deepspeeds(base):
    ds = engine_config(base, base.generator_optim, 2, 1)
    assert ds["steps_per_print"] >= 10**9
    assert ds["wall_clock_breakdown"] is False
