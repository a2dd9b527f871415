"""Decoding one sample's window and shaping it for training: pure functions on bytes and tensors.

Legend: T frames, C channels (RGB), H/W pixels. Decoders give (T, H, W, C) and the transforms
keep that channels-last layout: moving C to the front is a byte-wise transpose that costs as much
as a tenth of the decode, so the loader leaves it to the training side (``Batch.pixels``), where
it rides along with the float conversion on the device. Everything here is uint8 except the
conversions (``to_float``, ``yuv420_to_rgb``, ``to_pixels``), which run on the training side,
after the batch has crossed the worker boundary.

The PyAV backend goes one step further for the loader (``planar=True``): it hands over the H.264
stream's own 4:2:0 planes (``Yuv420``) and ``yuv420_to_rgb`` runs on the training side. swscale's
YUV -> RGB conversion is a quarter of a 17 x 128^2 window's decode time on one core, and the
planes are half the bytes of RGB through the worker boundary (benchmarks/bench_data.py).
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

from pipeline.data.yuv import Yuv420, uint8_buffer, yuv420_to_rgb, yuv420_to_rgb_uint8

try:  # x86_64 only; the PyAV backend works everywhere
    import decord
except ImportError:  # pragma: no cover
    decord = None

Backend = Literal["decord", "pyav"]
Crop = Literal["random", "center", "resize"]


class TooShort(ValueError):
    """The video has fewer frames than one window needs."""


def clip_size(frames: torch.Tensor | Yuv420) -> tuple[int, int, int]:
    """(T, H, W) of a clip, RGB (T, H, W, C) or planes."""
    if isinstance(frames, Yuv420):
        return tuple(frames.luma.shape)
    return tuple(frames.shape[:3])


def stack_clips(clips: list[torch.Tensor | Yuv420], shared: bool = False) -> torch.Tensor | Yuv420:
    """Equally sized clips (T, H, W, C) or images (H, W, C), or planes, as one batch: ``Yuv420``
    with (B, T) leading dims when all are planes; else uint8 RGB (B, C, T, H, W) or
    (B, C, H, W), a channels-last view (planes among RGB are converted here: passthrough clips
    of other pixel formats). ``shared``: straight into shared memory, for a batch about to
    leave a data-loader worker (sending it then copies nothing)."""
    if all(isinstance(c, Yuv420) for c in clips):
        return Yuv420.stacked(clips, shared)
    rgb = [yuv420_to_rgb_uint8(c) if isinstance(c, Yuv420) else c for c in clips]
    out = uint8_buffer((len(rgb), *rgb[0].shape), shared)
    pixels = torch.stack(rgb, out=out)  # (B, T, H, W, C) or (B, H, W, C)
    return pixels.permute(0, 4, 1, 2, 3) if pixels.ndim == 5 else pixels.permute(0, 3, 1, 2)


def to_pixels(frames: torch.Tensor | Yuv420) -> torch.Tensor:
    """A ``stack_clips`` batch -> float32 RGB in [-1, 1], (B, C, T, H, W) or (B, C, H, W), on
    the batch's device (run it there: the conversion is the heavy part)."""
    if isinstance(frames, Yuv420):  # (B, T, H, W) planes -> (B, 3, T, H, W) levels
        return yuv420_to_rgb(frames, dim=1).div_(127.5).sub_(1.0)
    return to_float(frames)


def decode_window(
    payload: bytes,
    num_frames: int,
    frame_stride: int,
    start: int | None,
    rng: random.Random,
    backend: Backend = "decord",
    fps: float | None = None,
    planar: bool = False,
) -> torch.Tensor | Yuv420:
    """Decodes only the frames of one window: ``num_frames`` frames, ``frame_stride`` apart.

    Args:
        payload: the mp4 (or passthrough container) bytes, decoded from memory.
        start: first frame; None draws it uniformly from the valid starts with ``rng``.
        fps: the payload's frame rate from its metadata (the PyAV backend seeks with it).
        planar: PyAV backend: return the stream's ``Yuv420`` planes when it is 8-bit 4:2:0
            BT.601 limited range with even sides (data_prep's clips are); RGB otherwise.

    Returns:
        (T, H, W, C) uint8 frames, or ``Yuv420`` with (T,) leading dims.

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
    frames = _decode_window_pyav(payload, span, frame_stride, start, rng, fps, planar)
    return frames if isinstance(frames, Yuv420) else torch.from_numpy(frames)


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
    planar: bool = False,
) -> np.ndarray | Yuv420:
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
        frames: list[np.ndarray] = []
        planes: _Planes | None = None
        count = 0
        for position, frame in enumerate(container.decode(stream)):
            index = (
                round(float((frame.pts - first_pts) * time_base) * rate) if seeking else position
            )
            if index not in wanted:
                continue
            if count == 0 and planar and _is_bt601_yuv420(frame):
                planes = _Planes(len(wanted), frame.height, frame.width)
            if planes is not None:
                planes.copy(count, frame)
            else:
                # threads=1: swscale otherwise starts a thread per core for every frame
                frames.append(frame.to_ndarray(format="rgb24", threads=1))
            count += 1
            if count == len(wanted):
                return planes.frames() if planes is not None else np.stack(frames)
    raise TooShort(f"the stream ended after {count} of the window's {len(wanted)} frames")


def frames_as_loaded(frames: list[av.VideoFrame]) -> torch.Tensor | Yuv420:
    """Decoded frames as the PyAV loader hands them over (``planar=True``): their ``Yuv420``
    planes when the stream is 8-bit 4:2:0 BT.601 limited range with even sides, else uint8 RGB
    (T, H, W, C) from swscale. For readers that must give the training loader's pixels."""
    if frames and all(_is_bt601_yuv420(frame) for frame in frames):
        planes = _Planes(len(frames), frames[0].height, frames[0].width)
        for i, frame in enumerate(frames):
            planes.copy(i, frame)
        return planes.frames()
    return torch.from_numpy(np.stack([f.to_ndarray(format="rgb24", threads=1) for f in frames]))


