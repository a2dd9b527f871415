"""Decoding one sample's window and shaping it for training: pure functions on bytes and tensors.

Legend: T frames, C channels (RGB), H/W pixels. Decoders give (T, H, W, C) and the transforms
keep that channels-last layout: moving C to the front is a byte-wise transpose that costs as much
as a tenth of the decode, so the loader leaves it to the training side (``Batch.pixels``), where
it rides along with the float conversion on the device. Everything here is uint8; ``to_float``
is applied on the training side, after the batch has crossed the worker boundary.
"""

from __future__ import annotations

import io
import random
from typing import Literal

import av
import numpy as np
import torch
import torch.nn.functional as F
import torch.utils.dlpack
from PIL import Image

try:  # x86_64 only; the PyAV backend works everywhere
    import decord
except ImportError:  # pragma: no cover
    decord = None

Backend = Literal["decord", "pyav"]
Crop = Literal["random", "center", "resize"]


class TooShort(ValueError):
    """The video has fewer frames than one window needs."""


def decode_window(
    payload: bytes,
    num_frames: int,
    frame_stride: int,
    start: int | None,
    rng: random.Random,
    backend: Backend = "decord",
    fps: float | None = None,
) -> torch.Tensor:
    """Decodes only the frames of one window: ``num_frames`` frames, ``frame_stride`` apart.

    Args:
        payload: the mp4 (or passthrough container) bytes, decoded from memory.
        start: first frame; None draws it uniformly from the valid starts with ``rng``.
        fps: the payload's frame rate from its metadata (the PyAV backend seeks with it).

    Returns:
        (T, H, W, C) uint8 frames.

    Raises:
        TooShort: fewer frames than ``(num_frames - 1) * frame_stride + 1``.
    """
    span = (num_frames - 1) * frame_stride + 1
    if backend == "decord":
        try:
            reader = decord.VideoReader(io.BytesIO(payload), num_threads=1)
            start = _window_start(len(reader), span, start, rng)
            frames = reader.get_batch(list(range(start, start + span, frame_stride)))
            return torch.utils.dlpack.from_dlpack(frames.to_dlpack())  # no copy, unlike asnumpy
        except TooShort:
            raise
        except Exception:  # decord 0.6.0 fails on some small widths (16, 24, 48, 72 px) and
            pass  # on Ogg; PyAV decodes those, and a truly broken payload fails there too
    return torch.from_numpy(_decode_window_pyav(payload, span, frame_stride, start, rng, fps))


def _window_start(length: int, span: int, start: int | None, rng: random.Random) -> int:
    if length < span:
        raise TooShort(f"{length} frames, the window needs {span}")
    if start is None:
        return rng.randint(0, length - span)
    if start + span > length:
        raise TooShort(f"{length} frames, a window from frame {start} needs {span}")
    return start


def _decode_window_pyav(
    payload: bytes,
    span: int,
    frame_stride: int,
    start: int | None,
    rng: random.Random,
    fps: float | None,
) -> np.ndarray:
    with av.open(io.BytesIO(payload)) as container:
        stream = container.streams.video[0]
        stream.codec_context.thread_count = 1
        length = stream.frames
        if not length:  # containers without a frame count: count packets (no decoding)
            length = sum(1 for packet in container.demux(stream) if packet.size)
            container.seek(0)
        start = _window_start(length, span, start, rng)
        wanted = range(start, start + span, frame_stride)
        first_pts, time_base = stream.start_time or 0, stream.time_base
        rate = float(fps or stream.average_rate or stream.guessed_rate)
        seeking = start > 0
        if seeking:  # jump to the keyframe before the window; then frames are told by timestamp
            container.seek(first_pts + int(start / rate / time_base), stream=stream)
        frames = []
        for position, frame in enumerate(container.decode(stream)):
            index = (
                round(float((frame.pts - first_pts) * time_base) * rate) if seeking else position
            )
            if index in wanted:
                # threads=1: swscale otherwise starts a thread per core for every frame
                frames.append(frame.to_ndarray(format="rgb24", threads=1))
                if len(frames) == len(wanted):
                    return np.stack(frames)
    raise TooShort(f"the stream ended after {len(frames)} of the window's {len(wanted)} frames")


def decode_image(payload: bytes) -> torch.Tensor:
    """(H, W, C) uint8 RGB from JPEG/PNG/WebP bytes."""
    with Image.open(io.BytesIO(payload)) as image:
        return torch.from_numpy(np.array(image.convert("RGB")))  # np.array: a writable copy


def resize_short_side(frames: torch.Tensor, size: int) -> torch.Tensor:
    """(..., H, W, C) uint8 with the short side at ``size`` (anti-aliased bilinear)."""
    height, width = frames.shape[-3:-1]
    if min(height, width) == size:
        return frames
    scale = size / min(height, width)
    shape = (max(size, round(height * scale)), max(size, round(width * scale)))
    return _resize(frames, shape)


def _resize(frames: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
    # interpolate wants (N, C, H, W); the permuted view is channels-last, its fast uint8 path.
    flat = frames.reshape(-1, *frames.shape[-3:]).permute(0, 3, 1, 2)
    out = F.interpolate(flat, size=shape, mode="bilinear", antialias=True, align_corners=False)
    return out.permute(0, 2, 3, 1).reshape(*frames.shape[:-3], *shape, frames.shape[-1])


def crop_to_square(
    frames: torch.Tensor, size: int, mode: Crop, rng: random.Random | None
) -> torch.Tensor:
    """(..., H, W, C) -> (..., size, size, C): a random or center crop after resizing the short
    side, or a plain resize of the whole frame (aspect ratio not kept) for ``mode="resize"``.
    Crops are views: the one copy happens when the batch is stacked."""
    if mode == "resize":
        if frames.shape[-3:-1] == (size, size):
            return frames
        return _resize(frames, (size, size))
    frames = resize_short_side(frames, size)
    height, width = frames.shape[-3:-1]
    if mode == "random":
        top, left = rng.randint(0, height - size), rng.randint(0, width - size)
    else:
        top, left = (height - size) // 2, (width - size) // 2
    return frames[..., top : top + size, left : left + size, :]


def to_float(pixels: torch.Tensor) -> torch.Tensor:
    """uint8 [0, 255] -> float32 [-1, 1]."""
    return pixels.float().div_(127.5).sub_(1.0)


def to_uint8(pixels: torch.Tensor) -> torch.Tensor:
    """float [-1, 1] -> uint8 [0, 255] (rounded, clamped): for logging and tests."""
    return pixels.add(1.0).mul_(127.5).round_().clamp_(0, 255).to(torch.uint8)
