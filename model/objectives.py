"""The tokenizer's training objectives: the generator loss (reconstruction, quantizer,
perceptual, adaptive adversarial) and the discriminator loss (hinge or non-saturating, gradient
penalty, optional LeCAM regularisation).

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
    DISCR_LOSSES,
    GEN_LOSSES,
    adaptive_adversarial_weight,
    gradient_penalty,
    lecam_regularizer,
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


def critic_view(model: VideoTokenizer, video: Tensor, index: Tensor) -> Tensor:
    """What the discriminator sees of a (B, C, T, H, W) clip: frame index[b] of each (the 2-D
    image discriminator) or the whole clip (the 3-D one)."""
    if model.config.discriminator_kind == "3d":
        return video
    return take_frames(video, index)


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
    norm at the last decoder conv) when the perceptual loss is on, the model is training and
    `config.adaptive_adversarial_weight` is set; otherwise the weight is 1, as in magvit2-pytorch.

    The terms computed from the reconstruction by frozen networks (VGG, discriminators) are
    backpropagated to the reconstruction once, here, and their graphs freed; the returned total
    carries that gradient as a linear term. Its value and its gradient are those of the plain
    sum, but VGG and discriminator are not backpropagated twice (once for the adaptive weight,
    once for the update) and their activations do not wait for the final backward pass.
    """
    config = model.config
    adversarial_scale = _default(adversarial_loss_weight, config.adversarial_loss_weight)
    multiscale_scale = _default(
        multiscale_adversarial_loss_weight, config.multiscale_adversarial_loss_weight
    )
    recon = output.recon
    differentiable = recon.requires_grad and torch.is_grad_enabled()
    zero = video.new_zeros((), dtype=torch.float32)
    gen_loss = GEN_LOSSES[config.generator_adversarial_loss]

    def value_and_grad(loss: Tensor) -> tuple[Tensor, Tensor | None]:
        if not differentiable:
            return loss.detach(), None
        (grad,) = torch.autograd.grad(loss, recon)  # frees the VGG / discriminator graph
        return loss.detach(), grad

    perceptual_loss, d_perceptual = zero, None
    if model.perceptual is not None:
        index = random_frame_index(video)  # the same frame of input and reconstruction
        perceptual_loss, d_perceptual = value_and_grad(
            model.perceptual(take_frames(video, index), take_frames(recon, index))
        )

    use_gan = config.use_gan and model.discr is not None and adversarial_scale > 0
    adversarial: list[tuple[Tensor, Tensor | None]] = []  # (loss, d loss / d recon)
    scales: list[float] = []
    with frozen(model.discriminators()):
        if use_gan:
            fake = critic_view(model, recon, random_frame_index(recon))
            adversarial.append(value_and_grad(gen_loss(model.discr(fake).float())))
            scales.append(adversarial_scale)
        if config.use_gan and multiscale_scale > 0:
            for discr in model.multiscale_discrs:
                adversarial.append(value_and_grad(gen_loss(discr(recon).float())))
                scales.append(multiscale_scale)

    weights = [torch.ones_like(zero) for _ in adversarial]
    adaptive = config.adaptive_adversarial_weight and model.training
    if adaptive and d_perceptual is not None and adversarial:
        perceptual_norm = _last_layer_grad_norm(model, recon, d_perceptual)
        weights = [
            adaptive_adversarial_weight(perceptual_norm, _last_layer_grad_norm(model, recon, g))
            for _, g in adversarial
        ]

    recon_loss = F.mse_loss(recon.float(), video.float())
    total = recon_loss + output.aux_loss * config.quantizer_aux_loss_weight
    total = total + perceptual_loss * config.perceptual_loss_weight
    for (loss, _), weight, scale in zip(adversarial, weights, scales, strict=True):
        total = total + loss * weight * scale
    if differentiable:
        upstream = torch.zeros_like(recon, dtype=torch.float32)
        if d_perceptual is not None:
            upstream += config.perceptual_loss_weight * d_perceptual.float()
        for (_, grad), weight, scale in zip(adversarial, weights, scales, strict=True):
            upstream += (weight * scale) * grad.float()
        linear = (recon.float() * upstream).sum()
        total = total + (linear - linear.detach())  # adds the gradient, not the value

    first_multiscale = 1 if use_gan else 0
    breakdown = LossBreakdown(
        recon_loss,
        output.aux_loss,
        output.quantizer_breakdown,
        perceptual_loss,
        adversarial[0][0] if use_gan else zero,
        weights[0] if use_gan else zero,
        [loss for loss, _ in adversarial[first_multiscale:]],
        weights[first_multiscale:],
    )
    return total, breakdown


