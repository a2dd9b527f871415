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
from collections.abc import Iterator, Sequence
from dataclasses import replace
from pathlib import Path

import torch
from torch import nn

from model import Tokenizer
from model.compilation import compile_blocks
from model.critics import build_training_networks
from model.memory_format import use_channels_last
from pipeline.data.loader import Batch, ShardLoader
from pipeline.distributed.collectives import all_reduce_mean, differentiable_mean, is_distributed
from pipeline.distributed.world import World, deterministic_cublas
from pipeline.inference.quality import load_lpips
from pipeline.inference.video_features import load_i3d, load_inception
from pipeline.logs import progress_bar
from pipeline.train import engines as ds
from pipeline.train import schedules
from pipeline.train.callbacks import Callbacks, TrainerCallback
from pipeline.train.checkpoint_flow import CheckpointFlow, load_initial_weights
from pipeline.train.checkpointing import Checkpointer
from pipeline.train.config import TrainConfig, dump_config
from pipeline.train.ema import EMA
from pipeline.train.health import HealthMonitor
from pipeline.train.metrics import CodebookStats
from pipeline.train.objectives import DiscriminatorObjective, GeneratorObjective, frozen_parameters
from pipeline.train.preemption import StopRequests
from pipeline.train.reporting import Reporting
from pipeline.train.run_log import build_run_log

logger = logging.getLogger(__name__)


