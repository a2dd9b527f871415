"""The opt-in GAN and codebook recipe switches: LeCAM, non-saturating losses, annealed LFQ
weights, a fixed adversarial weight; formulas on tiny modules, then all of them in one 2-rank
DeepSpeed run, resumed from its middle checkpoint."""

from __future__ import annotations

import json
import math
import shutil
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F
from trainrun import CONFIG, base_overrides, checkpoints, engine_weights, explain, finished, metrics
from trainrun import torchrun_launch as launch

from model import VideoTokenizer
from model.config import TokenizerConfig
from model.losses import (
    lecam_regularizer,
    non_saturating_discr_loss,
    non_saturating_gen_loss,
)
from model.objectives import random_frame_index, take_frames
from pipeline.train import schedules
from pipeline.train.config import LossScheduleConfig, load_config


def tiny(**changes) -> VideoTokenizer:
    """A 32x32 tokenizer with a GAN and a stand-in perceptual network (no VGG weights)."""
    torch.manual_seed(0)
    reference = VideoTokenizer(
        image_size=32,
        layers=("residual", "compress_space"),
        init_dim=8,
        codebook_size=16,
        attn_heads=1,
        attn_dim_head=8,
        perceptual_loss_weight=0.1,
        discr_kwargs={"dim": 8, "image_size": 32, "max_dim": 16},
    )
    config = replace(reference.config, **changes)
    torch.manual_seed(0)
    features = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.Flatten(1))
    return VideoTokenizer.from_config(config, vgg=features).train()


def clip() -> torch.Tensor:
    return torch.rand(2, 3, 3, 32, 32, generator=torch.Generator().manual_seed(1)) * 2 - 1


# LeCAM.


def test_lecam_regularizer_is_the_formula():
    real = torch.tensor([0.5, -1.0, 2.0])
    fake = torch.tensor([-0.5, 1.5])
    ema_real, ema_fake = torch.tensor(0.25), torch.tensor(-0.75)
    expected = (
        sum(max(r + 0.75, 0) ** 2 for r in (0.5, -1.0, 2.0)) / 3
        + sum(max(0.25 - f, 0) ** 2 for f in (-0.5, 1.5)) / 2
    )
    assert lecam_regularizer(real, fake, ema_real, ema_fake).item() == pytest.approx(expected)


def test_discriminator_loss_adds_the_weighted_lecam_term_on_its_logits():
    model = tiny()
    x, recon = clip(), clip().flip(0)
    anchors = torch.tensor([0.3, -0.2])

    def run(weight):
        torch.manual_seed(5)  # the same random frames
        out = {}
        loss, _ = model.discriminator_loss(
            x,
            recon,
            apply_gradient_penalty=False,
            lecam_weight=weight,
            lecam_anchors=anchors,
            logits_out=out,
        )
        return loss, out

    plain, _ = run(0.0)
    with_lecam, out = run(0.5)
    torch.manual_seed(5)
    index = random_frame_index(x)
    real = model.discr(take_frames(x, index)).float()
    fake = model.discr(take_frames(recon, index)).float()
    formula = (F.relu(real - (-0.2)) ** 2).mean() + (F.relu(0.3 - fake) ** 2).mean()
    assert out["lecam"].item() == pytest.approx(formula.item(), rel=1e-5)
    assert (with_lecam - plain).item() == pytest.approx(0.5 * formula.item(), rel=1e-4)
    with pytest.raises(ValueError, match="lecam_anchors"):
        model.discriminator_loss(x, recon, lecam_weight=0.1)


def test_the_lecam_emas_start_at_the_first_logits_mix_then_and_skip_nonfinite_ones():
    from types import SimpleNamespace

    from pipeline.train.trainer import Trainer

    losses = LossScheduleConfig(lecam_weight=0.1, lecam_ema_decay=0.9)
    state = SimpleNamespace(
        config=SimpleNamespace(losses=losses), lecam_ema=torch.zeros(2), lecam_updates=0
    )

    def update(real, fake):
        Trainer._update_lecam_ema(state, torch.tensor(real), torch.tensor(fake))
        return state.lecam_ema.tolist()

    assert update(1.0, -2.0) == [1.0, -2.0]
    assert update(2.0, 0.0) == pytest.approx([1.1, -1.8])
    assert update(float("nan"), 0.0) == pytest.approx([1.1, -1.8])  # a skipped step


# Non-saturating losses.


