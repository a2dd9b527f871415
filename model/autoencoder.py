"""The tokenizer's encoder (video -> latents) and decoder (quantized latents -> video).

Legend: B batch, C channels, T/H/W video frames and pixels, D latent channels, t/h/w latent grid,
f the time compression. The encoder pads a video of T = 1 + k*f frames in front with f - 1 zero
frames, so that frame 0 gets a latent frame of its own; the decoder drops those frames again.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from model.config import TokenizerConfig
from model.conv import CausalConv3d, FrameConv2d, pad_time_past
from model.layers import build_layer_pair
from model.norm import ChannelLayerNorm


def run_layers(
    layers: nn.ModuleList,
    takes_cond: list[bool],
    x: Tensor,
    cond: Tensor | None,
    recompute: bool,
) -> Tensor:
    """Each layer in turn (with `cond` where it takes one); `recompute`: activation checkpoints."""
    for layer, with_cond in zip(layers, takes_cond, strict=True):
        args = (x, cond) if with_cond else (x,)
        x = checkpoint(layer, *args, use_reentrant=False) if recompute else layer(*args)
    return x


class _CondEmbedding(nn.Module):
    """Shared by Encoder and Decoder: the validated embedding of the conditioning vector."""

    config: TokenizerConfig
    cond_in: nn.Module | None

    def embed_cond(self, cond: Tensor | None, batch: int) -> Tensor | None:
        """(B, dim_cond) -> the expanded conditioning the layers take, or None if unconditioned.

        A ValueError when `cond` is missing, given to an unconditioned model, or mis-shaped.
        """
        if self.cond_in is None:
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
        return self.cond_in(cond)


class Encoder(_CondEmbedding):
    """Causal 3-D stem (plus a 2-D one for frame 0 with separate_first_frame_encoding), the
    encoder layers and the final channel LayerNorm (skipped with reference_quirks)."""

    def __init__(
        self,
        config: TokenizerConfig,
        *,
        conv_in: nn.Module,
        conv_in_first_frame: nn.Module | None,
        layers: nn.ModuleList,
        takes_cond: list[bool],
        norm: nn.Module,
        cond_in: nn.Module | None,
    ) -> None:
        super().__init__()
        self.config = config
        self.conv_in = conv_in
        self.conv_in_first_frame = conv_in_first_frame
        self.layers = layers
        self.takes_cond = takes_cond
        """Per layer: whether it takes the conditioning."""
        self.norm = norm
        self.cond_in = cond_in
        self.gradient_checkpointing = config.gradient_checkpointing

    def forward(
        self, video: Tensor, cond: Tensor | None = None, video_contains_first_frame: bool = True
    ) -> Tensor:
        """(B, C, T, H, W), embedded cond or None -> latents (B, D, t, h, w)."""
        time_pad = self.config.time_downsample_factor - 1 if video_contains_first_frame else 0
        if self.conv_in_first_frame is not None and video_contains_first_frame:
            # The first frame gets its own 2-D stem; the rest runs through the causal stem
            # without it, and the two are joined behind the zero padding.
            x = self.conv_in_first_frame(video[:, :, 0]).unsqueeze(2)  # (b, d, 1, h, w)
            if video.shape[2] > 1:  # images have no rest
                x = torch.cat((x, self.conv_in(video[:, :, 1:])), dim=2)  # (b, d, T, h, w)
            x = pad_time_past(x, time_pad)
        else:
            x = self.conv_in(pad_time_past(video, time_pad))  # (b, d, T + f - 1, h, w)
        recompute = self.gradient_checkpointing and torch.is_grad_enabled()
        x = run_layers(self.layers, self.takes_cond, x, cond, recompute)
        if not self.config.reference_quirks:
            x = self.norm(x)  # (b, D, t, h, w)
        return x


class Decoder(_CondEmbedding):
    """The decoder layers (the encoder's mirrored), then the causal 3-D output conv (and a 2-D
    one for frame 0 with separate_first_frame_encoding)."""

    def __init__(
        self,
        config: TokenizerConfig,
        *,
        layers: nn.ModuleList,
        takes_cond: list[bool],
        conv_out: nn.Module,
        conv_out_first_frame: nn.Module | None,
        cond_in: nn.Module | None,
    ) -> None:
        super().__init__()
        self.config = config
        self.layers = layers
        self.takes_cond = takes_cond
        """Per layer: whether it takes the conditioning."""
        self.conv_out = conv_out
        self.conv_out_first_frame = conv_out_first_frame
        self.cond_in = cond_in
        self.gradient_checkpointing = config.gradient_checkpointing

    @property
    def last_weight(self) -> Tensor:
        """The output conv's weight: where the adaptive adversarial weight compares gradients."""
        return self.conv_out.conv.weight

    def forward(
        self, latents: Tensor, cond: Tensor | None = None, video_contains_first_frame: bool = True
    ) -> Tensor:
        """Quantized latents (B, D, t, h, w), embedded cond or None -> video (B, C, T, H, W)."""
        # The quantizers hand out channels-last views; kernels round differently per layout, so
        # one layout keeps the result independent of the caller's (and of chunked decoding).
        latents = latents.contiguous()
        recompute = self.gradient_checkpointing and torch.is_grad_enabled()
        x = run_layers(self.layers, self.takes_cond, latents, cond, recompute)
        time_pad = self.config.time_downsample_factor - 1 if video_contains_first_frame else 0
        if self.conv_out_first_frame is not None and video_contains_first_frame:
            out = self.conv_out_first_frame(x[:, :, time_pad]).unsqueeze(2)
            if x.shape[2] > time_pad + 1:
                out = torch.cat((out, self.conv_out(x[:, :, time_pad + 1 :])), dim=2)
            return out
        return self.conv_out(x)[:, :, time_pad:]  # (b, C, T, H, W)


