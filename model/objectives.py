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
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from model.compilation import eager
from model.config import TokenizerConfig
from model.losses import (
    DISCR_LOSSES,
    GEN_LOSSES,
    adaptive_adversarial_weight,
    gradient_penalty,
    lecam_regularizer,
)
from model.tokenizer import TokenizerOutput

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


def critic_view(kind: str, video: Tensor, index: Tensor) -> Tensor:
    """What the discriminator of `kind` ('2d' or '3d') sees of a (B, C, T, H, W) clip: frame
    index[b] of each (the 2-D image discriminator) or the whole clip (the 3-D one)."""
    if kind == "3d":
        return video
    return take_frames(video, index)


def recon_loss(video: Tensor, recon: Tensor) -> Tensor:
    """The reconstruction term: MSE in fp32."""
    return F.mse_loss(recon.float(), video.float())


class _Term(NamedTuple):
    """A loss computed from the reconstruction by a frozen network, and d loss / d recon (None
    when nothing is differentiable)."""

    loss: Tensor
    grad: Tensor | None


def _value_and_grad(loss: Tensor, recon: Tensor, differentiable: bool) -> _Term:
    if not differentiable:
        return _Term(loss.detach(), None)
    (grad,) = torch.autograd.grad(loss, recon)  # frees the VGG / discriminator graph
    return _Term(loss.detach(), grad)


def generator_loss(
    video: Tensor,
    output: TokenizerOutput,
    *,
    config: TokenizerConfig,
    last_weight: Tensor,
    training: bool,
    perceptual: nn.Module | None = None,
    discr: nn.Module | None = None,
    multiscale_discrs: Sequence[nn.Module] = (),
    adversarial_loss_weight: float | None = None,
    multiscale_adversarial_loss_weight: float | None = None,
) -> tuple[Tensor, LossBreakdown]:
    """Total generator loss for `video` (B, C, T, H, W) and its tokenizer `output`.

    Args: `config` gives the weights and settings; `last_weight` is `Decoder.last_weight`;
    `training`: the tokenizer's mode; `perceptual`: (frames, frames) -> scalar, or None; the
    critics `discr`, `multiscale_discrs` are frozen here; the two weights override the config's.

    The adversarial terms are scaled by the adaptive weight (perceptual vs adversarial gradient
    norm at `last_weight`) when the perceptual loss is on, `training` and
    `config.adaptive_adversarial_weight` are set; otherwise the weight is 1, as in magvit2-pytorch.
    Value and gradient of the total are those of the plain sum (see `_backpropagated`).
    """
    adversarial_scale = _default(adversarial_loss_weight, config.adversarial_loss_weight)
    multiscale_scale = _default(
        multiscale_adversarial_loss_weight, config.multiscale_adversarial_loss_weight
    )
    recon = output.recon
    differentiable = recon.requires_grad and torch.is_grad_enabled()
    zero = video.new_zeros((), dtype=torch.float32)
    perceptual_term = _perceptual_term(video, recon, perceptual, differentiable)

    use_gan = config.use_gan and discr is not None and adversarial_scale > 0
    critics, scales = _scaled_critics(
        config, discr if use_gan else None, multiscale_discrs, adversarial_scale, multiscale_scale
    )
    with frozen(([discr] if discr is not None else []) + list(multiscale_discrs)):
        adversarial = _adversarial_terms(config, recon, critics, use_gan, differentiable)
    weights = [torch.ones_like(zero) for _ in adversarial]
    if config.adaptive_adversarial_weight and training:
        weights = _adaptive_weights(last_weight, recon, perceptual_term, adversarial, weights)

    reconstruction = recon_loss(video, recon)
    total = reconstruction + output.aux_loss * config.quantizer_aux_loss_weight
    total = total + perceptual_term.loss * config.perceptual_loss_weight
    for term, weight, scale in zip(adversarial, weights, scales, strict=True):
        total = total + term.loss * weight * scale
    if differentiable:  # adds the gradient, not the value
        total = total + _backpropagated(
            recon, config, perceptual_term, adversarial, weights, scales
        )

    breakdown = _breakdown(reconstruction, output, perceptual_term, adversarial, weights, use_gan)
    return total, breakdown


