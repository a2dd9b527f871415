"""The training run: `train()` sequences it, `train_step()` does one optimizer step of the
generator and the discriminator.

One iteration per micro-batch: one tokenizer forward; the generator update (discriminator
frozen) on reconstruction + quantizer + perceptual + adaptive adversarial loss; the
discriminator update on the detached reconstruction of that same forward, with the lazy gradient
penalty. A non-finite loss or gradient makes DeepSpeed skip that engine's update on every rank
(its overflow check all-reduces the flag); the trainer counts it.
"""

from __future__ import annotations

import logging
import time
from collections import defaultdict
from dataclasses import replace
from pathlib import Path

import torch
from tqdm import tqdm

from model import Tokenizer, VideoTokenizer
from model.critics import build_discriminators, build_perceptual
from model.pretrained import save_pretrained
from pipeline import engines as ds
from pipeline import schedules
from pipeline.checkpointing import Checkpointer, latest_checkpoint, module_weights, set_rng_state
from pipeline.config import TrainConfig, dump_config
from pipeline.data import Batch, ShardLoader
from pipeline.distributed import (
    all_reduce_max,
    all_reduce_mean,
    all_reduce_sum,
    differentiable_mean,
    is_distributed,
)
from pipeline.ema import EMA
from pipeline.evaluate import SideBySideWriter, evaluate, write_reports
from pipeline.faults import Faults
from pipeline.health import HealthMonitor
from pipeline.inference import inference_precision, resolve_precision
from pipeline.metrics import CodebookStats, TensorBoard, memory_bytes
from pipeline.objectives import DiscriminatorObjective, GeneratorObjective, frozen_parameters
from pipeline.preemption import StopRequests
from pipeline.quality import load_lpips, psnr_per_clip, to_unit_range
from pipeline.video_features import load_i3d, load_inception
from pipeline.world import World

logger = logging.getLogger(__name__)


