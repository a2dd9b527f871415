"""``python -m data_prep verify DIR``: read every shard back and check it against the manifest.

Checks: each manifest shard exists with its recorded size and sample count; every sample has valid
metadata, its payload, the payload's SHA-256 and the key its metadata implies; no key appears
twice; per-source clip counts match; no stray shards; and a seeded sample of clips decodes to the
frame count and size their metadata claims.
"""

from __future__ import annotations

import hashlib
import io
import os
import random
import tarfile
from collections import Counter
from dataclasses import dataclass, field

import av
import numpy as np
from PIL import Image

from data_prep.format import (
    JOURNAL_DIR,
    META_KEY,
    Manifest,
    SampleMeta,
    ShardEntry,
    parse_shard_name,
    read_manifest,
    sample_key,
)
from data_prep.manifest import merge_parts
from data_prep.video_io import decord


@dataclass
class VerifyReport:
    directory: str
    manifest: Manifest | None = None
    num_samples: int = 0
    num_decoded: int = 0
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def summary(self) -> str:
        lines = [
            f"{self.directory}: read {self.num_samples} samples, decoded {self.num_decoded}",
        ]
        if self.manifest is not None:
            lines.append(f"manifest totals: {self.manifest.totals()}")
        lines += [f"PROBLEM: {p}" for p in self.problems[:50]]
        if len(self.problems) > 50:
            lines.append(f"... and {len(self.problems) - 50} more problems")
        lines.append("OK" if self.ok else f"FAILED: {len(self.problems)} problems")
        return "\n".join(lines)


def decode_frames(meta: SampleMeta, payload: bytes) -> tuple[int, int, int]:
    """(frames, height, width) of a payload, decoded in full (decord, else PyAV for video)."""
    if meta.kind == "image":
        with Image.open(io.BytesIO(payload)) as image:
            image.load()
            return 1, image.height, image.width
    if decord is not None:
        try:
            reader = decord.VideoReader(io.BytesIO(payload), num_threads=1)
            frames = reader.get_batch(list(range(len(reader)))).asnumpy()
            return frames.shape[0], frames.shape[1], frames.shape[2]
        except Exception:  # decord 0.6.0 fails on some small widths and on Ogg: ask PyAV
            pass
    with av.open(io.BytesIO(payload)) as container:
        frames = [f.to_ndarray(format="rgb24", threads=1) for f in container.decode(video=0)]
    return len(frames), *np.asarray(frames[0]).shape[:2]


def _check_sample(key: str, members: dict[str, bytes], decode: bool, report: VerifyReport):
    """Checks one sample; returns its SampleMeta or None."""
    try:
        meta = SampleMeta.from_json(members[META_KEY])
    except (KeyError, ValueError) as exc:
        report.problems.append(f"{key}: bad or missing metadata ({exc})")
        return None
    payload = members.get(meta.payload)
    if payload is None:
        report.problems.append(f"{key}: no {meta.payload!r} member (has {sorted(members)})")
        return meta
    if hashlib.sha256(payload).hexdigest() != meta.sha256:
        report.problems.append(f"{key}: payload SHA-256 differs from its metadata")
    if key != sample_key(meta.source, meta.index):
        report.problems.append(f"{key}: key does not match {meta.source} clip {meta.index}")
    if decode:
        try:
            frames, height, width = decode_frames(meta, payload)
            report.num_decoded += 1
            if (height, width) != (meta.height, meta.width) or (
                not meta.passthrough and frames != meta.num_frames
            ):
                report.problems.append(
                    f"{key}: decoded {frames}x{height}x{width}, metadata says "
                    f"{meta.num_frames}x{meta.height}x{meta.width}"
                )
        except Exception as exc:
            report.problems.append(f"{key}: does not decode ({type(exc).__name__}: {exc})")
    return meta


