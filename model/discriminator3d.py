"""A spatio-temporal (3-D) video discriminator, StyleGAN-like as in MAGVIT: residual 3-D conv
blocks with anti-aliased (blurpool) downsampling in space and in time, then a logit per clip.

The reference's discriminator sees one random frame (2-D); this one sees the whole clip, so it
can judge motion (flicker, temporal blur), which a per-frame critic cannot.

Legend: B clips, C channels, T frames, H/W pixels. Input (B, C, T, H, W) in [-1, 1], or images
(B, C, H, W) as one-frame clips; output (B,) logits. Any frame count works (1 + k·f or not):
time is halved only while more than one frame is left, with ceil rounding, and the logit comes
from a mean over the remaining (t, h, w) grid.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch.nn.functional as F
from torch import Tensor, nn

from model.sampling import Blur


@dataclass(frozen=True, kw_only=True)
class Discriminator3DConfig:
    image_size: int
    """Side of the (square) frames; must divide by 2**num_space_downsamples."""
    channels: int = 3
    dim: int = 64
    """Width of the first block; doubled at each space downsampling, up to max_dim."""
    max_dim: int = 512
    num_space_downsamples: int = 4
    num_time_downsamples: int = 2
    """Time is halved in the first this-many blocks (while more than one frame is left)."""
    antialiased_downsample: bool = True

    def __post_init__(self) -> None:
        for name in ("image_size", "channels", "dim", "max_dim"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.num_space_downsamples < 0 or self.num_time_downsamples < 0:
            raise ValueError("num_space_downsamples and num_time_downsamples must be >= 0")
        if self.num_time_downsamples > self.num_space_downsamples:
            raise ValueError(
                f"num_time_downsamples ({self.num_time_downsamples}) must be at most "
                f"num_space_downsamples ({self.num_space_downsamples}): time is halved in the "
                "blocks that halve space"
            )
        if self.image_size % 2**self.num_space_downsamples:
            raise ValueError(
                f"image_size {self.image_size} must divide by 2**num_space_downsamples "
                f"= {2**self.num_space_downsamples}"
            )


class Block3D(nn.Module):
    """Two 3x3x3 convs and a 1x1x1 residual path, then an optional 2x downsampling of space
    (and time): blur first (anti-aliasing), then average pooling, on both paths."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        *,
        down_space: bool,
        down_time: bool,
        antialiased: bool,
    ) -> None:
        super().__init__()
        self.conv1 = nn.Conv3d(in_channels, out_channels, 3, padding=1)
        self.conv2 = nn.Conv3d(out_channels, out_channels, 3, padding=1)
        self.residual = nn.Conv3d(in_channels, out_channels, 1, bias=False)
        self.act = nn.LeakyReLU(0.2)
        self.down_space, self.down_time = down_space, down_time
        self.blur = Blur() if antialiased and (down_space or down_time) else None

    def _downsample(self, x: Tensor) -> Tensor:
        halve_time = self.down_time and x.shape[2] > 1
        if not (self.down_space or halve_time):
            return x
        if self.blur is not None:
            x = self.blur(x, space_only=not halve_time, time_only=not self.down_space)
        kernel = (2 if halve_time else 1, 2 if self.down_space else 1, 2 if self.down_space else 1)
        return F.avg_pool3d(x, kernel, ceil_mode=True)  # odd frame counts keep the last frame

    def forward(self, x: Tensor) -> Tensor:
        res = self._downsample(self.residual(x))
        x = self.act(self.conv2(self.act(self.conv1(x))))
        return (self._downsample(x) + res) * (2**-0.5)


class Discriminator3D(nn.Module):
    def __init__(self, config: Discriminator3DConfig) -> None:
        super().__init__()
        self.config = config
        n = config.num_space_downsamples
        dims = [min(config.dim * 2**i, config.max_dim) for i in range(n + 1)]
        self.stem = nn.Conv3d(config.channels, dims[0], 3, padding=1)
        self.blocks = nn.ModuleList(
            Block3D(  # n downsampling blocks, then one at the final resolution
                dims[i],
                dims[min(i + 1, n)],
                down_space=i < n,
                down_time=i < config.num_time_downsamples,
                antialiased=config.antialiased_downsample,
            )
            for i in range(n + 1)
        )
        self.act = nn.LeakyReLU(0.2)
        self.to_logit = nn.Linear(dims[n], 1)

    def forward(self, video: Tensor) -> Tensor:
        if video.ndim == 4:  # images: one-frame clips
            video = video.unsqueeze(2)
        if video.ndim != 5 or video.shape[1] != self.config.channels:
            raise ValueError(
                f"Discriminator3D expects (B, {self.config.channels}, T, H, W) or "
                f"(B, {self.config.channels}, H, W), got {tuple(video.shape)}"
            )
        if video.shape[-2:] != (self.config.image_size, self.config.image_size):
            raise ValueError(
                f"Discriminator3D was built for {self.config.image_size}x"
                f"{self.config.image_size} frames, got {video.shape[-1]}x{video.shape[-2]}"
            )
        x = self.act(self.stem(video))  # (b, dim, t, h, w)
        for block in self.blocks:
            x = block(x)  # (b, c_i, t_i, h_i, w_i)
        return self.to_logit(self.act(x).mean(dim=(2, 3, 4))).squeeze(-1)  # (b,)
