"""The magvit2-pytorch facade: its constructor arguments and its `forward(..., return_*)`
contract, mapped onto the typed config and the explicit tokenizer methods.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

from torch import Tensor, nn

from model.config import DiscriminatorConfig, TokenizerConfig
from model.losses import VGG16_CHECKPOINT_NAME

if TYPE_CHECKING:
    from model.tokenizer import VideoTokenizer

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
        return model.recon_loss(video, output.recon), output.recon
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
