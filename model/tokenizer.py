"""VideoTokenizer: causal 3-D conv encoder, LFQ/FSQ quantizer, mirrored decoder.

Legend: B batch, C channels, T/H/W video frames and pixels, D latent channels, t/h/w latent grid.
A video of T = 1 + k*f frames (f = 2**number of compress_time layers) is padded in front with
f - 1 zero frames, so that frame 0 gets a latent frame of its own and every later latent frame
covers f frames: (B, C, 1 + k*f, H, W) -> codes (B, 1 + k, H/s, W/s). Images (B, C, H, W) are
one-frame videos.

The explicit methods (`encode`, `quantize`, `decode`, `reconstruct`, `generator_loss`,
`discriminator_loss`) are what the training pipeline calls; the constructor and `forward(...)`
keep the magvit2-pytorch contract on top of them (see model/reference_api.py).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from model import objectives
from model.config import LayerSpec, TokenizerConfig
from model.conv import CausalConv3d, FrameConv2d, pad_time_past
from model.discriminator import Discriminator, Discriminators
from model.discriminator3d import Discriminator3D, Discriminator3DConfig
from model.layers import build_layer_pair
from model.losses import PerceptualLoss
from model.norm import ChannelLayerNorm
from model.quantizers import QuantizerLossBreakdown, QuantizerOutput, build_quantizer
from model.reference_api import config_from_reference_kwargs, reference_forward
from model.streaming import decode_long, encode_long


class TokenizerOutput(NamedTuple):
    recon: Tensor
    """(B, C, T, H, W) reconstruction."""
    codes: Tensor
    """(B, t, h, w) or (B, t, h, w, num_codebooks) integer codes."""
    aux_loss: Tensor
    """Scalar quantizer loss (entropy + commitment), not yet multiplied by
    quantizer_aux_loss_weight."""
    quantizer_breakdown: QuantizerLossBreakdown | None


class VideoTokenizer(nn.Module):
    """MAGVIT-v2 video tokenizer.

    The keyword arguments are magvit2-pytorch 0.5.1's (see TokenizerConfig for each one), plus
    `gradient_checkpointing` and `reference_quirks`. `vgg` is an optional module mapping
    normalised (B, 3, H, W) frames to features for the perceptual loss (default: torchvision
    VGG16 to fc7, weights from `vgg_weights` or the torch hub cache, loaded on first use);
    `multiscale_discrs` are extra discriminators that take whole videos.
    """

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
        super().__init__()
        kwargs = {
            k: v
            for k, v in locals().items()
            if k not in ("self", "__class__", "vgg", "multiscale_discrs")
        }
        self._build(config_from_reference_kwargs(**kwargs), vgg, multiscale_discrs)

    @classmethod
    def from_config(
        cls,
        config: TokenizerConfig,
        *,
        vgg: nn.Module | None = None,
        multiscale_discrs: Sequence[nn.Module] = (),
    ) -> VideoTokenizer:
        model = cls.__new__(cls)
        nn.Module.__init__(model)
        model._build(config, vgg, multiscale_discrs)
        return model

    def _build(
        self, config: TokenizerConfig, vgg: nn.Module | None, multiscale_discrs: Sequence[nn.Module]
    ) -> None:
        self.config = config
        self.gradient_checkpointing = config.gradient_checkpointing
        kernel_in, kernel_out = config.input_conv_kernel_size, config.output_conv_kernel_size
        self.conv_in = CausalConv3d(
            config.channels, config.init_dim, kernel_in, pad_mode=config.pad_mode
        )
        self.conv_out = CausalConv3d(
            config.init_dim, config.channels, kernel_out, pad_mode=config.pad_mode
        )
        self.conv_in_first_frame: nn.Module | None = None
        self.conv_out_first_frame: nn.Module | None = None
        if config.separate_first_frame_encoding:
            self.conv_in_first_frame = FrameConv2d(config.channels, config.init_dim, kernel_in[1:])
            self.conv_out_first_frame = FrameConv2d(
                config.init_dim, config.channels, kernel_out[1:]
            )

        pairs = [
            build_layer_pair(spec, in_dim, out_dim, config)
            for spec, (in_dim, out_dim) in zip(config.layers, config.layer_dims(), strict=True)
        ]
        self.encoder_layers = nn.ModuleList(pair.encoder for pair in pairs)
        self.decoder_layers = nn.ModuleList(pair.decoder for pair in reversed(pairs))
        self._encoder_takes_cond = [pair.takes_cond for pair in pairs]
        self._decoder_takes_cond = self._encoder_takes_cond[::-1]
        self.encoder_norm = ChannelLayerNorm(config.latent_dim)

        self.encoder_cond_in: nn.Module | None = None
        self.decoder_cond_in: nn.Module | None = None
        if config.is_conditioned:
            assert config.dim_cond is not None
            expanded = config.expanded_dim_cond
            self.encoder_cond_in = nn.Sequential(nn.Linear(config.dim_cond, expanded), nn.SiLU())
            self.decoder_cond_in = nn.Sequential(nn.Linear(config.dim_cond, expanded), nn.SiLU())

        self.quantizer = build_quantizer(config)

        # Training-only parts: perceptual loss (frozen VGG, outside the state dict) and the
        # discriminators, which the trainer optimises separately.
        self.perceptual: PerceptualLoss | None = None
        if config.channels in (1, 3, 4) and config.perceptual_loss_weight > 0:
            self.perceptual = PerceptualLoss(weights=config.vgg_weights, network=vgg)
        self.discr = _build_discriminator(config) if config.use_gan else None
        self.multiscale_discrs = nn.ModuleList(multiscale_discrs)

    # Shape facts.

    @property
    def time_downsample_factor(self) -> int:
        return self.config.time_downsample_factor

    @property
    def fmap_size(self) -> int:
        return self.config.latent_size

    @property
    def codebook_size(self) -> int:
        return self.config.effective_codebook_size

    def set_gradient_checkpointing(self, enabled: bool = True) -> None:
        """Recompute each encoder/decoder layer during backward instead of keeping its
        activations (torch.utils.checkpoint, non-reentrant): less memory, same gradients."""
        self.gradient_checkpointing = enabled

    # Input checks: each bad input is a ValueError saying what was expected and what was given.

    def check_video(
        self, video: Tensor, *, contains_first_frame: bool = True, exact_size: bool = True
    ) -> None:
        config = self.config
        if video.ndim != 5:
            raise ValueError(f"expected a video (B, C, T, H, W), got shape {tuple(video.shape)}")
        if not video.is_floating_point():
            raise ValueError(f"expected a floating-point video, got dtype {video.dtype}")
        _, channels, frames, height, width = video.shape
        if channels != config.channels:
            raise ValueError(
                f"expected {config.channels} channels, got {channels} (shape {tuple(video.shape)})"
            )
        if not config.num_frames_ok(frames, contains_first_frame):
            f = config.time_downsample_factor
            rule = f"1 + k*{f}" if contains_first_frame else f"k*{f} (k >= 1)"
            raise ValueError(
                f"expected a number of frames of the form {rule} (the layers compress time by "
                f"{f}), got {frames}; e.g. {1 + f}, {1 + 2 * f} or {1 + 4 * f} frames"
            )
        if exact_size and (height, width) != (config.image_size, config.image_size):
            raise ValueError(
                f"expected frames of {config.image_size}x{config.image_size}, got {height}x{width}"
            )
        s = config.space_downsample_factor
        if height % s or width % s:
            raise ValueError(f"expected height and width divisible by {s}, got {height}x{width}")

    def _embed_cond(self, cond: Tensor | None, stem: nn.Module | None, batch: int) -> Tensor | None:
        if stem is None:
            if cond is not None:
                raise ValueError("cond was given but this tokenizer has no conditioned layers")
            return None
        dim_cond = self.config.dim_cond
        if cond is None:
            raise ValueError(
                f"cond of shape (batch, {dim_cond}) is required: the layers include conditioned "
                f"ones ({[s.kind for s in self.config.layers if s.is_conditioned]})"
            )
        if cond.shape != (batch, dim_cond):
            raise ValueError(
                f"expected cond of shape ({batch}, {dim_cond}), got {tuple(cond.shape)}"
            )
        return stem(cond)

    def _run_layers(
        self, layers: nn.ModuleList, takes_cond: list[bool], x: Tensor, cond: Tensor | None
    ) -> Tensor:
        recompute = self.gradient_checkpointing and torch.is_grad_enabled()
        for layer, with_cond in zip(layers, takes_cond, strict=True):
            args = (x, cond) if with_cond else (x,)
            x = checkpoint(layer, *args, use_reentrant=False) if recompute else layer(*args)
        return x

    # The model.

    def encode(
        self,
        video: Tensor,
        quantize: bool = False,
        cond: Tensor | None = None,
        video_contains_first_frame: bool = True,
    ) -> Tensor | QuantizerOutput:
        """(B, C, T, H, W) -> latents (B, D, t, h, w), or the quantizer output if `quantize`."""
        if video.ndim == 4:
            video = video.unsqueeze(2)
        self.check_video(video, contains_first_frame=video_contains_first_frame, exact_size=False)
        cond = self._embed_cond(cond, self.encoder_cond_in, video.shape[0])
        time_pad = self.time_downsample_factor - 1 if video_contains_first_frame else 0
        if self.conv_in_first_frame is not None and video_contains_first_frame:
            # The first frame gets its own 2-D stem; the rest runs through the causal stem
            # without it, and the two are joined behind the zero padding.
            x = self.conv_in_first_frame(video[:, :, 0]).unsqueeze(2)  # (b, d, 1, h, w)
            if video.shape[2] > 1:  # images have no rest
                x = torch.cat((x, self.conv_in(video[:, :, 1:])), dim=2)  # (b, d, T, h, w)
            x = pad_time_past(x, time_pad)
        else:
            x = self.conv_in(pad_time_past(video, time_pad))  # (b, d, T + f - 1, h, w)
        x = self._run_layers(self.encoder_layers, self._encoder_takes_cond, x, cond)
        if not self.config.reference_quirks:
            x = self.encoder_norm(x)  # (b, D, t, h, w)
        return self.quantizer(x) if quantize else x

    def quantize(self, latents: Tensor) -> QuantizerOutput:
        return self.quantizer(latents)

    def decode(
        self, quantized: Tensor, cond: Tensor | None = None, video_contains_first_frame: bool = True
    ) -> Tensor:
        """Quantized latents (B, D, t, h, w) -> video (B, C, T, H, W)."""
        if quantized.ndim != 5 or quantized.shape[1] != self.config.latent_dim:
            raise ValueError(
                f"expected latents (B, {self.config.latent_dim}, t, h, w), "
                f"got shape {tuple(quantized.shape)}"
            )
        cond = self._embed_cond(cond, self.decoder_cond_in, quantized.shape[0])
        # The quantizers hand out channels-last views; kernels round differently per layout, so
        # one layout keeps the result independent of the caller's (and of chunked decoding).
        quantized = quantized.contiguous()
        x = self._run_layers(self.decoder_layers, self._decoder_takes_cond, quantized, cond)
        time_pad = self.time_downsample_factor - 1 if video_contains_first_frame else 0
        if self.conv_out_first_frame is not None and video_contains_first_frame:
            out = self.conv_out_first_frame(x[:, :, time_pad]).unsqueeze(2)
            if x.shape[2] > time_pad + 1:
                out = torch.cat((out, self.conv_out(x[:, :, time_pad + 1 :])), dim=2)
            return out
        return self.conv_out(x)[:, :, time_pad:]  # (b, C, T, H, W)

    def codes_to_latents(self, codes: Tensor) -> Tensor:
        """Validated integer codes -> quantized latents (B, D, t, h, w)."""
        codes = self._check_codes(codes)
        return self.quantizer.indices_to_codes(codes)

    def decode_from_code_indices(
        self, codes: Tensor, cond: Tensor | None = None, video_contains_first_frame: bool = True
    ) -> Tensor:
        """Codes (B, t, h, w), or flattened (B, t*h*w) — with a trailing codebook axis when
        num_codebooks > 1 — to video (B, C, T, H, W)."""
        return self.decode(self.codes_to_latents(codes), cond, video_contains_first_frame)

    def _check_codes(self, codes: Tensor) -> Tensor:
        num_codebooks = self.config.num_codebooks
        grid_dims = 4 if num_codebooks == 1 else 5
        flat_dims = grid_dims - 2
        if codes.is_floating_point() or codes.is_complex() or codes.dtype == torch.bool:
            raise ValueError(f"codes must be an integer tensor, got dtype {codes.dtype}")
        suffix = "" if num_codebooks == 1 else f", {num_codebooks}"
        if codes.ndim not in (grid_dims, flat_dims) or (
            num_codebooks > 1 and codes.shape[-1] != num_codebooks
        ):
            raise ValueError(
                f"expected codes of shape (B, t, h, w{suffix}) or (B, t*h*w{suffix}), "
                f"got {tuple(codes.shape)}"
            )
        if codes.numel() and (int(codes.min()) < 0 or int(codes.max()) >= self.codebook_size):
            raise ValueError(
                f"codes must lie in [0, {self.codebook_size}), got values in "
                f"[{int(codes.min())}, {int(codes.max())}]"
            )
        if codes.ndim == flat_dims:
            size = self.fmap_size
            length = codes.shape[1]
            if length == 0 or length % (size * size):
                raise ValueError(
                    f"flattened codes must have a length divisible by the latent grid "
                    f"{size}x{size} = {size * size}, got {length}"
                )
            codes = codes.unflatten(1, (length // (size * size), size, size))
        return codes.long()

    def reconstruct(
        self, video: Tensor, cond: Tensor | None = None, video_contains_first_frame: bool = True
    ) -> TokenizerOutput:
        """One pass through encoder, quantizer and decoder: what a training step needs."""
        quantized, codes, aux_loss, breakdown = self.encode(
            video, quantize=True, cond=cond, video_contains_first_frame=video_contains_first_frame
        )
        recon = self.decode(quantized, cond, video_contains_first_frame)
        return TokenizerOutput(recon, codes, aux_loss, breakdown)

    @torch.no_grad()
    def tokenize(self, video: Tensor, cond: Tensor | None = None) -> Tensor:
        """Codes of a video or of images, in eval mode (restoring the previous mode)."""
        was_training = self.training
        self.eval()
        try:
            return self.encode(video, quantize=True, cond=cond).codes
        finally:
            self.train(was_training)

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

    # Parameter groups: the trainer gives them to separate optimizers / DeepSpeed engines.

    def generator_parameters(self) -> list[nn.Parameter]:
        skip = {id(p) for p in self.discriminator_parameters()}
        return [p for p in self.parameters() if id(p) not in skip]

    def discriminator_parameters(self) -> list[nn.Parameter]:
        params = []
        for module in self.discriminators():
            params.extend(module.parameters())
        return params

    def detach_discriminators(self) -> Discriminators:
        """Takes the discriminators out of this module's tree and returns them as one module, for
        a separate optimizer or DeepSpeed engine. The losses keep using them; this module's
        parameters, state dict and exports are then the generator's alone."""
        critics = Discriminators(self.discr, self.multiscale_discrs)
        for name in ("discr", "multiscale_discrs"):
            self._modules.pop(name, None)
            object.__setattr__(self, name, getattr(critics, name))
        return critics

    def discriminators(self) -> list[nn.Module]:
        found = [self.discr] if self.discr is not None else []
        return found + list(self.multiscale_discrs)

    @property
    def last_decoder_weight(self) -> Tensor:
        """Where the adaptive adversarial weight compares gradient norms."""
        return self.conv_out.conv.weight

    # Losses.

    @staticmethod
    def recon_loss(video: Tensor, recon: Tensor) -> Tensor:
        return F.mse_loss(recon.float(), video.float())

    def generator_loss(
        self,
        video: Tensor,
        output: TokenizerOutput,
        *,
        adversarial_loss_weight: float | None = None,
        multiscale_adversarial_loss_weight: float | None = None,
    ) -> tuple[Tensor, objectives.LossBreakdown]:
        return objectives.generator_loss(
            self,
            video,
            output,
            adversarial_loss_weight=adversarial_loss_weight,
            multiscale_adversarial_loss_weight=multiscale_adversarial_loss_weight,
        )

    def discriminator_loss(
        self,
        video: Tensor,
        recon: Tensor,
        *,
        apply_gradient_penalty: bool = True,
        gradient_penalty_scale: float = 1.0,
        lecam_weight: float = 0.0,
        lecam_anchors: Tensor | None = None,
        logits_out: dict[str, Tensor] | None = None,
    ) -> tuple[Tensor, objectives.DiscrLossBreakdown]:
        return objectives.discriminator_loss(
            self,
            video,
            recon,
            apply_gradient_penalty=apply_gradient_penalty,
            gradient_penalty_scale=gradient_penalty_scale,
            lecam_weight=lecam_weight,
            lecam_anchors=lecam_anchors,
            logits_out=logits_out,
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


def _build_discriminator(config: TokenizerConfig) -> nn.Module:
    """The reference's image discriminator, or the spatio-temporal one (`discriminator_kind`)."""
    d = config.resolved_discriminator()
    if config.discriminator_kind == "2d":
        return Discriminator(d)
    time_halvings = int(math.log2(config.time_downsample_factor))
    return Discriminator3D(
        Discriminator3DConfig(
            image_size=d.image_size,
            channels=d.channels,
            dim=d.dim,
            max_dim=d.max_dim,
            num_space_downsamples=d.num_downsamples,
            num_time_downsamples=min(time_halvings, d.num_downsamples),
            antialiased_downsample=d.antialiased_downsample,
        )
    )
