"""The one definition of the on-disk dataset: shard samples, shard names and the manifest.

Everything that writes shards (``data_prep``) and everything that reads them
(``pipeline.data.loader``, ``data_prep.verify``) imports this module; nothing else spells a key or a
field name.

A dataset folder holds WebDataset tar shards and ``manifest.json``::

    DIR/clips-n0000-w000-000000.tar     video clips made by node 0, worker 0
    DIR/images-n0001-w002-000004.tar    images made by node 1, worker 2
    DIR/manifest.json                   every shard, every source, every skipped input
    DIR/.journal/                       resume journals and per-node manifest parts

A sample is two tar members with the same key: ``<key>.json`` (``SampleMeta``) and
``<key>.<payload>`` (the media bytes). ``payload`` is ``mp4`` for re-encoded clips, ``jpg`` for
re-encoded images, and the source's own extension in passthrough mode.

Decoded samples (the loader's contract with the trainer):

- a video clip is ``(C, T, H, W)`` uint8 across the data-loader worker boundary; batches are
  ``(B, C, T, H, W)`` (the loader keeps the bytes channels-last, see ``pipeline.data.decode``);
- an image is ``(C, H, W)`` uint8, batches ``(B, C, H, W)``;
- on the training side pixels are float in ``[-1, 1]`` (``x / 127.5 - 1``).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
from dataclasses import dataclass, field
from typing import Any, Literal

FORMAT_VERSION = 1

Kind = Literal["video", "image"]
KINDS: tuple[Kind, ...] = ("video", "image")

META_KEY = "json"
CLIP_PAYLOAD = "mp4"
IMAGE_PAYLOAD = "jpg"

# Containers probed as video. "gif" is here because animated GIFs are short videos.
VIDEO_EXTENSIONS = frozenset(
    "mp4 m4v mov mkv webm avi ogv ogg gif mpg mpeg m2v ts mts m2ts flv wmv asf 3gp 3g2 vob".split()
    + ["mxf"]
)
IMAGE_EXTENSIONS = frozenset("jpg jpeg png webp bmp tif tiff".split())

VIDEO_LAYOUT = "CTHW"
VIDEO_BATCH_LAYOUT = "BCTHW"
IMAGE_LAYOUT = "CHW"
IMAGE_BATCH_LAYOUT = "BCHW"
PIXEL_RANGE = (-1.0, 1.0)

MANIFEST_NAME = "manifest.json"
JOURNAL_DIR = ".journal"
SHARD_PREFIXES: dict[Kind, str] = {"video": "clips", "image": "images"}
_SHARD_RE = re.compile(r"^(clips|images)-n(\d{4})-w(\d{3})-(\d{6})\.tar$")


def shard_name(kind: Kind, node_rank: int, worker_id: int, index: int) -> str:
    """Name of a shard; node rank and worker id in the name keep parallel writers from colliding."""
    return f"{SHARD_PREFIXES[kind]}-n{node_rank:04d}-w{worker_id:03d}-{index:06d}.tar"


def parse_shard_name(name: str) -> tuple[Kind, int, int, int] | None:
    """(kind, node rank, worker id, index) of a shard name, or None for any other file name."""
    match = _SHARD_RE.match(name)
    if match is None:
        return None
    kind: Kind = "video" if match.group(1) == "clips" else "image"
    return kind, int(match.group(2)), int(match.group(3)), int(match.group(4))


def partial_name(name: str) -> str:
    """Temporary name of a shard being written; hidden and not ``*.tar``, so no glob picks it up."""
    return f".{name}.partial"


def source_id(path: str) -> str:
    """Stable 16-hex-digit id of a source path; also the basis of the node partition."""
    return hashlib.sha1(path.encode("utf-8")).hexdigest()[:16]


def sample_key(path: str, index: int) -> str:
    """Tar key of clip ``index`` of a source. WebDataset splits keys at the first dot: none here."""
    return f"{source_id(path)}-{index:06d}"


def payload_for_extension(extension: str) -> str:
    """Payload key for passthrough bytes: the lower-case extension, with jpeg spelled jpg."""
    extension = extension.lower().lstrip(".")
    return "jpg" if extension == "jpeg" else extension


def _from_dict(cls: type, data: dict[str, Any]) -> Any:
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ValueError(f"{cls.__name__}: unknown fields {unknown}; expected {sorted(names)}")
    return cls(**data)


@dataclass(frozen=True, kw_only=True)
class SampleMeta:
    """The ``json`` member of every sample."""

    kind: Kind
    """"video" or "image"."""
    payload: str
    """Key of the media member: "mp4", "jpg", or the source extension in passthrough mode."""
    source: str
    """Absolute path of the source file."""
    source_sha256: str
    """SHA-256 of the whole source file (finds the same content under two names)."""
    index: int
    """Clip number within the source (0 for images and passthrough samples)."""
    start_frame: int
    """Index of the clip's first frame in the source's own frame sequence."""
    start_time: float
    """Seconds from the start of the source to the clip's first frame."""
    fps: float
    """Frame rate of the payload (the target fps, or the source's for passthrough)."""
    num_frames: int
    """Frames in the payload (1 for images)."""
    width: int
    height: int
    sha256: str
    """SHA-256 of the payload bytes; ``verify`` checks it."""
    passthrough: bool = False
    """True when the payload holds the source's original bytes."""

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"SampleMeta.kind must be one of {KINDS}, got {self.kind!r}")
        if self.num_frames < 1 or self.width < 1 or self.height < 1:
            raise ValueError(f"SampleMeta sizes must be positive, got {self}")

    def to_json(self) -> bytes:
        return json.dumps(dataclasses.asdict(self), sort_keys=True).encode("utf-8")

    @classmethod
    def from_json(cls, data: bytes | str | dict[str, Any]) -> SampleMeta:
        """Parses a ``json`` member; ``ValueError`` for missing or unknown fields."""
        if not isinstance(data, dict):
            data = json.loads(data)
        try:
            return _from_dict(cls, data)
        except TypeError as exc:  # missing required fields
            raise ValueError(f"SampleMeta: {exc}") from exc


