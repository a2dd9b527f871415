"""Resuming on another number of ranks keeps the optimizer: a ZeRO 2 checkpoint of both engines
written by 2 ranks restores on 1 rank (and one of 1 rank on 2) with the same fp32 master weights
and Adam moments, through DeepSpeed's universal checkpoint."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import pytest
import torch
from trainrun import (
    CONFIG,
    base_overrides,
    checkpoints,
    deepspeed_launch,
    explain,
    finished,
    free_port,
    metrics,
    run,
    single_process,
)

PROBE = Path(__file__).with_name("optimizer_probe.py")


def saved_full_states(engine_dir: Path) -> dict[str, dict[str, torch.Tensor]]:
    """Every parameter's state gathered from the ranks' ZeRO 1/2 partitions as saved (each
    rank's `param_slice_mappings` say where its fragment of a parameter lies), independently
    of DeepSpeed's converter."""
    files = sorted(engine_dir.glob("zero_pp_rank_*_mp_rank_00_optim_states.pt"))
    pieces: dict[str, dict[str, list[torch.Tensor]]] = {}
    for path in files:  # rank order: fragments concatenate in it
        state = torch.load(path, map_location="cpu", weights_only=False)["optimizer_state_dict"]
        for group, mapping in enumerate(state["param_slice_mappings"]):
            flat = {
                "fp32": state["single_partition_of_fp32_groups"][group],
                **{
                    key: state["base_optimizer_state"]["state"][group][key]
                    for key in ("exp_avg", "exp_avg_sq")
                },
            }
            for name, fragment in mapping.items():
                part = pieces.setdefault(name, {key: [] for key in flat})
                for key, values in flat.items():
                    part[key].append(values[fragment.start : fragment.start + fragment.numel])
    return {name: {k: torch.cat(v) for k, v in parts.items()} for name, parts in pieces.items()}


def probe(output: Path, overrides: list[str], ranks: int, tmp_path: Path) -> dict:
    out = tmp_path / f"probe_{ranks}.pt"
    command = [sys.executable, str(PROBE), str(out), "--config", str(CONFIG), *overrides]
    if ranks == 1:
        result = run(
            command,
            RANK="0",
            WORLD_SIZE="1",
            LOCAL_RANK="0",
            MASTER_ADDR="127.0.0.1",
            MASTER_PORT=str(free_port()),
        )
    else:
        launcher = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            f"--nproc_per_node={ranks}",
        ]
        result = run([*launcher, str(PROBE), str(out), "--config", str(CONFIG), *overrides])
    assert result.returncode == 0 and out.is_file(), explain(result)
    log = result.stdout + result.stderr
    assert "converted to DeepSpeed's universal checkpoint" in log, log[-4000:]
    assert "could not convert" not in log, log[-4000:]
    return torch.load(out, weights_only=False)


@pytest.mark.slow
@pytest.mark.parametrize("saved_ranks, resumed_ranks", [(2, 1), (1, 2)])
def test_another_world_size_restores_master_weights_and_moments(
    tmp_path, video_shards, saved_ranks, resumed_ranks
):
    output = tmp_path / "run"
    overrides = base_overrides(output, video_shards, num_steps=3, checkpoint_every=3)
    if saved_ranks == 2:
        result = deepspeed_launch(overrides)
    else:
        result = single_process(overrides)
    assert finished(result), explain(result)
    (checkpoint,) = [c for c in checkpoints(output) if c.name == "step_00000003"]
    restored = probe(output, overrides, resumed_ranks, tmp_path)
    assert restored["step"] == 3
    for tag in ("generator", "discriminator"):
        saved = saved_full_states(checkpoint / tag)
        model_states = torch.load(
            checkpoint / tag / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=False
        )
        assert restored[f"{tag}_global_steps"] == model_states["global_steps"] > 0
        assert set(restored[tag]) == set(saved), tag
        for name, states in restored[tag].items():
            for key, value in states.items():
                expected = saved[name][key].view_as(value)
                assert torch.equal(value, expected), (tag, name, key)
        moments = sum(float(s["exp_avg_sq"].abs().sum()) for s in restored[tag].values())
        assert moments > 0, tag  # trained moments, not a fresh optimizer
    assert (checkpoint / "universal" / "COMPLETE").is_file()  # kept next to the original


@pytest.mark.slow
def test_the_next_step_after_resharding_equals_the_continuation(tmp_path, one_clip_shards):
    """2 ranks save at step 2 and go on; 1 rank (twice the micro-batch: the same global batch of
    the same clip) resumes from that checkpoint. The loss of step 4 depends on step 3's Adam
    update, i.e. on the restored moments, master weights and schedule: the two agree."""
    common = {
        "num_steps": 4,
        "checkpoint_every": 2,
        "data.flip": "false",
        "losses.discriminator_start_step": 1000,  # the generator alone: no random frame choice
    }
    straight = tmp_path / "straight"
    result = deepspeed_launch(
        base_overrides(straight, one_clip_shards, micro_batch_size=1, **common)
    )
    assert finished(result), explain(result)
    resumed = tmp_path / "resumed"
    (resumed / "checkpoints").mkdir(parents=True)
    shutil.copytree(
        straight / "checkpoints" / "step_00000002", resumed / "checkpoints" / "step_00000002"
    )
    result = single_process(base_overrides(resumed, one_clip_shards, micro_batch_size=2, **common))
    assert finished(result), explain(result)
    assert "converted to DeepSpeed's universal checkpoint" in result.stdout + result.stderr
    a, b = metrics(straight), metrics(resumed)
    for step in (3, 4):
        assert b[step]["loss/generator_total"] == pytest.approx(
            a[step]["loss/generator_total"], rel=1e-4
        ), step