def _breakdown(
    reconstruction: Tensor,
    output: TokenizerOutput,
    perceptual: _Term,
    adversarial: list[_Term],
    weights: list[Tensor],
    use_gan: bool,
) -> LossBreakdown:
    """The terms in magvit2-pytorch's order: the image critic's first, then the multiscale."""
    zero = reconstruction.new_zeros(())
    first_multiscale = 1 if use_gan else 0
    return LossBreakdown(
        reconstruction,
        output.aux_loss,
        output.quantizer_breakdown,
        perceptual.loss,
        adversarial[0].loss if use_gan else zero,
        weights[0] if use_gan else zero,
        [term.loss for term in adversarial[first_multiscale:]],
        weights[first_multiscale:],
    )


def _scaled_critics(
    config: TokenizerConfig,
    discr: nn.Module | None,
    multiscale_discrs: Sequence[nn.Module],
    adversarial_scale: float,
    multiscale_scale: float,
) -> tuple[list[nn.Module], list[float]]:
    """The critics the generator plays against (the image one first), each with its scale."""
    critics = [discr] if discr is not None else []
    scales = [adversarial_scale] if discr is not None else []
    if config.use_gan and multiscale_scale > 0:
        critics += list(multiscale_discrs)
        scales += [multiscale_scale] * len(multiscale_discrs)
    return critics, scales


def _perceptual_term(
    video: Tensor, recon: Tensor, perceptual: nn.Module | None, differentiable: bool
) -> _Term:
    """The perceptual loss on one random frame (the same of input and reconstruction)."""
    if perceptual is None:
        return _Term(video.new_zeros((), dtype=torch.float32), None)
    index = random_frame_index(video)
    loss = perceptual(take_frames(video, index), take_frames(recon, index))
    return _value_and_grad(loss, recon, differentiable)


def _adversarial_terms(
    config: TokenizerConfig,
    recon: Tensor,
    critics: list[nn.Module],
    with_image_critic: bool,
    differentiable: bool,
) -> list[_Term]:
    """The generator's adversarial loss against each critic: the first one (with
    `with_image_critic`) sees `critic_view` of the reconstruction, the multiscale ones all of it."""
    gen_loss = GEN_LOSSES[config.generator_adversarial_loss]
    terms = []
    for i, critic in enumerate(critics):
        if i == 0 and with_image_critic:
            seen = critic_view(config.discriminator_kind, recon, random_frame_index(recon))
        else:
            seen = recon
        terms.append(_value_and_grad(gen_loss(critic(seen).float()), recon, differentiable))
    return terms


def _adaptive_weights(
    last_weight: Tensor,
    recon: Tensor,
    perceptual: _Term,
    adversarial: list[_Term],
    fixed: list[Tensor],
) -> list[Tensor]:
    """Per adversarial term, the perceptual vs adversarial gradient-norm ratio at the last
    weight; `fixed` (ones) without a perceptual gradient or adversarial terms."""
    if perceptual.grad is None or not adversarial:
        return fixed
    perceptual_norm = _last_layer_grad_norm(last_weight, recon, perceptual.grad)
    return [
        adaptive_adversarial_weight(
            perceptual_norm, _last_layer_grad_norm(last_weight, recon, term.grad)
        )
        for term in adversarial
    ]


def _backpropagated(
    recon: Tensor,
    config: TokenizerConfig,
    perceptual: _Term,
    adversarial: list[_Term],
    weights: list[Tensor],
    scales: list[float],
) -> Tensor:
    """A zero-valued term whose gradient w.r.t. recon is that of the weighted frozen-network
    losses (their gradients, already computed, summed).

    The terms computed from the reconstruction by frozen networks (VGG, discriminators) are
    backpropagated to the reconstruction once, in `generator_loss`, and their graphs freed; the
    total carries that gradient as this linear term. Its value and its gradient are those of the
    plain sum, but VGG and discriminator are not backpropagated twice (once for the adaptive
    weight, once for the update) and their activations do not wait for the final backward pass.
    """
    upstream = torch.zeros_like(recon, dtype=torch.float32)
    if perceptual.grad is not None:
        upstream += config.perceptual_loss_weight * perceptual.grad.float()
    for term, weight, scale in zip(adversarial, weights, scales, strict=True):
        upstream += (weight * scale) * term.grad.float()
    linear = (recon.float() * upstream).sum()
    return linear - linear.detach()  # adds the gradient, not the value


