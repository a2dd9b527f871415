"""The training run's typed configuration: YAML file + dotted command-line overrides.

    python -m pipeline.train --config launch/configs/tiny_cpu.yaml generator_optim.lr=2e-4 \
        data.num_workers=4

Every section is a frozen dataclass; unknown keys, bad values and impossible combinations raise
`ValueError` here, before any process group or engine exists. `model` holds the VideoTokenizer
arguments (model.TokenizerConfig) and `data` the loader's (pipeline.data.loader.DataConfig), except
the fields the trainer derives (batch size, frame compression).
"""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

from model.config import TokenizerConfig
from pipeline.data.loader import DataConfig
from pipeline.train.config_sections import (
    ANNEAL_SHAPES,
    LR_DECAYS,
    FaultInjection,
    LossScheduleConfig,
    OptimizerConfig,
    SpeedConfig,
    check_logger,
)
from pipeline.train.health import HealthConfig

__all__ = [
    "ANNEAL_SHAPES",
    "DERIVED_DATA_FIELDS",
    "DEVICES",
    "LR_DECAYS",
    "PRECISIONS",
    "FaultInjection",
    "LossScheduleConfig",
    "OptimizerConfig",
    "SpeedConfig",
    "TrainConfig",
    "apply_overrides",
    "config_from_dict",
    "dump_config",
    "load_config",
]

PRECISIONS = ("bf16", "fp16", "fp32")
DEVICES = ("auto", "cuda", "cpu")
# DataConfig fields the trainer fills in itself (they must agree with the model and batch).
DERIVED_DATA_FIELDS = ("micro_batch_size", "time_compression")


