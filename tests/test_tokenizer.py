"""VideoTokenizer behaviour: shape algebra, causality, the forward contract, conditioning,
gradients, checkpointing, and clear errors for bad input."""

import pytest
import torch

from model import LossBreakdown, VideoTokenizer

from helpers import (
    ALL_CONDITIONED,
    ALL_UNCONDITIONED,
    SPEED_SWITCHES,
    randomize_,
    tiny_tokenizer,
    video,
    with_switch,
)


@pytest.mark.parametrize(
    "layers, frames, latent_frames",
    [
        (("residual",), 1, 1),
        (("compress_time",), 9, 5),
        (("compress_time", "compress_time"), 17, 5),
        (("compress_time", "compress_time", "compress_time"), 9, 2),
        (("compress_space", "compress_time", "compress_space"), 5, 3),
    ],
)
def test_shape_algebra(layers, frames, latent_frames):
    model = tiny_tokenizer(layers=layers).eval()
    space = 16 // 2 ** sum(layer == "compress_space" for layer in layers)
    x = video(frames=frames)
    codes = model.tokenize(x)
    assert codes.shape == (2, latent_frames, space, space)
    assert model.decode_from_code_indices(codes).shape == x.shape
    # Without the first frame, T = k * f frames give k latent frames.
    f = model.time_downsample_factor
    if f > 1:
        latents = model.encode(video(frames=2 * f), video_contains_first_frame=False)
        assert latents.shape[2] == 2
        assert model.decode(latents, video_contains_first_frame=False).shape[2] == 2 * f


def test_images_are_one_frame_videos():
    model = tiny_tokenizer().eval()
    images = video(frames=1)[:, :, 0]
    codes = model(images, return_codes=True)
    assert codes.shape == (2, 1, 8, 8)
    assert torch.equal(codes, model.tokenize(images.unsqueeze(2)))
    recon = model(images)
    assert recon.shape == (2, 3, 1, 16, 16)


