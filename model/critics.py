"""The training-only networks around the tokenizer: the discriminators (critics) and the
perceptual loss's frozen VGG. The trainer builds them next to the tokenizer and optimises the
critics with an optimizer (or DeepSpeed engine) of their own."""

from __future__ import annotations

import math
from collections.abc import Sequence

from torch import nn

from model.config import TokenizerConfig
from model.discriminator import Discriminator, Discriminators
from model.discriminator3d import Discriminator3D, Discriminator3DConfig
from model.losses import PerceptualLoss
from model.tokenizer import Tokenizer


def build_discriminator(config: TokenizerConfig) -> nn.Module:
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


def build_discriminators(
    config: TokenizerConfig, multiscale_discrs: Sequence[nn.Module] = ()
) -> Discriminators | None:
    """The image (or 3-D) discriminator and the multiscale ones as one module, or None without
    use_gan. Its keys (`discr.*`, `multiscale_discrs.*`) are the discriminator engine's."""
    if not config.use_gan:
        return None
    return Discriminators(build_discriminator(config), nn.ModuleList(multiscale_discrs))


def build_perceptual(
    config: TokenizerConfig, vgg: nn.Module | None = None
) -> PerceptualLoss | None:
    """The perceptual loss (VGG16 fc7 features, or `vgg`; loaded on first use), or None when its
    weight is 0 or the frames are not images VGG can read."""
    if config.channels in (1, 3, 4) and config.perceptual_loss_weight > 0:
        return PerceptualLoss(weights=config.vgg_weights, network=vgg)
    return None


def build_training_networks(
    config: TokenizerConfig,
) -> tuple[Tokenizer, PerceptualLoss | None, Discriminators | None]:
    """The trainer's networks: the core tokenizer, its perceptual loss and its critics (each None
    when off), built in this order, which is the facade's: the same seed gives the same weights."""
    return Tokenizer.from_config(config), build_perceptual(config), build_discriminators(config)
