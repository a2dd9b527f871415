"""Equivalence with magvit2-pytorch 0.5.1: a reference model with random weights, converted into
ours, gives identical codes and the same reconstructions (fp32)."""

import warnings

import pytest
import torch

from model import VideoTokenizer
from model.convert import load_reference_checkpoint, tokenizer_from_reference_checkpoint

from helpers import ALL_UNCONDITIONED, SPEED_SWITCHES, randomize_, video, with_switch

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    magvit2 = pytest.importorskip("magvit2_pytorch", reason="the test extra installs it")

SMALL = dict(
    image_size=16,
    init_dim=8,
    attn_dim_head=8,
    attn_heads=2,
    perceptual_loss_weight=0.0,
    discr_kwargs=dict(dim=2, image_size=16, max_dim=16, antialiased_downsample=False),
)
CONFIGS = {
    "every-unconditioned-kind-lfq": dict(layers=ALL_UNCONDITIONED, codebook_size=256),
    "lfq-3-codebooks": dict(
        layers=("residual", "compress_space", "compress_time", "attend_time"),
        codebook_size=16,
        num_codebooks=3,
    ),
    "fsq": dict(
        layers=("residual", "compress_time", "linear_attend_space", "compress_time"),
        use_fsq=True,
        fsq_levels=[8, 5, 5, 5],
    ),
    "fsq-2-codebooks": dict(
        layers=("compress_space", "gateloop_time", "compress_time"),
        use_fsq=True,
        fsq_levels=[7, 5],
        num_codebooks=2,
    ),
    "separate-first-frame": dict(
        layers=("residual", "compress_space", "compress_time", "attend_space"),
        codebook_size=64,
        separate_first_frame_encoding=True,
    ),
    "wide-kernels-max-dim": dict(
        layers=(("compress_space", 24), ("consecutive_residual", 2), "compress_time"),
        codebook_size=32,
        max_dim=32,
        residual_conv_kernel_size=5,
        input_conv_kernel_size=(5, 5, 5),
    ),
}


def build_pair(config: dict, seed: int = 0):
    kwargs = {**SMALL, **config}
    torch.manual_seed(seed)
    reference = magvit2.VideoTokenizer(**kwargs, flash_attn=False)
    randomize_(reference)  # zero-initialised gates and gains would hide mapping errors
    ours = VideoTokenizer(**kwargs, reference_quirks=True)
    load_reference_checkpoint(ours, reference.state_dict())
    return reference, ours


def _count(params):
    return sum(p.numel() for p in params)


@pytest.mark.parametrize("switch", SPEED_SWITCHES)
@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_codes_and_reconstructions_match_the_reference(name, switch):
    reference, ours = build_pair(CONFIGS[name])
    reference.eval(), ours.eval()
    with_switch(ours, switch)
    x = video(frames=9)
    with torch.no_grad():
        ref_codes, ref_recon = reference(x, return_codes=True, return_recon=True)
        codes, recon = ours(x, return_codes=True, return_recon=True)
        assert torch.equal(codes, ref_codes.long())
        assert ((recon - ref_recon).norm() / ref_recon.norm()) < 1e-4
        assert torch.allclose(
            ours.decode_from_code_indices(codes),
            reference.decode_from_code_indices(ref_codes),
            rtol=1e-4,
            atol=1e-5,
        )
        images = x[:, :, 0]
        if not ours.config.separate_first_frame_encoding:  # the reference fails on images there
            assert torch.equal(
                ours(images, return_codes=True), reference(images, return_codes=True).long()
            )
    assert _count(ours.generator_parameters()) == _count(reference.parameters())
    assert _count(ours.discriminator_parameters()) == _count(reference.discr_parameters())


def test_training_losses_match_the_reference():
    """Reconstruction + LFQ entropy/commitment in training mode (no GAN: random frames)."""
    config = dict(CONFIGS["every-unconditioned-kind-lfq"], use_gan=False)
    reference, ours = build_pair(config)
    x = video(frames=9)
    ref_total, ref_parts = reference(x, return_loss=True)
    total, parts = ours(x, return_loss=True)
    assert torch.allclose(parts.recon_loss, ref_parts.recon_loss, rtol=1e-5)
    # The reference clamps log p at 1e-5 inside its entropies; ours is exact: they differ by
    # the mass of codes with p < 1e-5, a few 1e-6 here.
    assert abs(parts.lfq_aux_loss - ref_parts.lfq_aux_loss) < 1e-4
    assert abs(total - ref_total) < 1e-4


@pytest.mark.parametrize("switch", SPEED_SWITCHES)
def test_discriminator_matches_the_reference(switch):
    """Logits and their input gradient (what the gradient penalty takes) match; compiled
    blocks have no double backward, so the penalty runs them eagerly (model.compilation)."""
    reference, ours = build_pair(dict(layers=("residual",), codebook_size=16))
    with_switch(ours.discr, switch)
    images = torch.randn(3, 3, 16, 16, requires_grad=True)
    ref_logits = reference.discr(images)
    (ref_grad,) = torch.autograd.grad(ref_logits.sum(), images)
    logits = ours.discr(images)
    (grad,) = torch.autograd.grad(logits.sum(), images)
    assert torch.allclose(logits, ref_logits, rtol=1e-4, atol=1e-5)
    assert torch.allclose(grad, ref_grad, rtol=1e-4, atol=1e-6)


def test_reference_pt_file_round_trip(tmp_path):
    config = CONFIGS["lfq-3-codebooks"]
    reference, _ = build_pair(config)
    path = tmp_path / "magvit2.pt"
    reference.save(str(path))
    ours = tokenizer_from_reference_checkpoint(path).eval()
    assert ours.config.reference_quirks
    x = video(frames=5)
    with torch.no_grad():
        assert torch.equal(ours.tokenize(x), reference.eval().tokenize(x).long())
    rebuilt = VideoTokenizer(**SMALL, **config, reference_quirks=True)
    load_reference_checkpoint(rebuilt, path)
    assert all(
        torch.equal(a, b)
        for a, b in zip(rebuilt.state_dict().values(), ours.state_dict().values(), strict=True)
    )


def test_mismatched_checkpoint_is_a_clear_error():
    reference, _ = build_pair(CONFIGS["fsq"])
    other = VideoTokenizer(**SMALL, **CONFIGS["lfq-3-codebooks"], reference_quirks=True)
    with pytest.raises(ValueError, match="same arguments"):
        load_reference_checkpoint(other, reference.state_dict())
