"""What a config will cost before a job waits in a queue: `python -m pipeline.train ... --dry-run`.

No process group, no GPU memory, seconds on a laptop: the model is built on the meta device (shapes
only) and one training step of one clip is traced there. Reported:
- the data: shards and samples per section, from the manifests;
- parameters of the generator and the discriminator(s);
- training FLOPs per clip of both engines (torch.utils.flop_counter's formulas for convolutions,
  matmuls and attention; elementwise ops are not counted), the discriminator's averaged over its
  gradient-penalty interval;
- memory per rank: weights, gradients and optimizer state under the configured precision, ZeRO
  stage and world size, and the activations autograd keeps for one micro-batch, with and without
  activation checkpointing (what the forward saves for backward; the peak adds the largest
  recomputed layer when checkpointing). Allocator caches, communication buffers and the CUDA
  context (~0.5-1 GiB) come on top.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass, field, replace

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import flop_registry

from data_prep.format import read_manifest
from model.critics import build_training_networks
from model.losses import PerceptualLoss
from pipeline.train.config import TrainConfig
from pipeline.train.objectives import DiscriminatorObjective, GeneratorObjective, frozen_parameters

GiB = 2**30


class FlopCount(TorchDispatchMode):
    """FLOPs of the ops torch.utils.flop_counter has formulas for (convolutions, matmuls,
    attention), op by op; `with FlopCount() as c: ...` then `c.flops`. FlopCounterMode itself
    also adds module backward hooks, which break autograd.grad(create_graph=True) of the
    gradient penalty; the op counts are the same. (The benchmarks count with it too.)"""

    def __init__(self) -> None:
        super().__init__()
        self.flops = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        formula = flop_registry.get(func.overloadpacket)
        if formula is not None:
            self.flops += formula(*args, **kwargs, out_val=out)
        return out


class _FusedAttention(TorchFunctionMode):
    """On the meta device scaled_dot_product_attention takes the math path, which keeps the
    (L x L) attention probabilities for backward; CPUs and GPUs run a fused kernel that keeps
    only the output and a log-sum-exp. For the activation count, route it to the CPU fused
    kernel's meta implementation (same saved tensors as the CUDA flash kernel's)."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.scaled_dot_product_attention:
            query, key, value, *rest = args
            mask = kwargs.get("attn_mask", rest[0] if rest else None)
            if mask is None and not kwargs.get("dropout_p", 0.0):
                return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
                    query,
                    key,
                    value,
                    is_causal=kwargs.get("is_causal", False),
                    scale=kwargs.get("scale"),
                )[0]
        return func(*args, **kwargs)


class _SavedBytes:
    """Bytes of the storages autograd saves for backward inside the block (each storage once,
    parameters' excluded: they are counted as weights), in total and per `layers` module (the
    activation-checkpointing units)."""

    def __init__(self, layers: list[nn.Module], parameters: list[torch.Tensor]) -> None:
        self.total = 0
        self.per_layer: dict[int, int] = {}
        self._current: list[int] = []
        self._layers = layers
        self._seen = {p.untyped_storage()._cdata for p in parameters}

    @contextlib.contextmanager
    def counting(self):
        handles = []
        for index, layer in enumerate(self._layers):
            handles.append(layer.register_forward_pre_hook(lambda *_, i=index: self._enter(i)))
            handles.append(layer.register_forward_hook(self._leave))  # returns None: output kept

        def pack(tensor: torch.Tensor):
            storage = tensor.untyped_storage()
            if storage._cdata not in self._seen:  # views and re-saves of one tensor: once
                self._seen.add(storage._cdata)
                size = storage.nbytes()
                self.total += size
                if self._current:
                    key = self._current[-1]
                    self.per_layer[key] = self.per_layer.get(key, 0) + size
            return tensor

        try:
            with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
                yield self
        finally:
            for handle in handles:
                handle.remove()

    def _enter(self, index: int) -> None:
        self._current.append(index)

    def _leave(self, *_) -> None:
        self._current.pop()


