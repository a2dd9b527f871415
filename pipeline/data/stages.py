"""The stages of the loader's ``wds.DataPipeline``: shard sources, sample decoding, batching,
interleaving image and video batches, and the per-worker counters that ride along with batches.
"""

from __future__ import annotations

import hashlib
import logging
import math
import random
from collections.abc import Iterable, Iterator

import torch

from data_prep.format import META_KEY, Kind, SampleMeta
from pipeline.data.decode import (
    Backend,
    Crop,
    TooShort,
    crop_to_square,
    decode_image,
    decode_window,
    stack_clips,
)
from pipeline.distributed.world import World

logger = logging.getLogger(__name__)

STAT_NAMES = (
    "samples",
    "batches",
    "bad_undecodable",
    "bad_too_short",
    "bad_missing_key",
    "bad_metadata",
    "bad_wrong_kind",
    "bad_shard",
)
_MAX_WARNINGS = 20


def reader_seed(base_seed: int, epoch: int, world: World) -> int:
    """Seed of one reader (rank, worker) in one epoch: differs across all three, else stable."""
    text = f"{base_seed}/{epoch}/{world.rank}/{world.worker_id}"
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "big")


class WorkerStats:
    """Counters of one worker; ``snapshot()`` goes into every batch so the main process can sum
    them without any side channel."""

    def __init__(self, max_consecutive_errors: int) -> None:
        self.counts = dict.fromkeys(STAT_NAMES, 0)
        self.max_consecutive_errors = max_consecutive_errors
        self._consecutive = 0
        self._warnings = 0

    def good(self) -> None:
        self.counts["samples"] += 1
        self._consecutive = 0

    def bad(self, name: str, where: str, exc: BaseException) -> None:
        self.counts[name] += 1
        self._consecutive += 1
        if self._warnings < _MAX_WARNINGS:
            self._warnings += 1
            logger.warning("skipping %s (%s): %s: %s", where, name, type(exc).__name__, exc)
        if self._consecutive > self.max_consecutive_errors:
            # Endless bad data would look like a hung run; say so instead.
            raise RuntimeError(
                f"{self._consecutive} bad samples or shards in a row (last: {where}: {exc}); "
                "check the shard list"
            ) from exc

    def shard_error(self, exc: BaseException) -> bool:
        """WebDataset handler: count and warn about an unreadable or truncated tar, go on."""
        self.bad("bad_shard", "shard", exc)
        return True

    def snapshot(self) -> dict[str, int]:
        return dict(self.counts)


def ordered_shards(urls: list[str], world: World) -> Iterator[dict]:
    """Evaluation: split shards by rank, then by worker; each shard is read by one reader."""
    for url in urls[world.rank :: world.world_size][world.worker_id :: world.num_workers]:
        yield {"url": url}


def resampled_shards(urls: list[str], rng: random.Random) -> Iterator[dict]:
    """Training: endless draws with replacement, so no reader waits for a shard of its own even
    with fewer shards than ranks x workers; readers differ by their seeds."""
    while True:
        yield {"url": rng.choice(urls)}


def decode_samples(
    samples: Iterable[dict],
    *,
    kind: Kind,
    num_frames: int,
    frame_stride: int,
    size: int,
    crop: Crop,
    flip: bool,
    random_start: bool,
    backend: Backend,
    rng: random.Random,
    stats: WorkerStats,
) -> Iterator[dict]:
    """Raw tar samples -> {"pixels": uint8 (T, H, W, C), (H, W, C) or ``Yuv420`` planes (the
    PyAV backend), "flip": bool, "key": str}; bad samples are counted and dropped. Flips are
    drawn here and applied on the training side (``Batch.pixels``), with the conversion."""
    for sample in samples:
        where = f"{sample.get('__url__', '?')}:{sample.get('__key__', '?')}"
        try:
            meta = SampleMeta.from_json(sample[META_KEY])
            payload = sample[meta.payload]
        except KeyError as exc:
            stats.bad("bad_missing_key", where, exc)
            continue
        except ValueError as exc:  # unparsable JSON or fields that are not SampleMeta's
            stats.bad("bad_metadata", where, exc)
            continue
        if meta.kind != kind:
            stats.bad("bad_wrong_kind", where, ValueError(f"a {meta.kind} among {kind}s"))
            continue
        try:
            if kind == "video":
                frames = decode_window(
                    payload,
                    num_frames,
                    frame_stride,
                    None if random_start else 0,
                    rng,
                    backend,
                    meta.fps,
                    planar=True,
                )
            else:
                frames = decode_image(payload)
            pixels = crop_to_square(frames, size, crop, rng)  # (T,) H, W, C or planes
            flipped = flip and rng.random() < 0.5
        except TooShort as exc:
            stats.bad("bad_too_short", where, exc)
            continue
        except Exception as exc:  # any decoder failure is the sample's problem, not the run's
            stats.bad("bad_undecodable", where, exc)
            continue
        stats.good()
        yield {"pixels": pixels, "flip": flipped, "key": sample["__key__"]}


def collate(samples: list[dict], *, kind: Kind, stats: WorkerStats, world: World) -> dict:
    """Stacks a batch: the one copy of the pixels in the worker. RGB becomes (B, C, T, H, W) or
    (B, C, H, W) with channels-last strides (see ``data_decode``); planes become ``Yuv420``
    with (B, T) leading dims. A batch mixing both (passthrough clips of other pixel formats)
    is converted to RGB here."""
    stats.counts["batches"] += 1
    in_worker = torch.utils.data.get_worker_info() is not None  # the batch leaves the process
    frames = stack_clips([s["pixels"] for s in samples], shared=in_worker)
    return {
        "kind": kind,
        "frames": frames,
        "flip": [s["flip"] for s in samples],  # a list: a tensor would cost a shared segment
        "keys": [s["key"] for s in samples],
        "stats": stats.snapshot(),
        "worker": world.worker_id,
    }


def interleave(
    video_batches: Iterator[dict] | None, image_batches: Iterator[dict] | None, image_ratio: float
) -> Iterator[dict]:
    """Training: image batches at ``image_ratio`` of the steps, evenly spread (batch i is an
    image batch when floor((i + 1) r) > floor(i r)); shapes differ, so batches are never mixed."""
    step = 0
    while True:
        is_image = math.floor((step + 1) * image_ratio) > math.floor(step * image_ratio)
        yield next(image_batches if is_image else video_batches)
        step += 1


def chain(*streams: Iterator[dict] | None) -> Iterator[dict]:
    """Evaluation: every video batch, then every image batch."""
    for stream in streams:
        if stream is not None:
            yield from stream