def _read_shard(path: str, decode_at: set[int], report: VerifyReport, seen: Counter):
    """Yields the SampleMeta of each sample of one shard, in order."""
    position, key, members = 0, None, {}

    def flush():
        nonlocal position
        meta = _check_sample(key, members, position in decode_at, report)
        seen[key] += 1
        position += 1
        return meta

    with tarfile.open(path, mode="r|") as tar:
        for info in tar:
            if not info.isfile():
                continue
            member_key, _, extension = info.name.partition(".")
            if key is not None and member_key != key:
                yield flush()
                members = {}
            key = member_key
            members[extension] = tar.extractfile(info).read()
    if key is not None:
        yield flush()


def verify(directory: str, num_decode: int = 32, seed: int = 0) -> VerifyReport:
    """Checks the dataset in ``directory`` (merging node parts first, if any)."""
    report = VerifyReport(directory)
    _merge_node_parts(directory, report)
    try:
        manifest = report.manifest = read_manifest(directory)
    except ValueError as exc:
        report.problems.append(str(exc))
        return report
    if not manifest.complete:
        missing = sorted(set(range(manifest.num_nodes)) - set(manifest.nodes_done))
        report.problems.append(f"the manifest lacks nodes {missing}: their runs did not finish")
    total = sum(s.num_samples for s in manifest.shards)
    chosen = sorted(random.Random(seed).sample(range(total), min(num_decode, total)))
    seen: Counter = Counter()
    clips_per_source: Counter = Counter()
    offset = 0
    for shard in manifest.shards:
        decode_at = {i - offset for i in chosen if offset <= i < offset + shard.num_samples}
        offset += shard.num_samples
        _check_shard(directory, shard, decode_at, report, seen, clips_per_source)
    report.problems += [f"{key}: in the shards {n} times" for key, n in seen.items() if n > 1]
    _check_sources(manifest, clips_per_source, report)
    _check_stray_shards(directory, manifest, report)
    return report


def _merge_node_parts(directory: str, report: VerifyReport) -> None:
    """Rebuilds manifest.json from the node parts, where there are any."""
    journal_dir = os.path.join(directory, JOURNAL_DIR)
    if os.path.isdir(journal_dir) and any(n.startswith("part-n") for n in os.listdir(journal_dir)):
        try:
            merge_parts(directory)
        except (ValueError, OSError) as exc:
            report.problems.append(f"cannot merge the node parts: {exc}")


def _check_shard(
    directory: str,
    shard: ShardEntry,
    decode_at: set[int],
    report: VerifyReport,
    seen: Counter,
    clips_per_source: Counter,
) -> None:
    """Checks one manifest shard: present, its size, its samples; counts them per source."""
    path = os.path.join(directory, shard.name)
    if not os.path.isfile(path):
        report.problems.append(f"{shard.name}: missing")
        return
    if os.path.getsize(path) != shard.bytes:
        report.problems.append(
            f"{shard.name}: {os.path.getsize(path)} bytes, manifest says {shard.bytes}"
        )
    count = 0
    try:
        for meta in _read_shard(path, decode_at, report, seen):
            count += 1
            if meta is not None:
                clips_per_source[meta.source] += 1
    except (tarfile.TarError, OSError) as exc:
        report.problems.append(f"{shard.name}: unreadable after {count} samples ({exc})")
    report.num_samples += count
    if count != shard.num_samples:
        report.problems.append(f"{shard.name}: {count} samples, manifest says {shard.num_samples}")


def _check_sources(manifest: Manifest, clips_per_source: Counter, report: VerifyReport) -> None:
    """Each source's sample count in the shards against the manifest's, both ways."""
    for source in manifest.sources:
        if clips_per_source[source.path] != source.num_clips:
            report.problems.append(
                f"{source.path}: {clips_per_source[source.path]} samples in the shards, "
                f"manifest says {source.num_clips}"
            )
    listed = {s.path for s in manifest.sources}
    report.problems += [
        f"{path}: {n} samples in the shards but not in the manifest's sources"
        for path, n in clips_per_source.items()
        if path not in listed
    ]


def _check_stray_shards(directory: str, manifest: Manifest, report: VerifyReport) -> None:
    """Shard files in ``directory`` that the manifest does not list."""
    named = {s.name for s in manifest.shards}
    report.problems += [
        f"{name}: a shard file the manifest does not list"
        for name in sorted(os.listdir(directory))
        if parse_shard_name(name) is not None and name not in named
    ]
