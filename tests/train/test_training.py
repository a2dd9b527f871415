"""The trainer, end to end: real DeepSpeed on 2 CPU ranks (gloo), real video shards."""

from __future__ import annotations

import json
import math

import pytest
import torch
from trainrun import (
    base_overrides,
    checkpoints,
    deepspeed_launch,
    deepspeed_no_python_launch,
    engine_weights,
    explain,
    finished,
    metrics,
    single_process,
    torchrun_launch,
)

from helpers import save_i3d

pytestmark = pytest.mark.distributed

SCALARS = {
    "loss/generator_total",
    "loss/recon",
    "loss/quantizer_aux",
    "loss/perceptual",
    "loss/adversarial_gen",
    "loss/adaptive_weight",
    "loss/discriminator_total",
    "loss/gradient_penalty",
    "discriminator/logits_real",
    "discriminator/logits_fake",
    "lr/generator",
    "lr/discriminator",
    "grad_norm/generator",
    "grad_norm/discriminator",
    "codebook/usage",
    "codebook/perplexity",
    "perf/clips_per_s",
    "perf/data_wait_share",
    "perf/memory_gib",
    "eval/psnr_fixed_batch",
    "eval/psnr",
    "eval/ssim",
    "eval/codebook_usage",
    "eval/perplexity",
    "health/skipped_updates",
}


def _same(a: dict, b: dict, atol: float = 0.0) -> bool:
    return a.keys() == b.keys() and all(
        torch.allclose(a[k].float(), b[k].float(), atol=atol) for k in a
    )


def test_two_ranks_under_the_deepspeed_launcher_survive_a_killed_rank(tmp_path, video_shards):
    """ZeRO-2 on 2 ranks. Rank 1 is SIGKILLed at step 4: the job stops (no hang); rerunning the
    same command resumes from the step-3 checkpoint and finishes, with finite losses, both
    engines' weights changed, TensorBoard scalars and video, checkpoint and export."""
    out = tmp_path / "run"
    overrides = base_overrides(
        out,
        video_shards,
        video_log_every=3,
        eval_every=3,
        eval_batches=1,
        eval_videos=1,
        codebook_stats_window=3,
        eval_i3d_weights=save_i3d(tmp_path / "i3d.pt"),  # a stand-in: rFVD runs, no real number
        **{"eval_data.video_shards": f"[{video_shards}]", "eval_data.num_workers": 1},
        **{"faults.kill_at_step": 4, "faults.on_rank": 1},
    )
    crashed = deepspeed_launch(overrides)
    assert crashed.returncode != 0 and not finished(crashed), explain(crashed)
    assert [c.name for c in checkpoints(out)] == ["step_00000003"]
    rerun = deepspeed_launch(overrides)
    assert rerun.returncode == 0 and finished(rerun), explain(rerun)
    assert "resumed from" in rerun.stdout + rerun.stderr

    rows = metrics(out)
    assert sorted(rows) == [0, 1, 2, 3, 4, 5, 6]  # step 0: the evaluation before training
    assert all(math.isfinite(rows[s]["loss/generator_total"]) for s in range(1, 7))
    assert all(math.isfinite(rows[s]["loss/discriminator_total"]) for s in range(2, 7))
    first, last = checkpoints(out)
    for tag in ("generator", "discriminator"):
        assert not _same(engine_weights(first, tag), engine_weights(last, tag)), tag

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(out / "tensorboard"))
    events.Reload()
    assert SCALARS <= set(events.Tags()["scalars"]), SCALARS - set(events.Tags()["scalars"])
    assert "reconstruction/real_vs_recon" in events.Tags()["images"]
    # The evaluation at step 6 (pipeline.inference.evaluate): the one shard is rank 0's,
    # eval_batches=1 batch of 2 clips; reports and a video.
    assert (out / "eval" / "step_00000000" / "summary.json").exists()  # the untrained baseline
    summary = json.loads((out / "eval" / "step_00000006" / "summary.json").read_text())
    assert summary["step"] == 6 and summary["num_clips"] == 2, summary
    assert summary["psnr"] > 0 and 0 < summary["codebook_usage"] <= 1, summary
    assert math.isfinite(summary["fvd"]) and summary["fvd"] >= 0, summary  # 2 clips: a warning
    assert "unavailable" in summary["fid_note"], summary  # no Inception weights here
    assert "eval/rfvd" in events.Tags()["scalars"]
    assert len((out / "eval" / "step_00000006" / "clips.csv").read_text().splitlines()) == 3
    assert len(list((out / "eval" / "step_00000006" / "videos").glob("*.mp4"))) == 1

    from model.pretrained import load_pretrained

    model = load_pretrained(out / "export")
    video = torch.rand(2, 3, 9, 32, 32) * 2 - 1
    codes = model.tokenize(video)
    assert codes.shape == (2, 3, 16, 16)
    # The export is the trained model: the final checkpoint's config with its EMA weights (what
    # the trainer evaluates) gives the same codes and reconstructions.
    trained = trained_ema_model(last)
    assert torch.equal(trained.tokenize(video), codes)
    assert torch.equal(trained.decode_codes(codes), model.decode_from_code_indices(codes))


