import math

import pytest

from model import LayerSpec, TokenizerConfig, parse_layers
from model.config import LAYER_KINDS


def test_parse_reference_spec():
    specs = parse_layers(
        [
            "residual",
            ("consecutive_residual", 3),
            ("compress_space", 64),
            "compress_time",
            ["compress_time", 32],
        ]
    )
    assert specs[1] == LayerSpec("consecutive_residual", num_units=3)
    assert specs[2] == LayerSpec("compress_space", out_dim=64)
    assert specs[3] == LayerSpec("compress_time")
    assert specs[4].out_dim == 32
    assert [s.to_reference() for s in specs] == [
        "residual",
        ("consecutive_residual", 3),
        ("compress_space", 64),
        "compress_time",
        ("compress_time", 32),
    ]


@pytest.mark.parametrize(
    "entry, message",
    [
        ("attention", "unknown layer type 'attention'"),
        (("residual", 2), "takes no argument"),
        ("consecutive_residual", "needs the number of residual units"),
        (("consecutive_residual", 0), "takes one argument"),
        (("compress_space", 2, 3), "takes one argument"),
        (("compress_time", "wide"), "takes one argument"),
        (3, r"layer name or a \(name, int\) tuple"),
    ],
)
def test_bad_layer_entries_name_the_valid_ones(entry, message):
    with pytest.raises(ValueError, match=message) as info:
        parse_layers([entry])
    if "unknown" in message or "layer name" in message:
        assert all(kind in str(info.value) for kind in LAYER_KINDS)


def test_twelve_layer_kinds():
    assert len(LAYER_KINDS) == 12


def test_layer_dims_and_factors():
    config = TokenizerConfig(
        image_size=32,
        init_dim=16,
        codebook_size=16,
        max_dim=48,
        layers=("residual", "compress_space", ("compress_time", 20), "compress_time"),
    )
    assert config.layer_dims() == [(16, 16), (16, 32), (32, 20), (20, 40)]
    assert config.latent_dim == 40
    assert config.time_downsample_factor == 4 and config.space_downsample_factor == 2
    assert config.latent_size == 16
    assert config.num_frames_ok(17) and config.num_frames_ok(1) and not config.num_frames_ok(16)
    assert config.num_frames_ok(16, contains_first_frame=False)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(codebook_size=100), "power of two"),
        (dict(codebook_size=None), "needs codebook_size"),
        (dict(use_fsq=True, fsq_levels=[8, 5]), "codebook_size=None"),
        (dict(codebook_size=None, use_fsq=True, fsq_levels=[8, 2]), "fsq_levels must be ints >= 3"),
        (dict(pad_mode="reflect"), "pad_mode must be one of"),
        (dict(layers=("cond_residual",)), "dim_cond must be a positive int"),
        (
            dict(image_size=12, layers=("compress_space", "compress_space", "compress_space")),
            "divisible by 2\\*\\*3",
        ),
        (dict(input_conv_kernel_size=(3, 4, 3)), "must be odd"),
        (dict(attn_dropout=1.5), "attn_dropout"),
        (dict(max_dim=1.5), "max_dim"),
    ],
)
def test_bad_config_values(kwargs, message):
    base = dict(image_size=16, codebook_size=16)
    base.update(kwargs)
    with pytest.raises(ValueError, match=message):
        TokenizerConfig(**base)


def test_config_round_trips_through_dict():
    config = TokenizerConfig(
        image_size=16,
        codebook_size=16,
        max_dim=math.inf,
        layers=("residual", ("consecutive_residual", 2), "compress_time"),
        discriminator=dict(dim=8, image_size=16),
    )
    again = TokenizerConfig.from_dict(config.to_dict())
    assert again == config
    with pytest.raises(ValueError, match="unknown tokenizer config keys"):
        TokenizerConfig.from_dict({**config.to_dict(), "codebook": 3})
