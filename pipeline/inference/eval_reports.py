"""What an evaluation produces: per-clip scores and their means (`EvalResult`), the real |
reconstruction videos and contact sheet of a few clips (`SideBySideWriter`), and the reports
rank 0 writes (clips.csv, summary.json)."""

from __future__ import annotations

import csv
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from data_prep.format import write_json_atomic
from pipeline.inference.contact_sheet import sheet_frames, write_contact_sheet
from pipeline.inference.mp4 import Mp4Writer

SHEET_NAME = "contact_sheet.png"
"""Real | reconstruction stills of the written clips, next to their videos/ folder."""

VideoWriter = Callable[[str, Tensor, Tensor], None]
"""Called as writer(key, real, recon) with (C, T, H, W) clips in [0, 1], on rank 0."""


@dataclass(frozen=True)
class ClipScores:
    key: str
    psnr: float
    ssim: float
    lpips: float | None
    num_frames: int
    psnr_frames: float


@dataclass
class EvalResult:
    num_clips: int
    psnr: float
    """Mean over clips of the clip's PSNR (dB over all its pixels, frames in [0, 1])."""
    psnr_frames: float
    """Mean over clips of the mean over frames of each frame's PSNR (VidTok's convention)."""
    ssim: float
    lpips: float | None
    """Mean LPIPS (AlexNet), None when unavailable (see lpips_note)."""
    codebook_usage: float
    """Share of codebook entries used at least once (mean over codebooks)."""
    perplexity: float
    """exp(entropy) of the code distribution over the whole evaluation."""
    codebook_size: int
    num_codebooks: int
    clips: list[ClipScores] = field(default_factory=list)
    """Every clip of every rank, sorted by key."""
    skipped: dict[str, int] = field(default_factory=dict)
    """Samples the loader skipped, by reason (missing keys, undecodable, too short, ...)."""
    lpips_note: str = ""
    precision: str = ""
    """The arithmetic the model ran in ('fp32' or 'bf16')."""
    fvd: float | None = None
    """rFVD: Fréchet distance of I3D features, real vs reconstructed; None if unavailable."""
    fvd_note: str = ""
    """The I3D used and the number of clips (with any warning), or why rFVD is unavailable."""
    fid: float | None = None
    """rFID: Fréchet distance of InceptionV3 features of every frame; None when unavailable."""
    fid_note: str = ""

    def scalars(self, prefix: str = "eval/") -> dict[str, float]:
        """For TensorBoard: writer.add_scalar(name, value, step) for each item."""
        values = {
            "psnr": self.psnr,
            "psnr_frames": self.psnr_frames,
            "ssim": self.ssim,
            "codebook_usage": self.codebook_usage,
            "perplexity": self.perplexity,
            "num_clips": float(self.num_clips),
        }
        if self.lpips is not None:
            values["lpips"] = self.lpips
        if self.fvd is not None:
            values["rfvd"] = self.fvd
        if self.fid is not None:
            values["rfid"] = self.fid
        return {prefix + k: v for k, v in values.items()}

    def summary(self) -> dict:
        out = {k: v for k, v in asdict(self).items() if k != "clips"}
        out["psnr_min"] = min((c.psnr for c in self.clips), default=math.nan)
        return out


class SideBySideWriter:
    """Writes the first `max_videos` clips as `DIR/<key>.mp4`, real on the left, and a PNG
    contact sheet of them (first, middle and last frame; `sheet_path`, default
    `DIR/../contact_sheet.png`), rewritten as each clip arrives."""

    def __init__(
        self,
        directory: str | Path,
        max_videos: int = 4,
        fps: float = 8.0,
        sheet_path: str | Path | None = None,
    ) -> None:
        self.directory, self.max_videos, self.fps = Path(directory), max_videos, fps
        self.sheet_path = Path(sheet_path) if sheet_path else self.directory.parent / SHEET_NAME
        self.written: list[Path] = []
        self._sheet_clips: list[tuple[str, Tensor, Tensor]] = []

    def __call__(self, key: str, real: Tensor, recon: Tensor) -> None:
        if len(self.written) >= self.max_videos:
            return
        both = torch.cat((real, recon), dim=-1)  # (c, t, h, 2w)
        frames = both.mul(255).round().clamp(0, 255).to(torch.uint8).permute(1, 2, 3, 0)
        if frames.shape[-1] == 1:
            frames = frames.expand(-1, -1, -1, 3)
        with Mp4Writer(self.directory / f"{key}.mp4", self.fps) as writer:
            writer.write(frames[..., :3].contiguous())
        self.written.append(writer.path)
        frames_shown = sheet_frames(real.shape[1])
        self._sheet_clips.append((key, real[:, frames_shown], recon[:, frames_shown]))
        write_contact_sheet(self.sheet_path, self._sheet_clips)


def write_reports(result: EvalResult, out: Path, extra: dict) -> None:
    """clips.csv (one row per clip) and summary.json, each written atomically."""
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / ".clips.csv.partial"
    with open(tmp, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["key", "psnr", "ssim", "lpips", "num_frames", "psnr_frames"])
        for c in result.clips:
            lpips = "" if c.lpips is None else f"{c.lpips:.6f}"
            writer.writerow(
                [
                    c.key,
                    f"{c.psnr:.6f}",
                    f"{c.ssim:.6f}",
                    lpips,
                    c.num_frames,
                    f"{c.psnr_frames:.6f}",
                ]
            )
    tmp.replace(out / "clips.csv")
    write_json_atomic(str(out / "summary.json"), {**result.summary(), **extra})