def trained_ema_model(checkpoint):
    """The tokenizer of a training checkpoint, with the EMA weights, built from its config."""
    from model import Tokenizer
    from pipeline.train.config import load_config

    config = load_config(checkpoint / "config.yaml")
    model = Tokenizer.from_config(config.model)
    ema = torch.load(checkpoint / "ema.pt")
    state = {k: ema.get(k, v) for k, v in model.state_dict().items()}
    model.load_state_dict(state)
    return model.eval()


def test_resume_equals_an_uninterrupted_run(tmp_path, video_shards):
    """6 steps straight vs 3 steps, a crash, and a rerun: the same losses and weights."""
    common = {"deterministic": "true", "data.steps_per_epoch": 3, "ema_decay": 0.9}
    straight = tmp_path / "straight"
    result = torchrun_launch(base_overrides(straight, video_shards, **common))
    assert finished(result), explain(result)

    resumed = tmp_path / "resumed"
    overrides = base_overrides(resumed, video_shards, **common, **{"faults.kill_at_step": 3})
    crashed = torchrun_launch(overrides)
    assert not finished(crashed), explain(crashed)
    result = torchrun_launch(overrides)
    assert finished(result), explain(result)

    a, b = metrics(straight), metrics(resumed)
    for step in range(1, 7):
        for key in ("loss/generator_total", "loss/recon", "loss/discriminator_total"):
            if key in a[step]:
                assert abs(a[step][key] - b[step][key]) <= 1e-6, (step, key, a[step], b[step])
    final_a, final_b = checkpoints(straight)[-1], checkpoints(resumed)[-1]
    for tag in ("generator", "discriminator"):
        assert _same(engine_weights(final_a, tag), engine_weights(final_b, tag), atol=1e-6), tag
    ema_a = torch.load(final_a / "ema.pt")
    ema_b = torch.load(final_b / "ema.pt")
    assert _same(ema_a, ema_b, atol=1e-6)


def test_crash_during_save_keeps_the_previous_checkpoint_and_resumes_on_fewer_ranks(
    tmp_path, video_shards
):
    out = tmp_path / "run"
    overrides = base_overrides(
        out,
        video_shards,
        checkpoint_every=2,
        **{"faults.kill_during_save_at_step": 4, "faults.on_rank": 1},
    )
    crashed = torchrun_launch(overrides)
    assert not finished(crashed), explain(crashed)
    assert [c.name for c in checkpoints(out)] == ["step_00000002"]
    assert list((out / "checkpoints").glob(".partial-step_00000004"))
    # A node was lost: resume on one rank, through DeepSpeed's universal checkpoint.
    result = single_process(overrides)
    assert finished(result), explain(result)
    log = result.stdout + result.stderr
    assert "resumed from" in log and "step_00000002" in log, log[-3000:]
    assert "converted to DeepSpeed's universal checkpoint" in log and "start fresh" not in log
    assert [c.name for c in checkpoints(out)] == ["step_00000002", "step_00000004", "step_00000006"]
    assert not list((out / "checkpoints").glob(".partial-*"))


