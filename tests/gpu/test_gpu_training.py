"""Training on the GPU: real DeepSpeed with two engines in bf16 over NCCL, in a world of one that
takes every multi-rank code path (forced_collectives.py), and a resume that matches an
uninterrupted run to a stated tolerance (CUDA kernels are not bit-deterministic).

One 4-step run serves both training tests: the tiny CPU config with the discriminator, the
gradient penalty (steps 0 and 2) and the adaptive adversarial weight (perceptual loss on, VGG16
with random weights) active from step 0, `Trainer.log` and the codebook statistics at every
step, evaluation on held-out shards and real | reconstruction clips every 2 steps, checkpoints
at steps 2 and 4.
"""

from __future__ import annotations

import math
import shutil
from pathlib import Path

import pytest
import torch
from gpurun import (
    collectives_selftest,
    pipeline_collectives,
    read_report,
    train_on_gpu,
)
from trainrun import base_overrides, checkpoints, engine_weights, explain, finished, metrics

STEPS = 4
LOSS_RTOL, LOSS_ATOL = 2e-2, 1e-3
"""Resumed vs uninterrupted losses: |a - b| <= rtol * |a| + atol (bf16, nondeterministic
kernels; the absolute part for totals near 0, where the adversarial term is negative)."""
WEIGHT_RATIO = 0.25
"""Resumed vs uninterrupted weights after the resume: their distance at most this share of how
far the uninterrupted run moved them since the checkpoint (a lost optimizer state, learning-rate
schedule or data position moves them about as far as the steps themselves)."""
FINITE_AT_STEP_1 = (
    "loss/generator_total",
    "loss/recon",
    "loss/quantizer_aux",
    "loss/perceptual",
    "loss/adversarial_gen",
    "loss/adaptive_weight",
    "loss/discriminator_total",
    "loss/discriminator_hinge",
    "loss/gradient_penalty",
    "discriminator/logits_real",
    "discriminator/logits_fake",
    "codebook/usage",
    "codebook/perplexity",
    "grad_norm/generator",
    "grad_norm/discriminator",
    "perf/clips_per_s",
    "perf/memory_gib",
)


def run_overrides(output_dir: Path, shards: Path, vgg_weights: str) -> list[str]:
    return base_overrides(
        output_dir,
        shards,
        precision="bf16",
        num_steps=STEPS,
        checkpoint_every=2,
        codebook_stats_window=1,
        deterministic="true",
        ema_decay=0.9,
        video_log_every=2,
        eval_every=2,
        eval_batches=1,
        eval_videos=1,
        **{
            "data.steps_per_epoch": 2,  # epochs end at the checkpoint: a resume sees the same data
            "losses.discriminator_start_step": 0,
            "losses.adversarial_warmup_steps": 0,
            "losses.gradient_penalty_every": 2,
            "model.perceptual_loss_weight": 0.1,
            "model.vgg_weights": vgg_weights,
            "eval_data.video_shards": f"[{shards}]",
            "eval_data.num_workers": 0,
        },
    )


def _failed(result, report: dict) -> str:
    return explain(result) + "\n--- driver\n" + "\n".join(report.get("failures", []))[-4000:]


@pytest.fixture(scope="module")
def straight_run(tmp_path_factory, gpu_shards, vgg_weights):
    root = tmp_path_factory.mktemp("gpu_train")
    out = root / "straight"
    result = train_on_gpu(run_overrides(out, gpu_shards, vgg_weights), root / "report.json")
    return out, result, read_report(root / "report.json")


def test_pipeline_collectives_take_cpu_and_cuda_tensors_on_nccl(tmp_path):
    """pipeline.distributed.collectives's collectives, CodebookStats and CodeHistogram on a one-rank
    NCCL group: CPU and CUDA tensors, results back on the tensor's device with its dtype."""
    result = collectives_selftest(tmp_path / "report.json")
    report = read_report(tmp_path / "report.json")
    assert report, explain(result)
    assert report["backend"] == "nccl", report
    assert not report["failures"], "\n".join(report["failures"])
    assert result.returncode == 0, explain(result)


