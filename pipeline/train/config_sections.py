"""The optimizer, loss-schedule, speed and fault-injection sections of the training config
(pipeline.train.config, which re-exports them): each a frozen dataclass that checks its own
values."""

from __future__ import annotations

import importlib.util
import math
from dataclasses import dataclass

from model.compilation import COMPILE_MODES

LR_DECAYS = ("cosine", "linear", "constant")
ANNEAL_SHAPES = ("linear", "cosine")


@dataclass(frozen=True, kw_only=True)
class OptimizerConfig:
    """AdamW and its learning-rate schedule (one per engine)."""

    lr: float = 1e-4
    betas: tuple[float, float] = (0.9, 0.99)
    weight_decay: float = 0.0
    eps: float = 1e-8
    warmup_steps: int = 0
    """Linear warm-up from 0 over this many optimizer steps."""
    decay: str = "constant"
    """After warm-up: 'cosine' or 'linear' decay to min_lr_ratio * lr at the last step, or
    'constant'."""
    min_lr_ratio: float = 0.1
    gradient_clipping: float = 1.0
    """Global grad-norm clip; 0 disables (set explicitly: DeepSpeed silently defaults to 1)."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "betas", tuple(self.betas))
        if self.lr <= 0 or not math.isfinite(self.lr):
            raise ValueError(f"lr must be positive, got {self.lr}")
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            raise ValueError(f"betas must be two numbers in [0, 1), got {self.betas}")
        if self.decay not in LR_DECAYS:
            raise ValueError(f"decay must be one of {LR_DECAYS}, got {self.decay!r}")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ValueError(f"min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        for name in ("warmup_steps", "weight_decay", "gradient_clipping"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")


@dataclass(frozen=True, kw_only=True)
class LossScheduleConfig:
    """When and how strongly the adversarial game runs, and how the quantizer's loss weights
    change over the run."""

    discriminator_start_step: int = 0
    """The discriminator trains, and the generator sees its loss, from this step on."""
    adversarial_warmup_steps: int = 0
    """Then the adversarial weight ramps linearly from 0 to the model's weight."""
    gradient_penalty_every: int = 1
    """Lazy regularisation (StyleGAN2): the penalty every N discriminator steps, scaled by N."""
    lecam_weight: float = 0.0
    """LeCAM regularisation of the discriminator (Tseng et al. 2021), weight of
    mean(relu(D(real) - ema_fake)^2) + mean(relu(ema_real - D(fake))^2) in its loss; 0: off."""
    lecam_ema_decay: float = 0.999
    """Decay of the EMAs of the mean real and fake logits (averaged over ranks, updated after
    every discriminator micro-batch, saved in checkpoints): 0 before the first update, which
    sets them; each step's term uses the anchors of the steps before it."""
    entropy_weight_start_factor: float = 1.0
    """The LFQ entropy loss weight starts at this multiple of model.lfq_entropy_loss_weight and
    anneals to 1x over `quantizer_anneal_steps` (VidTok: 3.0); 1: constant."""
    commitment_weight_start_factor: float = 1.0
    """The same for model.lfq_commitment_loss_weight."""
    quantizer_anneal_steps: int = 0
    """Optimizer steps over which the start factors anneal to 1 (from step 0)."""
    quantizer_anneal_shape: str = "linear"
    """'linear' or 'cosine' (half a cosine from the start factor to 1)."""

    def __post_init__(self) -> None:
        if self.discriminator_start_step < 0 or self.adversarial_warmup_steps < 0:
            raise ValueError("discriminator_start_step and adversarial_warmup_steps must be >= 0")
        if self.gradient_penalty_every < 1:
            raise ValueError(
                f"gradient_penalty_every must be >= 1, got {self.gradient_penalty_every}"
            )
        if not (math.isfinite(self.lecam_weight) and self.lecam_weight >= 0):
            raise ValueError(f"lecam_weight must be >= 0 (0: off), got {self.lecam_weight}")
        if not 0 <= self.lecam_ema_decay < 1:
            raise ValueError(f"lecam_ema_decay must be in [0, 1), got {self.lecam_ema_decay}")
        for name in ("entropy_weight_start_factor", "commitment_weight_start_factor"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value > 0):
                raise ValueError(f"{name} must be a positive number, got {value}")
        if self.quantizer_anneal_steps < 0:
            raise ValueError(
                f"quantizer_anneal_steps must be >= 0, got {self.quantizer_anneal_steps}"
            )
        if self.quantizer_anneal_shape not in ANNEAL_SHAPES:
            raise ValueError(
                f"quantizer_anneal_shape must be one of {ANNEAL_SHAPES}, got "
                f"{self.quantizer_anneal_shape!r}"
            )
        if self.quantizer_annealed and self.quantizer_anneal_steps == 0:
            raise ValueError(
                "entropy_weight_start_factor / commitment_weight_start_factor != 1 need "
                "quantizer_anneal_steps > 0 (the steps over which they anneal to 1)"
            )

    @property
    def quantizer_annealed(self) -> bool:
        return self.entropy_weight_start_factor != 1 or self.commitment_weight_start_factor != 1