@dataclass
class DryRunReport:
    world_size: int
    data: dict[str, dict[str, int]] = field(default_factory=dict)
    generator_parameters: int = 0
    discriminator_parameters: int = 0
    generator_flops_per_clip: float = 0.0
    discriminator_flops_per_clip: float = 0.0
    """Averaged over the gradient-penalty interval (0 without a discriminator)."""
    memory_bytes: dict[str, float] = field(default_factory=dict)

    def lines(self) -> list[str]:
        out = [f"dry run for {self.world_size} rank(s) (nothing was started)"]
        for section, counts in self.data.items():
            shown = ", ".join(f"{v} {k}" for k, v in counts.items())
            out.append(f"  {section}: {shown}")
        out += [
            f"  generator: {self.generator_parameters / 1e6:.2f}M parameters, "
            f"{self.generator_flops_per_clip / 1e9:.1f} GFLOP per clip per step (fwd + bwd)",
            f"  discriminator: {self.discriminator_parameters / 1e6:.2f}M parameters, "
            f"{self.discriminator_flops_per_clip / 1e9:.1f} GFLOP per clip per step",
            "  memory per rank (estimate):",
        ]
        for name, value in self.memory_bytes.items():
            out.append(f"    {name}: {value / GiB:.3f} GiB")
        return out


def data_counts(config: TrainConfig) -> dict[str, dict[str, int]]:
    """Shards and samples per section and kind, from the manifests of dataset folders."""
    out: dict[str, dict[str, int]] = {}
    for name, section in (("data", config.data), ("eval_data", config.eval_data)):
        if section is None:
            continue
        for kind, specs in (("video", section.video_shards), ("image", section.image_shards)):
            counts = {"folders": 0, "shards": 0, "samples": 0, "uncounted": 0, "not found": 0}
            for spec in specs:
                if os.path.isdir(spec):
                    manifest = read_manifest(spec)
                    counts["folders"] += 1
                    counts["shards"] += sum(1 for s in manifest.shards if s.kind == kind)
                    counts["samples"] += sum(
                        s.num_samples for s in manifest.shards if s.kind == kind
                    )
                elif "://" in spec or spec.startswith("pipe:") or any(c in spec for c in "*?[{"):
                    counts["uncounted"] += 1  # URLs, globs: not read in a dry run
                elif os.path.isfile(spec):
                    counts["shards"] += 1
                else:
                    counts["not found"] += 1
            if specs:
                keep = ("folders", "shards", "samples")
                out[f"{name}.{kind}"] = {k: v for k, v in counts.items() if v or k in keep}
    return out


def _meta_perceptual(perceptual: PerceptualLoss | None) -> None:
    """The VGG16 of the perceptual loss as a shape-only stand-in: no weights are read."""
    if perceptual is None:
        return
    import torchvision

    from model.losses import vgg16_fc7_features

    with torch.device("meta"):
        network = vgg16_fc7_features(torchvision.models.vgg16(weights=None))
    perceptual.set_network(network)


def _build(config: TrainConfig, checkpointing: bool, dtype: torch.dtype):
    """On the meta device, in the engines' weight dtype (DeepSpeed's bf16 engines hold bf16)."""
    with torch.device("meta"):
        model_config = replace(config.model, gradient_checkpointing=checkpointing)
        tokenizer, perceptual, critics = build_training_networks(model_config)
    _meta_perceptual(perceptual)
    generator = GeneratorObjective(tokenizer, perceptual, critics)
    generator.to(dtype)
    if critics is not None:
        critics.to(dtype)
    return generator, critics


def _clip(config: TrainConfig, batch: int, dtype: torch.dtype) -> torch.Tensor:
    size, frames = config.model.image_size, config.data.num_frames
    return torch.zeros(batch, config.model.channels, frames, size, size, device="meta", dtype=dtype)


def _generator_step(generator, critics, video, adversarial: float, backward: bool = True):
    with frozen_parameters(critics):
        loss, recon, _, _ = generator(video, adversarial)
        if backward:
            loss.backward()
    return recon


def _discriminator_step(critics, video, recon, penalty: bool, config: TrainConfig):
    objective = DiscriminatorObjective(critics, config.model)
    loss, _, _ = objective(
        video,
        recon,
        penalty,
        float(config.losses.gradient_penalty_every),
        config.losses.lecam_weight,
        torch.zeros(2, device="meta"),
    )
    loss.backward()


def _parameters(*modules: nn.Module | None) -> list[torch.Tensor]:
    return [p for m in modules if m is not None for p in m.parameters()]


def _count(module: nn.Module | None) -> int:
    return sum(p.numel() for p in module.parameters()) if module is not None else 0


def _state_bytes(parameters: int, config: TrainConfig, zero_stage: int, world: int) -> dict:
    """Weights, gradients and optimizer state of one engine on one rank (AdamW)."""
    low = config.precision in ("bf16", "fp16")
    weight = 2 if low else 4
    grad = 4 if (low and config.fp32_gradient_reduction) or not low else 2
    master = 4  # DeepSpeed keeps an fp32 copy of each rank's partition under ZeRO >= 1
    shard_states = world if zero_stage >= 1 else 1
    shard_grads = world if zero_stage >= 2 else 1
    states = 8 * parameters / shard_states  # Adam's two moments, fp32
    if low or zero_stage >= 1:
        states += master * parameters / shard_states
    return {
        "weights": weight * parameters,
        "gradients": grad * parameters / shard_grads,
        "optimizer": states,
    }


