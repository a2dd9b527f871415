"""Pure per-source work: probe a file, cut it into clips, resize, encode, and build samples.

Frames are resized on the short side while decoding (swscale, bilinear with a filter as wide as
the downscale factor, so it is anti-aliased) and only then center-cropped: cropping raw frames
first, as the reference loader does, would keep a different field of view per source size.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import os
from collections.abc import Iterator
from dataclasses import dataclass

from PIL import Image, ImageOps

from data_prep.format import (
    CLIP_PAYLOAD,
    IMAGE_PAYLOAD,
    META_KEY,
    SampleMeta,
    payload_for_extension,
    sample_key,
)
from data_prep.inputs import Source
from data_prep.video_io import (
    VideoFrames,
    VideoUnreadable,
    encode_clip,
    open_video,
    resized_size,
)

_PRESETS = "ultrafast superfast veryfast faster fast medium slow slower veryslow placebo".split()


class SkipSource(Exception):
    """The source gives no sample; the message is the reason written to the manifest."""


@dataclass(frozen=True, kw_only=True)
class ClipConfig:
    """How sources become samples. Stored in the manifest; a resumed run must match it."""

    num_frames: int = 17
    """Frames per clip."""
    fps: float | None = None
    """Target frame rate; None keeps each source's own. Never above the source's (no upsampling)."""
    stride: int | None = None
    """Frames (at the target fps) between clip starts; None = num_frames (no overlap)."""
    size: int = 128
    """Short side after resizing, in pixels (even: H.264 4:2:0 needs even sides)."""
    crop: int | None = None
    """Side of a square center crop taken after resizing; None keeps the aspect ratio."""
    crf: int = 18
    """x264 constant rate factor (0 lossless .. 51); 18 keeps real clips near 35 dB PSNR."""
    keyframe_interval: int = 8
    """Frames between keyframes: a window needs at most this many extra frames decoded."""
    preset: str = "faster"
    """x264 preset; slower presets shrink files a little for much more encoding time."""
    passthrough: bool = False
    """Store each source's original bytes as one sample instead of cutting clips."""
    image_quality: int = 95
    """JPEG quality of re-encoded images (4:4:4, no chroma subsampling)."""

    def __post_init__(self) -> None:
        if self.num_frames < 1:
            raise ValueError(f"num_frames must be >= 1, got {self.num_frames}")
        if self.fps is not None and not self.fps > 0:
            raise ValueError(f"fps must be positive or None, got {self.fps}")
        if self.stride is not None and self.stride < 1:
            raise ValueError(f"stride must be >= 1 or None, got {self.stride}")
        if self.size < 2 or self.size % 2:
            raise ValueError(f"size must be an even number >= 2, got {self.size}")
        if self.crop is not None and (self.crop < 2 or self.crop % 2 or self.crop > self.size):
            raise ValueError(f"crop must be even and in [2, size={self.size}], got {self.crop}")
        if not 0 <= self.crf <= 51:
            raise ValueError(f"crf must be in [0, 51], got {self.crf}")
        if self.keyframe_interval < 1:
            raise ValueError(f"keyframe_interval must be >= 1, got {self.keyframe_interval}")
        if self.preset not in _PRESETS:
            raise ValueError(f"preset must be one of {_PRESETS}, got {self.preset!r}")
        if not 1 <= self.image_quality <= 100:
            raise ValueError(f"image_quality must be in [1, 100], got {self.image_quality}")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclass
class SourceReport:
    """Filled in while a source's samples are produced."""

    num_clips: int = 0
    """Clips of the source that exist, including those a resumed run did not rewrite."""
    note: str = ""


def clip_indices(clip: int, num_frames: int, stride: int, step: float) -> list[int]:
    """Source frame indices of clip ``clip``; ``step`` = source fps / target fps (>= 1)."""
    first = clip * stride
    return [int((first + k) * step + 0.5) for k in range(num_frames)]


def file_sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _check_readable(path: str) -> str:
    """SHA-256 of the file; ``SkipSource`` with the reason for the usual file-level failures."""
    try:
        if not os.path.isfile(path):  # a folder, a FIFO, a device: nothing to decode
            raise SkipSource("not a regular file")
        if os.path.getsize(path) == 0:
            raise SkipSource("empty file (0 bytes)")
        return file_sha256(path)
    except PermissionError as exc:
        raise SkipSource(f"permission denied: {exc.strerror}") from exc
    except OSError as exc:
        raise SkipSource(f"cannot read: {exc.strerror or exc}") from exc


def _sample(path: str, index: int, payload_key: str, payload: bytes, **meta) -> dict[str, bytes]:
    info = SampleMeta(
        payload=payload_key,
        source=path,
        index=index,
        sha256=hashlib.sha256(payload).hexdigest(),
        **meta,
    )
    return {"__key__": sample_key(path, index), payload_key: payload, META_KEY: info.to_json()}


