"""The two DeepSpeed engines: the generator (tokenizer) and the discriminator(s).

The only module that imports deepspeed. Each engine gets its own config dict derived here from
TrainConfig (batch sizes from the world size, precision, ZeRO stage, clipping), never a
hand-edited JSON. Rules this code keeps (found with DeepSpeed 0.19.8 while writing this trainer;
the README's "What a step does" describes the step they serve):

1. The discriminator's parameters are frozen during the generator step (ZeRO-1 otherwise
   corrupts its gradients; ZeRO-2 asserts "gradient computed twice").
2. The discriminator is called as a plain module (`engine.module`), never through its engine,
   both in the generator's adversarial term and in the gradient-penalty forward.
3. The discriminator stays at ZeRO <= 2: the penalty's double backward fails under ZeRO-3.
4. `gradient_clipping` is always set explicitly (DeepSpeed's default is 1.0).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from pipeline.distributed.world import World, export_rendezvous, use_cpu_accelerator
from pipeline.train.config import OptimizerConfig, TrainConfig
from pipeline.train.schedules import lr_multiplier

logger = logging.getLogger(__name__)


def init_deepspeed_distributed(
    world: World, timeout_s: float, device: torch.device | None = None
) -> None:
    """Joins (or creates) the process group through DeepSpeed's comm layer: NCCL for CUDA
    ranks, gloo for CPU ranks (`device`, default: CUDA where available)."""
    import datetime

    on_cuda = torch.cuda.is_available() if device is None else device.type == "cuda"
    if not on_cuda and torch.cuda.is_available():
        use_cpu_accelerator()  # CPU ranks on a GPU machine
    import deepspeed
    import deepspeed.ops

    if not on_cuda:
        # The shared-memory comm op is JIT-compiled on first use (40-100 s on a fresh machine)
        # and training on gloo never uses it.
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    backend = "nccl" if on_cuda else "gloo"
    export_rendezvous(world)
    deepspeed.init_distributed(
        dist_backend=backend,
        timeout=datetime.timedelta(seconds=timeout_s),
        rank=world.rank,
        world_size=world.world_size,
    )


def engine_config(
    config: TrainConfig, optim: OptimizerConfig, zero_stage: int, world_size: int
) -> dict[str, Any]:
    micro, accum = config.micro_batch_size, config.gradient_accumulation_steps
    ds: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": micro,
        "gradient_accumulation_steps": accum,
        "train_batch_size": micro * accum * world_size,
        "gradient_clipping": optim.gradient_clipping,
        "zero_optimization": {"stage": zero_stage},
        "steps_per_print": 10**9,  # our own logging
        "wall_clock_breakdown": False,
    }
    if zero_stage >= 1:
        # Bucketed, overlapped gradient reduction; contiguous buffers avoid fragmentation.
        ds["zero_optimization"].update(
            {
                "overlap_comm": torch.cuda.is_available() and config.device != "cpu",
                "contiguous_gradients": True,
                "reduce_bucket_size": 5e7,
                "allgather_bucket_size": 5e7,
            }
        )
    if config.precision == "bf16":
        ds["bf16"] = {"enabled": True, "check_grad_overflow": True}
        if config.fp32_gradient_reduction:
            # DeepSpeed reduces and accumulates in the model dtype unless told otherwise.
            ds["communication_data_type"] = "fp32"
            ds["data_types"] = {"grad_accum_dtype": "fp32"}
    elif config.precision == "fp16":
        ds["fp16"] = {
            "enabled": True,
            "loss_scale": 0,
            "initial_scale_power": 16,
            "loss_scale_window": 1000,
            "hysteresis": 2,
            "min_loss_scale": 1,
        }
    return ds


def _optimizer(params: list[nn.Parameter], optim: OptimizerConfig) -> torch.optim.Optimizer:
    # torch's AdamW (fused on CUDA): DeepSpeed's own Adam kernels JIT-compile on first use.
    return torch.optim.AdamW(
        params,
        lr=optim.lr,
        betas=optim.betas,
        eps=optim.eps,
        weight_decay=optim.weight_decay,
        fused=bool(params) and params[0].is_cuda,
    )


def _scheduler(optimizer: torch.optim.Optimizer, optim: OptimizerConfig, num_steps: int):
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_multiplier(step, optim, num_steps)
    )


@dataclass
class Engines:
    generator: Any
    """DeepSpeedEngine over the tokenizer (generator parameters only)."""
    discriminator: Any | None
    """DeepSpeedEngine over the discriminators, or None without a GAN."""


def build_engines(
    tokenizer: nn.Module, critics: nn.Module | None, config: TrainConfig, world: World
) -> Engines:
    import deepspeed

    def build(module: nn.Module, optim: OptimizerConfig, zero_stage: int):
        params = [p for p in module.parameters() if p.requires_grad]
        optimizer = _optimizer(params, optim)
        engine, *_ = deepspeed.initialize(
            model=module,
            optimizer=optimizer,
            lr_scheduler=_scheduler(optimizer, optim, config.num_steps),
            config=engine_config(config, optim, zero_stage, world.world_size),
            dist_init_required=False,
        )
        return engine

    generator = build(tokenizer, config.generator_optim, config.zero_stage)
    discriminator = None
    if critics is not None and any(True for _ in critics.parameters()):
        discriminator = build(critics, config.discriminator_optim, config.discriminator_zero_stage)
    return Engines(generator, discriminator)


def save_engine(engine: Any, directory: Path, tag: str) -> None:
    engine.save_checkpoint(str(directory), tag=tag, save_latest=False)


def load_engine(engine: Any, directory: Path, tag: str, *, module_only: bool) -> None:
    """Restores weights (and, unless module_only, optimizer, scheduler and step counters)."""
    path, _ = engine.load_checkpoint(
        str(directory),
        tag=tag,
        load_module_only=module_only,
        load_optimizer_states=not module_only,
        load_lr_scheduler_states=not module_only,
    )
    if path is None:
        raise RuntimeError(f"DeepSpeed could not load {directory / tag}")


def convert_to_universal(checkpoint: Path, tag: str, out: Path) -> None:
    """DeepSpeed's `ds_to_universal` of one engine's ZeRO 1/2 files `checkpoint/tag` into
    `out/tag`: every parameter's fp32 master weights and Adam moments whole, loadable on any
    number of ranks. Runs in this process (one worker), quietly."""
    import contextlib
    import io
    from types import SimpleNamespace

    from deepspeed.checkpoint import ds_to_universal

    args = SimpleNamespace(
        input_folder=str(checkpoint / tag),
        output_folder=str(out / tag),
        num_extract_workers=1,
        num_merge_workers=1,
        keep_temp_folder=False,
        strict=True,
        # Our engines save no Megatron-style universal_checkpoint_info: DeepSpeed's defaults
        # (no tensor or pipeline parallelism) are exactly our layout.
        inject_missing_state=True,
    )
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        ds_to_universal.main(args)  # prints every step and shows progress bars


def load_engine_universal(engine: Any, directory: Path, tag: str) -> None:
    """Restores weights, fp32 master weights, optimizer moments, scheduler and step counters
    from `convert_to_universal`'s output, whatever world size wrote the original."""
    # DeepSpeed reads this flag of the engine's config at load time only.
    engine._config.load_universal_checkpoint = True
    try:
        load_engine(engine, directory, tag, module_only=False)
    finally:
        engine._config.load_universal_checkpoint = False


