"""What evaluation and token export share: finding and loading a checkpoint, the autocast policy,
and how many frames of a clip the tokenizer can take."""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import logging
from collections.abc import Iterator
from pathlib import Path

import torch

from model import VideoTokenizer
from model.precision import ieee_fp32
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


PRECISIONS = ("auto", "fp32", "bf16")
"""Arithmetic of evaluation and token export: 'fp32' is IEEE fp32 (no TF32 convolutions or
matmuls), 'bf16' autocast (the quantizer stays fp32), 'auto' bf16 on CUDA devices that support
it and fp32 elsewhere. Every path that encodes resolves it here, so the same precision gives the
same codes whichever command made them."""


def resolve_precision(requested: str, device: torch.device) -> str:
    """'auto' -> 'bf16' or 'fp32' for `device`; ValueError for bf16 a CUDA device lacks."""
    if requested not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {requested!r}")
    cuda_bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported()
    if requested == "auto":
        return "bf16" if cuda_bf16 else "fp32"
    if requested == "bf16" and device.type == "cuda" and not cuda_bf16:
        raise ValueError(f"precision bf16: {torch.cuda.get_device_name(device)} has no bf16")
    return requested


@contextlib.contextmanager
def inference_precision(device: torch.device, precision: str) -> Iterator[None]:
    """Runs the block in a resolved precision ('fp32' or 'bf16', see PRECISIONS)."""
    if precision == "bf16":
        with torch.autocast(device.type, dtype=torch.bfloat16):
            yield
        return
    if precision != "fp32":
        raise ValueError(f"resolve the precision first (fp32 or bf16), got {precision!r}")
    # TF32 is on by default for cuDNN convolutions: IEEE fp32 means switching it off too.
    with ieee_fp32(device.type, convolutions=True):
        yield


def add_precision_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--precision",
        choices=PRECISIONS,
        default="auto",
        help="encoder arithmetic: fp32 (IEEE), bf16 (autocast), or auto = bf16 on CUDA, fp32 "
        "elsewhere; recorded with the codes (default: %(default)s)",
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


def add_checkpoint_and_shards(parser: argparse.ArgumentParser, shards_help: str) -> None:
    """``--checkpoint`` and ``--shards``, as the evaluation and export commands take them."""
    parser.add_argument(
        "--checkpoint",
        required=True,
        help="export folder (or a training output folder with an export/ subfolder)",
    )
    parser.add_argument(
        "--shards", nargs="+", required=True, metavar="DIR_OR_TAR", help=shards_help
    )