def _is_bt601_yuv420(frame: av.VideoFrame) -> bool:
    # colorspace 2/5/6: unspecified, BT.470BG, SMPTE 170M; color_range 0/1: unspecified, MPEG.
    return (
        frame.format.name == "yuv420p"
        and frame.colorspace in (2, 5, 6)
        and frame.color_range in (0, 1)
        and frame.width % 2 == 0
        and frame.height % 2 == 0
    )


class _Planes:
    """A window's 4:2:0 planes, filled frame by frame straight from the decoder's buffers."""

    def __init__(self, count: int, height: int, width: int) -> None:
        self.height, self.width = height, width
        self.luma = np.empty((count, height, width), np.uint8)
        self.chroma = np.empty((count, 2, height // 2, width // 2), np.uint8)

    def copy(self, i: int, frame: av.VideoFrame) -> None:
        if (frame.height, frame.width) != (self.height, self.width):
            raise ValueError("the frame size changes within the window")
        outs = (self.luma[i], self.chroma[i, 0], self.chroma[i, 1])
        for plane, out in zip(frame.planes, outs, strict=True):
            _copy_plane(plane, out)

    def frames(self) -> Yuv420:
        return Yuv420(torch.from_numpy(self.luma), torch.from_numpy(self.chroma))


def _copy_plane(plane, out: np.ndarray) -> None:
    """One plane's pixels into ``out`` (H, W); the decoder's rows are ``line_size`` bytes."""
    height, width = out.shape
    if plane.line_size == width:  # no row padding: one flat copy
        out.reshape(-1)[:] = np.frombuffer(plane, np.uint8, count=height * width)
    else:
        rows = np.frombuffer(plane, np.uint8, count=height * plane.line_size)
        out[:] = rows.reshape(height, plane.line_size)[:, :width]


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
    frames: torch.Tensor | Yuv420, size: int, mode: Crop, rng: random.Random | None
) -> torch.Tensor | Yuv420:
    """(..., H, W, C) -> (..., size, size, C): a random or center crop after resizing the short
    side, or a plain resize of the whole frame (aspect ratio not kept) for ``mode="resize"``.
    Crops are views: the one copy happens when the batch is stacked.

    ``Yuv420`` planes stay planes where 4:2:0 can hold the result: random crops round the resized
    sides and the offsets to even numbers; "center" and "resize" keep the RGB geometry exactly
    and convert to RGB here when it has an odd side or offset (as an odd ``size`` does)."""
    if isinstance(frames, Yuv420):
        planes = _crop_planes(frames, size, mode, rng) if size % 2 == 0 else None
        if planes is not None:
            return planes
        frames = yuv420_to_rgb_uint8(frames)
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


def _crop_planes(frames: Yuv420, size: int, mode: Crop, rng: random.Random | None) -> Yuv420 | None:
    """``crop_to_square`` of 4:2:0 planes (``size`` even), with every side and offset even so
    the chroma stays on its 2 x 2 blocks; None where "center" would need an odd one."""
    height, width = frames.luma.shape[-2:]
    if mode == "resize":
        return frames if (height, width) == (size, size) else _resize_planes(frames, size, size)
    if min(height, width) != size:
        scale = size / min(height, width)
        if mode == "random":
            height, width = (max(size, 2 * round(v * scale / 2)) for v in (height, width))
        else:  # the RGB path's sides
            height, width = (max(size, round(v * scale)) for v in (height, width))
            if height % 2 or width % 2:
                return None
        frames = _resize_planes(frames, height, width)
    if mode == "random":
        top, left = (2 * rng.randint(0, (v - size) // 2) for v in (height, width))
    else:
        top, left = ((v - size) // 2 for v in (height, width))
        if top % 2 or left % 2:
            return None
    half, top2, left2 = size // 2, top // 2, left // 2
    return Yuv420(
        frames.luma[..., top : top + size, left : left + size],
        frames.chroma[..., top2 : top2 + half, left2 : left2 + half],
    )


def _resize_planes(frames: Yuv420, height: int, width: int) -> Yuv420:
    luma = _resize(frames.luma.unsqueeze(-1), (height, width)).squeeze(-1)
    chroma = _resize(frames.chroma.movedim(-3, -1), (height // 2, width // 2)).movedim(-1, -3)
    return Yuv420(luma, chroma)
