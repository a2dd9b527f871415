"""The image discriminator: residual conv blocks with anti-aliased (blurpool) downsampling,
each followed by linear attention and a feed-forward, ending in a single logit per image.

Input (B, C, H, W) frames in [-1, 1]; output (B,) logits.
"""

from __future__ import annotations

from einops import rearrange
from torch import Tensor, nn

from model.attention import LinearSpaceAttention
from model.blocks import FeedForward
from model.config import DiscriminatorConfig
from model.sampling import Blur


class DiscriminatorBlock(nn.Module):
    def __init__(
        self, in_channels: int, out_channels: int, *, downsample: bool, antialiased: bool
    ) -> None:
        super().__init__()
        # The residual's stride-2 1x1 conv runs as a stride-1 conv of every other pixel (the same
        # sums): oneDNN's strided 1x1 weight gradient of a channels-last input with fewer
        # channels than its block (the RGB stage) writes out of bounds and crashes the process
        # (oneDNN issue 6035), and the copy it makes internally for the stride is the same one.
        self.conv_res = nn.Conv2d(in_channels, out_channels, 1)
        self.residual_stride = 2 if downsample else 1
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.act = nn.LeakyReLU(0.1)
        self.blur = Blur() if downsample and antialiased else None
        # Space-to-depth then a 1x1 conv: a learned 2x downsampling that sees every pixel.
        self.downsample = nn.Conv2d(out_channels * 4, out_channels, 1) if downsample else None

    def forward(self, x: Tensor) -> Tensor:
        step = self.residual_stride
        res = self.conv_res(x[:, :, ::step, ::step])
        x = self.act(self.conv2(self.act(self.conv1(x))))
        if self.downsample is not None:
            if self.blur is not None:
                x = self.blur(x, space_only=True)
            x = rearrange(x, "b c (h p1) (w p2) -> b (c p1 p2) h w", p1=2, p2=2)
            x = self.downsample(x)
        return (x + res) * (2**-0.5)


class DiscriminatorStage(nn.Module):
    """Conv block, then residual linear attention and residual feed-forward."""

    def __init__(self, block: DiscriminatorBlock, dim: int, config: DiscriminatorConfig) -> None:
        super().__init__()
        self.block = block
        self.attn = LinearSpaceAttention(
            dim, dim_head=config.linear_attn_dim_head, heads=config.linear_attn_heads
        )
        self.ff = FeedForward(dim, mult=config.ff_mult, images=True)

    def forward(self, x: Tensor) -> Tensor:
        x = self.block(x)
        x = x + self.attn(x)
        return x + self.ff(x)


class Discriminator(nn.Module):
    def __init__(self, config: DiscriminatorConfig) -> None:
        super().__init__()
        self.config = config
        num_layers = config.num_downsamples
        dims = [config.channels] + [config.dim * 4 * 2**i for i in range(num_layers + 1)]
        dims = [min(d, config.max_dim) for d in dims]
        pairs = list(zip(dims[:-1], dims[1:], strict=True))
        self.stages = nn.ModuleList(
            DiscriminatorStage(
                DiscriminatorBlock(
                    in_dim,
                    out_dim,
                    downsample=i < len(pairs) - 1,
                    antialiased=config.antialiased_downsample,
                ),
                out_dim,
                config,
            )
            for i, (in_dim, out_dim) in enumerate(pairs)
        )
        last_size = config.image_size // 2**num_layers
        self.to_logits_conv = nn.Conv2d(dims[-1], dims[-1], 3, padding=1)
        self.act = nn.LeakyReLU(0.1)
        self.to_logits = nn.Linear(last_size * last_size * dims[-1], 1)

    def forward(self, images: Tensor) -> Tensor:
        x = images
        for stage in self.stages:
            x = stage(x)  # (b, c_i, h_i, w_i)
        x = self.act(self.to_logits_conv(x))
        return self.to_logits(x.flatten(1)).squeeze(-1)  # (b,)


class Discriminators(nn.Module):
    """The image discriminator and any multiscale (video) discriminators, as one module: what a
    trainer hands to the discriminator's optimizer or engine."""

    def __init__(self, discr: nn.Module | None, multiscale_discrs: nn.ModuleList) -> None:
        super().__init__()
        self.discr = discr
        self.multiscale_discrs = multiscale_discrs