def test_bf16_two_engine_steps_on_nccl_log_finite_metrics(straight_run, record_property):
    out, result, report = straight_run
    assert result.returncode == 0 and finished(result), _failed(result, report)
    assert report["backend"] == "nccl", report
    ours = pipeline_collectives(report)
    record_property("pipeline_collectives", ours)
    # The trainer's log, the codebook statistics and the evaluation all reduce across ranks.
    assert any(k.startswith("pipeline.") for k in ours), (
        f"no pipeline collective ran ({report['calls']}): forcing is_distributed() did not reach "
        f"them (patched: {report['patched_modules']})"
    )
    on_host = {k: v for k, v in ours.items() if "cpu" in v}
    assert not on_host, f"host tensors reached NCCL collectives: {on_host}"
    rows = metrics(out)
    assert sorted(rows) == list(range(STEPS + 1)), sorted(rows)  # 0: the baseline evaluation
    first = rows[1]
    bad = {k: first.get(k) for k in FINITE_AT_STEP_1 if not math.isfinite(first.get(k, math.nan))}
    assert not bad, f"missing or not finite at step 1: {bad}"
    assert first["loss/perceptual"] > 0 and first["loss/adaptive_weight"] > 0, first
    assert 0 < first["codebook/usage"] <= 1 and first["codebook/perplexity"] >= 1, first
    assert all(rows[s]["health/skipped_updates"] == 0 for s in range(1, STEPS + 1)), rows
    assert rows[STEPS]["health/nonfinite_losses_total"] == 0
    for step in (2, STEPS):
        assert math.isfinite(rows[step]["eval/psnr"]) and rows[step]["eval/psnr"] > 0, rows[step]
        assert math.isfinite(rows[step]["eval/psnr_fixed_batch"]), rows[step]
    record_property("step_time_s", rows[STEPS]["perf/step_time_s"])
    record_property("memory_gib", rows[STEPS]["perf/memory_gib"])
    assert (out / "export" / "model.safetensors").is_file()


def _distance(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return math.sqrt(sum(float((a[k].double() - b[k].double()).pow(2).sum()) for k in a))


def test_resume_on_the_gpu_matches_the_uninterrupted_run(
    straight_run, tmp_path, gpu_shards, vgg_weights, record_property
):
    """The step-2 checkpoint of the straight run in a fresh output folder, the same command:
    steps 3 and 4 give the straight run's losses and weights, to the tolerances above."""
    straight, result, report = straight_run
    assert finished(result), _failed(result, report)
    saved = straight / "checkpoints" / "step_00000002"
    resumed = tmp_path / "resumed"
    shutil.copytree(saved, resumed / "checkpoints" / saved.name)
    result = train_on_gpu(run_overrides(resumed, gpu_shards, vgg_weights), tmp_path / "r.json")
    assert finished(result), _failed(result, read_report(tmp_path / "r.json"))
    assert "resumed from" in result.stdout + result.stderr

    a, b = metrics(straight), metrics(resumed)
    assert sorted(b) == [3, 4], sorted(b)
    worst = 0.0
    for step in (3, 4):
        for key in ("loss/generator_total", "loss/recon", "loss/discriminator_total"):
            difference = abs(a[step][key] - b[step][key])
            worst = max(worst, difference)
            bound = LOSS_RTOL * abs(a[step][key]) + LOSS_ATOL
            assert difference <= bound, (step, key, a[step][key], b[step][key])
    assert "loss/gradient_penalty" in b[3]  # the penalty step after the resume
    record_property("loss_max_abs_difference", worst)

    final_a, final_b = checkpoints(straight)[-1], checkpoints(resumed)[-1]
    assert final_a.name == final_b.name == "step_00000004"
    for tag in ("generator", "discriminator"):
        start, wa, wb = (engine_weights(c, tag) for c in (saved, final_a, final_b))
        ratio = _distance(wa, wb) / max(_distance(wa, start), 1e-12)
        record_property(f"{tag}_weights_distance_over_update", ratio)
        print(f"{tag}: |resumed - straight| / |straight step 4 - step 2| = {ratio:.4f}")
        assert ratio <= WEIGHT_RATIO, (tag, ratio)
