"""Writing H.264 mp4 files frame by frame (PyAV): decoded token files and side-by-side evaluation
videos. A file appears under its name only when complete (written under a temporary name)."""

from __future__ import annotations

import os
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import torch


class Mp4Writer:
    """Appends (T, H, W, 3) uint8 frames to an mp4; odd sizes are padded by one edge pixel
    (yuv420p needs even sizes)."""

    def __init__(self, path: str | Path, fps: float, crf: int = 18) -> None:
        self.path = Path(path)
        self._tmp = self.path.with_name(f".{self.path.name}.partial")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._container = av.open(str(self._tmp), "w", format="mp4")
        self._stream = self._container.add_stream(
            "libx264", rate=Fraction(fps).limit_denominator(1001)
        )
        self._stream.pix_fmt = "yuv420p"
        self._stream.options = {"crf": str(crf)}
        self._size: tuple[int, int] | None = None
        self.num_frames = 0

    def write(self, frames: np.ndarray | torch.Tensor) -> None:
        if isinstance(frames, torch.Tensor):
            frames = frames.cpu().numpy()
        if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
            raise ValueError(
                f"expected uint8 frames (T, H, W, 3), got {frames.dtype} {frames.shape}"
            )
        height, width = frames.shape[1:3]
        pad = ((0, 0), (0, height % 2), (0, width % 2), (0, 0))
        frames = np.pad(frames, pad, mode="edge") if any(p[1] for p in pad) else frames
        if self._size is None:
            self._size = frames.shape[1:3]
            self._stream.height, self._stream.width = self._size
        elif frames.shape[1:3] != self._size:
            raise ValueError(f"frame size changed from {self._size} to {frames.shape[1:3]}")
        for frame in frames:
            packets = self._stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24"))
            self._container.mux(packets)
        self.num_frames += len(frames)

    def close(self) -> Path:
        """Flushes the encoder and gives the file its final name."""
        self._container.mux(self._stream.encode())
        self._container.close()
        os.replace(self._tmp, self.path)
        return self.path

    def abort(self) -> None:
        self._container.close()
        self._tmp.unlink(missing_ok=True)

    def __enter__(self) -> Mp4Writer:
        return self

    def __exit__(self, exc_type, *_) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()
