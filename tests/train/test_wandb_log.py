"""The wandb run log: a 2-rank training run with `logger: both` and wandb offline writes an
offline run (its .wandb records hold the scalars, its media the clip) next to TensorBoard;
without wandb the config says so."""

from __future__ import annotations

import importlib.util

import pytest
from trainrun import base_overrides, explain, finished, torchrun_launch

pytestmark = pytest.mark.distributed


@pytest.mark.skipif(importlib.util.find_spec("wandb") is None, reason="needs the wandb extra")
def test_two_ranks_log_to_an_offline_wandb_run(tmp_path, video_shards):
    out = tmp_path / "run"
    overrides = base_overrides(
        out,
        video_shards,
        num_steps=2,
        checkpoint_every=2,
        video_log_every=2,
        export_on_finish="false",
        logger="both",
        wandb_mode="offline",
        wandb_project="tests",
    )
    result = torchrun_launch(overrides)
    assert finished(result), explain(result)
    (run,) = (out / "wandb").glob("offline-run-*")
    # wandb 0.31 writes no wandb-summary.json offline: the records (protobuf, keys as plain
    # strings) are in the run's .wandb file, which `wandb sync` uploads.
    (records,) = run.glob("*.wandb")
    data = records.read_bytes()
    for key in (b"loss/generator_total", b"loss/discriminator_total", b"lr/generator"):
        assert key in data, key
    assert list((run / "files" / "media" / "videos").rglob("real_vs_recon*.gif"))
    assert list((out / "tensorboard").glob("events.*"))
    assert (out / "wandb_run_id.txt").read_text().strip() in run.name


def test_selecting_wandb_without_it_is_a_config_error(monkeypatch):
    from pipeline.train import config_sections

    real = importlib.util.find_spec
    monkeypatch.setattr(
        config_sections.importlib.util,
        "find_spec",
        lambda name, *a: None if name == "wandb" else real(name, *a),
    )
    with pytest.raises(ValueError, match="needs the wandb package"):
        config_sections.check_logger("wandb", "offline")
    config_sections.check_logger("tensorboard", None)
    with pytest.raises(ValueError, match="logger must be one of"):
        config_sections.check_logger("mlflow", None)
