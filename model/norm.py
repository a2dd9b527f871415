"""Normalisation layers: RMSNorm, its conditioned variant, and a channel-first LayerNorm."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class RMSNorm(nn.Module):
    """x / ||x|| * sqrt(dim) * gamma over the channel axis (last, or dim 1 if channel_first)."""

    def __init__(self, dim: int, *, channel_first: bool = False) -> None:
        super().__init__()
        self.channel_first = channel_first
        self.scale = dim**0.5
        self.gamma = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        if self.channel_first:
            gamma = self.gamma.view(-1, *(1,) * (x.ndim - 2))
            return F.normalize(x, dim=1) * self.scale * gamma
        return F.normalize(x, dim=-1) * self.scale * self.gamma


class AdaptiveRMSNorm(nn.Module):
    """RMSNorm whose gain is predicted from a conditioning vector (initialised to gain 1).

    `cond` is (b, dim_cond). For channel-last input the batch may be a multiple of b (frames or
    pixels folded into the batch by the caller): `rows_per_cond` says how many rows share one
    conditioning vector, so nothing is broadcast silently.
    """

    def __init__(self, dim: int, *, dim_cond: int, channel_first: bool = False) -> None:
        super().__init__()
        self.dim_cond = dim_cond
        self.channel_first = channel_first
        self.scale = dim**0.5
        self.to_gamma = nn.Linear(dim_cond, dim)
        nn.init.zeros_(self.to_gamma.weight)
        nn.init.ones_(self.to_gamma.bias)

    def forward(self, x: Tensor, cond: Tensor) -> Tensor:
        gamma = self.to_gamma(cond)  # (b, dim)
        if self.channel_first:
            if gamma.shape[0] != x.shape[0]:
                raise ValueError(f"cond batch {gamma.shape[0]} != input batch {x.shape[0]}")
            gamma = gamma.view(*gamma.shape, *(1,) * (x.ndim - 2))
            return F.normalize(x, dim=1) * self.scale * gamma
        if x.shape[0] % gamma.shape[0]:
            raise ValueError(
                f"input rows {x.shape[0]} are not a multiple of the cond batch {gamma.shape[0]}"
            )
        rows_per_cond = x.shape[0] // gamma.shape[0]
        gamma = gamma.repeat_interleave(rows_per_cond, dim=0)
        gamma = gamma.view(gamma.shape[0], *(1,) * (x.ndim - 2), gamma.shape[-1])
        return F.normalize(x, dim=-1) * self.scale * gamma


class ChannelLayerNorm(nn.LayerNorm):
    """LayerNorm over dim 1 of (B, C, ...) tensors: the encoder's last layer before quantization."""

    def forward(self, x: Tensor) -> Tensor:
        return super().forward(x.movedim(1, -1)).movedim(-1, 1)