class Trainer:
    def __init__(
        self,
        config: TrainConfig,
        world: World,
        device: torch.device,
        stop: StopRequests | None = None,
    ) -> None:
        """`stop`: the stop requests (signals) of this process, installed by the caller before
        anything slow starts; None records none."""
        self.config, self.world, self.device = config, world, device
        self.stop = stop if stop is not None else StopRequests()
        self.stop.every_s = config.checkpoint_every_minutes * 60.0
        self.stopped = False
        """True when train() ended early on a stop request, after saving that step."""
        self.saved_step: int | None = None
        self.output_dir = Path(config.output_dir)
        self.dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(
            config.precision, torch.float32
        )
        if device.type == "cuda":
            # Training shapes are static: the algorithm search pays off after the first step.
            torch.backends.cudnn.benchmark = config.cudnn_benchmark and not config.deterministic
        torch.manual_seed(config.seed)  # the same initial weights on every rank
        model_config = replace(config.model, gradient_checkpointing=config.activation_checkpointing)
        tokenizer = Tokenizer.from_config(model_config)
        perceptual = build_perceptual(model_config)
        critics = build_discriminators(model_config)
        if perceptual is not None:
            perceptual.load()  # missing VGG weights: fail now, not at step 1
        if config.init_from:
            self._init_from(Path(config.init_from), tokenizer, critics)
        if is_distributed() and hasattr(tokenizer.quantizer, "batch_probs_reducer"):
            # LFQ's batch code distribution over all ranks, as the batch entropy is defined.
            tokenizer.quantizer.batch_probs_reducer = differentiable_mean
        tokenizer.to(device)
        if critics is not None:
            critics.to(device)
        if perceptual is not None:
            perceptual.to(device)
        self.tokenizer, self.critics = tokenizer, critics
        self.engines = ds.build_engines(
            GeneratorObjective(tokenizer, perceptual, critics),
            DiscriminatorObjective(critics, model_config) if critics else None,
            config,
            world,
        )
        self.ema = (
            EMA(tokenizer, config.ema_decay, config.ema_start_step)
            if (config.ema_decay > 0)
            else None
        )
        seed = config.seed if config.deterministic else None
        self.loader = ShardLoader(replace(config.data, seed=seed), world)
        self.eval_loader = ShardLoader(config.eval_data, world) if config.eval_data else None
        # LPIPS only when its package and AlexNet weights are on disk; the note says which.
        self.lpips = load_lpips(device) if config.eval_data else None
        # rFVD / rFID likewise: their networks from local files, checked now, or a reason.
        evaluating = config.eval_data is not None
        self.fvd = load_i3d(device, config.eval_i3d_weights) if evaluating else None
        self.fid = load_inception(device, config.eval_inception_weights) if evaluating else None
        self.checkpointer = Checkpointer(
            config.checkpoint_dir, world, config.keep_checkpoints, dump_config(config)
        )
        self.tensorboard = TensorBoard(
            self.output_dir / "tensorboard", world.rank == 0, self.output_dir / "metrics.jsonl"
        )
        self.codebook = CodebookStats(tokenizer.codebook_size, config.model.num_codebooks, device)
        self.faults = Faults(config.faults, world.rank, self.output_dir)
        self.step = 0
        self.counters = {"nonfinite_losses": 0}
        # LeCAM's anchors: EMAs of the rank-averaged mean (real, fake) logits, and their updates.
        self.lecam_ema = torch.zeros(2, device=device)
        self.lecam_updates = 0
        # Fed the rank-averaged window means, so every rank holds the same alarms.
        self.health = HealthMonitor(config.health)
        self.fixed_batch: torch.Tensor | None = None

    # The schedule of the run.

    def train(self) -> None:
        config = self.config
        self.maybe_resume()
        # What is on disk (the resumed checkpoint) or nothing worth saving (the initial
        # weights): a stop before the first step saves nothing, and the save clock starts now.
        self.saved_step = self.step
        self.stop.saved()
        self.tensorboard.text("config", dump_config(config))
        if self.step == 0 and self.eval_loader is not None:
            self.evaluate()  # the baseline: what training improves on
        batches = iter(self.loader)
        progress = tqdm(
            total=config.num_steps,
            initial=self.step,
            disable=self.world.rank != 0,
            dynamic_ncols=True,
            desc="train",
        )
        window: dict[str, list[float]] = defaultdict(list)
        while self.step < config.num_steps:
            stop, save_now = self.stop.poll(self.device)  # every rank: the same answer
            if stop or save_now:
                self.stopped = stop
                if self.saved_step != self.step:
                    self.save()
                if stop:
                    break
            self.faults.at_step_start(self.step)
            start = time.perf_counter()
            micro_batches = [next(batches) for _ in range(config.gradient_accumulation_steps)]
            data_wait = time.perf_counter() - start
            metrics = self.train_step(micro_batches)
            self.step += 1
            if self.ema is not None:
                self.ema.update(self.tokenizer, self.step)
            elapsed = time.perf_counter() - start
            metrics["perf/data_wait_share"] = data_wait / elapsed
            metrics["perf/step_time_s"] = elapsed
            metrics["perf/clips_per_s"] = (
                config.micro_batch_size * len(micro_batches) * (self.world.world_size) / elapsed
            )
            for key, value in metrics.items():
                window[key].append(value)
            progress.update(1)
            progress.set_postfix(loss=f"{metrics['loss/generator_total']:.4f}")
            if self.step % config.log_every == 0 or self.step == config.num_steps:
                self.log(window)
                window.clear()
            if config.video_log_every and self.step % config.video_log_every == 0:
                self.log_video(micro_batches[-1])
            if self.step % config.eval_every == 0 or self.step == config.num_steps:
                self.evaluate()
            if self.step % config.checkpoint_every == 0 or self.step == config.num_steps:
                self.save()
        progress.close()
        if self.stopped:
            if self.world.rank == 0:
                logger.warning(
                    "stopped at step %d on a stop signal (%s); %s: rerun the same command to "
                    "resume",
                    self.step,
                    "received here" if self.stop.signal is not None else "on another rank",
                    "the checkpoint of that step is complete"
                    if self.step
                    else "nothing was trained yet, nothing saved",
                )
        elif config.export_on_finish:
            self.export()
        self.tensorboard.close()

    def to_video(self, batch: Batch) -> torch.Tensor:
        pixels = batch.pixels(self.device, self.dtype)
        return pixels.unsqueeze(2) if batch.kind == "image" else pixels  # images: 1 frame

    # One optimizer step.

    def train_step(self, micro_batches: list[Batch]) -> dict[str, float]:
        config, engines = self.config, self.engines
        schedule = config.losses
        adversarial = config.model.adversarial_loss_weight * schedules.adversarial_ramp(
            self.step, schedule
        )
        train_discriminator = engines.discriminator is not None and (
            schedules.discriminator_active(self.step, schedule)
        )
        apply_gp, gp_scale = schedules.gradient_penalty_now(self.step, schedule)
        quantizer_weights = self._set_quantizer_weights()
        skipped_before = [
            ds.skipped_steps(e) for e in (engines.generator, engines.discriminator) if e is not None
        ]
        # Summed on the device, read once per step: one host sync instead of one per value.
        sums: dict[str, torch.Tensor] = defaultdict(lambda: torch.zeros((), device=self.device))
        for batch in micro_batches:
            video = self.faults.poison(self.step, self.to_video(batch))  # (b, c, t, h, w)
            sums["data/image_batch_share"] += float(batch.kind == "image")
            if self.fixed_batch is None:
                self.fixed_batch = video[:2].detach().float().clone()
            with frozen_parameters(self.critics):
                loss, recon, codes, parts = engines.generator(video, adversarial)
                engines.generator.backward(loss)
            engines.generator.step()
            self.codebook.add(codes)
            _add_generator_terms(sums, loss.detach(), parts)
            if train_discriminator:
                d_loss, d_parts, logits = engines.discriminator(
                    video, recon, apply_gp, gp_scale, schedule.lecam_weight, self.lecam_ema.clone()
                )
                engines.discriminator.backward(d_loss)
                engines.discriminator.step()
                sums["loss/discriminator_total"] += d_loss.detach().float()
                sums["loss/discriminator_hinge"] += d_parts.discr_loss.float()
                if apply_gp:
                    sums["loss/gradient_penalty"] += d_parts.gradient_penalty.float()
                sums["discriminator/logits_real"] += logits["real"]
                sums["discriminator/logits_fake"] += logits["fake"]
                if schedule.lecam_weight > 0:
                    sums["loss/lecam"] += logits["lecam"]
                    self._update_lecam_ema(logits["real"], logits["fake"])
                    sums["discriminator/ema_logits_real"] += self.lecam_ema[0]
                    sums["discriminator/ema_logits_fake"] += self.lecam_ema[1]
        keys = sorted(sums)
        values = torch.stack([sums[k].float() for k in keys]).tolist()
        metrics = {k: v / len(micro_batches) for k, v in zip(keys, values, strict=True)}
        metrics["health/nonfinite_losses"] *= len(micro_batches)  # a count, not a mean
        skipped_after = [
            ds.skipped_steps(e) for e in (engines.generator, engines.discriminator) if e is not None
        ]
        metrics["health/skipped_updates"] = float(sum(skipped_after) - sum(skipped_before))
        metrics["loss/adversarial_weight"] = adversarial
        if quantizer_weights is not None:
            metrics["loss/entropy_weight"], metrics["loss/commitment_weight"] = quantizer_weights
        return metrics

    def _set_quantizer_weights(self) -> tuple[float, float] | None:
        """LFQ's entropy and commitment weights of this step (annealed from the model's config
        values), set on the training tokenizer's quantizer. Copies built from the config (EMA
        evaluation, exports) keep the config values."""
        quantizer = self.tokenizer.quantizer
        if not hasattr(quantizer, "entropy_loss_weight"):
            return None  # FSQ: no loss weights
        model = self.config.model
        weights = schedules.quantizer_weights(
            self.step,
            self.config.losses,
            model.lfq_entropy_loss_weight,
            model.lfq_commitment_loss_weight,
        )
        quantizer.entropy_loss_weight, quantizer.commitment_loss_weight = weights
        return weights

    def _update_lecam_ema(self, real: torch.Tensor, fake: torch.Tensor) -> None:
        """One EMA step with this micro-batch's mean logits, averaged over ranks (so every rank
        holds the same anchors); the first update sets the EMAs. Non-finite logits on any rank
        (a step DeepSpeed skips) leave them unchanged, on every rank."""
        means = torch.stack((real, fake)).float()
        all_reduce_mean(means)
        means = means.to(self.lecam_ema.device)
        decay = self.config.losses.lecam_ema_decay if self.lecam_updates else 0.0
        mixed = self.lecam_ema * decay + means * (1 - decay)
        self.lecam_ema.copy_(torch.where(torch.isfinite(means).all(), mixed, self.lecam_ema))
        self.lecam_updates += 1

    # Observability.

    def log(self, window: dict[str, list[float]]) -> None:
        """Window means, averaged across ranks (a collective), to TensorBoard on rank 0."""
        nonfinite = torch.tensor(window.pop("health/nonfinite_losses"), dtype=torch.float64)
        keys = sorted(window)
        local = torch.tensor([sum(window[k]) / len(window[k]) for k in keys], dtype=torch.float64)
        # Host tensors: pipeline.distributed moves them to the backend's device (NCCL: CUDA).
        all_reduce_mean(local)
        all_reduce_max(nonfinite)
        values = dict(zip(keys, local.tolist(), strict=True))
        self.counters["nonfinite_losses"] += int((nonfinite > 0).sum())  # steps, on any rank
        engines = self.engines
        values["lr/generator"] = float(engines.generator.get_lr()[0])
        values["grad_norm/generator"] = ds.global_grad_norm(engines.generator)
        if engines.discriminator is not None:
            values["lr/discriminator"] = float(engines.discriminator.get_lr()[0])
            values["grad_norm/discriminator"] = ds.global_grad_norm(engines.discriminator)
        if self.step % self.config.codebook_stats_window == 0 or self.step == self.config.num_steps:
            values.update(self.codebook.read_and_reset())
        values["perf/memory_gib"] = memory_bytes(self.device) / 2**30
        values["health/nonfinite_losses_total"] = float(self.counters["nonfinite_losses"])
        values["health/skipped_updates_total"] = float(
            sum(ds.skipped_steps(e) for e in (engines.generator, engines.discriminator) if e)
        )
        values.update({f"data/{k}": float(v) for k, v in self.loader.stats.items()})
        health = self.health.update(self.step, values)
        values.update(health.scalars)
        self.tensorboard.scalars(values, self.step)
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

    def log_video(self, batch: Batch) -> None:
        if self.world.rank != 0:
            return
        video = self.to_video(batch)[:2].float()
        model = self.inference_model()
        with torch.no_grad():
            recon = model(video)
        self.tensorboard.video("reconstruction/real_vs_recon", video, recon, self.step)

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
        state = self.ema.state_dict_for(self.tokenizer) if self.ema else self.tokenizer.state_dict()
        model.load_state_dict(
            {k: v.float() if v.is_floating_point() else v for k, v in state.items()}
        )
        return model.eval()

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """The EMA model on the fixed training batch, and on the held-out shards through
        `pipeline.evaluate` (PSNR, SSIM, LPIPS when available, codebook usage and perplexity;
        clips.csv, summary.json and a few real | reconstruction mp4s under OUTPUT_DIR/eval/)."""
        model = self.inference_model()
        values: dict[str, float] = {}
        if self.fixed_batch is not None:
            real = to_unit_range(self.fixed_batch)
            with inference_precision(self.device, resolve_precision("auto", self.device)):
                recon = to_unit_range(model(self.fixed_batch))
            fixed = torch.stack(
                (psnr_per_clip(real, recon).mean().double(), real.new_ones((), dtype=torch.float64))
            )
            all_reduce_sum(fixed)  # every rank has its own fixed batch
            values["eval/psnr_fixed_batch"] = float(fixed[0] / fixed[1])
        if self.eval_loader is not None:
            folder = self.output_dir / "eval" / f"step_{self.step:08d}"
            writer = SideBySideWriter(folder / "videos", self.config.eval_videos)
            result = evaluate(
                model,
                self.eval_loader,
                self.world,
                self.device,
                max_batches=self.config.eval_batches,
                video_writer=writer if self.config.eval_videos else None,
                lpips_model=self.lpips.model,
                lpips_note=self.lpips.note,
                fvd_model=self.fvd.model,
                fvd_note=self.fvd.note,
                fid_model=self.fid.model,
                fid_note=self.fid.note,
            )
            values.update(result.scalars())
            if self.world.rank == 0:
                write_reports(result, folder, {"step": self.step})
        self.tensorboard.scalars(values, self.step)
        return values

    # Checkpoints and exports.

    def save(self) -> None:
        self.checkpointer.save(
            self.step,
            self.engines,
            self.ema.state_dict() if self.ema else None,
            self.loader.state_dict(),
            {
                "counters": self.counters,
                "lecam_ema": {
                    "real_logits": float(self.lecam_ema[0]),
                    "fake_logits": float(self.lecam_ema[1]),
                    "updates": self.lecam_updates,
                },
                "health": self.health.state_dict(),
            },
            fault_hook=self.faults.during_save(self.step, stopping=self.stopped),
        )
        self.saved_step = self.step
        self.stop.saved()
        self.tensorboard.flush()

    def maybe_resume(self) -> None:
        checkpoint = latest_checkpoint(self.config.checkpoint_dir)
        if checkpoint is None:
            return
        restored = self.checkpointer.restore(checkpoint, self.engines)
        self.step = int(restored["trainer"]["step"])
        self.counters.update(restored["trainer"].get("counters", {}))
        lecam = restored["trainer"].get("lecam_ema")
        if lecam is not None:
            values = (lecam["real_logits"], lecam["fake_logits"])
            self.lecam_ema.copy_(torch.tensor(values, dtype=torch.float32))
            self.lecam_updates = int(lecam["updates"])
        if "health" in restored["trainer"]:
            self.health.load_state_dict(restored["trainer"]["health"])
        if self.ema is not None and restored["ema"] is not None:
            self.ema.load_state_dict(restored["ema"])
        if restored["loader"] is not None:
            self.loader.load_state_dict(restored["loader"])
        if restored["rng"] is not None:
            set_rng_state(restored["rng"])
        if self.world.rank == 0:
            logger.info("resumed from %s at step %d", checkpoint.path, self.step)

    def export(self) -> Path | None:
        """The EMA generator as safetensors + config JSON, loadable without DeepSpeed."""
        if self.world.rank != 0:
            return None
        state = self.ema.state_dict_for(self.tokenizer) if self.ema else None
        path = save_pretrained(
            self.tokenizer,
            self.output_dir / "export",
            state_dict=state,
            metadata={"step": self.step, "ema": self.ema is not None},
        )
        logger.info("exported the %s generator to %s", "EMA" if self.ema else "final", path)
        return path

    def _init_from(self, source: Path, tokenizer: Tokenizer, critics) -> None:
        generator, discriminator = module_weights(source)
        generator = {k.removeprefix("tokenizer."): v for k, v in generator.items()}
        tokenizer.load_state_dict(generator)
        if critics is not None and discriminator is not None:
            critics.load_state_dict(
                {k.removeprefix("critics."): v for k, v in discriminator.items()}
            )
        if self.world.rank == 0:
            logger.info("initialised weights from %s (fresh optimizer state)", source)


def _add_generator_terms(sums: dict[str, torch.Tensor], loss: torch.Tensor, parts) -> None:
    sums["loss/generator_total"] += loss.float()
    sums["health/nonfinite_losses"] += (~torch.isfinite(loss)).float()
    sums["loss/recon"] += parts.recon_loss.float()
    sums["loss/quantizer_aux"] += parts.lfq_aux_loss.float()
    sums["loss/perceptual"] += parts.perceptual_loss.float()
    sums["loss/adversarial_gen"] += parts.adversarial_gen_loss.float()
    sums["loss/adaptive_weight"] += parts.adaptive_adversarial_weight.float()
    quantizer = parts.quantizer_loss_breakdown
    if quantizer is not None:
        sums["codebook/per_sample_entropy"] += quantizer.per_sample_entropy.float()
        sums["codebook/batch_entropy"] += quantizer.batch_entropy.float()
        sums["loss/commitment"] += quantizer.commitment.float()
