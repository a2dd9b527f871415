"""The modules the two engines wrap: each forward computes its engine's whole loss.

DeepSpeed hooks an engine's forward *outputs* to run its backward bookkeeping, so the loss must
come out of `engine(...)`; and those hooks break `autograd.grad` on hooked tensors (the gradient
penalty, the adaptive weight). Computing each loss inside the module's forward, and returning
the scalar loss as the only tensor that requires grad, satisfies both.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn

from model import Tokenizer, TokenizerConfig
from model.discriminator import Discriminators
from model.objectives import discriminator_loss, generator_loss


def _detached(value: Any) -> Any:
    if isinstance(value, Tensor):
        return value.detach()
    if isinstance(value, tuple) and hasattr(value, "_fields"):
        return type(value)(*(_detached(v) for v in value))
    if isinstance(value, list | tuple):
        return type(value)(_detached(v) for v in value)
    return value


class GeneratorObjective(nn.Module):
    """forward(video, adversarial_loss_weight) -> (loss, recon, codes, LossBreakdown); only the
    loss carries gradient. The discriminators are called as plain modules inside."""

    def __init__(
        self,
        tokenizer: Tokenizer,
        perceptual: nn.Module | None = None,
        critics: Discriminators | None = None,
    ) -> None:
        super().__init__()
        self.tokenizer = tokenizer
        self.perceptual = perceptual  # non-persistent buffers only: the VGG is not in its tree
        # The critics belong to the discriminator engine: plain references, not submodules.
        self.critic_parts = (
            (None, ()) if critics is None else (critics.discr, tuple(critics.multiscale_discrs))
        )

    def forward(self, video: Tensor, adversarial_loss_weight: float) -> tuple:
        output = self.tokenizer.reconstruct(video)
        discr, multiscale_discrs = self.critic_parts
        loss, breakdown = generator_loss(
            video,
            output,
            config=self.tokenizer.config,
            last_weight=self.tokenizer.decoder.last_weight,
            training=self.tokenizer.training,
            perceptual=self.perceptual,
            discr=discr,
            multiscale_discrs=multiscale_discrs,
            adversarial_loss_weight=adversarial_loss_weight,
        )
        return loss, output.recon.detach(), output.codes, _detached(breakdown)


class DiscriminatorObjective(nn.Module):
    """forward(video, recon, apply_gradient_penalty, gradient_penalty_scale, lecam_weight,
    lecam_anchors) -> (loss, DiscrLossBreakdown, {'real', 'fake'} mean logits and 'lecam' when
    lecam_weight > 0)."""

    def __init__(self, critics: Discriminators, config: TokenizerConfig) -> None:
        super().__init__()
        self.critics = critics
        self.config = config  # the loss weights and settings

    def forward(
        self,
        video: Tensor,
        recon: Tensor,
        apply_gradient_penalty: bool,
        gradient_penalty_scale: float,
        lecam_weight: float = 0.0,
        lecam_anchors: Tensor | None = None,
    ) -> tuple:
        logits: dict[str, Tensor] = {}
        loss, breakdown = discriminator_loss(
            video,
            recon,
            config=self.config,
            discr=self.critics.discr,
            multiscale_discrs=self.critics.multiscale_discrs,
            apply_gradient_penalty=apply_gradient_penalty,
            gradient_penalty_scale=gradient_penalty_scale,
            lecam_weight=lecam_weight,
            lecam_anchors=lecam_anchors,
            logits_out=logits,
        )
        return loss, _detached(breakdown), logits


def frozen_parameters(module: nn.Module | None):
    """Context manager: the module's parameters don't require grad inside the block."""
    from model.objectives import frozen

    return frozen([module] if module is not None else [])
