"""The magvit2-pytorch facade, `VideoTokenizer`: its constructor arguments and its
`forward(..., return_*)` contract, mapped onto the typed config and the explicit methods of
`Tokenizer` (model/tokenizer.py); it also owns the training-only parts the reference keeps in the
model (`perceptual`, `discr`, `multiscale_discrs`) and binds the losses to them.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from model.config import DiscriminatorConfig, LayerSpec, TokenizerConfig
from model.critics import build_discriminator, build_perceptual
from model.export_format import (
    inference_config,
    load_config,
    load_exported_weights,
    save_pretrained,
)
from model.hub import resolve_pretrained
from model.losses import VGG16_CHECKPOINT_NAME, PerceptualLoss
from model.objectives import (
    DiscrLossBreakdown,
    LossBreakdown,
    discriminator_loss,
    generator_loss,
    recon_loss,
)
from model.streaming import decode_long, encode_long
from model.tokenizer import Tokenizer, TokenizerOutput

_ACTIVATION_NAMES = {
    nn.Identity: "identity",
    nn.Tanh: "tanh",
    nn.SiLU: "silu",
    nn.ELU: "elu",
    nn.GELU: "gelu",
}


def _activation_name(activation: Any) -> str:
    if isinstance(activation, str):
        return activation
    for cls, name in _ACTIVATION_NAMES.items():
        if type(activation) is cls:
            return name
    raise ValueError(
        f"lfq_activation must be one of {sorted(_ACTIVATION_NAMES.values())} (a name or the "
        f"nn.Module instance), got {activation!r}"
    )


def _vgg_weights_path(vgg_weights: Any) -> str | None:
    """None (the torch hub cache) for torchvision's VGG16_Weights enum, or a file path."""
    if vgg_weights is None or isinstance(vgg_weights, str | Path):
        return None if vgg_weights is None else str(vgg_weights)
    url = getattr(vgg_weights, "url", None)
    if url is not None:
        if url.rsplit("/", 1)[-1] != VGG16_CHECKPOINT_NAME:
            raise ValueError(
                f"only the ImageNet VGG16 classification weights ({VGG16_CHECKPOINT_NAME}) are "
                f"supported, got {vgg_weights}"
            )
        return None
    raise ValueError(
        f"vgg_weights must be a path or torchvision VGG16_Weights, got {vgg_weights!r}"
    )


def config_from_reference_kwargs(**kwargs: Any) -> TokenizerConfig:
    """TokenizerConfig from magvit2-pytorch's VideoTokenizer keyword arguments."""
    max_dim = kwargs.pop("max_dim")
    kwargs["max_dim"] = None if isinstance(max_dim, float) and math.isinf(max_dim) else max_dim
    kwargs["lfq_activation"] = _activation_name(kwargs["lfq_activation"])
    kwargs["vgg_weights"] = _vgg_weights_path(kwargs["vgg_weights"])
    discr_kwargs = kwargs.pop("discr_kwargs")
    kwargs["discriminator"] = None if discr_kwargs is None else DiscriminatorConfig(**discr_kwargs)
    return TokenizerConfig(**kwargs)


def reference_forward(
    model: VideoTokenizer,
    video_or_images: Tensor,
    cond: Tensor | None,
    *,
    return_loss: bool,
    return_codes: bool,
    return_recon: bool,
    return_discr_loss: bool,
    return_recon_loss_only: bool,
    apply_gradient_penalty: bool,
    video_contains_first_frame: bool,
    adversarial_loss_weight: float | None,
    multiscale_adversarial_loss_weight: float | None,
) -> Any:
    """What magvit2-pytorch's VideoTokenizer.forward returns for the same flags:

    - default: the reconstruction
    - return_codes: codes, or (codes, recon) with return_recon
    - return_recon_loss_only: (mse, recon)
    - return_loss: (total generator loss, LossBreakdown)
    - return_discr_loss: (total discriminator loss, DiscrLossBreakdown)
    """
    if return_loss + return_codes + return_discr_loss > 1:
        raise ValueError("return_loss, return_codes and return_discr_loss are exclusive")
    if video_or_images.ndim not in (4, 5):
        raise ValueError(
            f"expected images (B, C, H, W) or a video (B, C, T, H, W), "
            f"got shape {tuple(video_or_images.shape)}"
        )
    is_image = video_or_images.ndim == 4
    video = video_or_images.unsqueeze(2) if is_image else video_or_images
    contains_first = True if is_image else video_contains_first_frame
    model.check_video(video, contains_first_frame=contains_first)

    if return_codes and not return_recon:
        return model.encode(
            video, quantize=True, cond=cond, video_contains_first_frame=contains_first
        ).codes
    output = model.reconstruct(video, cond, contains_first)
    if return_codes:
        return output.codes, output.recon
    if not (return_loss or return_discr_loss or return_recon_loss_only):
        return output.recon
    if return_recon_loss_only:
        return recon_loss(video, output.recon), output.recon
    if return_discr_loss:
        return model.discriminator_loss(
            video, output.recon, apply_gradient_penalty=apply_gradient_penalty
        )
    return model.generator_loss(
        video,
        output,
        adversarial_loss_weight=adversarial_loss_weight,
        multiscale_adversarial_loss_weight=multiscale_adversarial_loss_weight,
    )