def skipped_steps(engine: Any) -> int:
    """Optimizer steps DeepSpeed skipped for non-finite gradients (or fp16 overflow)."""
    return int(getattr(engine, "skipped_steps", 0))


def global_grad_norm(engine: Any) -> float | None:
    norm = engine.get_global_grad_norm()
    if norm is None:
        return None
    return float(norm.item() if torch.is_tensor(norm) else norm)


def optimizer_state_bytes(engine: Any) -> dict[str, int]:
    """What this rank's optimizer holds besides the model's weights: the Adam moments and the fp32
    master weights (this rank's partition under ZeRO 1/2, which keep one in fp32 training too;
    all of them under bf16/fp16 without ZeRO)."""
    optimizer = engine.optimizer
    inner = getattr(optimizer, "optimizer", optimizer)  # ZeRO wraps the torch optimizer
    moments = sum(
        t.numel() * t.element_size()
        for state in inner.state.values()
        for t in state.values()
        if torch.is_tensor(t) and t.dim() > 0  # not the step counters
    )
    partitions = [
        *getattr(optimizer, "single_partition_of_fp32_groups", []),  # ZeRO 1/2
        *getattr(optimizer, "fp32_groups_flat", []),  # bf16/fp16 without ZeRO: all of it
        *(t for group in getattr(optimizer, "fp32_groups", []) for t in group),  # (unfused, CPU)
        *getattr(optimizer, "fp32_groups_flat_partition", []),  # DeepSpeed's BF16_Optimizer
    ]
    master = sum(t.numel() * t.element_size() for t in partitions)
    return {"moments": moments, "fp32_master": master, "total": moments + master}