@pytest.mark.parametrize("switch", SPEED_SWITCHES)
@pytest.mark.parametrize("separate_first_frame_encoding", [False, True])
def test_encoder_and_decoder_are_causal(separate_first_frame_encoding, switch):
    """Changing frame t leaves the latents (and reconstructions) of earlier groups
    bit-identical, and changes its own group: every frame is seen, frame 0 included; with each
    speed switch on too."""
    model = tiny_tokenizer(
        layers=ALL_UNCONDITIONED, separate_first_frame_encoding=separate_first_frame_encoding
    ).eval()
    randomize_(model)
    with_switch(model, switch)
    f = model.time_downsample_factor
    x = video(frames=1 + 2 * f)
    with torch.no_grad():
        latents = model.encode(x)
        recon = model.decode(latents)
        for t in range(x.shape[2]):
            changed = x.clone()
            changed[:, :, t] += 0.5
            new_latents = model.encode(changed)
            group = -(-t // f)  # frame 0 -> latent 0, frames 1..f -> latent 1, ...
            assert torch.equal(new_latents[:, :, :group], latents[:, :, :group]), t
            assert not torch.equal(new_latents[:, :, group], latents[:, :, group]), t
            new_recon = model.decode(new_latents)
            first_frame_of_group = max(0, (group - 1) * f + 1)
            assert torch.equal(
                new_recon[:, :, :first_frame_of_group], recon[:, :, :first_frame_of_group]
            ), t


def test_reference_quirks_reproduce_the_ignored_frames():
    model = tiny_tokenizer(layers=("compress_time", "compress_time"), reference_quirks=True).eval()
    randomize_(model)
    x = video(frames=9)
    with torch.no_grad():
        latents = model.encode(x)
        changed = x.clone()
        changed[:, :, 0] += 1
        changed[:, :, -1] += 1
        # The first latent frame never depends on the video; the last frame is never seen.
        assert torch.equal(model.encode(changed)[:, :, 0], latents[:, :, 0])
        changed = x.clone()
        changed[:, :, -1] += 1
        assert torch.equal(model.encode(changed), latents)


def test_forward_contract():
    model = tiny_tokenizer(use_gan=True, layers=("residual", "compress_space", "compress_time"))
    x = video(frames=5)
    codes = model(x, return_codes=True)
    codes2, recon = model(x, return_codes=True, return_recon=True)
    assert torch.equal(codes, codes2) and recon.shape == x.shape
    assert model(x).shape == x.shape
    loss, recon = model(x, return_recon_loss_only=True)
    assert torch.allclose(loss, torch.mean((recon - x) ** 2))
    total, breakdown = model(x, return_loss=True)
    assert isinstance(breakdown, LossBreakdown)
    assert torch.isfinite(total)
    d_total, d_breakdown = model(x, return_discr_loss=True)
    assert d_breakdown.gradient_penalty > 0
    _, no_gp = model(x, return_discr_loss=True, apply_gradient_penalty=False)
    assert no_gp.gradient_penalty == 0
    with pytest.raises(ValueError, match="exclusive"):
        model(x, return_loss=True, return_codes=True)


def test_tokenize_keeps_the_training_mode():
    model = tiny_tokenizer().train()
    model.tokenize(video(frames=5))
    assert model.training


def test_flattened_codes_decode_like_grid_codes():
    model = tiny_tokenizer(num_codebooks=2, codebook_size=16).eval()
    x = video(frames=5)
    codes = model.tokenize(x)
    assert codes.shape == (2, 3, 8, 8, 2)
    flat = codes.flatten(1, 3)
    assert torch.equal(model.decode_from_code_indices(flat), model.decode_from_code_indices(codes))
    assert torch.equal(
        model.decode_from_code_indices(codes.int()), model.decode_from_code_indices(codes)
    )


@pytest.mark.parametrize(
    "make_input, message",
    [
        (lambda: video(frames=8), r"1 \+ k\*2.*got 8"),
        (lambda: video(size=12), "16x16, got 12x12"),
        (lambda: video(channels=1), "expected 3 channels, got 1"),
        (lambda: video()[:, 0, 0], r"images \(B, C, H, W\) or a video"),
        (lambda: video().long(), "floating-point"),
    ],
)
def test_bad_videos_are_value_errors(make_input, message):
    model = tiny_tokenizer()
    with pytest.raises(ValueError, match=message):
        model(make_input(), return_loss=True)


@pytest.mark.parametrize(
    "codes, message",
    [
        (torch.full((1, 3, 8, 8), 64), r"\[0, 64\), got values in \[64, 64\]"),
        (torch.full((1, 3, 8, 8), -1), r"\[0, 64\)"),
        (torch.zeros(1, 3, 8, 8, 2, dtype=torch.long), r"\(B, t, h, w\)"),
        (torch.zeros(1, 3, 8, dtype=torch.long), r"\(B, t, h, w\)"),
        (torch.zeros(1, 3, 8, 8), "integer tensor"),
        (torch.zeros(1, 100, dtype=torch.long), "divisible by the latent grid 8x8 = 64, got 100"),
    ],
)
def test_bad_codes_are_value_errors(codes, message):
    model = tiny_tokenizer()
    with pytest.raises(ValueError, match=message):
        model.decode_from_code_indices(codes)


def test_conditioning_works_and_is_checked():
    model = tiny_tokenizer(layers=ALL_CONDITIONED, dim_cond=6)
    randomize_(model)
    x = video(frames=5)
    cond = torch.randn(2, 6)
    recon = model(x, cond=cond)
    assert not torch.allclose(recon, model(x, cond=cond.flip(0)))
    total, _ = model(x, cond=cond, return_loss=True)
    total.backward()
    for name in ("encoder_cond_in", "decoder_cond_in"):
        grads = [p.grad for p in getattr(model, name).parameters()]
        assert all(g is not None and g.abs().sum() > 0 for g in grads), name
    with pytest.raises(ValueError, match=r"cond of shape \(batch, 6\) is required"):
        model(x)
    with pytest.raises(ValueError, match=r"expected cond of shape \(2, 6\), got \(2, 5\)"):
        model(x, cond=torch.randn(2, 5))
    with pytest.raises(ValueError, match="no conditioned layers"):
        tiny_tokenizer()(x, cond=cond)


def _generator_grads(model, x, cond=None):
    model.zero_grad(set_to_none=True)
    torch.manual_seed(7)  # same random frames for the perceptual and adversarial terms
    total, _ = model(x, cond=cond, return_loss=True)
    total.backward()
    return {name: p.grad for name, p in model.named_parameters()}


def test_generator_loss_reaches_every_generator_parameter_and_no_discriminator_one(vgg_weights):
    model = tiny_tokenizer(
        layers=ALL_UNCONDITIONED,
        use_gan=True,
        perceptual_loss_weight=0.1,
        vgg_weights=vgg_weights,
        image_size=32,
    )
    randomize_(model)
    grads = _generator_grads(model, video(frames=9, size=32))
    generator = {name for name, p in model.named_parameters() if not name.startswith("discr.")}
    assert {n for n in generator if grads[n] is None or grads[n].abs().sum() == 0} == set()
    assert all(grads[n] is None for n in grads if n.startswith("discr."))
    assert all(p.requires_grad for p in model.discriminator_parameters())  # restored


def test_discriminator_loss_reaches_every_discriminator_parameter():
    model = tiny_tokenizer(use_gan=True)
    randomize_(model)
    x = video(frames=5)
    recon = model(x).detach()
    total, _ = model.discriminator_loss(x, recon)
    total.backward()
    grads = {n: p.grad for n, p in model.named_parameters() if n.startswith("discr.")}
    assert [n for n, g in grads.items() if g is None] == []
    # The hinge loss's gradient on the final bias is (share of fakes inside the margin) - (share
    # of reals inside it), exactly 0 while every logit is in (-1, 1); all else must move.
    assert [n for n, g in grads.items() if g.abs().sum() == 0] in ([], ["discr.to_logits.bias"])
    assert all(p.grad is None for p in model.generator_parameters())


def test_gradient_checkpointing_gives_the_same_gradients(vgg_weights):
    model = tiny_tokenizer(
        layers=ALL_UNCONDITIONED,
        use_gan=True,
        perceptual_loss_weight=0.1,
        vgg_weights=vgg_weights,
        image_size=32,
    )
    randomize_(model)
    x = video(frames=9, size=32)
    plain = _generator_grads(model, x)
    model.set_gradient_checkpointing(True)
    checkpointed = _generator_grads(model, x)
    for name, grad in plain.items():
        if grad is None:
            assert checkpointed[name] is None
        else:
            assert torch.allclose(grad, checkpointed[name], rtol=1e-5, atol=1e-7), name


def test_parameter_groups_partition_the_parameters():
    model = tiny_tokenizer(use_gan=True)
    generator = {id(p) for p in model.generator_parameters()}
    discriminator = {id(p) for p in model.discriminator_parameters()}
    assert generator.isdisjoint(discriminator)
    assert generator | discriminator == {id(p) for p in model.parameters()}
    assert discriminator == {id(p) for p in model.discr.parameters()}


def test_from_config_builds_the_same_model():
    model = tiny_tokenizer(seed=3)
    torch.manual_seed(3)
    again = VideoTokenizer.from_config(model.config)
    assert model.config == again.config
    again.load_state_dict(model.state_dict())
    x = video(frames=5)
    assert torch.equal(model.eval()(x), again.eval()(x))


class VideoCritic(torch.nn.Module):
    """A small multiscale discriminator on whole videos (users pass their own)."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv3d(3, 4, 3, stride=2)
        self.out = torch.nn.Linear(4, 1)

    def forward(self, x):
        return self.out(self.conv(x).mean(dim=(2, 3, 4))).squeeze(-1)


def _plain_generator_loss(model, x):
    """The textbook formula, backpropagated as one sum: the adaptive weight from double
    backward passes through VGG and discriminators, as magvit2-pytorch computes it."""
    from model.losses import adaptive_adversarial_weight, hinge_gen_loss
    from model.objectives import frozen, random_frame_index, take_frames

    out = model.reconstruct(x)
    weight = model.decoder.last_weight

    def norm(loss):
        return torch.autograd.grad(loss, weight, retain_graph=True)[0].norm()

    index = random_frame_index(x)
    perceptual = model.perceptual(take_frames(x, index), take_frames(out.recon, index))
    with frozen(model.discriminators()):
        fake = take_frames(out.recon, random_frame_index(out.recon))
        gan = hinge_gen_loss(model.discr(fake))
        multiscale = [hinge_gen_loss(d(out.recon)) for d in model.multiscale_discrs]
    total = torch.mean((out.recon - x) ** 2) + out.aux_loss + 0.1 * perceptual
    for loss in [gan, *multiscale]:
        total = total + loss * adaptive_adversarial_weight(norm(perceptual), norm(loss))
    return total


def test_generator_loss_value_and_gradient_equal_the_plain_formula(vgg_weights):
    model = tiny_tokenizer(
        use_gan=True,
        perceptual_loss_weight=0.1,
        vgg_weights=vgg_weights,
        image_size=32,
        multiscale_discrs=[VideoCritic()],
    )
    randomize_(model)
    x = video(frames=5, size=32)
    torch.manual_seed(3)
    plain = _plain_generator_loss(model, x)
    plain.backward()
    expected = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    torch.manual_seed(3)
    total, breakdown = model(x, return_loss=True)
    total.backward()
    assert torch.allclose(total, plain, rtol=1e-5)
    assert len(breakdown.multiscale_gen_losses) == 1 and breakdown.adaptive_adversarial_weight > 0
    grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert grads.keys() == expected.keys()
    for name, grad in grads.items():
        assert torch.allclose(grad, expected[name], rtol=1e-4, atol=1e-7), name


def test_export_round_trip(tmp_path):
    from model.pretrained import load_pretrained, save_pretrained

    model = tiny_tokenizer(use_gan=True, layers=("residual", "compress_space", "compress_time"))
    randomize_(model)
    save_pretrained(model, tmp_path / "export", metadata={"step": 3})
    loaded = load_pretrained(tmp_path / "export")
    assert loaded.discr is None and loaded.perceptual is None and not loaded.training
    x = video(frames=5)
    assert torch.equal(loaded.tokenize(x), model.tokenize(x))
    assert not any(
        name.startswith(".") for name in (p.name for p in (tmp_path / "export").iterdir())
    )
    with pytest.raises(ValueError, match="not a tokenizer export"):
        load_pretrained(tmp_path)


def test_separately_built_discriminators_drive_the_losses():
    from model import Tokenizer
    from model.critics import build_discriminators
    from model.objectives import discriminator_loss, generator_loss

    full = tiny_tokenizer(use_gan=True)
    count = len(list(full.parameters()))
    torch.manual_seed(0)
    model = Tokenizer.from_config(full.config)
    critics = build_discriminators(full.config)
    assert not any(k.startswith("discr.") for k in model.state_dict())
    assert len(list(model.parameters())) + len(list(critics.parameters())) == count
    assert list(model.state_dict()) + list(critics.state_dict()) == list(full.state_dict())
    x = video(frames=5)
    out = model.reconstruct(x)
    parts = dict(discr=critics.discr, multiscale_discrs=critics.multiscale_discrs)
    d_loss, _ = discriminator_loss(x, out.recon, config=model.config, **parts)
    d_loss.backward()
    assert all(p.grad is not None for p in critics.parameters())
    g_loss, breakdown = generator_loss(
        x,
        out,
        config=model.config,
        last_weight=model.decoder.last_weight,
        training=model.training,
        **parts,
    )
    assert breakdown.adversarial_gen_loss != 0
