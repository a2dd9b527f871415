"""Typed configuration of the tokenizer.

The user-facing contract is the magvit2-pytorch constructor (`VideoTokenizer(image_size=...,
layers=(...), ...)`). It is parsed once into the dataclasses below, so that no string comparison
reaches a forward pass and every bad value fails at construction with a `ValueError` that names
the field, what was given and what is allowed.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from typing import Any

from model.layer_spec import LAYER_KINDS as LAYER_KINDS
from model.layer_spec import LayerSpec as LayerSpec
from model.layer_spec import parse_layers as parse_layers

PAD_MODES = ("constant", "replicate")
ADVERSARIAL_LOSSES = ("hinge", "non_saturating")
DISCRIMINATOR_KINDS = ("2d", "3d")
LFQ_ACTIVATIONS = ("identity", "tanh", "silu", "elu", "gelu")


def _kernel3(name: str, value: Any) -> tuple[int, int, int]:
    kernel = (value,) * 3 if isinstance(value, int) else tuple(value)
    if len(kernel) != 3 or any(not isinstance(k, int) or k < 1 for k in kernel):
        raise ValueError(f"{name} must be an int or 3 positive ints (t, h, w), got {value!r}")
    if kernel[1] % 2 == 0 or kernel[2] % 2 == 0:
        raise ValueError(f"{name}: spatial kernel sizes must be odd, got {value!r}")
    return kernel  # type: ignore[return-value]


@dataclass(frozen=True, kw_only=True)
class DiscriminatorConfig:
    """The image discriminator (magvit2-pytorch `Discriminator` arguments)."""

    dim: int
    """Base width; block i has min(dim * 4 * 2**i, max_dim) channels."""
    image_size: int
    channels: int = 3
    max_dim: int = 512
    attn_heads: int = 8
    """Accepted for compatibility; the reference discriminator has no softmax attention."""
    attn_dim_head: int = 32
    linear_attn_dim_head: int = 8
    linear_attn_heads: int = 16
    ff_mult: int = 4
    antialiased_downsample: bool = True
    """Blur before each strided downsampling (blurpool). The reference defaults to False."""

    def __post_init__(self) -> None:
        for name in ("dim", "channels", "max_dim", "linear_attn_dim_head", "linear_attn_heads"):
            if getattr(self, name) < 1:
                raise ValueError(f"discriminator {name} must be >= 1, got {getattr(self, name)}")
        if self.image_size < 8 or self.image_size % (2**self.num_downsamples):
            raise ValueError(
                f"discriminator image_size must be >= 8 and divisible by "
                f"2**{self.num_downsamples}, got {self.image_size}"
            )

    @property
    def num_downsamples(self) -> int:
        return int(math.log2(self.image_size) - 2) if self.image_size >= 8 else 0


@dataclass(frozen=True, kw_only=True)
class TokenizerConfig:
    """Everything that defines a VideoTokenizer's architecture and losses (JSON-serialisable)."""

    image_size: int
    layers: tuple[LayerSpec, ...] = (LayerSpec("residual"),) * 3
    residual_conv_kernel_size: tuple[int, int, int] = (3, 3, 3)
    num_codebooks: int = 1
    codebook_size: int | None = None
    """LFQ codebook size (a power of two); must be None with FSQ."""
    channels: int = 3
    init_dim: int = 64
    max_dim: int | None = None
    """Cap on the width of compress layers (None: no cap)."""
    dim_cond: int | None = None
    dim_cond_expansion_factor: float = 4.0
    input_conv_kernel_size: tuple[int, int, int] = (7, 7, 7)
    output_conv_kernel_size: tuple[int, int, int] = (3, 3, 3)
    pad_mode: str = "constant"
    """Padding of the input/output convs: 'constant' (zeros) or 'replicate'."""
    lfq_entropy_loss_weight: float = 0.1
    lfq_commitment_loss_weight: float = 1.0
    lfq_diversity_gamma: float = 2.5
    lfq_spherical: bool = False
    lfq_soft_clamp_input_value: float | None = 10.0
    lfq_activation: str = "identity"
    """Straight-through activation of LFQ: one of LFQ_ACTIVATIONS."""
    quantizer_aux_loss_weight: float = 1.0
    use_fsq: bool = False
    fsq_levels: tuple[int, ...] | None = None
    attn_dim_head: int = 32
    attn_heads: int = 8
    attn_dropout: float = 0.0
    linear_attn_dim_head: int = 8
    linear_attn_heads: int = 16
    perceptual_loss_weight: float = 0.1
    vgg_weights: str | None = None
    """Path of a torchvision VGG16 state dict; None looks in the torch hub cache."""
    discriminator: DiscriminatorConfig | None = None
    """None: the reference default (dim = final encoder dim, max_dim 512)."""
    use_gan: bool = True
    adversarial_loss_weight: float = 1.0
    grad_penalty_loss_weight: float = 10.0
    multiscale_adversarial_loss_weight: float = 1.0
    generator_adversarial_loss: str = "hinge"
    """The generator's adversarial loss: 'hinge' (-mean D(fake), the reference) or
    'non_saturating' (mean softplus(-D(fake)))."""
    discriminator_adversarial_loss: str = "hinge"
    """The discriminator's loss: 'hinge' (mean relu(1 + D(fake)) + relu(1 - D(real)), the
    reference) or 'non_saturating' (mean softplus(D(fake)) + softplus(-D(real)))."""
    discriminator_kind: str = "2d"
    """'2d' (the reference): the image discriminator on one random frame of each clip. '3d': a
    spatio-temporal discriminator on the whole clip (model/discriminator3d.py: 3-D residual
    blocks, blurpool downsampling in space and time, MAGVIT-style), which can judge motion; it
    takes `discriminator`'s dim, max_dim, image size and antialiasing."""
    adaptive_adversarial_weight: bool = True
    """True (the reference): the adversarial terms are scaled by the adaptive weight (perceptual
    vs adversarial gradient norm at the last decoder conv) when the perceptual loss is on. False:
    by their loss weights alone (the adaptive weight is 1, no last-layer gradients are taken)."""
    flash_attn: bool = True
    """Accepted for compatibility: attention always runs on scaled_dot_product_attention."""
    separate_first_frame_encoding: bool = False
    reference_quirks: bool = False
    """Reproduce magvit2-pytorch 0.5.1's numerics, bugs included, for checkpoints imported from
    it: its strided time convs pad one frame too many (the first latent frame ignores the video,
    the last frame is never seen), and its encoder skips the final LayerNorm."""
    gradient_checkpointing: bool = False
    """Recompute each encoder/decoder layer in the backward pass instead of storing activations."""

    def __post_init__(self) -> None:
        set_ = object.__setattr__  # frozen: normalise lists from YAML/JSON into tuples
        set_(self, "layers", parse_layers(self.layers))
        for name in (
            "residual_conv_kernel_size",
            "input_conv_kernel_size",
            "output_conv_kernel_size",
        ):
            set_(self, name, _kernel3(name, getattr(self, name)))
        if isinstance(self.discriminator, dict):
            set_(self, "discriminator", DiscriminatorConfig(**self.discriminator))
        if self.fsq_levels is not None:
            set_(self, "fsq_levels", tuple(self.fsq_levels))
        if isinstance(self.max_dim, float):
            if not math.isinf(self.max_dim):
                raise ValueError(f"max_dim must be an int or inf, got {self.max_dim}")
            set_(self, "max_dim", None)
        self._validate()

    def _validate(self) -> None:
        self._validate_sizes()
        self._validate_choices()
        self._validate_codebook()
        self._validate_layers()

    def _validate_sizes(self) -> None:
        for name in (
            "image_size",
            "channels",
            "init_dim",
            "num_codebooks",
            "attn_dim_head",
            "attn_heads",
            "linear_attn_dim_head",
            "linear_attn_heads",
        ):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if self.max_dim is not None and self.max_dim < 1:
            raise ValueError(f"max_dim must be >= 1 or None, got {self.max_dim}")

    def _validate_choices(self) -> None:
        """Names among the allowed ones, flags and probabilities."""
        if self.pad_mode not in PAD_MODES:
            raise ValueError(
                f"pad_mode must be one of {PAD_MODES}, got {self.pad_mode!r} (reflect and "
                "circular padding would read future frames and break causality)"
            )
        if self.lfq_activation not in LFQ_ACTIVATIONS:
            raise ValueError(
                f"lfq_activation must be one of {LFQ_ACTIVATIONS}, got {self.lfq_activation!r}"
            )
        for name in ("generator_adversarial_loss", "discriminator_adversarial_loss"):
            if getattr(self, name) not in ADVERSARIAL_LOSSES:
                raise ValueError(
                    f"{name} must be one of {ADVERSARIAL_LOSSES}, got {getattr(self, name)!r}"
                )
        if self.discriminator_kind not in DISCRIMINATOR_KINDS:
            raise ValueError(
                f"discriminator_kind must be one of {DISCRIMINATOR_KINDS}, "
                f"got {self.discriminator_kind!r}"
            )
        if not isinstance(self.adaptive_adversarial_weight, bool):
            raise ValueError(
                "adaptive_adversarial_weight must be a bool, got "
                f"{self.adaptive_adversarial_weight!r}"
            )
        if not 0.0 <= self.attn_dropout < 1.0:
            raise ValueError(f"attn_dropout must be in [0, 1), got {self.attn_dropout}")

    def _validate_codebook(self) -> None:
        """LFQ needs a power-of-two codebook_size, FSQ its levels."""
        if self.use_fsq:
            if self.codebook_size is not None or not self.fsq_levels:
                raise ValueError(
                    "use_fsq=True needs fsq_levels (e.g. [8, 5, 5, 5]) and codebook_size=None; "
                    f"got fsq_levels={self.fsq_levels}, codebook_size={self.codebook_size}"
                )
            if any(not isinstance(level, int) or level < 3 for level in self.fsq_levels):
                raise ValueError(f"fsq_levels must be ints >= 3, got {self.fsq_levels}")
        else:
            size = self.codebook_size
            if size is None or self.fsq_levels is not None:
                raise ValueError(
                    "use_fsq=False needs codebook_size (a power of two) and fsq_levels=None; "
                    f"got codebook_size={size}, fsq_levels={self.fsq_levels}"
                )
            if size < 2 or size & (size - 1):
                raise ValueError(f"codebook_size must be a power of two >= 2, got {size}")

    def _validate_layers(self) -> None:
        """The layers fit the image size; conditioned layers need dim_cond."""
        num_space = sum(spec.compresses_space for spec in self.layers)
        if self.image_size % (2**num_space):
            raise ValueError(
                f"image_size {self.image_size} must be divisible by 2**{num_space} "
                f"(the layers compress space {num_space} times)"
            )
        if any(spec.is_conditioned for spec in self.layers):
            if self.dim_cond is None or self.dim_cond < 1:
                raise ValueError(
                    f"layers {[s.kind for s in self.layers if s.is_conditioned]} are conditioned: "
                    f"dim_cond must be a positive int, got {self.dim_cond}"
                )
            if int(self.dim_cond * self.dim_cond_expansion_factor) < 1:
                raise ValueError(
                    f"dim_cond * dim_cond_expansion_factor must be >= 1, got "
                    f"{self.dim_cond} * {self.dim_cond_expansion_factor}"
                )

    # Derived facts used by the model and by the pipeline.

    @property
    def time_downsample_factor(self) -> int:
        return 2 ** sum(spec.compresses_time for spec in self.layers)

    @property
    def space_downsample_factor(self) -> int:
        return 2 ** sum(spec.compresses_space for spec in self.layers)

    @property
    def latent_size(self) -> int:
        return self.image_size // self.space_downsample_factor

    @property
    def is_conditioned(self) -> bool:
        return any(spec.is_conditioned for spec in self.layers)

    @property
    def expanded_dim_cond(self) -> int:
        if self.dim_cond is None:
            raise ValueError("this tokenizer has no conditioning (dim_cond is None)")
        return int(self.dim_cond * self.dim_cond_expansion_factor)

    @property
    def effective_codebook_size(self) -> int:
        if self.use_fsq:
            assert self.fsq_levels is not None
            return math.prod(self.fsq_levels)
        assert self.codebook_size is not None
        return self.codebook_size

    def layer_dims(self) -> list[tuple[int, int]]:
        """(in_dim, out_dim) of each encoder layer, in order."""
        dims, dim = [], self.init_dim
        for spec in self.layers:
            out = dim
            if spec.compresses_space or spec.compresses_time:
                out = spec.out_dim if spec.out_dim is not None else dim * 2
                if self.max_dim is not None:
                    out = min(out, self.max_dim)
            dims.append((dim, out))
            dim = out
        return dims

    @property
    def latent_dim(self) -> int:
        """Channels of the encoder output, before quantization."""
        dims = self.layer_dims()
        return dims[-1][1] if dims else self.init_dim

    def resolved_discriminator(self) -> DiscriminatorConfig:
        if self.discriminator is not None:
            return self.discriminator
        return DiscriminatorConfig(
            dim=self.latent_dim,
            image_size=self.image_size,
            channels=self.channels,
            max_dim=512,
            antialiased_downsample=True,
        )

    def num_frames_ok(self, num_frames: int, contains_first_frame: bool = True) -> bool:
        return (
            num_frames >= 1
            and (num_frames - int(contains_first_frame)) % (self.time_downsample_factor) == 0
        )

    # Serialisation (exports, checkpoints).

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["layers"] = [spec.to_reference() for spec in self.layers]
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TokenizerConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(
                f"unknown tokenizer config keys {unknown}; valid keys: {sorted(known)}"
            )
        return cls(**data)
