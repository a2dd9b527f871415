"""`--dry-run`: the cost of a config without starting anything."""

from __future__ import annotations

import subprocess
import time

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from trainrun import CONFIG, REPO, _env

from model import Tokenizer
from model.critics import build_discriminators, build_training_networks
from pipeline.train.config import load_config
from pipeline.train.dry_run import FlopCount, _generator_step, dry_run
from pipeline.train.objectives import GeneratorObjective

BASE_128 = CONFIG.parent / "base_128.yaml"


def test_parameters_match_the_built_models_and_it_takes_seconds():
    for path, world in ((CONFIG, 2), (BASE_128, 64)):
        config = load_config(path)
        start = time.perf_counter()
        report = dry_run(config, world)
        assert time.perf_counter() - start < 60
        assert not torch.distributed.is_initialized()
        with torch.device("meta"):
            tokenizer = Tokenizer.from_config(config.model)
            critics = build_discriminators(config.model)
        assert report.generator_parameters == sum(p.numel() for p in tokenizer.parameters())
        assert report.discriminator_parameters == sum(p.numel() for p in critics.parameters())
        assert report.generator_flops_per_clip > 0 and report.discriminator_flops_per_clip > 0
        memory = report.memory_bytes
        checkpointed = "... with activation checkpointing (saved + largest layer)"
        assert 0 < memory[checkpointed] < memory["generator activations per micro-batch"]


def test_zero_stages_and_world_size_divide_the_states():
    config = load_config(BASE_128)
    one, many = dry_run(config, 1).memory_bytes, dry_run(config, 8).memory_bytes
    # ZeRO 2: optimizer state and gradients sharded; weights whole on every rank.
    assert many["generator optimizer"] * 8 == one["generator optimizer"]
    assert many["generator gradients"] * 8 == one["generator gradients"]
    assert many["generator weights"] == one["generator weights"]
    params = dry_run(config, 1).generator_parameters
    assert one["generator weights"] == 2 * params  # bf16
    assert one["generator optimizer"] == 12 * params  # fp32 moments + master


def test_generator_flops_equal_a_real_steps():
    """The meta-device count equals the count of the same step run for real on the CPU (with
    the math attention kernel: flop_counter has no formula for the CPU flash kernel, which the
    meta device does not take)."""
    config = load_config(CONFIG)
    report = dry_run(config, 1)
    torch.manual_seed(0)
    tokenizer, perceptual, critics = build_training_networks(config.model)
    generator = GeneratorObjective(tokenizer, perceptual, critics)
    size = config.model.image_size
    video = torch.rand(1, 3, config.data.num_frames, size, size) * 2 - 1
    with sdpa_kernel(SDPBackend.MATH), FlopCount() as flops:
        _generator_step(generator, critics, video, config.model.adversarial_loss_weight)
    assert flops.flops == report.generator_flops_per_clip


def test_train_sh_dry_run_prints_once_for_the_whole_job():
    result = subprocess.run(
        ["bash", "launch/train.sh", "--config", str(CONFIG), "--dry-run"],
        cwd=REPO,
        env=_env(NPROC_PER_NODE="2"),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.count("dry run for 2 rank(s)") == 1, result.stdout
    assert "generator:" in result.stdout and "memory per rank" in result.stdout