def dry_run(config: TrainConfig, world_size: int) -> DryRunReport:
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(config.precision, torch.float32)
    report = DryRunReport(world_size=world_size, data=data_counts(config))
    generator, critics = _build(config, checkpointing=False, dtype=dtype)
    report.generator_parameters = _count(generator)
    report.discriminator_parameters = _count(critics)
    adversarial = config.model.adversarial_loss_weight if critics is not None else 0.0
    # The autocast of the trainer is not reproduced: FLOPs do not depend on it, and the saved
    # activations are counted at the training dtype of the input clip.
    with FlopCount() as flops:  # the math attention path: flop_counter has its formulas
        recon = _generator_step(generator, critics, _clip(config, 1, dtype), adversarial)
    report.generator_flops_per_clip = float(flops.flops)
    layers = list(generator.tokenizer.encoder.layers) + list(generator.tokenizer.decoder.layers)
    saved = _SavedBytes(layers, _parameters(generator, critics))
    # Saved tensors are all packed in the forward. (Not the backward: autograd runs it on its
    # own thread, outside the attention mode, and a checkpointed layer would recompute there.)
    with _FusedAttention(), saved.counting():
        _generator_step(generator, critics, _clip(config, 1, dtype), adversarial, backward=False)
    micro = config.micro_batch_size
    activations = {
        "generator": saved.total * micro,
        "checkpointed": _checkpointed_saved_bytes(config, dtype) * micro
        + max(saved.per_layer.values(), default=0) * micro,  # saved + the largest layer
    }
    if critics is not None:
        flops_per_clip, critic_saved = _measure_discriminator(critics, recon, config, dtype)
        report.discriminator_flops_per_clip = flops_per_clip
        activations["discriminator"] = critic_saved * micro
    report.memory_bytes = _memory_table(report, config, world_size, activations)
    return report


def _measure_discriminator(
    critics: nn.Module,
    recon: torch.Tensor,
    config: TrainConfig,
    dtype: torch.dtype,
) -> tuple[float, int]:
    """(FLOPs per clip of a discriminator step, the lazy gradient penalty's share averaged in;
    bytes its gradient-penalty step saves for one clip)."""
    per_step = []
    saved = _SavedBytes([], _parameters(critics))
    for penalty in (False, True):
        counting = saved.counting() if penalty else contextlib.nullcontext()
        with FlopCount() as flops, counting:
            _discriminator_step(critics, _clip(config, 1, dtype), recon, penalty, config)
        per_step.append(float(flops.flops))
    every = config.losses.gradient_penalty_every
    return per_step[0] + (per_step[1] - per_step[0]) / every, saved.total


def _checkpointed_saved_bytes(config: TrainConfig, dtype: torch.dtype) -> int:
    """Bytes the generator's forward saves for one clip with activation checkpointing."""
    checkpointed, _ = _build(config, checkpointing=True, dtype=dtype)
    saved = _SavedBytes([], _parameters(checkpointed, None))
    with _FusedAttention(), saved.counting():
        _generator_step(checkpointed, None, _clip(config, 1, dtype), 0.0, backward=False)
    return saved.total


def _memory_table(
    report: DryRunReport, config: TrainConfig, world_size: int, activations: dict[str, float]
) -> dict[str, float]:
    """Per-rank bytes: the engines' states, the activations per micro-batch, and the peak of the
    configured run (the discriminator's step runs after the generator's: peaks do not add up)."""
    memory: dict[str, float] = {}
    for name, count, stage in (
        ("generator", report.generator_parameters, config.zero_stage),
        ("discriminator", report.discriminator_parameters, config.discriminator_zero_stage),
    ):
        if count:
            for part, value in _state_bytes(count, config, stage, world_size).items():
                memory[f"{name} {part}"] = value
    states = sum(memory.values())
    memory["generator activations per micro-batch"] = activations["generator"]
    memory["... with activation checkpointing (saved + largest layer)"] = activations[
        "checkpointed"
    ]
    if "discriminator" in activations:
        memory["discriminator activations per micro-batch (gradient penalty step)"] = activations[
            "discriminator"
        ]
    generator_peak = activations["checkpointed" if config.activation_checkpointing else "generator"]
    critic_peak = activations.get("discriminator", 0)
    memory["total as configured"] = states + max(generator_peak, critic_peak)
    return memory
