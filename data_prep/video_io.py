"""Reading source videos and writing H.264 clips.

decord probes each source (frame count, frame rate; PyAV probes what decord cannot open, such as
Ogg/Theora), and PyAV's decoder, one thread, reads the frames in order; decord decodes only what
PyAV cannot. Not decord's reader: it decodes ahead in a thread of its own, so one worker keeps
~1.5 cores busy and a second worker per two cores adds little (on 2 cores, 17 x 128^2 clips of
real videos: decord's reader 21 -> 26 clips/s from 1 to 2 workers, PyAV's 15 -> 27.6;
benchmarks/bench_data.py). data_prep runs one worker per core by default.

Both readers resize while decoding with swscale's bilinear filter, so a source gives the same
frames (within a few levels of rounding) whichever reader opened it.
"""

from __future__ import annotations

import abc
import io
import math
from collections.abc import Callable
from fractions import Fraction

import av
import numpy as np

try:  # decord has x86_64 wheels only; elsewhere PyAV reads everything.
    import decord
except ImportError:  # pragma: no cover - exercised on aarch64 only
    decord = None


def resized_size(width: int, height: int, size: int) -> tuple[int, int]:
    """(width, height) with the short side at ``size`` and even sides, aspect ratio kept."""
    scale = size / min(width, height)
    width, height = (max(2, int(round(v * scale / 2)) * 2) for v in (width, height))
    return (size, height) if width <= height else (width, size)


class VideoUnreadable(Exception):
    """Neither reader can open the file as a video."""


