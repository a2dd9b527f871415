"""Inference exports: a folder with `config.json` (the TokenizerConfig) and `model.safetensors`
(the generator weights: encoder, quantizer, decoder). Loads without DeepSpeed or the trainer.

    save_pretrained(tokenizer, "export/")
    tokenizer = load_pretrained("export/")           # eval mode, no discriminator, no VGG

`VideoTokenizer.from_pretrained` / `.save_pretrained` are the same, as methods, and also take a
Hugging Face Hub repo id (model.hub).
"""

from __future__ import annotations

from pathlib import Path

import torch

from model.export_format import (
    CONFIG_NAME,
    EXPORT_FORMAT_VERSION,
    WEIGHTS_NAME,
    generator_state_dict,
    inference_config,
    load_config,
    load_exported_weights,
    save_pretrained,
)
from model.reference_api import VideoTokenizer

__all__ = [
    "CONFIG_NAME",
    "EXPORT_FORMAT_VERSION",
    "WEIGHTS_NAME",
    "generator_state_dict",
    "load_config",
    "load_pretrained",
    "save_pretrained",
]


def load_pretrained(
    directory: str | Path, *, map_location: str | torch.device = "cpu", for_training: bool = False
) -> VideoTokenizer:
    """The exported tokenizer in eval mode. For inference the losses are switched off (no
    discriminator, no VGG); `for_training=True` keeps the config as trained, with the
    discriminator freshly initialised."""
    config = load_config(directory)
    if not for_training:
        config = inference_config(config)
    model = VideoTokenizer.from_config(config)
    load_exported_weights(model, directory, map_location)
    return model
