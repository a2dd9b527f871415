"""The trainer with every speed switch on (channels-last 3-D and 2-D convolutions, compiled
blocks) and activation checkpointing trains as it does without them: DeepSpeed engines, the
gradient penalty (run eagerly) and the adaptive loss included."""

import pytest
from trainrun import base_overrides, explain, finished, metrics, single_process

pytestmark = [pytest.mark.distributed, pytest.mark.slow]

SWITCHES = {
    "speed.channels_last_3d": "true",
    "speed.channels_last": "true",
    "speed.compile": "blocks",
    "activation_checkpointing": "true",
}


def test_training_with_every_switch_on_matches_training_without(tmp_path, video_shards):
    runs = {}
    for name, extra in (("plain", {}), ("switched", SWITCHES)):
        overrides = base_overrides(
            tmp_path / name,
            video_shards,
            num_steps=3,
            checkpoint_every=3,
            deterministic="true",  # the same data order in both runs
            **{
                # fewer distinct blocks to compile
                "model.layers": "[residual,compress_space,compress_time]",
                "losses.discriminator_start_step": 0,
                "losses.adversarial_warmup_steps": 0,
                "losses.gradient_penalty_every": 2,
                "data.num_workers": 0,
                **extra,
            },
        )
        result = single_process(overrides)
        assert finished(result), explain(result)
        runs[name] = metrics(tmp_path / name)
    plain, switched = runs["plain"], runs["switched"]
    assert plain[1]["loss/gradient_penalty"] > 0  # a penalty step
    for step in (1, 2, 3):
        for key in ("loss/recon", "loss/discriminator_total", "loss/quantizer_aux"):
            a, b = plain[step][key], switched[step][key]
            # the same first step to rounding; the updates then differ by rounding only
            tolerance = 1e-5 if step == 1 else 1e-3
            assert abs(a - b) <= tolerance * max(abs(a), 1e-3), (step, key, a, b)
