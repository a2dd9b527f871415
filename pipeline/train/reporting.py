"""What the trainer reports: window means to TensorBoard and the log, and evaluations of the EMA
model (the fixed training batch, and the held-out shards through pipeline.inference.evaluate).
"""

from __future__ import annotations

import logging
from dataclasses import replace
from typing import TYPE_CHECKING

import torch

from model import VideoTokenizer
from pipeline.distributed.collectives import all_reduce_max, all_reduce_mean, all_reduce_sum
from pipeline.inference.eval_reports import SideBySideWriter, write_reports
from pipeline.inference.evaluate import evaluate
from pipeline.inference.precision import inference_precision, resolve_precision
from pipeline.inference.quality import psnr_per_clip, to_unit_range
from pipeline.train import engines as ds
from pipeline.train.metrics import memory_bytes

if TYPE_CHECKING:
    from pipeline.train.trainer import Trainer

logger = logging.getLogger(__name__)


def log(trainer: Trainer, window: dict[str, list[float]]) -> None:
    """Window means, averaged across ranks (a collective), to TensorBoard on rank 0."""
    nonfinite = torch.tensor(window.pop("health/nonfinite_losses"), dtype=torch.float64)
    keys = sorted(window)
    local = torch.tensor([sum(window[k]) / len(window[k]) for k in keys], dtype=torch.float64)
    # Host tensors: pipeline.distributed.collectives moves them to the backend's device (NCCL:
    # CUDA).
    all_reduce_mean(local)
    all_reduce_max(nonfinite)
    values = dict(zip(keys, local.tolist(), strict=True))
    trainer.counters["nonfinite_losses"] += int((nonfinite > 0).sum())  # steps, on any rank
    values.update(_run_scalars(trainer))
    health = trainer.health.update(trainer.step, values)
    values.update(health.scalars)
    trainer.tensorboard.scalars(values, trainer.step)
    if trainer.world.rank == 0:
        for event in health.events:
            logger.warning(event.message())
        logger.info(
            "step %d: %s",
            trainer.step,
            ", ".join(
                f"{k}={v:.4g}" for k, v in values.items() if k.startswith("loss/") and v is not None
            ),
        )


def _run_scalars(trainer: Trainer) -> dict[str, float]:
    """Learning rates, gradient norms, codebook usage (at its window), memory, the run's health
    totals and the loader's counters."""
    config, engines = trainer.config, trainer.engines
    values = {
        "lr/generator": float(engines.generator.get_lr()[0]),
        "grad_norm/generator": ds.global_grad_norm(engines.generator),
    }
    if engines.discriminator is not None:
        values["lr/discriminator"] = float(engines.discriminator.get_lr()[0])
        values["grad_norm/discriminator"] = ds.global_grad_norm(engines.discriminator)
    if trainer.step % config.codebook_stats_window == 0 or trainer.step == config.num_steps:
        values.update(trainer.codebook.read_and_reset())
    values["perf/memory_gib"] = memory_bytes(trainer.device) / 2**30
    values["health/nonfinite_losses_total"] = float(trainer.counters["nonfinite_losses"])
    values["health/skipped_updates_total"] = float(
        sum(ds.skipped_steps(e) for e in (engines.generator, engines.discriminator) if e)
    )
    values.update({f"data/{k}": float(v) for k, v in trainer.loader.stats.items()})
    return values


def inference_model(trainer: Trainer) -> VideoTokenizer:
    """A fp32 copy of the generator with the EMA weights (or the current ones)."""
    config = replace(
        trainer.config.model,
        use_gan=False,
        perceptual_loss_weight=0.0,
        discriminator=None,
        gradient_checkpointing=False,
    )
    with torch.random.fork_rng(devices=[]):  # initialisation must not shift the run's RNG
        model = VideoTokenizer.from_config(config).to(trainer.device)
    tokenizer, ema = trainer.tokenizer, trainer.ema
    state = ema.state_dict_for(tokenizer) if ema else tokenizer.state_dict()
    model.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in state.items()})
    return model.eval()


@torch.no_grad()
def evaluate_run(trainer: Trainer) -> dict[str, float]:
    """The EMA model on the fixed training batch, and on the held-out shards through
    `pipeline.inference.evaluate` (PSNR, SSIM, LPIPS when available, codebook usage and
    perplexity; clips.csv, summary.json and a few real | reconstruction mp4s under
    OUTPUT_DIR/eval/)."""
    model = inference_model(trainer)
    values: dict[str, float] = {}
    if trainer.fixed_batch is not None:
        values["eval/psnr_fixed_batch"] = _fixed_batch_psnr(trainer, model)
    if trainer.eval_loader is not None:
        values.update(_evaluate_held_out(trainer, model))
    trainer.tensorboard.scalars(values, trainer.step)
    return values


def _fixed_batch_psnr(trainer: Trainer, model: VideoTokenizer) -> float:
    """PSNR on each rank's fixed training batch, averaged over ranks."""
    real = to_unit_range(trainer.fixed_batch)
    with inference_precision(trainer.device, resolve_precision("auto", trainer.device)):
        recon = to_unit_range(model(trainer.fixed_batch))
    fixed = torch.stack(
        (psnr_per_clip(real, recon).mean().double(), real.new_ones((), dtype=torch.float64))
    )
    all_reduce_sum(fixed)  # every rank has its own fixed batch
    return float(fixed[0] / fixed[1])


def _evaluate_held_out(trainer: Trainer, model: VideoTokenizer) -> dict[str, float]:
    """pipeline.inference.evaluate over `eval_data`; its reports under OUTPUT_DIR/eval/step_N/."""
    config = trainer.config
    folder = trainer.output_dir / "eval" / f"step_{trainer.step:08d}"
    writer = SideBySideWriter(folder / "videos", config.eval_videos)
    result = evaluate(
        model,
        trainer.eval_loader,
        trainer.world,
        trainer.device,
        max_batches=config.eval_batches,
        video_writer=writer if config.eval_videos else None,
        lpips_model=trainer.lpips.model,
        lpips_note=trainer.lpips.note,
        fvd_model=trainer.fvd.model,
        fvd_note=trainer.fvd.note,
        fid_model=trainer.fid.model,
        fid_note=trainer.fid.note,
    )
    if trainer.world.rank == 0:
        write_reports(result, folder, {"step": trainer.step})
    return result.scalars()