def build_autoencoder(config: TokenizerConfig) -> tuple[Encoder, Decoder]:
    """Encoder and decoder of `config`. The parts are created in a fixed order (stems, layer
    pairs, norm, cond stems): a seeded build gives the same initial weights as before the
    encoder/decoder split."""
    kernel_in, kernel_out = config.input_conv_kernel_size, config.output_conv_kernel_size
    conv_in = CausalConv3d(config.channels, config.init_dim, kernel_in, pad_mode=config.pad_mode)
    conv_out = CausalConv3d(config.init_dim, config.channels, kernel_out, pad_mode=config.pad_mode)
    conv_in_first_frame = conv_out_first_frame = None
    if config.separate_first_frame_encoding:
        conv_in_first_frame = FrameConv2d(config.channels, config.init_dim, kernel_in[1:])
        conv_out_first_frame = FrameConv2d(config.init_dim, config.channels, kernel_out[1:])
    pairs = [
        build_layer_pair(spec, in_dim, out_dim, config)
        for spec, (in_dim, out_dim) in zip(config.layers, config.layer_dims(), strict=True)
    ]
    norm = ChannelLayerNorm(config.latent_dim)
    encoder_cond_in = decoder_cond_in = None
    if config.is_conditioned:
        assert config.dim_cond is not None
        expanded = config.expanded_dim_cond
        encoder_cond_in = nn.Sequential(nn.Linear(config.dim_cond, expanded), nn.SiLU())
        decoder_cond_in = nn.Sequential(nn.Linear(config.dim_cond, expanded), nn.SiLU())
    takes_cond = [pair.takes_cond for pair in pairs]
    encoder = Encoder(
        config,
        conv_in=conv_in,
        conv_in_first_frame=conv_in_first_frame,
        layers=nn.ModuleList(pair.encoder for pair in pairs),
        takes_cond=takes_cond,
        norm=norm,
        cond_in=encoder_cond_in,
    )
    decoder = Decoder(
        config,
        layers=nn.ModuleList(pair.decoder for pair in reversed(pairs)),
        takes_cond=takes_cond[::-1],
        conv_out=conv_out,
        conv_out_first_frame=conv_out_first_frame,
        cond_in=decoder_cond_in,
    )
    return encoder, decoder
