"""Import magvit2-pytorch 0.5.1 VideoTokenizer checkpoints.

    model = VideoTokenizer(**same_kwargs, reference_quirks=True)
    load_reference_checkpoint(model, "magvit2.pt")      # its .pt file or its state dict

or, trusting the pickled constructor arguments stored in the .pt file:

    model = tokenizer_from_reference_checkpoint("magvit2.pt")

The reference's module tree is mapped key by key onto ours (per layer kind); conv weights that
the reference stores as Conv1d/Conv2d are reshaped to our Conv3d/Linear layouts, which is exact.
Buffers with no learned content (the LFQ bit mask, blur taps) are dropped.
"""

from __future__ import annotations

import logging
import pickle
import re
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from model.config import LayerSpec
from model.reference_api import VideoTokenizer

logger = logging.getLogger(__name__)

Rules = list[tuple[str, str]]  # (regex on the reference key suffix, replacement)

_RESIDUAL_UNIT: Rules = [
    (r"fn\.0\.conv\.", "conv.conv."),
    (r"fn\.2\.", "conv_1x1."),
    (r"fn\.4\.to_k\.", "squeeze_excite.to_k."),
    (r"fn\.4\.net\.0\.", "squeeze_excite.hidden."),
    (r"fn\.4\.net\.2\.", "squeeze_excite.out."),
]


def _prefixed(prefix_from: str, prefix_to: str, rules: Rules) -> Rules:
    return [(prefix_from + src, prefix_to + dst) for src, dst in rules]


def _mixing_rules(shift: str, attn_body: Rules) -> Rules:
    """attention (index 0) + feed-forward (index 1); `shift` is '.fn' under TokenShift."""
    ff = [(r"norm\.", "norm."), (r"net\.0\.", "proj_in."), (r"net\.2\.", "proj_out.")]
    return _prefixed(rf"0\.fn{shift}\.", "attn.", attn_body) + _prefixed(
        rf"1\.fn{shift}\.", "ff.", ff
    )


_SOFTMAX_ATTN: Rules = [
    (r"mem_kv$", "mem_kv"),
    (r"norm\.", "norm."),
    (r"to_qkv\.0\.", "to_qkv."),
    (r"to_out\.1\.", "to_out."),
]
_LINEAR_ATTN: Rules = [
    (r"norm\.", "norm."),
    (r"attn\.to_q\.0\.", "to_q."),
    (r"attn\.to_kv\.0\.", "to_kv."),
    (r"attn\.to_out\.0\.", "to_out."),
]


def _layer_rules(spec: LayerSpec, *, decoder: bool) -> Rules:
    kind = spec.kind
    if kind == "residual":
        return _prefixed("", "0.", _RESIDUAL_UNIT)
    if kind == "consecutive_residual":
        return _prefixed(r"(\d+)\.", r"\1.", _RESIDUAL_UNIT)
    if kind == "cond_residual":
        return [
            (r"to_cond\.", "to_cond."),
            (r"conv\.weights$", "conv.weights"),
            (r"conv_out\.", "conv_1x1."),
        ]
    if kind in ("compress_space", "compress_time"):
        return [(r"net\.0\." if decoder else r"conv\.", "conv.")]
    if kind == "gateloop_time":
        return [
            (r"fn\.fn\.norm\.", "gate_loop.norm."),
            (r"fn\.fn\.to_qkva\.0\.", "gate_loop.to_qkva."),
        ]
    if kind.removeprefix("cond_") == "linear_attend_space":
        return _mixing_rules("", _LINEAR_ATTN)
    if kind.removeprefix("cond_") == "attend_time":
        return _mixing_rules(r"\.fn", _SOFTMAX_ATTN)
    return _mixing_rules("", _SOFTMAX_ATTN)  # attend_space, cond_attend_space


_DISCRIMINATOR: Rules = [
    (r"discr\.blocks\.(\d+)\.0\.conv_res\.", r"discr.stages.\1.block.conv_res."),
    (r"discr\.blocks\.(\d+)\.0\.net\.0\.", r"discr.stages.\1.block.conv1."),
    (r"discr\.blocks\.(\d+)\.0\.net\.2\.", r"discr.stages.\1.block.conv2."),
    (r"discr\.blocks\.(\d+)\.0\.downsample\.1\.", r"discr.stages.\1.block.downsample."),
    (r"discr\.blocks\.(\d+)\.1\.0\.fn\.norm\.", r"discr.stages.\1.attn.norm."),
    (r"discr\.blocks\.(\d+)\.1\.0\.fn\.attn\.to_(q|kv|out)\.0\.", r"discr.stages.\1.attn.to_\2."),
    (r"discr\.blocks\.(\d+)\.1\.1\.fn\.norm\.", r"discr.stages.\1.ff.norm."),
    (r"discr\.blocks\.(\d+)\.1\.1\.fn\.net\.0\.", r"discr.stages.\1.ff.proj_in."),
    (r"discr\.blocks\.(\d+)\.1\.1\.fn\.net\.2\.", r"discr.stages.\1.ff.proj_out."),
    (r"discr\.to_logits\.0\.", "discr.to_logits_conv."),
    (r"discr\.to_logits\.3\.", "discr.to_logits."),
]
_DROPPED = re.compile(r"(^quantizers\.mask$|maybe_blur\.f$|^vgg\.)")