@dataclass(frozen=True, kw_only=True)
class ShardEntry:
    name: str
    """File name inside the dataset folder."""
    kind: Kind
    num_samples: int
    bytes: int


@dataclass(frozen=True, kw_only=True)
class SourceEntry:
    path: str
    num_clips: int
    """Samples of this source in the shards (1 for an image or a passthrough video)."""
    complete: bool = True
    """False when the run stopped (full disk) before all of the source's clips were written."""
    note: str = ""
    """Why a source gave fewer clips than its length suggests (e.g. decoding stopped early)."""


@dataclass(frozen=True, kw_only=True)
class SkipEntry:
    path: str
    reason: str


@dataclass(kw_only=True)
class Manifest:
    """``manifest.json``: accounts for every input of a (possibly multi-node) sharding run."""

    format_version: int = FORMAT_VERSION
    settings: dict[str, Any] = field(default_factory=dict)
    """The settings every node ran with (clip length, fps, size, codec, shard size, nodes)."""
    num_nodes: int = 1
    nodes_done: list[int] = field(default_factory=list)
    """Node ranks whose part is merged in; the manifest is complete when all are."""
    shards: list[ShardEntry] = field(default_factory=list)
    sources: list[SourceEntry] = field(default_factory=list)
    skipped: list[SkipEntry] = field(default_factory=list)
    num_ignored_files: int = 0
    """Files inside input folders whose extension is neither video nor image."""

    @property
    def complete(self) -> bool:
        return sorted(self.nodes_done) == list(range(self.num_nodes))

    def totals(self) -> dict[str, int]:
        by_kind = {
            kind: sum(s.num_samples for s in self.shards if s.kind == kind) for kind in KINDS
        }
        # A source cut short (full disk) is in both lists: it counts once, as skipped.
        complete = sum(1 for s in self.sources if s.complete)
        return {
            "num_inputs": complete + len(self.skipped),
            "num_sources": len(self.sources),
            "num_skipped": len(self.skipped),
            "num_shards": len(self.shards),
            "num_samples": sum(s.num_samples for s in self.shards),
            "num_video_clips": by_kind["video"],
            "num_images": by_kind["image"],
            "bytes": sum(s.bytes for s in self.shards),
        }

    def shard_paths(self, directory: str, kind: Kind) -> list[str]:
        return [os.path.join(directory, s.name) for s in self.shards if s.kind == kind]

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["complete"] = self.complete
        data["totals"] = self.totals()
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Manifest:
        data = {k: v for k, v in data.items() if k not in ("complete", "totals")}
        version = data.get("format_version")
        if version != FORMAT_VERSION:
            raise ValueError(f"manifest format_version {version} is not {FORMAT_VERSION}")
        manifest = _from_dict(cls, data)
        manifest.shards = [_from_dict(ShardEntry, s) for s in manifest.shards]
        manifest.sources = [_from_dict(SourceEntry, s) for s in manifest.sources]
        manifest.skipped = [_from_dict(SkipEntry, s) for s in manifest.skipped]
        return manifest


def read_manifest(directory: str) -> Manifest:
    """Reads ``DIR/manifest.json``; ``ValueError`` naming the file when it is missing or invalid."""
    path = os.path.join(directory, MANIFEST_NAME)
    try:
        with open(path, encoding="utf-8") as f:
            return Manifest.from_dict(json.load(f))
    except (OSError, json.JSONDecodeError, TypeError) as exc:
        raise ValueError(f"cannot read {path}: {exc}") from exc


def write_json_atomic(path: str, data: Any) -> None:
    """Writes JSON under a temporary name, fsyncs and renames: readers never see half a file."""
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=1, sort_keys=True)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
