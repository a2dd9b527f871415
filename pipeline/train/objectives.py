"""The modules the two engines wrap: each forward computes its engine's whole loss.

DeepSpeed hooks an engine's forward *outputs* to run its backward bookkeeping, so the loss must
come out of `engine(...)`; and those hooks break `autograd.grad` on hooked tensors (the gradient
penalty, the adaptive weight). Computing each loss inside the module's forward, and returning
the scalar loss as the only tensor that requires grad, satisfies both.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import Tensor, nn

from model import VideoTokenizer


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

    def __init__(self, tokenizer: VideoTokenizer) -> None:
        super().__init__()
        self.tokenizer = tokenizer

    def forward(self, video: Tensor, adversarial_loss_weight: float) -> tuple:
        output = self.tokenizer.reconstruct(video)
        loss, breakdown = self.tokenizer.generator_loss(
            video, output, adversarial_loss_weight=adversarial_loss_weight
        )
        return loss, output.recon.detach(), output.codes, _detached(breakdown)


class DiscriminatorObjective(nn.Module):
    """forward(video, recon, apply_gradient_penalty, gradient_penalty_scale, lecam_weight,
    lecam_anchors) -> (loss, DiscrLossBreakdown, {'real', 'fake'} mean logits and 'lecam' when
    lecam_weight > 0)."""

    def __init__(self, critics: nn.Module, loss_fn: Callable[..., tuple[Tensor, Any]]) -> None:
        super().__init__()
        self.critics = critics
        self.loss_fn = loss_fn  # the tokenizer's bound method: not a submodule of this engine

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
        loss, breakdown = self.loss_fn(
            video,
            recon,
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
