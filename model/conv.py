"""Convolutions that are causal in time.

Shapes: (B, C, T, H, W). "Causal" means output frame t depends only on input frames <= t: all
temporal padding goes on the past side, and it is zeros (or a copy of the first frame with
'replicate'), never frames from the future.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def _triple(kernel_size: int | tuple[int, int, int]) -> tuple[int, int, int]:
    return (kernel_size,) * 3 if isinstance(kernel_size, int) else tuple(kernel_size)  # type: ignore[return-value]


def pad_time_past(x: Tensor, num_frames: int, mode: str = "constant") -> Tensor:
    """Pads `num_frames` on the past side of dim 2 with zeros or copies of frame 0."""
    if num_frames <= 0:
        return x
    if mode == "replicate":
        return torch.cat([x[:, :, :1].expand(-1, -1, num_frames, -1, -1), x], dim=2)
    return F.pad(x, (0, 0, 0, 0, num_frames, 0))


class CausalConv3d(nn.Module):
    """Conv3d with 'same' spatial padding and past-only temporal padding.

    With stride s in time, T input frames give ceil(T / s) output frames, the last one aligned
    with the last input frame.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int | tuple[int, int, int],
        *,
        pad_mode: str = "constant",
        stride: int = 1,
        dilation: int = 1,
        bias: bool = True,
    ) -> None:
        super().__init__()
        kt, kh, kw = _triple(kernel_size)
        if kh % 2 == 0 or kw % 2 == 0:
            raise ValueError(f"spatial kernel sizes must be odd, got {(kt, kh, kw)}")
        self.pad_mode = pad_mode
        self.time_pad = dilation * (kt - 1) + (1 - stride)
        self.space_pad = (kw // 2, kw // 2, kh // 2, kh // 2)
        self.conv = nn.Conv3d(
            in_channels,
            out_channels,
            (kt, kh, kw),
            stride=(stride, 1, 1),
            dilation=(dilation, 1, 1),
            bias=bias,
        )

    def forward(self, x: Tensor) -> Tensor:
        # One pad call (one copy) for time and space; 'replicate' repeats frame 0 into the past.
        x = F.pad(x, (*self.space_pad, self.time_pad, 0), mode=self.pad_mode)
        return self.conv(x)


class CausalConvTranspose3d(nn.Module):
    """Transposed conv that upsamples time by `time_stride` and keeps causality.

    The transposed conv spreads input frame t over output frames [s*t, s*t + kt); keeping the
    first s*T outputs drops only the tail, so output frame u still depends on inputs <= u // s.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int | tuple[int, int, int],
        *,
        time_stride: int,
    ) -> None:
        super().__init__()
        kt, kh, kw = _triple(kernel_size)
        if kh % 2 == 0 or kw % 2 == 0:
            raise ValueError(f"spatial kernel sizes must be odd, got {(kt, kh, kw)}")
        self.upsample_factor = time_stride
        self.conv = nn.ConvTranspose3d(
            in_channels,
            out_channels,
            (kt, kh, kw),
            stride=(time_stride, 1, 1),
            padding=(0, kh // 2, kw // 2),
        )

    def forward(self, x: Tensor) -> Tensor:
        num_frames = x.shape[2]
        return self.conv(x)[:, :, : num_frames * self.upsample_factor]


class Conv3DMod(nn.Module):
    """StyleGAN2 modulated conv: per-sample weights scaled by (1 + cond), then demodulated.

    Run as one grouped conv over the batch, so each sample gets its own weights.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int | None = None,
        *,
        spatial_kernel: int,
        time_kernel: int,
        causal: bool = True,
        demod: bool = True,
        eps: float = 1e-8,
        pad_mode: str = "constant",
    ) -> None:
        super().__init__()
        out_channels = out_channels or in_channels
        if spatial_kernel % 2 == 0 or time_kernel % 2 == 0:
            raise ValueError(f"kernel sizes must be odd, got {(time_kernel, spatial_kernel)}")
        self.eps = eps
        self.demod = demod
        self.pad_mode = pad_mode
        self.time_pad = (time_kernel - 1, 0) if causal else (time_kernel // 2,) * 2
        self.space_pad = (spatial_kernel // 2,) * 4
        self.weights = nn.Parameter(
            torch.empty(out_channels, in_channels, time_kernel, spatial_kernel, spatial_kernel)
        )
        nn.init.kaiming_normal_(self.weights, a=0, mode="fan_in", nonlinearity="selu")

    def forward(self, x: Tensor, cond: Tensor) -> Tensor:
        # x: (b, i, t, h, w), cond: (b, i)
        batch = x.shape[0]
        weights = self.weights[None] * (
            cond[:, None, :, None, None, None] + 1
        )  # (b, o, i, k, k, k)
        if self.demod:
            inv_norm = (
                weights.pow(2).sum(dim=(2, 3, 4, 5), keepdim=True).clamp(min=self.eps).rsqrt()
            )
            weights = weights * inv_norm
        x = x.reshape(1, -1, *x.shape[2:])  # (1, b*i, t, h, w)
        x = F.pad(x, (*self.space_pad, *self.time_pad), mode=self.pad_mode)
        out = F.conv3d(x, weights.flatten(0, 1), groups=batch)
        return out.reshape(batch, -1, *out.shape[2:])  # (b, o, t, h, w)


class FrameConv2d(nn.Conv2d):
    """'Same'-padded Conv2d for a single frame (the separate first-frame stems)."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: tuple[int, int]) -> None:
        super().__init__(
            in_channels, out_channels, kernel_size, padding=tuple(k // 2 for k in kernel_size)
        )
