"""The 3-D discriminator: every frame count and images, shapes, anti-aliasing, the gradient
penalty's double backward, clear errors for inputs it was not built for."""

import pytest
import torch

from model.discriminator3d import Discriminator3D, Discriminator3DConfig
from model.losses import gradient_penalty


def _tiny(**overrides) -> Discriminator3D:
    torch.manual_seed(0)
    kwargs = dict(image_size=16, dim=4, max_dim=16, num_space_downsamples=2, num_time_downsamples=2)
    return Discriminator3D(Discriminator3DConfig(**{**kwargs, **overrides}))


@pytest.mark.parametrize("frames", [1, 2, 5, 9, 17])
def test_every_frame_count_gives_one_logit_per_clip(frames):
    d = _tiny()
    assert d(torch.randn(3, 3, frames, 16, 16)).shape == (3,)


def test_images_are_one_frame_clips():
    d = _tiny()
    images = torch.randn(2, 3, 16, 16)
    assert torch.equal(d(images), d(images.unsqueeze(2)))


def test_the_logit_depends_on_motion():
    """A per-frame critic cannot tell a clip from its frames shuffled in time; this one can."""
    d = _tiny()
    clip = torch.randn(1, 3, 9, 16, 16)
    shuffled = clip[:, :, torch.randperm(9, generator=torch.Generator().manual_seed(1))]
    assert not torch.allclose(d(clip), d(shuffled))


def test_blurpool_changes_the_downsampling():
    clip = torch.randn(2, 3, 9, 16, 16)
    plain = _tiny(antialiased_downsample=False)
    blurred = _tiny(antialiased_downsample=True)
    blurred.load_state_dict(plain.state_dict())  # same weights: only the blur differs
    assert not torch.allclose(plain(clip), blurred(clip))


def test_gradient_penalty_double_backward():
    d = _tiny()
    clip = torch.randn(2, 3, 5, 16, 16, requires_grad=True)
    penalty = gradient_penalty(clip, d(clip))
    penalty.backward()
    # Weights get gradients (biases that only shift the logit cannot move the penalty).
    grads = [p.grad for p in d.parameters() if p.ndim > 1]
    assert torch.isfinite(penalty) and penalty > 0
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert sum(g.abs().sum() for g in grads) > 0


def test_bad_inputs_and_configs_are_clear_errors():
    d = _tiny()
    with pytest.raises(ValueError, match="built for 16x16 frames, got 32x32"):
        d(torch.randn(1, 3, 5, 32, 32))
    with pytest.raises(ValueError, match=r"expects \(B, 3, T, H, W\)"):
        d(torch.randn(1, 1, 5, 16, 16))
    with pytest.raises(ValueError, match="must divide by 2\\*\\*num_space_downsamples"):
        Discriminator3DConfig(image_size=24, num_space_downsamples=4)
    with pytest.raises(ValueError, match="num_time_downsamples"):
        Discriminator3DConfig(image_size=16, num_space_downsamples=1, num_time_downsamples=2)


def test_the_tokenizer_trains_against_it_on_whole_clips():
    from dataclasses import replace

    from model import VideoTokenizer

    from helpers import tiny_tokenizer, video

    config = replace(tiny_tokenizer(use_gan=True).config, discriminator_kind="3d")
    model = VideoTokenizer.from_config(config).train()
    assert isinstance(model.discr, Discriminator3D)
    seen = []
    model.discr.register_forward_hook(lambda module, args, out: seen.append(args[0].shape))
    x = video(batch=2, frames=9, size=16)
    output = model.reconstruct(x)
    loss, parts = model.generator_loss(x, output, adversarial_loss_weight=1.0)
    loss.backward()
    d_loss, d_parts = model.discriminator_loss(x, output.recon.detach())
    d_loss.backward()
    # Whole clips, not frames (the discriminator update sends real and fake as one batch).
    assert seen and all(shape[1:] == x.shape[1:] for shape in seen)
    assert {shape[0] for shape in seen} == {2, 4}
    assert torch.isfinite(loss) and torch.isfinite(d_loss) and d_parts.gradient_penalty > 0
    assert all(p.grad is not None for p in model.discr.parameters() if p.ndim > 1)
    with pytest.raises(ValueError, match="discriminator_kind must be one of"):
        replace(config, discriminator_kind="4d")
