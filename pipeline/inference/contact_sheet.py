"""A PNG contact sheet of reconstructions: one row per clip, its first, middle and last frame,
real | reconstruction side by side. Something a person can look at in a second, next to the
evaluation's mp4s (which need a player and hide compression artefacts in motion)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw
from torch import Tensor

GAP = 4
"""Pixels of background between frames and rows."""
LABEL_HEIGHT = 12


def sheet_frames(num_frames: int) -> list[int]:
    """The frames a row shows: first, middle and last (fewer for short clips)."""
    return sorted({0, (num_frames - 1) // 2, num_frames - 1})


def contact_sheet(clips: list[tuple[str, Tensor, Tensor]], scale: int = 1) -> Image.Image:
    """clips: (key, real, recon), each (C, T, H, W) float in [0, 1], all of one size. Each row:
    for each of the sheet frames, the real frame then its reconstruction; `scale` enlarges
    small frames (nearest neighbour, so pixels stay visible)."""
    if not clips:
        raise ValueError("contact_sheet needs at least one clip")
    _, _, t, h, w = (1, *clips[0][1].shape)
    h, w = h * scale, w * scale
    columns = 2 * len(sheet_frames(t))
    width = columns * w + (columns + 1) * GAP
    row_height = LABEL_HEIGHT + h + GAP
    sheet = Image.new("RGB", (width, GAP + row_height * len(clips)), (32, 32, 32))
    draw = ImageDraw.Draw(sheet)
    for row, (key, real, recon) in enumerate(clips):
        if real.shape != clips[0][1].shape or recon.shape != real.shape:
            raise ValueError(f"clip {key}: all clips of a sheet must have one shape")
        top = GAP + row * row_height
        draw.text(
            (GAP, top),
            f"{key}  (real | reconstruction: first, middle, last frame)",
            fill=(220, 220, 220),
        )
        for i, frame in enumerate(sheet_frames(real.shape[1])):
            for j, video in enumerate((real, recon)):
                left = GAP + (2 * i + j) * (w + GAP)
                sheet.paste(_image(video[:, frame], scale), (left, top + LABEL_HEIGHT))
    return sheet


def _image(frame: Tensor, scale: int) -> Image.Image:
    """(C, H, W) in [0, 1] -> RGB image (grey frames repeated into 3 channels)."""
    pixels = frame.detach().float().clamp(0, 1).mul(255).round().to(torch.uint8).cpu()
    if pixels.shape[0] == 1:
        pixels = pixels.expand(3, -1, -1)
    image = Image.fromarray(np.ascontiguousarray(pixels[:3].permute(1, 2, 0).numpy()))
    if scale > 1:
        image = image.resize((image.width * scale, image.height * scale), Image.NEAREST)
    return image


def write_contact_sheet(
    path: str | Path, clips: list[tuple[str, Tensor, Tensor]], scale: int | None = None
) -> Path:
    """Writes the sheet as PNG; frames under 96 px are enlarged (by default) to be legible."""
    path = Path(path)
    if scale is None:
        side = max(clips[0][1].shape[-2:]) if clips else 96
        scale = max(1, 96 // side)
    path.parent.mkdir(parents=True, exist_ok=True)
    contact_sheet(clips, scale).save(path)
    return path