def source_samples(
    source: Source, config: ClipConfig, first_clip: int, report: SourceReport
) -> Iterator[dict[str, bytes]]:
    """Yields the samples of one source, from clip ``first_clip`` on (earlier ones exist).

    Raises:
        SkipSource: before the first sample, when the source gives none.
    """
    source_hash = _check_readable(source.path)
    if source.kind == "image":
        yield from _image_samples(source.path, source_hash, config, first_clip, report)
        return
    try:
        video = open_video(source.path, config.size, config.crop)
    except VideoUnreadable as exc:
        raise SkipSource(str(exc)) from exc
    with video:
        if config.passthrough:
            yield from _passthrough_video(
                source.path, source_hash, video, config, first_clip, report
            )
        else:
            yield from _video_clips(source.path, source_hash, video, config, first_clip, report)


def _video_clips(
    path: str,
    source_hash: str,
    video: VideoFrames,
    config: ClipConfig,
    first_clip: int,
    report: SourceReport,
) -> Iterator[dict[str, bytes]]:
    fps = min(config.fps or video.fps, video.fps)
    step = video.fps / fps
    stride = config.stride or config.num_frames
    report.num_clips = first_clip
    clip = 0
    while True:
        indices = clip_indices(clip, config.num_frames, stride, step)
        if video.num_frames is not None and indices[-1] >= video.num_frames:
            break
        if clip < first_clip and video.seekable:
            clip += 1  # written by an earlier run; decord needs no decoding to skip it
            continue
        try:
            frames = video.read(indices)  # (T, H, W, C) uint8
        except EOFError:
            break
        except Exception as exc:
            if clip == 0:
                raise SkipSource(f"cannot decode the first frames: {exc}") from exc
            report.note = f"decoding stopped at frame {indices[0]} after {clip} clips: {exc}"
            break
        if clip >= first_clip:
            payload = encode_clip(frames, fps, config.crf, config.preset, config.keyframe_interval)
            report.num_clips = clip + 1
            yield _sample(
                path,
                clip,
                CLIP_PAYLOAD,
                payload,
                kind="video",
                source_sha256=source_hash,
                start_frame=indices[0],
                start_time=indices[0] / video.fps,
                fps=fps,
                num_frames=len(indices),
                width=frames.shape[2],
                height=frames.shape[1],
            )
        clip += 1
    if clip == 0:
        raise SkipSource(
            f"too short: {video.num_frames} frames at {video.fps:.3g} fps, a clip needs "
            f"{config.num_frames} frames at {fps:.3g} fps"
        )


def _passthrough_video(
    path: str,
    source_hash: str,
    video: VideoFrames,
    config: ClipConfig,
    first_clip: int,
    report: SourceReport,
) -> Iterator[dict[str, bytes]]:
    num_frames = video.count_frames()
    if num_frames < config.num_frames:
        raise SkipSource(f"too short: {num_frames} frames, a clip needs {config.num_frames}")
    report.num_clips = 1
    if first_clip > 0:
        return
    with open(path, "rb") as f:
        payload = f.read()
    yield _sample(
        path,
        0,
        payload_for_extension(os.path.splitext(path)[1] or ".video"),
        payload,
        kind="video",
        source_sha256=source_hash,
        start_frame=0,
        start_time=0.0,
        fps=video.fps,
        num_frames=num_frames,
        width=video.source_width,
        height=video.source_height,
        passthrough=True,
    )


def _image_samples(
    path: str, source_hash: str, config: ClipConfig, first_clip: int, report: SourceReport
) -> Iterator[dict[str, bytes]]:
    try:
        with Image.open(path) as opened:
            image = ImageOps.exif_transpose(opened).convert("RGB")
    except (OSError, Image.DecompressionBombError, ValueError) as exc:
        raise SkipSource(f"not a readable image: {exc}") from exc
    report.num_clips = 1
    if first_clip > 0:
        return
    if config.passthrough:
        with open(path, "rb") as f:
            payload = f.read()
        key = payload_for_extension(os.path.splitext(path)[1])
    else:
        width, height = resized_size(image.width, image.height, config.size)
        image = image.resize((width, height), Image.Resampling.BICUBIC, reducing_gap=3.0)
        if config.crop is not None:
            left, top = (width - config.crop) // 2, (height - config.crop) // 2
            image = image.crop((left, top, left + config.crop, top + config.crop))
        buffer = io.BytesIO()
        image.save(buffer, format="JPEG", quality=config.image_quality, subsampling=0)
        payload, key = buffer.getvalue(), IMAGE_PAYLOAD
    yield _sample(
        path,
        0,
        key,
        payload,
        kind="image",
        source_sha256=source_hash,
        start_frame=0,
        start_time=0.0,
        fps=0.0,
        num_frames=1,
        width=image.width,
        height=image.height,
        passthrough=config.passthrough,
    )