def test_non_saturating_losses_value_and_gradient_are_the_formula():
    logits = torch.tensor([-2.0, 0.0, 3.0], requires_grad=True)
    loss = non_saturating_gen_loss(logits)
    expected = -torch.log(torch.sigmoid(logits.detach())).mean()
    assert loss.item() == pytest.approx(expected.item())
    (grad,) = torch.autograd.grad(loss, logits)
    # d/dl softplus(-l) = -sigmoid(-l) = -(1 - sigmoid(l)); the mean divides by n.
    assert torch.allclose(grad, -(1 - torch.sigmoid(logits.detach())) / 3)
    real, fake = torch.tensor([1.0, -0.5]), torch.tensor([0.2, -3.0])
    expected = (-torch.log(torch.sigmoid(real)) - torch.log(1 - torch.sigmoid(fake))).mean()
    assert non_saturating_discr_loss(fake, real).item() == pytest.approx(expected.item())


def test_the_generator_loss_uses_the_configured_adversarial_loss():
    x = clip()
    parts = {}
    for kind in ("hinge", "non_saturating"):
        model = tiny(generator_adversarial_loss=kind)
        output = model.reconstruct(x)
        torch.manual_seed(7)
        _, breakdown = model.generator_loss(x, output)
        torch.manual_seed(7)
        random_frame_index(x)  # the perceptual loss's frame draw comes first
        logits = model.discr(take_frames(output.recon, random_frame_index(output.recon))).float()
        expected = F.softplus(-logits).mean() if kind == "non_saturating" else -logits.mean()
        assert breakdown.adversarial_gen_loss.item() == pytest.approx(expected.item(), rel=1e-5)
        parts[kind] = breakdown.adversarial_gen_loss.item()
    assert parts["hinge"] != parts["non_saturating"]


# Adaptive vs fixed adversarial weight.


def test_a_fixed_adversarial_weight_is_one_and_takes_no_last_layer_gradient(monkeypatch):
    import model.objectives as objectives

    calls = []
    original = objectives._last_layer_grad_norm

    def counting(*args):
        calls.append(1)
        return original(*args)

    monkeypatch.setattr(objectives, "_last_layer_grad_norm", counting)
    x = clip()
    adaptive = tiny()
    adaptive.generator_loss(x, adaptive.reconstruct(x))
    assert calls  # the default takes them

    calls.clear()
    model = tiny(adaptive_adversarial_weight=False, adversarial_loss_weight=0.3)
    output = model.reconstruct(x)
    total, parts = model.generator_loss(x, output)
    assert not calls
    assert parts.adaptive_adversarial_weight.item() == 1.0
    expected = (
        parts.recon_loss
        + parts.lfq_aux_loss
        + 0.1 * parts.perceptual_loss
        + 0.3 * parts.adversarial_gen_loss
    )
    assert total.item() == pytest.approx(expected.item(), rel=1e-6)
    total.backward()
    assert model.decoder.last_weight.grad is not None  # the update still trains it


# Annealed quantizer weights.


def test_anneal_factor_linear_and_cosine():
    linear = LossScheduleConfig(entropy_weight_start_factor=3.0, quantizer_anneal_steps=10)
    assert [schedules.anneal_factor(s, 3.0, linear) for s in (0, 5, 10, 20)] == [3, 2, 1, 1]
    cosine = replace(linear, quantizer_anneal_shape="cosine")
    assert schedules.anneal_factor(0, 3.0, cosine) == 3.0
    assert schedules.anneal_factor(5, 3.0, cosine) == pytest.approx(2.0)
    assert schedules.anneal_factor(2, 3.0, cosine) == pytest.approx(
        3.0 - 2.0 * 0.5 * (1 - math.cos(math.pi * 0.2))
    )
    assert schedules.anneal_factor(10, 3.0, cosine) == 1.0
    assert schedules.quantizer_weights(5, linear, 0.1, 1.0) == (pytest.approx(0.2), 1.0)
    assert schedules.quantizer_weights(3, LossScheduleConfig(), 0.1, 1.0) == (0.1, 1.0)


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"lecam_weight": -1.0}, "lecam_weight must be >= 0"),
        ({"lecam_ema_decay": 1.0}, r"lecam_ema_decay must be in \[0, 1\)"),
        ({"entropy_weight_start_factor": 0.0}, "must be a positive number"),
        ({"entropy_weight_start_factor": 3.0}, "quantizer_anneal_steps > 0"),
        ({"quantizer_anneal_steps": -1}, "quantizer_anneal_steps must be >= 0"),
        ({"quantizer_anneal_shape": "step"}, "quantizer_anneal_shape must be one of"),
    ],
)
def test_bad_schedule_values_raise(changes, message):
    with pytest.raises(ValueError, match=message):
        LossScheduleConfig(**changes)


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["model.generator_adversarial_loss=wgan"], "generator_adversarial_loss must be one of"),
        (["model.discriminator_adversarial_loss=x"], "discriminator_adversarial_loss must be"),
        (["model.adaptive_adversarial_weight=1"], "adaptive_adversarial_weight must be a bool"),
        (["model.use_gan=false", "losses.lecam_weight=0.1"], "lecam_weight > 0 needs the GAN"),
    ],
)
def test_bad_recipe_configs_raise(overrides, message):
    with pytest.raises(ValueError, match=message):
        load_config(CONFIG, overrides)