# Not "off": YAML reads an unquoted off as false.
COMPILE_CHOICES = ("none", "blocks")


@dataclass(frozen=True, kw_only=True)
class SpeedConfig:
    """Switches of how a step runs, not of what it computes (the same losses and gradients, to
    float rounding). All off by default: on CPU each measured slower or within a few percent
    (benchmarks/bench_switches.py; the README's "Speed switches"); benchmarks/gpu_check.sh
    measures them on a GPU."""

    channels_last_3d: bool = False
    """The training networks' Conv3d inputs in torch.channels_last_3d (model.memory_format)."""
    channels_last: bool = False
    """Their Conv2d inputs (image discriminator, perceptual VGG, first-frame stems) in
    torch.channels_last."""
    compile: str = "none"
    """'blocks': torch.compile of each encoder and decoder layer and each discriminator stage
    (model.compilation), compiled during the first steps (about a minute on CPU); the
    gradient penalty's steps run the discriminator eagerly (no double backward through
    compiled code). 'none'."""
    compile_mode: str = "default"
    """torch.compile's mode for 'blocks': 'default' or 'max-autotune-no-cudagraphs'."""

    def __post_init__(self) -> None:
        if self.compile not in COMPILE_CHOICES:
            raise ValueError(
                f"speed.compile must be one of {COMPILE_CHOICES}, got {self.compile!r}"
            )
        if self.compile_mode not in COMPILE_MODES:
            raise ValueError(
                f"speed.compile_mode must be one of {COMPILE_MODES}, got {self.compile_mode!r}"
            )


@dataclass(frozen=True, kw_only=True)
class FaultInjection:
    """For tests of the failure paths; all off by default."""

    nan_at_step: int | None = None
    """Poison this step's batch with NaN on rank `on_rank`."""
    kill_at_step: int | None = None
    """SIGKILL rank `on_rank` at the start of this step."""
    kill_during_save_at_step: int | None = None
    """SIGKILL rank `on_rank` halfway through writing the checkpoint of this step."""
    signal_group_during_stop_save: bool = False
    """Halfway through the checkpoint of a stop request, rank `on_rank` sends SIGTERM to its
    whole process group (the job, as SLURM's second signal would)."""
    on_rank: int = 0


LOGGERS = ("tensorboard", "wandb", "both")
WANDB_MODES = (None, "online", "offline", "disabled")


def check_logger(logger: str, wandb_mode: str | None) -> None:
    """`logger` and `wandb_mode` are known values, and wandb is installed where it is asked for."""
    if logger not in LOGGERS:
        raise ValueError(f"logger must be one of {LOGGERS}, got {logger!r}")
    if wandb_mode not in WANDB_MODES:
        raise ValueError(f"wandb_mode must be one of {WANDB_MODES}, got {wandb_mode!r}")
    if logger != "tensorboard" and importlib.util.find_spec("wandb") is None:
        raise ValueError(
            f"logger: {logger} needs the wandb package, which is not installed: "
            "pip install 'magvit2-at-scale[wandb]' (or wandb), or use logger: tensorboard"
        )
