"""The VGG16 perceptual loss: local weights only, frozen, never in the state dict."""

import pytest
import torch
import torchvision

from model.losses import VGG16_CHECKPOINT_NAME, PerceptualLoss, VGGWeightsNotFoundError

from helpers import tiny_tokenizer, video


def test_missing_weights_error_says_how_to_provide_them(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty-cache"))
    model = tiny_tokenizer(perceptual_loss_weight=0.1, image_size=32)  # weights load on first use
    with pytest.raises(VGGWeightsNotFoundError) as info:
        model(video(frames=5, size=32), return_loss=True)
    message = str(info.value)
    assert VGG16_CHECKPOINT_NAME in message and "vgg_weights=" in message
    assert "perceptual_loss_weight=0" in message and "empty-cache" in message


def test_weights_from_the_torch_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    (tmp_path / "hub" / "checkpoints").mkdir(parents=True)
    torch.manual_seed(0)
    state = torchvision.models.vgg16(weights=None).state_dict()
    torch.save(state, tmp_path / "hub" / "checkpoints" / VGG16_CHECKPOINT_NAME)
    loss = PerceptualLoss()
    rng = torch.get_rng_state()
    network = loss.load()
    assert torch.equal(network[0][0].weight, state["features.0.weight"])
    assert torch.equal(torch.get_rng_state(), rng)  # loading draws no random numbers


def test_vgg_is_frozen_eval_and_outside_the_state_dict(vgg_weights):
    model = tiny_tokenizer(perceptual_loss_weight=0.1, vgg_weights=vgg_weights, image_size=32)
    x = video(frames=5, size=32)
    model.train()
    total, breakdown = model(x, return_loss=True)
    total.backward()
    network = model.perceptual.load()
    assert not network.training  # no dropout inside the loss
    assert all(not p.requires_grad and p.grad is None for p in network.parameters())
    assert not any("vgg" in key or key.startswith("perceptual") for key in model.state_dict())
    assert len(model.generator_parameters()) == len(list(model.parameters()))
    assert breakdown.perceptual_loss > 0
    # Deterministic: the same frames give the same loss (no dropout).
    frames = x[:, :, 0]
    assert torch.equal(
        model.perceptual(frames, frames * 0.5), model.perceptual(frames, frames * 0.5)
    )


def test_small_frames_are_a_clear_error(vgg_weights):
    loss = PerceptualLoss(weights=vgg_weights)
    with pytest.raises(ValueError, match="at least 32x32"):
        loss(torch.zeros(1, 3, 16, 16), torch.zeros(1, 3, 16, 16))