def _apply(rules: Rules, suffix: str) -> str | None:
    for pattern, replacement in rules:
        new, count = re.subn("^" + pattern, replacement, suffix)
        if count:
            return new
    return None


def convert_reference_state_dict(
    state_dict: Mapping[str, Tensor], model: VideoTokenizer
) -> dict[str, Tensor]:
    """Reference keys and layouts -> ours, for `model` built with the same arguments."""
    specs = model.config.layers
    num_layers = len(specs)
    stacks: dict[str, Callable[[int], Rules]] = {
        "encoder_layers": lambda i: _layer_rules(specs[i], decoder=False),
        "decoder_layers": lambda i: _layer_rules(specs[num_layers - 1 - i], decoder=True),
    }
    ours = model.state_dict()
    converted: dict[str, Tensor] = {}
    unmapped = []
    for key, value in state_dict.items():
        if _DROPPED.search(key):
            continue
        new_key: str | None = key
        match = re.match(r"(encoder_layers|decoder_layers)\.(\d+)\.(.*)", key)
        if match:
            stack, index, suffix = match.group(1), int(match.group(2)), match.group(3)
            if stack == "encoder_layers" and index == num_layers:  # the final LayerNorm
                new_key = "encoder_norm." + suffix.removeprefix("1.")
            else:
                mapped = _apply(stacks[stack](index), suffix)
                new_key = None if mapped is None else f"{stack}.{index}.{mapped}"
        elif key.startswith("quantizers."):
            new_key = "quantizer." + key.removeprefix("quantizers.")
        elif key.startswith("discr."):
            new_key = _apply(_DISCRIMINATOR, key)
            if new_key is not None and model.discr is None:
                continue  # use_gan=False here: the reference always builds a discriminator
        if new_key is None or new_key not in ours:
            unmapped.append(key)
            continue
        target = ours[new_key]
        if value.numel() != target.numel():
            raise ValueError(
                f"{key} {tuple(value.shape)} does not fit {new_key} {tuple(target.shape)}: was "
                "the model built with the same arguments as the checkpoint?"
            )
        converted[new_key] = value.reshape(target.shape).to(target.dtype)
    if unmapped:
        raise ValueError(
            f"{len(unmapped)} checkpoint entries have no place in this model (built with other "
            f"arguments?): {unmapped[:8]}"
        )
    return converted


def read_reference_checkpoint(path: str | Path) -> dict[str, Any]:
    """The dict magvit2-pytorch's `VideoTokenizer.save` writes (tensors only, safely loaded)."""
    package = torch.load(str(path), map_location="cpu", weights_only=True)
    if "model_state_dict" not in package:
        raise ValueError(f"{path} is not a magvit2-pytorch checkpoint (no 'model_state_dict')")
    return package


def load_reference_checkpoint(
    model: VideoTokenizer, checkpoint: str | Path | Mapping[str, Tensor], *, strict: bool = True
) -> VideoTokenizer:
    """Loads a magvit2-pytorch 0.5.1 checkpoint (.pt path or state dict) into `model`."""
    if isinstance(checkpoint, str | Path):
        checkpoint = read_reference_checkpoint(checkpoint)["model_state_dict"]
    converted = convert_reference_state_dict(checkpoint, model)
    if not model.config.reference_quirks:
        logger.warning(
            "loading magvit2-pytorch weights into a model with reference_quirks=False: its "
            "outputs will differ from the reference's (build with reference_quirks=True to "
            "reproduce them, or fine-tune to adapt the weights)"
        )
    missing, unexpected = model.load_state_dict(converted, strict=False)
    if strict and (missing or unexpected):
        raise ValueError(
            f"checkpoint does not cover the model: missing {missing[:8]}, "
            f"unexpected {unexpected[:8]}"
        )
    return model


def tokenizer_from_reference_checkpoint(path: str | Path, **overrides: Any) -> VideoTokenizer:
    """Builds our tokenizer from the constructor arguments pickled in a magvit2-pytorch .pt file
    (only for files you trust: unpickling runs code), with `reference_quirks=True`."""
    package = read_reference_checkpoint(path)
    if "config" not in package:
        raise ValueError(
            f"{path} holds no pickled config; build the model yourself and call "
            "load_reference_checkpoint"
        )
    kwargs = pickle.loads(package["config"])
    kwargs.pop("vgg", None)
    kwargs.setdefault("reference_quirks", True)
    kwargs.update(overrides)
    return load_reference_checkpoint(VideoTokenizer(**kwargs), package["model_state_dict"])