def _short(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return (text[-1] if text else type(exc).__name__)[:200]


class VideoFrames(abc.ABC):
    """Frames of one source, resized on the short side and then center-cropped."""

    fps: float
    num_frames: int | None
    """Frame count when the container knows it (decord); None for streamed containers (PyAV)."""
    seekable: bool
    """True when ``read`` can jump forward without decoding the frames in between."""
    source_width: int
    source_height: int

    def _set_geometry(self, width: int, height: int, size: int, crop: int | None) -> None:
        self.source_width, self.source_height = width, height
        self.width, self.height = resized_size(width, height, size)
        self._crop = crop

    def _cropped(self, frames: np.ndarray) -> np.ndarray:  # (T, H, W, C)
        if self._crop is None:
            return frames
        top, left = (self.height - self._crop) // 2, (self.width - self._crop) // 2
        return np.ascontiguousarray(frames[:, top : top + self._crop, left : left + self._crop])

    @abc.abstractmethod
    def read(self, indices: list[int]) -> np.ndarray:
        """Frames at increasing source ``indices``: (T, H, W, 3) uint8; EOFError past the end."""

    @abc.abstractmethod
    def count_frames(self) -> int:
        """Frames in the video (decoding them all where the container does not say)."""

    def close(self) -> None:  # noqa: B027 - optional: readers without resources keep it
        """Releases the decoder (a no-op where there is nothing to release)."""

    def __enter__(self) -> VideoFrames:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class DecordFrames(VideoFrames):
    seekable = True

    def __init__(self, path: str, size: int, crop: int | None) -> None:
        probe = decord.VideoReader(path, num_threads=1)
        self.num_frames = len(probe)
        self.fps = float(probe.get_avg_fps())
        if self.num_frames < 1 or not math.isfinite(self.fps) or self.fps <= 0:
            raise ValueError(f"no frames or no frame rate ({self.num_frames}, {self.fps})")
        height, width = probe[0].shape[:2]
        del probe
        self._set_geometry(width, height, size, crop)
        self._reader = decord.VideoReader(path, num_threads=1, width=self.width, height=self.height)
        # decord 0.6.0 fails on some small widths (16, 24, 48, 72 px): find out now, while PyAV
        # can still take over.
        self._reader.get_batch([0])
        self._reader.seek(0)

    def read(self, indices: list[int]) -> np.ndarray:
        if indices[-1] >= self.num_frames:
            raise EOFError
        return self._cropped(self._reader.get_batch(indices).asnumpy())

    def count_frames(self) -> int:
        return self.num_frames


class PyAVFrames(VideoFrames):
    """Sequential decoding on the calling thread; also opens Ogg, MPEG-TS, GIF and other files
    decord cannot index. ``num_frames``/``fps`` come from decord's probe where it had one."""

    seekable = False

    def __init__(
        self,
        path: str,
        size: int,
        crop: int | None,
        num_frames: int | None = None,
        fps: float | None = None,
    ) -> None:
        self._path = path
        self.num_frames = num_frames
        self._container = av.open(path)
        try:
            stream = self._container.streams.video[0]
        except IndexError:
            self._container.close()
            raise ValueError("no video stream") from None
        stream.codec_context.thread_count = 1
        rate = fps or stream.average_rate or stream.guessed_rate or stream.base_rate
        if not rate or float(rate) <= 0:
            self._container.close()
            raise ValueError("no frame rate")
        self.fps = float(rate)
        context = stream.codec_context
        self._set_geometry(context.width, context.height, size, crop)
        self._frames = self._container.decode(stream)
        self._next_index = 0
        self._cache: dict[int, np.ndarray] = {}

    def read(self, indices: list[int]) -> np.ndarray:
        for index in [i for i in self._cache if i < indices[0]]:
            del self._cache[index]
        wanted = set(indices)
        while self._next_index <= indices[-1]:
            try:
                frame = next(self._frames)
            except StopIteration:
                self.num_frames = self._next_index  # now known
                raise EOFError from None
            if self._next_index in wanted:
                # threads=1: swscale would start a thread per core for every frame, and the
                # parallelism is already one worker process per core.
                self._cache[self._next_index] = frame.to_ndarray(
                    format="rgb24",
                    width=self.width,
                    height=self.height,
                    interpolation="BILINEAR",
                    threads=1,
                )
            self._next_index += 1
        return self._cropped(np.stack([self._cache[i] for i in indices]))

    def count_frames(self) -> int:
        if self.num_frames is not None:
            return self.num_frames
        with av.open(self._path) as container:
            stream = container.streams.video[0]
            return sum(1 for packet in container.demux(stream) if packet.size)

    def close(self) -> None:
        self._container.close()


def _decord_probe(path: str) -> tuple[int, float]:
    """(frame count, frame rate) from decord's index, without decoding a frame."""
    probe = decord.VideoReader(path, num_threads=1)
    num_frames, fps = len(probe), float(probe.get_avg_fps())
    if num_frames < 1 or not math.isfinite(fps) or fps <= 0:
        raise ValueError(f"no frames or no frame rate ({num_frames}, {fps})")
    return num_frames, fps


def open_video(path: str, size: int, crop: int | None) -> VideoFrames:
    """Probes ``path`` with decord and reads it with PyAV (see the module docstring); decord
    reads what PyAV cannot open, PyAV alone what decord cannot probe. ``VideoUnreadable`` with
    every reason otherwise."""
    errors = []
    readers: list[tuple[str, Callable[[], VideoFrames]]] = [
        ("PyAV", lambda: PyAVFrames(path, size, crop))
    ]
    if decord is not None:
        try:
            num_frames, fps = _decord_probe(path)
        except Exception as exc:  # decord raises DECORDError, RuntimeError, ValueError, ...
            errors.append(f"decord: {_short(exc)}")
        else:
            readers = [
                ("PyAV", lambda: PyAVFrames(path, size, crop, num_frames, fps)),
                ("decord", lambda: DecordFrames(path, size, crop)),
            ]
    for name, reader in readers:
        try:
            return reader()
        except Exception as exc:
            errors.append(f"{name}: {_short(exc)}")
    raise VideoUnreadable("not a readable video (" + "; ".join(errors) + ")")


def encode_clip(
    frames: np.ndarray, fps: float, crf: int, preset: str, keyframe_interval: int
) -> bytes:
    """H.264 mp4 of (T, H, W, 3) uint8 frames, one encoder thread (parallelism is per process)."""
    buffer = io.BytesIO()
    with av.open(buffer, "w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=Fraction(fps).limit_denominator(1001))
        stream.width, stream.height = frames.shape[2], frames.shape[1]
        stream.pix_fmt = "yuv420p"
        stream.codec_context.thread_count = 1
        stream.options = {
            "crf": str(crf),
            "preset": preset,
            "g": str(keyframe_interval),
            "keyint_min": str(keyframe_interval),
        }
        for frame in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode())
    return buffer.getvalue()
