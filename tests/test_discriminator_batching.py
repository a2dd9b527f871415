"""The discriminator update sends real and fake frames through the critic as one batch, with
one double backward for the gradient penalty: same loss, penalty and gradients as two passes."""

from __future__ import annotations

import pytest
import torch

from model.losses import DISCR_LOSSES, gradient_penalty
from model.objectives import critic_view, discriminator_loss

from helpers import tiny_tokenizer, video


def two_pass_loss(model, real_clip, fake_clip, index, apply_gp):
    """The loss as computed before batching: one critic pass each, one penalty each."""
    config = model.config
    real = critic_view(config.discriminator_kind, real_clip, index).detach().requires_grad_()
    fake = critic_view(config.discriminator_kind, fake_clip, index).detach().requires_grad_()
    real_logits, fake_logits = model.discr(real), model.discr(fake)
    loss = DISCR_LOSSES[config.discriminator_adversarial_loss](fake_logits, real_logits)
    penalty = torch.zeros(())
    if apply_gp:
        penalty = gradient_penalty(real, real_logits) + gradient_penalty(fake, fake_logits)
    return loss + penalty * config.grad_penalty_loss_weight, penalty


@pytest.mark.parametrize("kind", ["2d", "3d"])
@pytest.mark.parametrize("apply_gp", [True, False])
def test_one_batch_equals_two_passes(kind, apply_gp):
    from dataclasses import replace

    from model import VideoTokenizer

    config = replace(tiny_tokenizer(use_gan=True).config, discriminator_kind=kind)
    torch.manual_seed(0)
    model = VideoTokenizer.from_config(config).train()
    real, fake = video(batch=2, seed=1), video(batch=2, seed=2)

    torch.manual_seed(3)  # the same random frame in both computations
    batched, parts = discriminator_loss(
        real, fake, config=config, discr=model.discr, apply_gradient_penalty=apply_gp
    )
    batched.backward()
    batched_grads = [p.grad.clone() for p in model.discr.parameters()]
    model.discr.zero_grad()

    torch.manual_seed(3)
    index = torch.randint(0, real.shape[2], (real.shape[0],))
    expected, penalty = two_pass_loss(model, real, fake, index, apply_gp)
    expected.backward()

    torch.testing.assert_close(batched, expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(parts.gradient_penalty, penalty, rtol=1e-5, atol=1e-6)
    assert (parts.gradient_penalty > 0) == apply_gp
    for got, want in zip(batched_grads, (p.grad for p in model.discr.parameters()), strict=True):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)
