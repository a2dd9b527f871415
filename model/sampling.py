"""2x down- and upsampling in space and in time, and the anti-aliasing blur.

All video tensors are (B, C, T, H, W). Time resampling is causal: the downsampler pads only the
past, and the upsampler turns each latent frame into two consecutive frames.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange
from kornia.filters import filter3d
from torch import Tensor, nn

from model.conv import pad_time_past


class Blur(nn.Module):
    """[1, 2, 1] binomial blur (blurpool, Zhang 2019), in space, in time, or both.

    Space uses kornia's `filter3d` with replicate borders. Time is filtered causally, over frames
    (t-2, t-1, t), so a blur never lets a frame see its future (the reference centres the time
    kernel, which reads frame t+1).
    """

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("taps", torch.tensor([1.0, 2.0, 1.0]), persistent=False)

    def forward(self, x: Tensor, *, space_only: bool = False, time_only: bool = False) -> Tensor:
        if space_only and time_only:
            raise ValueError("Blur: space_only and time_only are exclusive")
        is_image = x.ndim == 4
        if is_image:
            x = x.unsqueeze(2)
        if not time_only:
            kernel = (self.taps[:, None] * self.taps[None, :])[None, None].to(x.dtype)  # (1,1,3,3)
            x = filter3d(x, kernel, normalized=True)
        if not space_only:
            padded = pad_time_past(x, 2, mode="replicate")
            taps = (self.taps / self.taps.sum()).to(x.dtype)
            num_frames = x.shape[2]
            x = sum(taps[i] * padded[:, :, i : i + num_frames] for i in range(3))
        return x.squeeze(2) if is_image else x


class SpatialDownsample2x(nn.Module):
    """Strided 3x3 conv applied to every frame, as a (1, k, k) Conv3d (no frame folding)."""

    def __init__(
        self, in_channels: int, out_channels: int, kernel_size: int = 3, antialias: bool = False
    ) -> None:
        super().__init__()
        self.blur = Blur() if antialias else None
        self.conv = nn.Conv3d(
            in_channels,
            out_channels,
            (1, kernel_size, kernel_size),
            stride=(1, 2, 2),
            padding=(0, kernel_size // 2, kernel_size // 2),
        )

    def forward(self, x: Tensor) -> Tensor:
        if self.blur is not None:
            x = self.blur(x, space_only=True)
        return self.conv(x)  # (b, c, t, h/2, w/2)


class TimeDownsample2x(nn.Module):
    """Strided causal conv over time, as a (k, 1, 1) Conv3d.

    It pads k - 2 past frames, so output i covers inputs (2i + 2 - k, ..., 2i + 1): it ends on the
    last frame of its pair, and an even number of frames T gives T / 2 outputs that see every
    frame. `reference_padding` pads k - 1 as magvit2-pytorch does: output i ends on frame 2i, the
    last frame is never seen, and the first output sees only padding.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int = 3,
        antialias: bool = False,
        reference_padding: bool = False,
    ) -> None:
        super().__init__()
        if kernel_size < 2:
            raise ValueError(f"time downsampling needs kernel_size >= 2, got {kernel_size}")
        self.blur = Blur() if antialias else None
        self.time_pad = kernel_size - 1 if reference_padding else kernel_size - 2
        self.conv = nn.Conv3d(in_channels, out_channels, (kernel_size, 1, 1), stride=(2, 1, 1))

    def forward(self, x: Tensor) -> Tensor:
        if self.blur is not None:
            x = self.blur(x, time_only=True)
        return self.conv(pad_time_past(x, self.time_pad))  # (b, c, t/2, h, w)


def _init_repeated_(conv: nn.Conv3d, factor: int) -> None:
    """Same weights for each of the `factor` outputs of a channel: upsampling starts as
    nearest-neighbour, which avoids checkerboard artefacts at initialisation."""
    out_channels, in_channels = conv.weight.shape[:2]
    weight = torch.empty(out_channels // factor, in_channels)
    nn.init.kaiming_uniform_(weight)
    with torch.no_grad():
        conv.weight.copy_(weight.repeat_interleave(factor, dim=0).view_as(conv.weight))
        conv.bias.zero_()


class SpatialUpsample2x(nn.Module):
    """1x1 conv to 4x channels, SiLU, depth-to-space: (b, c, t, h, w) -> (b, c', t, 2h, 2w)."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv3d(in_channels, out_channels * 4, 1)
        _init_repeated_(self.conv, 4)

    def forward(self, x: Tensor) -> Tensor:
        x = F.silu(self.conv(x))
        return rearrange(x, "b (c p1 p2) t h w -> b c t (h p1) (w p2)", p1=2, p2=2)


class TimeUpsample2x(nn.Module):
    """1x1 conv to 2x channels, SiLU, depth-to-time: (b, c, t, h, w) -> (b, c', 2t, h, w)."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv3d(in_channels, out_channels * 2, 1)
        _init_repeated_(self.conv, 2)

    def forward(self, x: Tensor) -> Tensor:
        x = F.silu(self.conv(x))
        return rearrange(x, "b (c p) t h w -> b c (t p) h w", p=2)