class Trainer(CheckpointFlow, Reporting):
    """The training loop; its checkpoints (`CheckpointFlow`: save, maybe_resume, export) and its
    reporting (`Reporting`: log, inference_model, evaluate) are mixins of their own files."""

    def __init__(
        self,
        config: TrainConfig,
        world: World,
        device: torch.device,
        stop: StopRequests | None = None,
        callbacks: Sequence[TrainerCallback] = (),
    ) -> None:
        """`stop`: the stop requests (signals) of this process, installed by the caller before
        anything slow starts; None records none. `callbacks`: hooks into the loop (the tests'
        fault injection), called in order."""
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
        if config.deterministic:
            use_deterministic_algorithms()
        elif device.type == "cuda":
            # Training shapes are static: the algorithm search pays off after the first step.
            torch.backends.cudnn.benchmark = config.cudnn_benchmark
        self.tokenizer, perceptual, self.critics = self._build_models()
        self.engines = ds.build_engines(
            GeneratorObjective(self.tokenizer, perceptual, self.critics),
            DiscriminatorObjective(self.critics, self.config.model) if self.critics else None,
            config,
            world,
        )
        self.ema = (
            EMA(self.tokenizer, config.ema_decay, config.ema_start_step, config.ema_warmup)
            if (config.ema_decay > 0)
            else None
        )
        seed = config.seed if config.deterministic else None
        self.loader = ShardLoader(replace(config.data, seed=seed), world)
        self.eval_loader = ShardLoader(config.eval_data, world) if config.eval_data else None
        self.lpips, self.fvd, self.fid = self._load_metric_networks()
        self.checkpointer = Checkpointer(
            config.checkpoint_dir, world, config.keep_checkpoints, dump_config(config)
        )
        self.run_log = build_run_log(config, world)
        self.codebook = CodebookStats(
            self.tokenizer.codebook_size, config.model.num_codebooks, device
        )
        self.callbacks = Callbacks(callbacks)
        self.step = 0
        self.counters = {"nonfinite_losses": 0}
        # LeCAM's anchors: EMAs of the rank-averaged mean (real, fake) logits, and their updates.
        self.lecam_ema = torch.zeros(2, device=device)
        self.lecam_updates = 0
        # Fed the rank-averaged window means, so every rank holds the same alarms.
        self.health = HealthMonitor(config.health)
        self.fixed_batch: torch.Tensor | None = None

    def _build_models(self) -> tuple[Tokenizer, nn.Module | None, nn.Module | None]:
        """The tokenizer, its perceptual loss and its discriminators (each None when off),
        initialised (or loaded from `init_from`) identically on every rank, on the device."""
        config, device = self.config, self.device
        torch.manual_seed(config.seed)  # the same initial weights on every rank
        model_config = replace(config.model, gradient_checkpointing=config.activation_checkpointing)
        tokenizer, perceptual, critics = build_training_networks(model_config)
        if perceptual is not None:
            perceptual.load()  # missing VGG weights: fail now, not at step 1
        if config.init_from:
            load_initial_weights(Path(config.init_from), tokenizer, critics, self.world.rank)
        if is_distributed() and hasattr(tokenizer.quantizer, "batch_probs_reducer"):
            # LFQ's batch code distribution over all ranks, as the batch entropy is defined.
            tokenizer.quantizer.batch_probs_reducer = differentiable_mean
        speed = config.speed
        for network in (tokenizer, critics, perceptual):
            if network is not None:
                network.to(device)
                use_channels_last(
                    network, conv3d=speed.channels_last_3d, conv2d=speed.channels_last
                )
                if speed.compile == "blocks":  # after the hooks, which it then traces
                    compile_blocks(network, speed.compile_mode)
        return tokenizer, perceptual, critics

    def _load_metric_networks(self) -> tuple:
        """(LPIPS, I3D, InceptionV3) statuses for evaluation; Nones without `eval_data`."""
        config, device = self.config, self.device
        # LPIPS only when its package and AlexNet weights are on disk; the note says which.
        lpips = load_lpips(device) if config.eval_data else None
        # rFVD / rFID likewise: their networks from local files, checked now, or a reason.
        evaluating = config.eval_data is not None
        fvd = load_i3d(device, config.eval_i3d_weights) if evaluating else None
        fid = load_inception(device, config.eval_inception_weights) if evaluating else None
        return lpips, fvd, fid

    # The schedule of the run.

    def train(self) -> None:
        config = self.config
        self.maybe_resume()
        # What is on disk (the resumed checkpoint) or nothing worth saving (the initial
        # weights): a stop before the first step saves nothing, and the save clock starts now.
        self.saved_step = self.step
        self.stop.saved()
        self.run_log.text("config", dump_config(config))
        if self.step == 0 and self.eval_loader is not None:
            self.evaluate()  # the baseline: what training improves on
        batches = iter(self.loader)
        progress = progress_bar(
            enabled=self.world.rank == 0, total=config.num_steps, initial=self.step, desc="train"
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
            self.callbacks.on_step_start(self.step)
            metrics, last_batch = self._timed_step(batches)
            for key, value in metrics.items():
                window[key].append(value)
            progress.update(1)
            progress.set_postfix(loss=f"{metrics['loss/generator_total']:.4f}")
            self._after_step(window, last_batch)
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
        self.run_log.close()

    def _timed_step(self, batches: Iterator[Batch]) -> tuple[dict[str, float], Batch]:
        """One optimizer step on the next micro-batches: its metrics with its timings, and the
        last micro-batch (for the video log)."""
        config = self.config
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
        return metrics, micro_batches[-1]

    def _after_step(self, window: dict[str, list[float]], last_batch: Batch) -> None:
        """Logging, video, evaluation and checkpoint at their intervals after a step."""
        config = self.config
        if self.step % config.log_every == 0 or self.step == config.num_steps:
            self.log(window)
            window.clear()
        if config.video_log_every and self.step % config.video_log_every == 0:
            self.log_video(last_batch)
        if self.step % config.eval_every == 0 or self.step == config.num_steps:
            self.evaluate()
        if self.step % config.checkpoint_every == 0 or self.step == config.num_steps:
            self.save()

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
            video = self.callbacks.on_batch(self.step, self.to_video(batch))  # (b, c, t, h, w)
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

    def log_video(self, batch: Batch) -> None:
        if self.world.rank != 0:
            return
        video = self.to_video(batch)[:2].float()
        model = self.inference_model()
        with torch.no_grad():
            recon = model(video)
        self.run_log.video("reconstruction/real_vs_recon", video, recon, self.step)


def use_deterministic_algorithms() -> None:
    """PyTorch's deterministic kernels where they exist (a warning, not an error, for ops that
    have none), cuDNN's deterministic algorithms without the benchmark search, and cuBLAS's fixed
    workspace (set before the first CUDA matmul of the process)."""
    deterministic_cublas()
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.backends.cudnn.deterministic = True
    torch.backends.cudnn.benchmark = False


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
