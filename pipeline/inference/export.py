"""A tokenizer export (model.pretrained format): finding and loading it, identifying its
weights, and how many frames of a clip it can take."""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path

import torch

from model import VideoTokenizer
from model.pretrained import CONFIG_NAME, WEIGHTS_NAME, load_pretrained

logger = logging.getLogger(__name__)

EXPORT_SUBDIR = "export"
"""Where a training output folder keeps its inference export (model.pretrained format)."""


def resolve_export_dir(path: str | Path) -> Path:
    """An export folder (config.json + model.safetensors), or a training output folder whose
    `export/` subfolder holds one."""
    path = Path(path)
    for candidate in (path, path / EXPORT_SUBDIR):
        if (candidate / CONFIG_NAME).is_file() and (candidate / WEIGHTS_NAME).is_file():
            return candidate
    raise ValueError(
        f"{path} is not a tokenizer export: expected {CONFIG_NAME} and {WEIGHTS_NAME} (as "
        f"model.pretrained.save_pretrained writes them) in it or in its {EXPORT_SUBDIR}/ folder"
    )


def load_tokenizer(path: str | Path, device: torch.device | str = "cpu") -> VideoTokenizer:
    """The exported tokenizer in eval mode on `device`, without discriminator or VGG."""
    directory = resolve_export_dir(path)
    model = load_pretrained(directory, map_location=device)
    logger.info("loaded %s (%s)", directory, _describe(model))
    return model


def _describe(model: VideoTokenizer) -> str:
    config = model.config
    return (
        f"{sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters, "
        f"{config.image_size}px, time x{config.time_downsample_factor}, space "
        f"x{config.space_downsample_factor}, {config.num_codebooks} x {model.codebook_size} codes"
    )


def usable_frames(num_frames: int, time_factor: int) -> int:
    """The longest 1 + k*f prefix of a clip of `num_frames` frames (0 for an empty clip)."""
    if num_frames < 1:
        return 0
    return 1 + (num_frames - 1) // time_factor * time_factor


def file_sha256(path: str | Path) -> str:
    """Hex SHA-256 of a file (the export's weights identify which tokenizer made some codes)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
