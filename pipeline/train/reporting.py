"""What the trainer reports: window means to the run log
(TensorBoard / wandb) and the log, and evaluations of the EMA
model (the fixed training batch, and the held-out shards through pipeline.inference.evaluate).
"""

from __future__ import annotations

import logging
from dataclasses import replace

import torch

from model import VideoTokenizer
from pipeline.distributed.collectives import all_reduce_max, all_reduce_mean, all_reduce_sum
from pipeline.inference.eval_reports import SideBySideWriter, write_reports
from pipeline.inference.evaluate import evaluate
from pipeline.inference.precision import inference_precision, resolve_precision
from pipeline.inference.quality import psnr_per_clip, to_unit_range
from pipeline.train import engines as ds
from pipeline.train.metrics import memory_bytes

logger = logging.getLogger(__name__)


class Reporting:
    """The `Trainer`'s reporting methods (a mixin: they read the trainer's step, config, world,
    engines, counters, run log, loaders and metric networks)."""

    def log(self, window: dict[str, list[float]]) -> None:
        """Window means, averaged across ranks (a collective), to the run log on rank 0."""
        nonfinite = torch.tensor(window.pop("health/nonfinite_losses"), dtype=torch.float64)
        keys = sorted(window)
        local = torch.tensor([sum(window[k]) / len(window[k]) for k in keys], dtype=torch.float64)
        # Host tensors: pipeline.distributed.collectives moves them to the backend's device (NCCL:
        # CUDA).
        all_reduce_mean(local)
        all_reduce_max(nonfinite)
        values = dict(zip(keys, local.tolist(), strict=True))
        self.counters["nonfinite_losses"] += int((nonfinite > 0).sum())  # steps, on any rank
        values.update(self._run_scalars())
        health = self.health.update(self.step, values)
        values.update(health.scalars)
        self.run_log.scalars(values, self.step)
        if self.world.rank == 0:
            for event in health.events:
                logger.warning(event.message())
            logger.info(
                "step %d: %s",
                self.step,
                ", ".join(
                    f"{k}={v:.4g}"
                    for k, v in values.items()
                    if k.startswith("loss/") and v is not None
                ),
            )

    def _run_scalars(self) -> dict[str, float]:
        """Learning rates, gradient norms, codebook usage (at its window), memory, the run's health
        totals and the loader's counters."""
        config, engines = self.config, self.engines
        values = {
            "lr/generator": float(engines.generator.get_lr()[0]),
            "grad_norm/generator": ds.global_grad_norm(engines.generator),
        }
        if engines.discriminator is not None:
            values["lr/discriminator"] = float(engines.discriminator.get_lr()[0])
            values["grad_norm/discriminator"] = ds.global_grad_norm(engines.discriminator)
        if self.step % config.codebook_stats_window == 0 or self.step == config.num_steps:
            values.update(self.codebook.read_and_reset())
        values["perf/memory_gib"] = memory_bytes(self.device) / 2**30
        values["health/nonfinite_losses_total"] = float(self.counters["nonfinite_losses"])
        values["health/skipped_updates_total"] = float(
            sum(ds.skipped_steps(e) for e in (engines.generator, engines.discriminator) if e)
        )
        values.update({f"data/{k}": float(v) for k, v in self.loader.stats.items()})
        return values

    def inference_model(self) -> VideoTokenizer:
        """A fp32 copy of the generator with the EMA weights (or the current ones)."""
        config = replace(
            self.config.model,
            use_gan=False,
            perceptual_loss_weight=0.0,
            discriminator=None,
            gradient_checkpointing=False,
        )
        with torch.random.fork_rng(devices=[]):  # initialisation must not shift the run's RNG
            model = VideoTokenizer.from_config(config).to(self.device)
        tokenizer, ema = self.tokenizer, self.ema
        state = ema.state_dict_for(tokenizer) if ema else tokenizer.state_dict()
        model.load_state_dict(
            {k: v.float() if v.is_floating_point() else v for k, v in state.items()}
        )
        return model.eval()

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """The EMA model on the fixed training batch, and on the held-out shards through
        `pipeline.inference.evaluate` (PSNR, SSIM, LPIPS when available, codebook usage and
        perplexity; clips.csv, summary.json and a few real | reconstruction mp4s under
        OUTPUT_DIR/eval/)."""
        model = self.inference_model()
        values: dict[str, float] = {}
        if self.fixed_batch is not None:
            values["eval/psnr_fixed_batch"] = self._fixed_batch_psnr(model)
        if self.eval_loader is not None:
            values.update(self._evaluate_held_out(model))
        self.run_log.scalars(values, self.step)
        return values

    def _fixed_batch_psnr(self, model: VideoTokenizer) -> float:
        """PSNR on each rank's fixed training batch, averaged over ranks."""
        real = to_unit_range(self.fixed_batch)
        with inference_precision(self.device, resolve_precision("auto", self.device)):
            recon = to_unit_range(model(self.fixed_batch))
        fixed = torch.stack(
            (psnr_per_clip(real, recon).mean().double(), real.new_ones((), dtype=torch.float64))
        )
        all_reduce_sum(fixed)  # every rank has its own fixed batch
        return float(fixed[0] / fixed[1])

    def _evaluate_held_out(self, model: VideoTokenizer) -> dict[str, float]:
        """pipeline.inference.evaluate over `eval_data`; reports under OUTPUT_DIR/eval/step_N/."""
        config = self.config
        folder = self.output_dir / "eval" / f"step_{self.step:08d}"
        writer = SideBySideWriter(folder / "videos", config.eval_videos)
        result = evaluate(
            model,
            self.eval_loader,
            self.world,
            self.device,
            max_batches=config.eval_batches,
            video_writer=writer if config.eval_videos else None,
            lpips_model=self.lpips.model,
            lpips_note=self.lpips.note,
            fvd_model=self.fvd.model,
            fvd_note=self.fvd.note,
            fid_model=self.fid.model,
            fid_note=self.fid.note,
        )
        if self.world.rank == 0:
            write_reports(result, folder, {"step": self.step})
        return result.scalars()