def _default(value: float | None, default: float) -> float:
    return default if value is None else value


def _last_layer_grad_norm(model: VideoTokenizer, recon: Tensor, grad_recon: Tensor) -> Tensor:
    """||d loss / d W|| at the last decoder conv, from d loss / d recon (cheap: one layer)."""
    (grad,) = torch.autograd.grad(
        recon, model.last_decoder_weight, grad_outputs=grad_recon, retain_graph=True
    )
    return grad.float().norm(2)


def discriminator_loss(
    model: VideoTokenizer,
    video: Tensor,
    recon: Tensor,
    *,
    apply_gradient_penalty: bool = True,
    gradient_penalty_scale: float = 1.0,
    lecam_weight: float = 0.0,
    lecam_anchors: Tensor | None = None,
    logits_out: dict[str, Tensor] | None = None,
) -> tuple[Tensor, DiscrLossBreakdown]:
    """Hinge (or non-saturating) loss of the discriminator(s) on real frames vs the detached
    reconstruction, plus the gradient penalty on both (magvit2-pytorch penalises real and fake
    inputs).

    `gradient_penalty_scale` multiplies the penalty (lazy regularisation applies it every N
    steps, scaled by N). With `lecam_weight` > 0, `lecam_anchors` = (EMA of the real logits,
    EMA of the fake logits) and the image discriminator's LeCAM term times `lecam_weight` is
    added. `logits_out`, if given, receives the mean real and fake logits (and 'lecam', the
    unweighted LeCAM term, when it is on).
    """
    if model.discr is None:
        raise ValueError("this tokenizer has no discriminator (use_gan=False)")
    config = model.config
    recon = recon.detach()
    index = random_frame_index(video)
    real, fake = critic_view(model, video, index), critic_view(model, recon, index)
    if apply_gradient_penalty:
        real, fake = real.detach().requires_grad_(), fake.detach().requires_grad_()
    real_logits, fake_logits = model.discr(real), model.discr(fake)
    loss_fn = DISCR_LOSSES[config.discriminator_adversarial_loss]
    discr_loss = loss_fn(fake_logits.float(), real_logits.float())
    lecam = None
    if lecam_weight > 0:
        if lecam_anchors is None:
            raise ValueError("lecam_weight > 0 needs lecam_anchors (EMA real, EMA fake logits)")
        ema_real, ema_fake = lecam_anchors.float().detach()
        lecam = lecam_regularizer(real_logits.float(), fake_logits.float(), ema_real, ema_fake)
    if logits_out is not None:
        logits_out["real"] = real_logits.detach().float().mean()
        logits_out["fake"] = fake_logits.detach().float().mean()
        if lecam is not None:
            logits_out["lecam"] = lecam.detach()

    multiscale_losses = [
        loss_fn(discr(recon).float(), discr(video).float()) for discr in model.multiscale_discrs
    ] or [video.new_zeros((), dtype=torch.float32)]

    penalty = video.new_zeros((), dtype=torch.float32)
    if apply_gradient_penalty:
        penalty = gradient_penalty(real, real_logits) + gradient_penalty(fake, fake_logits)
    total = (
        discr_loss
        + penalty * (config.grad_penalty_loss_weight * gradient_penalty_scale)
        + sum(multiscale_losses) * config.multiscale_adversarial_loss_weight
    )
    if lecam is not None:
        total = total + lecam * lecam_weight
    return total, DiscrLossBreakdown(discr_loss, multiscale_losses, penalty)