def _default(value: float | None, default: float) -> float:
    return default if value is None else value


def _last_layer_grad_norm(last_weight: Tensor, recon: Tensor, grad_recon: Tensor) -> Tensor:
    """||d loss / d W|| at the last decoder conv, from d loss / d recon (cheap: one layer)."""
    (grad,) = torch.autograd.grad(recon, last_weight, grad_outputs=grad_recon, retain_graph=True)
    return grad.float().norm(2)


def discriminator_loss(
    video: Tensor,
    recon: Tensor,
    *,
    config: TokenizerConfig,
    discr: nn.Module | None,
    multiscale_discrs: Sequence[nn.Module] = (),
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
    if discr is None:
        raise ValueError("this tokenizer has no discriminator (use_gan=False)")
    recon = recon.detach()
    index = random_frame_index(video)
    kind = config.discriminator_kind
    # Real and fake as one batch (the critic has no batch statistics): one critic pass and one
    # penalty double backward instead of two of each.
    both = torch.cat((critic_view(kind, video, index), critic_view(kind, recon, index)))
    both, both_logits = _critic_pass(discr, both, apply_gradient_penalty)
    real_logits, fake_logits = both_logits.chunk(2)
    loss_fn = DISCR_LOSSES[config.discriminator_adversarial_loss]
    discr_loss = loss_fn(fake_logits.float(), real_logits.float())
    lecam = _lecam_term(real_logits, fake_logits, lecam_weight, lecam_anchors)
    if logits_out is not None:
        logits_out["real"] = real_logits.detach().float().mean()
        logits_out["fake"] = fake_logits.detach().float().mean()
        if lecam is not None:
            logits_out["lecam"] = lecam.detach()

    multiscale_losses = [
        loss_fn(critic(recon).float(), critic(video).float()) for critic in multiscale_discrs
    ] or [video.new_zeros((), dtype=torch.float32)]

    penalty = video.new_zeros((), dtype=torch.float32)
    if apply_gradient_penalty:
        # The mean over real of E||grad||^2 plus the mean over fake: twice the mean over both.
        penalty = 2 * gradient_penalty(both, both_logits)
    total = (
        discr_loss
        + penalty * (config.grad_penalty_loss_weight * gradient_penalty_scale)
        + sum(multiscale_losses) * config.multiscale_adversarial_loss_weight
    )
    if lecam is not None:
        total = total + lecam * lecam_weight
    return total, DiscrLossBreakdown(discr_loss, multiscale_losses, penalty)


def _critic_pass(discr: nn.Module, inputs: Tensor, penalised: bool) -> tuple[Tensor, Tensor]:
    """(inputs, the critic's logits of them). For the gradient penalty the inputs become a leaf
    the logits are differentiated by, and the pass runs eagerly: compiled blocks
    (model.compilation) have no double backward."""
    if not penalised:
        return inputs, discr(inputs)
    inputs = inputs.detach().requires_grad_()
    with eager():
        return inputs, discr(inputs)


def _lecam_term(
    real_logits: Tensor, fake_logits: Tensor, lecam_weight: float, lecam_anchors: Tensor | None
) -> Tensor | None:
    """The unweighted LeCAM regulariser against the EMA anchors, or None when it is off."""
    if lecam_weight <= 0:
        return None
    if lecam_anchors is None:
        raise ValueError("lecam_weight > 0 needs lecam_anchors (EMA real, EMA fake logits)")
    ema_real, ema_fake = lecam_anchors.float().detach()
    return lecam_regularizer(real_logits.float(), fake_logits.float(), ema_real, ema_fake)