class VideoTokenizer(Tokenizer):
    """MAGVIT-v2 video tokenizer with magvit2-pytorch's constructor and `forward`.

    The keyword arguments are magvit2-pytorch 0.5.1's (see TokenizerConfig for each one), plus
    `gradient_checkpointing` and `reference_quirks`. `vgg` is an optional module mapping
    normalised (B, 3, H, W) frames to features for the perceptual loss (default: torchvision
    VGG16 to fc7, weights from `vgg_weights` or the torch hub cache, loaded on first use);
    `multiscale_discrs` are extra discriminators that take whole videos.
    """

    perceptual: PerceptualLoss | None
    discr: nn.Module | None
    multiscale_discrs: nn.ModuleList

    def __init__(
        self,
        *,
        image_size: int,
        layers: Sequence[str | tuple[str, int] | LayerSpec] = ("residual", "residual", "residual"),
        residual_conv_kernel_size: int | tuple[int, int, int] = 3,
        num_codebooks: int = 1,
        codebook_size: int | None = None,
        channels: int = 3,
        init_dim: int = 64,
        max_dim: float = float("inf"),
        dim_cond: int | None = None,
        dim_cond_expansion_factor: float = 4.0,
        input_conv_kernel_size: tuple[int, int, int] = (7, 7, 7),
        output_conv_kernel_size: tuple[int, int, int] = (3, 3, 3),
        pad_mode: str = "constant",
        lfq_entropy_loss_weight: float = 0.1,
        lfq_commitment_loss_weight: float = 1.0,
        lfq_diversity_gamma: float = 2.5,
        lfq_spherical: bool = False,
        quantizer_aux_loss_weight: float = 1.0,
        lfq_soft_clamp_input_value: float | None = 10.0,
        lfq_activation: nn.Module | str = "identity",
        use_fsq: bool = False,
        fsq_levels: Sequence[int] | None = None,
        attn_dim_head: int = 32,
        attn_heads: int = 8,
        attn_dropout: float = 0.0,
        linear_attn_dim_head: int = 8,
        linear_attn_heads: int = 16,
        vgg: nn.Module | None = None,
        vgg_weights: Any = None,
        perceptual_loss_weight: float = 1e-1,
        discr_kwargs: dict | None = None,
        multiscale_discrs: Sequence[nn.Module] = (),
        use_gan: bool = True,
        adversarial_loss_weight: float = 1.0,
        grad_penalty_loss_weight: float = 10.0,
        multiscale_adversarial_loss_weight: float = 1.0,
        flash_attn: bool = True,
        separate_first_frame_encoding: bool = False,
        gradient_checkpointing: bool = False,
        reference_quirks: bool = False,
    ) -> None:
        kwargs = {
            k: v
            for k, v in locals().items()
            if k not in ("self", "__class__", "vgg", "multiscale_discrs")
        }
        _build(self, config_from_reference_kwargs(**kwargs), vgg, multiscale_discrs)

    @classmethod
    def from_config(
        cls,
        config: TokenizerConfig,
        *,
        vgg: nn.Module | None = None,
        multiscale_discrs: Sequence[nn.Module] = (),
    ) -> VideoTokenizer:
        model = cls.__new__(cls)  # the keyword constructor is the reference's
        _build(model, config, vgg, multiscale_discrs)
        return model

    @classmethod
    def from_pretrained(
        cls,
        path_or_repo_id: str | Path,
        *,
        map_location: str | torch.device = "cpu",
        for_training: bool = False,
        **hub_kwargs: Any,
    ) -> VideoTokenizer:
        """An export (`save_pretrained`, or the trainer's `export/`) in eval mode: a local folder,
        or a Hugging Face Hub repo id when huggingface_hub is installed (`hub_kwargs`: revision,
        cache_dir, local_files_only, token; see model/hub.py). For inference the losses are
        off (no discriminator, no VGG); `for_training=True` keeps the config as trained."""
        directory = resolve_pretrained(path_or_repo_id, **hub_kwargs)
        config = load_config(directory)
        model = cls.from_config(config if for_training else inference_config(config))
        load_exported_weights(model, directory, map_location)
        return model

    def save_pretrained(self, directory: str | Path, *, metadata: dict | None = None) -> Path:
        """Writes the export (config.json + model.safetensors, the generator weights only) that
        `from_pretrained` and `model.pretrained.load_pretrained` read."""
        return save_pretrained(self, directory, metadata=metadata)

    def discriminators(self) -> list[nn.Module]:
        found = [self.discr] if self.discr is not None else []
        return found + list(self.multiscale_discrs)

    def discriminator_parameters(self) -> list[nn.Parameter]:
        return [p for module in self.discriminators() for p in module.parameters()]

    def generator_parameters(self) -> list[nn.Parameter]:
        skip = {id(p) for p in self.discriminator_parameters()}
        return [p for p in self.parameters() if id(p) not in skip]

    def decode_from_code_indices(
        self, codes: Tensor, cond: Tensor | None = None, video_contains_first_frame: bool = True
    ) -> Tensor:
        """Codes (B, t, h, w), or flattened (B, t*h*w) — with a trailing codebook axis when
        num_codebooks > 1 — to video (B, C, T, H, W)."""
        return self.decode_codes(codes, cond, video_contains_first_frame)

    def encode_long(
        self, video: Tensor, chunk_frames: int, cond: Tensor | None = None, quantize: bool = True
    ) -> Tensor:
        """Codes (or, with quantize=False, latents) of a video of any length, encoded in chunks
        of `chunk_frames` frames with memory set by the chunk; equal to whole-video encoding
        (bit-identical on CPU). See model/streaming.py."""
        return encode_long(self, video, chunk_frames, cond, quantize)

    def decode_long(
        self, codes_or_latents: Tensor, chunk_latent_frames: int, cond: Tensor | None = None
    ) -> Tensor:
        """Video from codes or quantized latents, decoded `chunk_latent_frames` latent frames at
        a time; equal to `decode_from_code_indices` / `decode`. See model/streaming.py."""
        return decode_long(self, codes_or_latents, chunk_latent_frames, cond)

    def generator_loss(
        self,
        video: Tensor,
        output: TokenizerOutput,
        *,
        adversarial_loss_weight: float | None = None,
        multiscale_adversarial_loss_weight: float | None = None,
    ) -> tuple[Tensor, LossBreakdown]:
        """`model.objectives.generator_loss` with this model's parts."""
        return generator_loss(
            video,
            output,
            config=self.config,
            last_weight=self.decoder.last_weight,
            training=self.training,
            perceptual=self.perceptual,
            discr=self.discr,
            multiscale_discrs=self.multiscale_discrs,
            adversarial_loss_weight=adversarial_loss_weight,
            multiscale_adversarial_loss_weight=multiscale_adversarial_loss_weight,
        )

    def discriminator_loss(
        self, video: Tensor, recon: Tensor, **settings: Any
    ) -> tuple[Tensor, DiscrLossBreakdown]:
        """`model.objectives.discriminator_loss` with this model's critics; `settings` are its
        keyword arguments (apply_gradient_penalty, gradient_penalty_scale, lecam_weight,
        lecam_anchors, logits_out)."""
        return discriminator_loss(
            video,
            recon,
            config=self.config,
            discr=self.discr,
            multiscale_discrs=self.multiscale_discrs,
            **settings,
        )

    def forward(
        self,
        video_or_images: Tensor,
        cond: Tensor | None = None,
        return_loss: bool = False,
        return_codes: bool = False,
        return_recon: bool = False,
        return_discr_loss: bool = False,
        return_recon_loss_only: bool = False,
        apply_gradient_penalty: bool = True,
        video_contains_first_frame: bool = True,
        adversarial_loss_weight: float | None = None,
        multiscale_adversarial_loss_weight: float | None = None,
    ) -> Any:
        """magvit2-pytorch's forward; see `reference_forward` for what each flag returns."""
        return reference_forward(
            self,
            video_or_images,
            cond,
            return_loss=return_loss,
            return_codes=return_codes,
            return_recon=return_recon,
            return_discr_loss=return_discr_loss,
            return_recon_loss_only=return_recon_loss_only,
            apply_gradient_penalty=apply_gradient_penalty,
            video_contains_first_frame=video_contains_first_frame,
            adversarial_loss_weight=adversarial_loss_weight,
            multiscale_adversarial_loss_weight=multiscale_adversarial_loss_weight,
        )


def _build(
    model: VideoTokenizer,
    config: TokenizerConfig,
    vgg: nn.Module | None,
    multiscale_discrs: Sequence[nn.Module],
) -> None:
    """Initialises `model`: the tokenizer, then its training-only parts. These are registered
    after the tokenizer's own, so the keys `discr.*`, `multiscale_discrs.*` come last, as
    magvit2-pytorch's do; the VGG stays outside the state dict."""
    Tokenizer.__init__(model, config)
    model.perceptual = build_perceptual(config, vgg)
    model.discr = build_discriminator(config) if config.use_gan else None
    model.multiscale_discrs = nn.ModuleList(multiscale_discrs)