def test_a_nan_batch_is_skipped_on_every_rank(tmp_path, video_shards):
    """Launched as `deepspeed --no_python ... launch/train.sh` (the launcher starts the script
    once per rank)."""
    out = tmp_path / "run"
    overrides = base_overrides(
        out,
        video_shards,
        num_steps=3,
        checkpoint_every=1,
        **{"faults.nan_at_step": 2, "faults.on_rank": 1, "losses.discriminator_start_step": 0},
    )
    result = deepspeed_no_python_launch(overrides)
    assert finished(result), explain(result)
    rows = metrics(out)
    assert rows[3]["health/skipped_updates"] == 2  # generator and discriminator, all ranks
    assert rows[3]["health/nonfinite_losses_total"] == 1
    assert rows[2]["health/skipped_updates"] == 0
    before, after = checkpoints(out)[1:3]  # steps 2 and 3: the NaN step changed nothing
    for tag in ("generator", "discriminator"):
        assert _same(engine_weights(before, tag), engine_weights(after, tag)), tag
    assert math.isfinite(rows[1]["loss/generator_total"])


def test_two_simulated_nodes(tmp_path, video_shards):
    """Two launcher invocations, node ranks 0 and 1, on loopback (no ssh)."""
    import subprocess

    from trainrun import REPO, _env, free_port

    hosts = tmp_path / "hostfile"
    hosts.write_text("localhost slots=1\n127.0.0.1 slots=1\n")
    out = tmp_path / "run"
    port = str(free_port())
    overrides = base_overrides(out, video_shards, num_steps=3, checkpoint_every=3)
    procs = [
        subprocess.Popen(
            ["bash", "launch/train.sh", "--config", "launch/configs/tiny_cpu.yaml", *overrides],
            cwd=REPO,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=_env(
                HOSTFILE=str(hosts),
                NNODES="2",
                NODE_RANK=str(rank),
                MASTER_ADDR="127.0.0.1",
                MASTER_PORT=port,
            ),
        )
        for rank in (0, 1)
    ]
    outputs = [p.communicate(timeout=300) for p in procs]
    assert all(p.returncode == 0 for p in procs), outputs
    assert "training finished at step 3" in outputs[0][0]
    assert "resolved config (2 rank(s))" in outputs[0][0]
    assert [c.name for c in checkpoints(out)] == ["step_00000003"]


def test_image_stage_then_video_stage(tmp_path, video_shards, image_shards):
    """Pretrain on image shards (4-D batches), then start a video run from those weights."""
    images = tmp_path / "images"
    result = single_process(
        base_overrides(
            images,
            video_shards,
            num_steps=2,
            checkpoint_every=2,
            **{"data.image_shards": f"[{image_shards}]", "data.image_batch_ratio": 1.0},
        )
    )
    assert finished(result), explain(result)
    rows = metrics(images)
    assert math.isfinite(rows[2]["loss/generator_total"])
    assert rows[1]["data/image_batch_share"] == rows[2]["data/image_batch_share"] == 1.0
    videos = tmp_path / "videos"
    frozen_lr = {
        "generator_optim.lr": 1e-30,
        "discriminator_optim.lr": 1e-30,
        "generator_optim.warmup_steps": 0,
        "discriminator_optim.warmup_steps": 0,
    }
    result = single_process(
        base_overrides(
            videos, video_shards, num_steps=1, checkpoint_every=1, init_from=images, **frozen_lr
        )
    )
    assert finished(result), explain(result)
    start = checkpoints(images)[-1]
    for tag in ("generator", "discriminator"):
        assert _same(
            engine_weights(start, tag), engine_weights(checkpoints(videos)[-1], tag), atol=1e-6
        ), tag
