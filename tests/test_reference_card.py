"""The reference card's usage example, as written there, on CPU (slow: 128x128x17, batch 2)."""

import pytest
import torch
import torchvision

from model import VideoTokenizer
from model.losses import VGG16_CHECKPOINT_NAME


@pytest.mark.slow
def test_reference_card_usage_example(tmp_path, monkeypatch):
    # The card builds with the default perceptual loss: VGG16 weights come from the torch cache
    # (random weights here; nothing can be downloaded).
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    (tmp_path / "hub" / "checkpoints").mkdir(parents=True)
    torch.save(
        torchvision.models.vgg16(weights=None).state_dict(),
        tmp_path / "hub" / "checkpoints" / VGG16_CHECKPOINT_NAME,
    )
    torch.manual_seed(0)
    tokenizer = VideoTokenizer(
        image_size=128,
        layers=(
            "residual",
            "compress_space",
            "residual",
            "compress_time",
            "attend_space",
            "residual",
        ),
        channels=3,
        init_dim=64,
        codebook_size=1024,
        num_codebooks=1,
        use_gan=True,
    )
    video = torch.rand(2, 3, 17, 128, 128) * 2 - 1

    codes = tokenizer(video, return_codes=True)
    assert codes.shape == (2, 9, 64, 64)
    assert codes.min() >= 0 and codes.max() < 1024
    with torch.no_grad():
        recon_video = tokenizer.decode_from_code_indices(codes)
    assert recon_video.shape == (2, 3, 17, 128, 128)

    total_loss, loss_breakdown = tokenizer(video, return_loss=True)
    assert torch.isfinite(total_loss)
    total_loss.backward()
    generator_grads = [p.grad for p in tokenizer.generator_parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in generator_grads)
    assert loss_breakdown.perceptual_loss > 0 and loss_breakdown.adaptive_adversarial_weight > 0

    tokenizer.zero_grad(set_to_none=True)
    discr_loss, discr_breakdown = tokenizer(video, return_discr_loss=True)
    assert torch.isfinite(discr_loss) and discr_breakdown.gradient_penalty > 0
    discr_loss.backward()
    assert all(
        p.grad is not None and torch.isfinite(p.grad).all()
        for p in tokenizer.discriminator_parameters()
    )