@dataclass(frozen=True, kw_only=True)
class TrainConfig:
    output_dir: str = "outputs/run"
    """Checkpoints, TensorBoard logs and exports go here; a run on a folder with checkpoints
    resumes from the latest complete one."""
    model: TokenizerConfig
    data: DataConfig
    eval_data: DataConfig | None = None
    """Held-out shards for evaluation (mode 'eval'); None: a fixed training batch only."""
    generator_optim: OptimizerConfig = field(default_factory=OptimizerConfig)
    discriminator_optim: OptimizerConfig = field(default_factory=OptimizerConfig)
    losses: LossScheduleConfig = field(default_factory=LossScheduleConfig)
    num_steps: int = 1000
    """Optimizer steps of the whole run."""
    micro_batch_size: int = 4
    """Clips per rank per forward pass."""
    gradient_accumulation_steps: int = 1
    global_batch_size: int | None = None
    """If set, must equal micro_batch_size * gradient_accumulation_steps * world size."""
    device: str = "auto"
    """'auto': one CUDA device per rank (NCCL) where torch can use CUDA, else CPU ranks (gloo);
    'cpu' forces CPU ranks on a GPU machine too (the deepspeed launcher sets
    CUDA_VISIBLE_DEVICES for its ranks, so hiding the GPUs from it does not); 'cuda' requires
    GPUs."""
    precision: str = "bf16"
    """bf16 (the default), fp32, or fp16 (only without the GAN and the perceptual loss, see
    __post_init__)."""
    fp32_gradient_reduction: bool = True
    """Under bf16, reduce gradients across ranks and accumulate micro-batches in fp32 (DeepSpeed
    otherwise does both in bf16, whose 8-bit mantissa loses the small terms of a sum over many
    ranks or micro-batches); costs twice the bytes of a bf16 reduction."""
    cudnn_benchmark: bool = True
    """On CUDA, let cuDNN time its convolution algorithms for the (static) training shapes once
    and keep the fastest; off when `deterministic`."""
    zero_stage: int = 2
    """ZeRO stage of the generator engine (1 or 2)."""
    discriminator_zero_stage: int = 2
    """ZeRO stage of the discriminator engine (1 or 2: the gradient penalty needs ZeRO <= 2)."""
    activation_checkpointing: bool = False
    speed: SpeedConfig = field(default_factory=SpeedConfig)
    """Channels-last convolutions and compiled blocks (config_sections.SpeedConfig)."""
    ema_decay: float = 0.999
    """EMA of the generator weights (evaluation and export use it); 0 disables."""
    ema_start_step: int = 0
    ema_warmup: bool = True
    """Warm the EMA decay up as min(ema_decay, (1 + t) / (10 + t)) at its t-th update
    (pipeline.train.ema), so the average forgets the random initialisation early; false: the
    full ema_decay from the first update."""
    seed: int = 0
    deterministic: bool = False
    """Reproducible runs: a fixed loader seed (data order), PyTorch's deterministic algorithms
    (`torch.use_deterministic_algorithms(True, warn_only=True)`: a warning for ops without one),
    cuDNN's deterministic convolutions without `cudnn_benchmark`, and cuBLAS's fixed workspace
    (CUBLAS_WORKSPACE_CONFIG=:4096:8 unless set). Slower on GPUs."""
    log_every: int = 10
    logger: str = "tensorboard"
    """Where scalars and reconstruction clips go (rank 0): "tensorboard" (OUTPUT_DIR/tensorboard),
    "wandb" (Weights & Biases in OUTPUT_DIR/wandb; the `wandb` extra) or "both";
    OUTPUT_DIR/metrics.jsonl holds the scalars either way."""
    wandb_project: str = "magvit2"
    wandb_mode: str | None = None
    """"online", "offline" (no network; `wandb sync` later), "disabled"; None: wandb's own
    choice (WANDB_MODE, else online)."""
    wandb_run_name: str | None = None
    """None: the output folder's name."""
    video_log_every: int = 200
    """Real | reconstruction clips side by side in the run log every N steps (0: never)."""
    eval_every: int = 500
    eval_batches: int = 8
    """Batches per rank at each evaluation (pipeline.inference.evaluate over eval_data)."""
    eval_videos: int = 2
    """Real | reconstruction mp4s written to OUTPUT_DIR/eval/step_N/ at each evaluation."""
    eval_i3d_weights: str | None = None
    """StyleGAN-V's TorchScript I3D (i3d_torchscript.pt) for rFVD at each evaluation; None: the
    torch hub cache ($TORCH_HOME/hub/checkpoints/), and without the file rFVD is reported
    unavailable with the reason (nothing is downloaded)."""
    eval_inception_weights: str | None = None
    """torch-fidelity's InceptionV3 weights for per-frame rFID at each evaluation (the `fid`
    extra); None: the torch hub cache, else unavailable with the reason."""
    checkpoint_every: int = 500
    checkpoint_every_minutes: float = 0.0
    """Also save when this many minutes have passed since the last save (0: steps only). A
    stop request (SIGTERM / SIGUSR1 on any rank) always saves the step it stops at."""
    keep_checkpoints: int = 3
    export_on_finish: bool = True
    codebook_stats_window: int = 50
    """Steps over which codebook usage and perplexity are counted."""
    init_from: str | None = None
    """Start from another run's weights (e.g. the image stage): an output folder, a checkpoint
    folder or an export; optimizer state starts fresh."""
    process_group_timeout_s: float = 600.0
    """How long a collective waits for a dead rank before the job fails."""
    health: HealthConfig = field(default_factory=HealthConfig)
    """Training health alarms (pipeline.train.health): warnings in the log and `health/alarm_*`
    scalars when the discriminator or the codebook collapses or the reconstruction diverges."""
    faults: FaultInjection = field(default_factory=FaultInjection)

    def __post_init__(self) -> None:
        self._check_intervals()
        check_logger(self.logger, self.wandb_mode)
        self._check_precision()
        self._check_zero_stages()
        self._check_losses_fit_the_model()
        self._check_data_fits_the_model()

    def _check_intervals(self) -> None:
        """Step counts, intervals and sizes are positive; the minute clock is not negative."""
        for name in (
            *("num_steps", "micro_batch_size", "gradient_accumulation_steps", "log_every"),
            *("eval_every", "eval_batches", "checkpoint_every", "keep_checkpoints"),
            "codebook_stats_window",
        ):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.eval_videos < 0:
            raise ValueError(f"eval_videos must be >= 0, got {self.eval_videos}")
        if not (
            math.isfinite(self.checkpoint_every_minutes) and self.checkpoint_every_minutes >= 0
        ):
            raise ValueError(
                "checkpoint_every_minutes must be >= 0 (0: off), got "
                f"{self.checkpoint_every_minutes}"
            )
        if not 0 <= self.ema_decay < 1:
            raise ValueError(f"ema_decay must be in [0, 1), got {self.ema_decay}")

    def _check_precision(self) -> None:
        """A known device and precision; fp16 only where its loss scaling reaches every
        gradient."""
        if self.device not in DEVICES:
            raise ValueError(f"device must be one of {DEVICES}, got {self.device!r}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {self.precision!r}")
        if self.precision == "fp16" and (
            self.model.use_gan or self.model.perceptual_loss_weight > 0
        ):
            raise ValueError(
                "precision fp16 is not supported with the GAN or the perceptual loss: the "
                "gradient penalty, the adaptive adversarial weight and the perceptual and "
                "adversarial gradients are taken with autograd.grad inside the forward pass, "
                "where DeepSpeed's fp16 loss scaling does not reach, so they underflow to zero. "
                "Use precision: bf16 (same speed on Ampere and newer GPUs, no loss scaling)"
            )

    def _check_zero_stages(self) -> None:
        """ZeRO 1 or 2 for both engines: what the training step's gradients need."""
        if self.zero_stage not in (1, 2):
            raise ValueError(
                f"zero_stage must be 1 or 2, got {self.zero_stage}: ZeRO-3 is not supported for "
                "the generator (the adaptive adversarial weight differentiates with respect to "
                "the last decoder weight, which ZeRO-3 partitions away), and stage 0 has no "
                "all-rank skip of non-finite steps"
            )
        if self.discriminator_zero_stage not in (1, 2):
            raise ValueError(
                f"discriminator_zero_stage must be 1 or 2, got {self.discriminator_zero_stage}: "
                "the gradient penalty's double backward fails under ZeRO-3, and stage 0 has no "
                "all-rank skip of non-finite steps"
            )

    def _check_losses_fit_the_model(self) -> None:
        """LeCAM needs the GAN; the quantizer annealing needs LFQ's loss weights."""
        if self.losses.lecam_weight > 0 and not self.model.use_gan:
            raise ValueError("losses.lecam_weight > 0 needs the GAN (model.use_gan: true)")
        if self.losses.quantizer_annealed and self.model.use_fsq:
            raise ValueError(
                "losses.entropy_weight_start_factor / commitment_weight_start_factor anneal LFQ's "
                "loss weights; FSQ (model.use_fsq) has none"
            )

    def _check_data_fits_the_model(self) -> None:
        """Clip length and size as the model compresses them; the loaders' modes."""
        f = self.model.time_downsample_factor
        if (self.data.num_frames - 1) % f:
            raise ValueError(
                f"data.num_frames must be 1 + k * {f} (the model compresses time by {f}), "
                f"got {self.data.num_frames}"
            )
        if self.data.image_size != self.model.image_size:
            raise ValueError(
                f"data.image_size ({self.data.image_size}) must equal "
                f"model.image_size ({self.model.image_size})"
            )
        if self.data.mode != "train":
            raise ValueError(f"data.mode must be 'train', got {self.data.mode!r}")
        if self.eval_data is not None and self.eval_data.mode != "eval":
            raise ValueError(f"eval_data.mode must be 'eval', got {self.eval_data.mode!r}")

    def check_world_size(self, world_size: int) -> None:
        """Batch sizes that do not divide: a clear error before training starts."""
        derived = self.micro_batch_size * self.gradient_accumulation_steps * world_size
        if self.global_batch_size is not None and self.global_batch_size != derived:
            raise ValueError(
                f"global_batch_size {self.global_batch_size} != micro_batch_size "
                f"{self.micro_batch_size} x gradient_accumulation_steps "
                f"{self.gradient_accumulation_steps} x world size {world_size} = {derived}"
            )

    @property
    def checkpoint_dir(self) -> Path:
        return Path(self.output_dir) / "checkpoints"

    def to_dict(self) -> dict[str, Any]:
        """The resolved config, loadable by `config_from_dict`."""
        out = dataclasses.asdict(self)
        out["model"] = self.model.to_dict()
        for key in ("data", "eval_data"):
            if out[key] is not None:
                for derived in DERIVED_DATA_FIELDS:
                    out[key].pop(derived)
                out[key].pop("mode")
        return out


