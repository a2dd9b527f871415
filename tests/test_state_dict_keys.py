"""State-dict keys, shapes and parameter order are part of the contract: model/convert.py maps
magvit2-pytorch checkpoints onto them, exports and DeepSpeed checkpoints store them, and ZeRO's
flat optimizer state follows the parameter order. The digests below were recorded before the
Encoder/Decoder split (the one-module VideoTokenizer)."""

import hashlib

import pytest
import torch

from model import Tokenizer, VideoTokenizer
from model.critics import build_discriminators

from helpers import ALL_CONDITIONED, ALL_UNCONDITIONED, tiny_kwargs

CONFIGS = {
    "lfq_gan": dict(use_gan=True),
    "fsq": dict(use_fsq=True, fsq_levels=[8, 5, 5], codebook_size=None),
    "first_frame_all_layers": dict(
        layers=ALL_UNCONDITIONED, separate_first_frame_encoding=True, use_gan=True
    ),
    "conditioned": dict(layers=ALL_CONDITIONED, dim_cond=4),
}
# name: (number of keys, digest of "key shape" lines, digest of the parameter names in order)
RECORDED = {
    "lfq_gan": (111, "8ec4e796aae12d80", "2b05ba4651564639"),
    "fsq": (58, "403e565ea73d00c4", "a3841421af654c84"),
    "first_frame_all_layers": (199, "2c4fa7a72dfd1e70", "7caedc717563d16e"),
    "conditioned": (138, "fd6567e2e126c574", "036f46545ce12a0a"),
}


def _digest(lines) -> str:
    return hashlib.sha256("\n".join(lines).encode()).hexdigest()[:16]


@pytest.mark.parametrize("name", CONFIGS)
def test_state_dict_keys_and_parameter_order_are_as_recorded(name):
    model = VideoTokenizer(
        **tiny_kwargs(**CONFIGS[name]), multiscale_discrs=[torch.nn.Conv3d(3, 1, 1)]
    )
    state = model.state_dict()
    keys = _digest(f"{k} {tuple(v.shape)}" for k, v in state.items())
    params = _digest(k for k, _ in model.named_parameters())
    assert (len(state), keys, params) == RECORDED[name]


def test_top_level_names_and_the_trainers_split():
    kwargs = tiny_kwargs(**CONFIGS["first_frame_all_layers"])
    full = VideoTokenizer(**kwargs)
    tops = list(dict.fromkeys(k.split(".")[0] for k in full.state_dict()))
    assert tops == [
        "conv_in",
        "conv_out",
        "conv_in_first_frame",
        "conv_out_first_frame",
        "encoder_layers",
        "decoder_layers",
        "encoder_norm",
        "quantizer",
        "discr",
    ]
    # What the trainer builds: the core tokenizer and the critics, keys as the engines had them.
    core, critics = Tokenizer.from_config(full.config), build_discriminators(full.config)
    assert list(core.state_dict()) + list(critics.state_dict()) == list(full.state_dict())
    assert [n for n, _ in core.named_parameters()] + [n for n, _ in critics.named_parameters()] == [
        n for n, _ in full.named_parameters()
    ]
