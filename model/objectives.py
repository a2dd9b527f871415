"""The tokenizer's training objectives: the generator loss (reconstruction, quantizer,
perceptual, adaptive adversarial) and the discriminator loss (hinge and gradient penalty).

They take the output of one tokenizer pass, so a training step runs the tokenizer once and
feeds the same (detached) reconstruction to the discriminator update.
"""

from __future__ import annotations

from collections import namedtuple
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from model.losses import (
    adaptive_adversarial_weight,
    grad_norm_wrt,
    gradient_penalty,
    hinge_discr_loss,
    hinge_gen_loss,
)

if TYPE_CHECKING:
    from model.tokenizer import TokenizerOutput, VideoTokenizer

# Field names and order of magvit2-pytorch's named tuples.
LossBreakdown = namedtuple(
    "LossBreakdown",
    [
        "recon_loss",
        "lfq_aux_loss",
        "quantizer_loss_breakdown",
        "perceptual_loss",
        "adversarial_gen_loss",
        "adaptive_adversarial_weight",
        "multiscale_gen_losses",
        "multiscale_gen_adaptive_weights",
    ],
)
DiscrLossBreakdown = namedtuple(
    "DiscrLossBreakdown", ["discr_loss", "multiscale_discr_losses", "gradient_penalty"]
)


@contextmanager
def frozen(modules: Sequence[nn.Module]) -> Iterator[None]:
    """Parameters of `modules` don't require grad inside the block (restored after): the
    generator loss flows through the discriminator to the reconstruction but leaves no
    gradients on the discriminator."""
    params = [p for m in modules for p in m.parameters()]
    flags = [p.requires_grad for p in params]
    for p in params:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, flag in zip(params, flags, strict=True):
            p.requires_grad_(flag)


def random_frame_index(video: Tensor) -> Tensor:
    """One random frame index per sample of a (B, C, T, H, W) video."""
    return torch.randint(0, video.shape[2], (video.shape[0],), device=video.device)


def take_frames(video: Tensor, index: Tensor) -> Tensor:
    """(B, C, T, H, W), (B,) -> (B, C, H, W): frame index[b] of sample b."""
    return video[torch.arange(video.shape[0], device=video.device), :, index]


def generator_loss(
    model: VideoTokenizer,
    video: Tensor,
    output: TokenizerOutput,
    *,
    adversarial_loss_weight: float | None = None,
    multiscale_adversarial_loss_weight: float | None = None,
) -> tuple[Tensor, LossBreakdown]:
    """Total generator loss for `video` (B, C, T, H, W) and its tokenizer `output`.

    The adversarial terms are scaled by the adaptive weight (perceptual vs adversarial gradient
    norm at the last decoder conv) when the perceptual loss is on and the model is training;
    otherwise the weight is 1, as in magvit2-pytorch.
    """
    config = model.config
    adversarial_loss_weight = (
        config.adversarial_loss_weight
        if adversarial_loss_weight is None
        else adversarial_loss_weight
    )
    multiscale_weight = (
        config.multiscale_adversarial_loss_weight
        if multiscale_adversarial_loss_weight is None
        else multiscale_adversarial_loss_weight
    )
    recon = output.recon
    zero = video.new_zeros((), dtype=torch.float32)
    recon_loss = F.mse_loss(recon.float(), video.float())

    perceptual_loss = zero
    if model.perceptual is not None:
        index = random_frame_index(video)  # the same frame of input and reconstruction
        perceptual_loss = model.perceptual(take_frames(video, index), take_frames(recon, index))

    use_gan = config.use_gan and model.discr is not None and adversarial_loss_weight > 0
    use_multiscale = config.use_gan and multiscale_weight > 0 and len(model.multiscale_discrs) > 0
    perceptual_norm = None
    if model.training and model.perceptual is not None and (use_gan or use_multiscale):
        perceptual_norm = grad_norm_wrt(perceptual_loss, model.last_decoder_weight)

    gen_loss, adaptive_weight = zero, zero
    multiscale_losses: list[Tensor] = []
    multiscale_weights: list[Tensor] = []
    with frozen(model.discriminators()):
        if use_gan:
            fake = take_frames(recon, random_frame_index(recon))
            gen_loss = hinge_gen_loss(model.discr(fake).float())
            adaptive_weight = _adaptive_weight(model, perceptual_norm, gen_loss)
        if use_multiscale:
            for discr in model.multiscale_discrs:
                loss = hinge_gen_loss(discr(recon).float())
                multiscale_losses.append(loss)
                multiscale_weights.append(_adaptive_weight(model, perceptual_norm, loss))

    total = (
        recon_loss
        + output.aux_loss * config.quantizer_aux_loss_weight
        + perceptual_loss * config.perceptual_loss_weight
        + gen_loss * adaptive_weight * adversarial_loss_weight
    )
    if multiscale_losses:
        weighted = sum(
            w * loss for w, loss in zip(multiscale_weights, multiscale_losses, strict=True)
        )
        total = total + weighted * multiscale_weight
    breakdown = LossBreakdown(
        recon_loss,
        output.aux_loss,
        output.quantizer_breakdown,
        perceptual_loss,
        gen_loss,
        adaptive_weight,
        multiscale_losses,
        multiscale_weights,
    )
    return total, breakdown


def _adaptive_weight(model: VideoTokenizer, perceptual_norm: Tensor | None, loss: Tensor) -> Tensor:
    if perceptual_norm is None:
        return torch.ones_like(loss)
    return adaptive_adversarial_weight(
        perceptual_norm, grad_norm_wrt(loss, model.last_decoder_weight)
    )


def discriminator_loss(
    model: VideoTokenizer, video: Tensor, recon: Tensor, *, apply_gradient_penalty: bool = True
) -> tuple[Tensor, DiscrLossBreakdown]:
    """Hinge loss of the discriminator(s) on real frames vs the detached reconstruction, plus
    the gradient penalty on both (magvit2-pytorch penalises real and fake inputs)."""
    if model.discr is None:
        raise ValueError("this tokenizer has no discriminator (use_gan=False)")
    config = model.config
    recon = recon.detach()
    index = random_frame_index(video)
    real, fake = take_frames(video, index), take_frames(recon, index)
    if apply_gradient_penalty:
        real, fake = real.detach().requires_grad_(), fake.detach().requires_grad_()
    real_logits, fake_logits = model.discr(real), model.discr(fake)
    discr_loss = hinge_discr_loss(fake_logits.float(), real_logits.float())

    multiscale_losses = [
        hinge_discr_loss(discr(recon).float(), discr(video).float())
        for discr in model.multiscale_discrs
    ] or [video.new_zeros((), dtype=torch.float32)]

    penalty = video.new_zeros((), dtype=torch.float32)
    if apply_gradient_penalty:
        penalty = gradient_penalty(real, real_logits) + gradient_penalty(fake, fake_logits)
    total = (
        discr_loss
        + penalty * config.grad_penalty_loss_weight
        + sum(multiscale_losses) * config.multiscale_adversarial_loss_weight
    )
    return total, DiscrLossBreakdown(discr_loss, multiscale_losses, penalty)
