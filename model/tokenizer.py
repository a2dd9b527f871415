"""The tokenizer: causal 3-D conv encoder, LFQ/FSQ quantizer, mirrored decoder.

Legend: B batch, C channels, T/H/W video frames and pixels, D latent channels, t/h/w latent grid.
A video of T = 1 + k*f frames (f = 2**number of compress_time layers) is padded in front with
f - 1 zero frames, so that frame 0 gets a latent frame of its own and every later latent frame
covers f frames: (B, C, 1 + k*f, H, W) -> codes (B, 1 + k, H/s, W/s). Images (B, C, H, W) are
one-frame videos.

`Tokenizer` holds only the encoder, the quantizer and the decoder, with the explicit methods the
pipeline calls (`encode`, `quantize`, `decode`, `reconstruct`, ...). The losses and their
networks live beside it (model/objectives.py, model/critics.py); the magvit2-pytorch contract,
`VideoTokenizer`, is a layer on top (model/reference_api.py).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor, nn

from model.autoencoder import Decoder, Encoder, build_autoencoder
from model.config import TokenizerConfig
from model.quantizers import QuantizerLossBreakdown, QuantizerOutput, build_quantizer


class TokenizerOutput(NamedTuple):
    recon: Tensor
    """(B, C, T, H, W) reconstruction."""
    codes: Tensor
    """(B, t, h, w) or (B, t, h, w, num_codebooks) integer codes."""
    aux_loss: Tensor
    """Scalar quantizer loss (entropy + commitment), not yet multiplied by
    quantizer_aux_loss_weight."""
    quantizer_breakdown: QuantizerLossBreakdown | None


class Tokenizer(nn.Module):
    """Encoder, quantizer and decoder of `config`; no discriminator, no perceptual network.

    State-dict keys, and the parameter order that ZeRO's flat optimizer state follows, predate
    the Encoder/Decoder split: the parts of `encoder` and `decoder` are registered here under
    their old top-level names (`conv_in`, `encoder_layers`, `decoder_layers`, `conv_out`, ...),
    and the two assemblies are plain attributes over the same modules, so that each parameter
    has exactly one key.
    """

    encoder: Encoder
    decoder: Decoder

    def __init__(self, config: TokenizerConfig) -> None:
        super().__init__()
        self.config = config
        encoder, decoder = build_autoencoder(config)
        registered = {
            "conv_in": encoder.conv_in,
            "conv_out": decoder.conv_out,
            "conv_in_first_frame": encoder.conv_in_first_frame,
            "conv_out_first_frame": decoder.conv_out_first_frame,
            "encoder_layers": encoder.layers,
            "decoder_layers": decoder.layers,
            "encoder_norm": encoder.norm,
            "encoder_cond_in": encoder.cond_in,
            "decoder_cond_in": decoder.cond_in,
        }
        for name, module in registered.items():
            self.add_module(name, module)
        vars(self).update(encoder=encoder, decoder=decoder)  # not submodules: see above
        self.quantizer = build_quantizer(config)

    @classmethod
    def from_config(cls, config: TokenizerConfig) -> Tokenizer:
        return cls(config)

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

    @property
    def gradient_checkpointing(self) -> bool:
        return self.encoder.gradient_checkpointing

    def set_gradient_checkpointing(self, enabled: bool = True) -> None:
        """Recompute each encoder/decoder layer during backward instead of keeping its
        activations (torch.utils.checkpoint, non-reentrant): less memory, same gradients."""
        self.encoder.gradient_checkpointing = enabled
        self.decoder.gradient_checkpointing = enabled

    def train(self, mode: bool = True) -> Tokenizer:
        super().train(mode)
        self.encoder.training = self.decoder.training = mode  # their parts are set above
        return self

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

    def check_latents(self, latents: Tensor) -> None:
        if latents.ndim != 5 or latents.shape[1] != self.config.latent_dim:
            raise ValueError(
                f"expected latents (B, {self.config.latent_dim}, t, h, w), "
                f"got shape {tuple(latents.shape)}"
            )

    def check_codes(self, codes: Tensor) -> Tensor:
        """Integer codes (B, t, h, w) or flattened (B, t*h*w), with a trailing codebook axis when
        num_codebooks > 1, validated and as int64 on the latent grid (B, t, h, w[, c])."""
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
        cond = self.encoder.embed_cond(cond, video.shape[0])
        x = self.encoder(video, cond, video_contains_first_frame)
        return self.quantizer(x) if quantize else x

    def quantize(self, latents: Tensor) -> QuantizerOutput:
        return self.quantizer(latents)

    def decode(
        self, quantized: Tensor, cond: Tensor | None = None, video_contains_first_frame: bool = True
    ) -> Tensor:
        """Quantized latents (B, D, t, h, w) -> video (B, C, T, H, W)."""
        self.check_latents(quantized)
        cond = self.decoder.embed_cond(cond, quantized.shape[0])
        return self.decoder(quantized, cond, video_contains_first_frame)

    def codes_to_latents(self, codes: Tensor) -> Tensor:
        """Validated integer codes -> quantized latents (B, D, t, h, w)."""
        return self.quantizer.indices_to_codes(self.check_codes(codes))

    def decode_codes(
        self, codes: Tensor, cond: Tensor | None = None, video_contains_first_frame: bool = True
    ) -> Tensor:
        """Codes (B, t, h, w), or flattened (B, t*h*w) — with a trailing codebook axis when
        num_codebooks > 1 — to video (B, C, T, H, W)."""
        return self.decode(self.codes_to_latents(codes), cond, video_contains_first_frame)

    def reconstruct(
        self, video: Tensor, cond: Tensor | None = None, video_contains_first_frame: bool = True
    ) -> TokenizerOutput:
        """One pass through encoder, quantizer and decoder: what a training step needs."""
        quantized, codes, aux_loss, breakdown = self.encode(
            video, quantize=True, cond=cond, video_contains_first_frame=video_contains_first_frame
        )
        recon = self.decode(quantized, cond, video_contains_first_frame)
        return TokenizerOutput(recon, codes, aux_loss, breakdown)

    def forward(
        self, video: Tensor, cond: Tensor | None = None, video_contains_first_frame: bool = True
    ) -> TokenizerOutput:
        return self.reconstruct(video, cond, video_contains_first_frame)

    @torch.no_grad()
    def tokenize(self, video: Tensor, cond: Tensor | None = None) -> Tensor:
        """Codes of a video or of images, in eval mode (restoring the previous mode)."""
        was_training = self.training
        self.eval()
        try:
            return self.encode(video, quantize=True, cond=cond).codes
        finally:
            self.train(was_training)