def test_the_defaults_are_the_reference_recipe():
    config = TokenizerConfig(image_size=32, codebook_size=16)
    assert config.generator_adversarial_loss == config.discriminator_adversarial_loss == "hinge"
    assert config.adaptive_adversarial_weight is True
    schedule = LossScheduleConfig()
    assert schedule.lecam_weight == 0 and not schedule.quantizer_annealed


# Every switch at once, on 2 ranks, crashed and resumed.

RECIPE = {
    "deterministic": "true",
    "data.steps_per_epoch": 3,
    "losses.lecam_weight": 0.1,
    "losses.lecam_ema_decay": 0.5,
    "losses.entropy_weight_start_factor": 3.0,
    "losses.commitment_weight_start_factor": 2.0,
    "losses.quantizer_anneal_steps": 4,
    "model.generator_adversarial_loss": "non_saturating",
    "model.discriminator_adversarial_loss": "non_saturating",
    "model.adaptive_adversarial_weight": "false",
}


@pytest.mark.distributed
def test_the_recipe_trains_on_two_ranks_and_resumes_exactly(tmp_path, video_shards):
    straight = tmp_path / "straight"
    result = launch(base_overrides(straight, video_shards, **RECIPE))
    assert finished(result), explain(result)
    rows = metrics(straight)
    schedule = load_config(CONFIG, base_overrides(straight, video_shards, **RECIPE)).losses
    for step in range(1, 7):  # row `step` is logged after the update at step - 1
        row = rows[step]
        assert math.isfinite(row["loss/generator_total"]), row
        entropy, commitment = schedules.quantizer_weights(step - 1, schedule, 0.1, 1.0)
        assert row["loss/entropy_weight"] == pytest.approx(entropy, rel=1e-9), step
        assert row["loss/commitment_weight"] == pytest.approx(commitment, rel=1e-9), step
        if step >= 2:  # the generator sees the discriminator from step 1 on: fixed weight 1
            assert row["loss/adaptive_weight"] == 1.0
            assert row["loss/adversarial_gen"] > 0  # softplus: positive
    assert [rows[s]["loss/entropy_weight"] for s in (1, 3, 5)] == pytest.approx([0.3, 0.2, 0.1])
    # The discriminator starts at step 1 (row 2): the first EMA update sets the anchors, the
    # next ones mix in the rank-averaged mean logits with decay 0.5.
    for side in ("real", "fake"):
        ema, logits = f"discriminator/ema_logits_{side}", f"discriminator/logits_{side}"
        assert rows[2][ema] == pytest.approx(rows[2][logits], abs=1e-5)
        for step in range(3, 7):
            mixed = 0.5 * rows[step - 1][ema] + 0.5 * rows[step][logits]
            assert rows[step][ema] == pytest.approx(mixed, abs=1e-5), (side, step)
    assert all(rows[s]["loss/lecam"] >= 0 for s in range(2, 7))
    assert "loss/lecam" not in rows[1]

    # Resume: the same folder as it was at the step-3 checkpoint (later checkpoint, export and
    # log rows removed), rerun: steps 4-6 must come out the same.
    resumed = tmp_path / "resumed"
    shutil.copytree(straight, resumed, ignore=shutil.ignore_patterns("step_00000006", "export"))
    log = resumed / "metrics.jsonl"
    kept = [line for line in log.read_text().splitlines() if json.loads(line)["step"] <= 3]
    log.write_text("\n".join(kept) + "\n")
    assert [c.name for c in checkpoints(resumed)] == ["step_00000003"]
    overrides = base_overrides(resumed, video_shards, **RECIPE)
    result = launch(overrides)
    assert finished(result) and "resumed from" in result.stdout + result.stderr, explain(result)
    again = metrics(resumed)
    keys = [k for k in rows[6] if k.startswith(("loss/", "discriminator/"))]
    assert {"loss/lecam", "discriminator/ema_logits_real", "loss/entropy_weight"} <= set(keys)
    for step in range(1, 7):
        for key in keys:
            if key in rows[step]:
                assert abs(rows[step][key] - again[step][key]) <= 1e-6, (step, key)
    final_a, final_b = checkpoints(straight)[-1], checkpoints(resumed)[-1]
    state_a = json.loads((final_a / "trainer_state.json").read_text())["lecam_ema"]
    state_b = json.loads((final_b / "trainer_state.json").read_text())["lecam_ema"]
    assert state_a == state_b and state_a["updates"] == 5, (state_a, state_b)
    for tag in ("generator", "discriminator"):
        a, b = engine_weights(final_a, tag), engine_weights(final_b, tag)
        assert all(torch.allclose(a[k].float(), b[k].float(), atol=1e-6) for k in a), tag
