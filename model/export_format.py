"""The inference export format: a folder with `config.json` (the TokenizerConfig) and
`model.safetensors` (the generator weights: encoder, quantizer, decoder). Writing it, and reading
it into a model built from its config; `model.pretrained` and `VideoTokenizer.from_pretrained`
are the entry points.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from model.config import TokenizerConfig
from model.tokenizer import Tokenizer

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
EXPORT_FORMAT_VERSION = 1


def generator_state_dict(model: Tokenizer) -> dict[str, torch.Tensor]:
    """The weights inference needs: everything but the discriminators."""
    skip = ("discr.", "multiscale_discrs.")
    return {k: v for k, v in model.state_dict().items() if not k.startswith(skip)}


def save_pretrained(
    model: Tokenizer,
    directory: str | Path,
    *,
    state_dict: dict[str, torch.Tensor] | None = None,
    metadata: dict | None = None,
) -> Path:
    """Writes config.json and model.safetensors; `state_dict` overrides the model's own weights
    (e.g. the EMA weights). Files are written under temporary names and renamed, so a crash
    never leaves a half-written export under the final names."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    weights = state_dict if state_dict is not None else generator_state_dict(model)
    weights = {k: v.detach().to("cpu").contiguous() for k, v in weights.items()}
    config = {
        "format_version": EXPORT_FORMAT_VERSION,
        "tokenizer": model.config.to_dict(),
        "metadata": metadata or {},
    }
    tmp_weights = directory / f".{WEIGHTS_NAME}.tmp"
    tmp_config = directory / f".{CONFIG_NAME}.tmp"
    save_file(weights, str(tmp_weights), metadata={"format": "pt"})
    tmp_config.write_text(json.dumps(config, indent=2))
    tmp_weights.replace(directory / WEIGHTS_NAME)
    tmp_config.replace(directory / CONFIG_NAME)
    return directory


def load_config(directory: str | Path) -> TokenizerConfig:
    path = Path(directory) / CONFIG_NAME
    if not path.is_file():
        raise ValueError(f"{directory} is not a tokenizer export: no {CONFIG_NAME}")
    data = json.loads(path.read_text())
    if data.get("format_version") != EXPORT_FORMAT_VERSION:
        raise ValueError(f"{path}: unsupported export format {data.get('format_version')!r}")
    return TokenizerConfig.from_dict(data["tokenizer"])


def load_exported_weights(
    model: Tokenizer, directory: str | Path, map_location: str | torch.device = "cpu"
) -> Tokenizer:
    """The export's model.safetensors into `model` (built from its config), checked key by key
    and shape by shape; the discriminators may be absent from the file."""
    weights = load_file(str(Path(directory) / WEIGHTS_NAME), device=str(map_location))
    expected = model.state_dict()
    misshapen = [
        f"{k}: {tuple(v.shape)} in the file, {tuple(expected[k].shape)} in the config"
        for k, v in weights.items()
        if k in expected and v.shape != expected[k].shape
    ]
    if misshapen:
        raise ValueError(
            f"{directory}: weights do not match the config in {CONFIG_NAME} (a checkpoint of "
            f"another configuration?): {'; '.join(misshapen[:4])}"
        )
    missing, unexpected = model.load_state_dict(weights, strict=False)
    missing = [k for k in missing if not k.startswith(("discr.", "multiscale_discrs."))]
    if missing or unexpected:
        raise ValueError(
            f"{directory}: weights do not match the config (missing {missing[:8]}, "
            f"unexpected {unexpected[:8]})"
        )
    return model.to(map_location).eval()


def inference_config(config: TokenizerConfig) -> TokenizerConfig:
    """The config without the training-only parts: no discriminator, no VGG."""
    return replace(config, use_gan=False, perceptual_loss_weight=0.0, discriminator=None)
