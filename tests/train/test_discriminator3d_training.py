"""The 3-D discriminator under the trainer: two DeepSpeed ranks, ZeRO 2 for the discriminator,
the gradient penalty's double backward every step."""

import math

import pytest
from trainrun import base_overrides, explain, finished, metrics
from trainrun import torchrun_launch as launch

pytestmark = pytest.mark.distributed


def test_the_3d_discriminator_trains_with_the_penalty_under_zero2(tmp_path, video_shards):
    overrides = base_overrides(
        tmp_path,
        video_shards,
        num_steps=3,
        checkpoint_every=3,
        discriminator_zero_stage=2,
        **{
            "model.discriminator_kind": "3d",
            "losses.discriminator_start_step": 0,
            "losses.gradient_penalty_every": 1,
        },
    )
    result = launch(overrides)
    assert finished(result), explain(result)
    rows = metrics(tmp_path)
    for step in (1, 2, 3):
        row = rows[step]
        assert math.isfinite(row["loss/discriminator_total"]) and row["health/skipped_updates"] == 0
        assert row["loss/gradient_penalty"] > 0 and math.isfinite(row["loss/gradient_penalty"])
        assert math.isfinite(row["grad_norm/discriminator"]) and row["grad_norm/discriminator"] > 0