_SECTIONS = {
    "generator_optim": OptimizerConfig,
    "discriminator_optim": OptimizerConfig,
    "losses": LossScheduleConfig,
    "speed": SpeedConfig,
    "faults": FaultInjection,
    "health": HealthConfig,
}


_SCALAR_TYPES = {"int": (int,), "float": (int, float), "bool": (bool,), "str": (str,)}


def _check_types(cls: type, data: dict[str, Any], where: str) -> None:
    """Scalar fields get values of their annotated type (a clear error instead of a TypeError)."""
    for f in fields(cls):
        if f.name not in data:
            continue
        value, annotation = data[f.name], str(f.type)
        base, optional = annotation.removesuffix(" | None"), annotation.endswith(" | None")
        allowed = _SCALAR_TYPES.get(base)
        if allowed is None or (value is None and optional):
            continue
        if not isinstance(value, allowed) or (base != "bool" and isinstance(value, bool)):
            raise ValueError(f"{where}.{f.name} must be {base}, got {value!r}")


def _build(cls: type, data: dict[str, Any], where: str) -> Any:
    if not isinstance(data, dict):
        raise ValueError(f"{where} must be a mapping, got {data!r}")
    names = {f.name for f in fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ValueError(f"unknown key(s) {unknown} in {where}; valid keys: {sorted(names)}")
    _check_types(cls, data, where)
    return cls(**data)


def config_from_dict(data: dict[str, Any]) -> TrainConfig:
    data = dict(data)
    for key in ("model", "data"):
        if key not in data:
            raise ValueError(f"the config needs a '{key}' section")
    model = TokenizerConfig.from_dict(data.pop("model"))
    micro_batch = data.get("micro_batch_size", 4)

    def data_config(section: dict[str, Any], where: str, mode: str) -> DataConfig:
        clashing = sorted(set(section) & set(DERIVED_DATA_FIELDS))
        if clashing:
            raise ValueError(
                f"{where}: {clashing} are derived by the trainer (set "
                "micro_batch_size at the top level)"
            )
        section = {
            "mode": mode,
            "image_size": model.image_size,
            **section,
            "micro_batch_size": micro_batch,
            "time_compression": model.time_downsample_factor,
        }
        return DataConfig.from_dict(section)

    data_section = data_config(data.pop("data"), "data", "train")
    eval_section = data.pop("eval_data", None)
    eval_data = None
    if eval_section is not None:  # clips as long as the training clips unless set
        eval_section = {"num_frames": data_section.num_frames, **eval_section}
        eval_data = data_config(eval_section, "eval_data", "eval")
    sections = {
        key: _build(cls, data.pop(key), key) for key, cls in _SECTIONS.items() if key in data
    }
    unknown_top = sorted(set(data) - {f.name for f in fields(TrainConfig)})
    if unknown_top:
        raise ValueError(
            f"unknown top-level key(s) {unknown_top}; valid keys: "
            f"{sorted(f.name for f in fields(TrainConfig))}"
        )
    _check_types(TrainConfig, data, "config")
    return TrainConfig(model=model, data=data_section, eval_data=eval_data, **sections, **data)


_EXPONENT_FLOAT = re.compile(r"^[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+$")


def _numbers(value: Any) -> Any:
    """PyYAML reads `1e-4` (no dot) as a string (YAML 1.1); make such strings floats."""
    if isinstance(value, str) and _EXPONENT_FLOAT.match(value):
        return float(value)
    if isinstance(value, dict):
        return {k: _numbers(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_numbers(v) for v in value]
    return value


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """`a.b.c=value` pairs; values are parsed as YAML (numbers, booleans, lists, null)."""
    for item in overrides:
        if "=" not in item:
            raise ValueError(f"override {item!r} must look like section.key=value")
        dotted, raw = item.split("=", 1)
        keys = dotted.split(".")
        node = data
        for key in keys[:-1]:
            node = node.setdefault(key, {})
            if not isinstance(node, dict):
                raise ValueError(f"override {item!r}: {key} is not a section")
        node[keys[-1]] = _numbers(yaml.safe_load(raw))
    return data


def load_config(path: str | Path, overrides: list[str] | None = None) -> TrainConfig:
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"config file {path} does not exist")
    data = _numbers(yaml.safe_load(path.read_text()) or {})
    try:
        return config_from_dict(apply_overrides(data, overrides or []))
    except TypeError as error:  # a value of the wrong type reached a comparison
        raise ValueError(f"invalid value type in the config: {error}") from error


def dump_config(config: TrainConfig) -> str:
    return yaml.safe_dump(config.to_dict(), sort_keys=False)
