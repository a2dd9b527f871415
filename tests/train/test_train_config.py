"""Bad configurations fail with a clear message before any process group starts."""

from __future__ import annotations

import pytest
from trainrun import CONFIG

from pipeline.train.cli import main, parse_args
from pipeline.train.config import load_config


@pytest.fixture
def one_rank(monkeypatch):
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(key, raising=False)


def run_main(overrides, capsys) -> tuple[int, str]:
    code = main(parse_args(["--config", str(CONFIG), *overrides]))
    return code, capsys.readouterr().err


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["data.video_shards=[/nonexistent/shards]"], "no video shards found"),
        (["data.num_frames=8"], r"num_frames must be 1 \+ k"),
        (["zero_stage=3"], "zero_stage must be 1 or 2"),
        (["discriminator_zero_stage=3"], "gradient penalty"),
        (["generator_optim.lrr=1e-4"], r"unknown key\(s\) \['lrr'\] in generator_optim"),
        (["learning_rate=1e-4"], r"unknown top-level key\(s\) \['learning_rate'\]"),
        (["model.codebook_size=1000"], "power of two"),
        (["model.layers=[residual, attention]"], "unknown layer type 'attention'"),
        (["precision=fp16"], "fp16 is not supported with the GAN or the perceptual loss"),
        (
            ["precision=fp16", "model.use_gan=false", "model.perceptual_loss_weight=0"],
            "fp16 needs a CUDA device",
        ),
        (["data.micro_batch_size=3"], "derived by the trainer"),
        (["init_from=/nonexistent/run"], "init_from=/nonexistent/run: not an export"),
        (["speed.compile=whole"], r"speed.compile must be one of \('none', 'blocks'\)"),
        (["speed.compile=off"], "speed.compile must be str, got False"),  # YAML's off
        (["speed.compile_mode=reduce-overhead"], "speed.compile_mode must be one of"),
        (["speed.channels_last=3"], "speed.channels_last must be bool"),
        (["speed.channel_last=true"], r"unknown key\(s\) \['channel_last'\] in speed"),
        (["generator_optim.lr=fast"], "generator_optim.lr must be float, got 'fast'"),
        (["num_steps=2.5"], "config.num_steps must be int, got 2.5"),
    ],
)
def test_bad_config_is_a_clear_error(overrides, message, capsys, one_rank, tmp_path):
    import re

    code, err = run_main([f"output_dir={tmp_path}", *overrides], capsys)
    assert code == 2
    assert re.search(message, err), err


def test_empty_shard_folder(tmp_path, capsys, one_rank):
    (tmp_path / "empty").mkdir()
    code, err = run_main([f"data.video_shards=[{tmp_path / 'empty'}]"], capsys)
    assert code == 2 and "empty" in err


def test_batch_sizes_that_do_not_divide(capsys, monkeypatch):
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    code, err = run_main(["global_batch_size=6", "micro_batch_size=2"], capsys)
    assert code == 2
    assert (
        "global_batch_size 6 != micro_batch_size 2 x gradient_accumulation_steps 1 x "
        "world size 2 = 4" in err
    )


def test_the_shipped_configs_load():
    for name in ("tiny_cpu", "base_128", "base_256"):
        config = load_config(CONFIG.parent / f"{name}.yaml")
        assert config.model.time_downsample_factor == 4
        assert (config.data.num_frames - 1) % 4 == 0
    demo = load_config(CONFIG.parent / "demo_cpu.yaml")  # 9 frames -> 5 latent frames
    assert demo.model.time_downsample_factor == 2 and demo.model.use_fsq
    assert not demo.model.use_gan and demo.data.num_frames == 9
    for name in ("base_128", "base_256"):  # the recipe README "Training recipe" argues for
        config = load_config(CONFIG.parent / f"{name}.yaml")
        assert config.model.discriminator_kind == "2d"  # the evidence: VidTok, bench_learning
        assert config.model.generator_adversarial_loss == "non_saturating"
        assert config.losses.lecam_weight > 0 and config.losses.quantizer_anneal_steps > 0


def test_eval_clips_are_as_long_as_training_clips_unless_set():
    shards = "[/data/heldout]"
    config = load_config(CONFIG, [f"eval_data.video_shards={shards}", "data.num_frames=9"])
    assert config.eval_data.num_frames == 9 and config.eval_data.mode == "eval"
    config = load_config(CONFIG, [f"eval_data.video_shards={shards}", "eval_data.num_frames=17"])
    assert config.eval_data.num_frames == 17
