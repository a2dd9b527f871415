"""The streaming loader: WebDataset shards -> batches of clips (B, C, T, H, W) in [-1, 1].

Per data-loader worker the stages are (``wds.DataPipeline``)::

    shard urls (train: resampled with a per-reader seed; eval: split by rank, then by worker)
      -> tar samples (an unreadable or truncated tar is counted, warned about and skipped)
      -> shuffle buffer (train)
      -> decode only the sampled window from the in-memory mp4, crop, draw the flip
                          uint8 (T, H, W, C), or 4:2:0 planes (T, H, W) + (T, 2, H/2, W/2) (PyAV)
      -> batch            uint8 (B, C, T, H, W), a view of (B, T, H, W, C); or planes (B, T, ...)
      -> images and videos interleaved by ratio (train) or one after the other (eval)
      -> with_epoch(steps_per_epoch / workers) (train)

Batches cross the worker boundary as uint8 and become float RGB in [-1, 1] on the training side
(``Batch.pixels``), where the colour conversion of planes and the flips run on the device.
Every epoch and every rank/worker gets its own seed, and a resumed run (``load_state_dict``)
starts the next epoch's seeds, so it never replays what it saw.
"""

from __future__ import annotations

import dataclasses
import glob
import logging
import math
import os
import random
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from functools import partial
from typing import Any

import braceexpand
import torch
import webdataset as wds

from data_prep.format import Kind, read_manifest
from pipeline.data.decode import Backend, Crop, Yuv420, to_pixels, to_uint8
from pipeline.data.stages import (
    STAT_NAMES,
    WorkerStats,
    chain,
    collate,
    decode_samples,
    interleave,
    ordered_shards,
    reader_seed,
    resampled_shards,
)
from pipeline.data.tar_stream import tar_samples
from pipeline.distributed.signals import ignore_stop_signals
from pipeline.distributed.world import World

logger = logging.getLogger(__name__)

_CROPS = ("random", "center", "resize")
_MODES = ("train", "eval")
_BACKENDS = ("decord", "pyav")


@dataclass(frozen=True, kw_only=True)
class DataConfig:
    video_shards: tuple[str, ...] = ()
    """Video shards: dataset folders (their manifest lists the shards), tar paths, globs or
    brace patterns such as ``data/clips-n0000-w000-{000000..000009}.tar``."""
    image_shards: tuple[str, ...] = ()
    """Image shards, in the same forms (for the image stage and mixed training)."""
    image_batch_ratio: float = 0.0
    """Fraction of training batches that are image batches (0: videos only, 1: images only)."""
    num_frames: int = 17
    """Frames per clip; must be 1 + k * time_compression (the tokenizer's causal first frame)."""
    time_compression: int = 4
    """The tokenizer's temporal downsampling factor f."""
    frame_stride: int = 1
    """Take every n-th frame of the stored clip (a lower effective frame rate)."""
    image_size: int = 128
    """Training frames are image_size x image_size."""
    crop: Crop = "random"
    """"random" or "center" crop after resizing the short side, or "resize" the whole frame.
    Evaluation uses "center" in place of "random"."""
    flip: bool = True
    """Random horizontal flips (training only)."""
    micro_batch_size: int = 4
    """Video clips per batch, per rank."""
    image_batch_size: int | None = None
    """Images per image batch; None = micro_batch_size."""
    num_workers: int = 2
    """Data-loader worker processes per rank; 0 loads in the training process."""
    shuffle_buffer: int = 256
    """Samples (still encoded, a few tens of KB each) held for shuffling, per worker."""
    mode: str = "train"
    """"train": resampled shards, random windows and crops, endless. "eval": every sample once
    across ranks and workers, in order, first window, center crop."""
    steps_per_epoch: int = 1000
    """Training batches per rank between reseeds (``with_epoch``; the loader itself is endless)."""
    seed: int | None = None
    """Base seed; None draws one from os.urandom (kept in state_dict, so resumes stay fresh)."""
    backend: Backend = "pyav"
    """Decoder for video windows: "pyav" (hands over the stream's 4:2:0 planes, converted on
    the device: 1.25x decord's clips/s per worker, 148 vs 118, in the README's Performance
    table) or "decord" (RGB; where decord is not installed, PyAV decodes)."""
    pin_memory: bool = False
    prefetch_factor: int = 2
    max_consecutive_errors: int = 1000
    """Bad samples/shards in a row before a worker gives up with an error instead of spinning."""

    def __post_init__(self) -> None:
        f = self.time_compression
        if f < 1 or self.num_frames < 1 or (self.num_frames - 1) % f:
            raise ValueError(
                f"num_frames must be 1 + k * time_compression ({f}), e.g. 1, "
                f"{1 + f}, {1 + 4 * f}; got {self.num_frames}"
            )
        for name in (
            "frame_stride",
            "image_size",
            "micro_batch_size",
            "steps_per_epoch",
            "shuffle_buffer",
            "prefetch_factor",
            "max_consecutive_errors",
        ):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.image_batch_size is not None and self.image_batch_size < 1:
            raise ValueError(
                f"image_batch_size must be positive or None, got {self.image_batch_size}"
            )
        if self.num_workers < 0:
            raise ValueError(f"num_workers must be >= 0, got {self.num_workers}")
        for name, allowed in (("crop", _CROPS), ("mode", _MODES), ("backend", _BACKENDS)):
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} must be one of {allowed}, got {getattr(self, name)!r}")
        if not 0.0 <= self.image_batch_ratio <= 1.0:
            raise ValueError(f"image_batch_ratio must be in [0, 1], got {self.image_batch_ratio}")
        if self.image_batch_ratio < 1.0 and not self.video_shards:
            raise ValueError("video_shards is empty but image_batch_ratio < 1 asks for videos")
        if self.image_batch_ratio > 0.0 and not self.image_shards:
            raise ValueError("image_shards is empty but image_batch_ratio > 0 asks for images")

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> DataConfig:
        """From YAML; unknown keys are errors, lists become tuples."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ValueError(f"unknown data config keys {unknown}; known: {sorted(names)}")
        fixed = {k: tuple(v) if isinstance(v, list) else v for k, v in data.items()}
        return cls(**fixed)


def resolve_shards(
    specs: tuple[str, ...], kind: Kind, *, require_existing: bool = False
) -> list[str]:
    """Expands folders (via manifest.json), globs and brace patterns into a list of shard paths.
    URLs (``s3://``, ``pipe:``) are passed on. A local file that does not exist is kept (the
    loader skips and counts it) unless `require_existing`, the trainer's pre-flight check."""
    urls: list[str] = []
    for spec in specs:
        if "://" in spec or spec.startswith("pipe:"):
            urls.append(spec)
        elif os.path.isdir(spec):
            manifest = read_manifest(spec)
            if not manifest.complete:
                logger.warning("%s: manifest lacks some nodes; using the shards it lists", spec)
            urls += manifest.shard_paths(spec, kind)
        elif "{" in spec:
            urls += list(braceexpand.braceexpand(spec))
        elif any(c in spec for c in "*?["):
            urls += sorted(glob.glob(spec))
        elif os.path.isfile(spec) or not require_existing:
            urls.append(spec)
        else:
            raise ValueError(f"no {kind} shards found: {spec} does not exist")
    if not urls:
        raise ValueError(f"no {kind} shards found in {specs}")
    return urls


class ShardDataset(torch.utils.data.IterableDataset):
    """Builds the per-worker pipeline when iterated (inside the worker, which then knows its id)."""

    def __init__(
        self, config: DataConfig, world: World, urls: dict[Kind, list[str]], seed: int
    ) -> None:
        super().__init__()
        self.config, self.world, self.urls, self.seed = config, world, urls, seed
        self.epoch = 0
        """Set by the loader before each epoch; workers receive a copy when they start."""

    def _stream(self, kind: Kind, world: World, seed: int, stats) -> Iterator[dict]:
        config, train = self.config, self.config.mode == "train"
        rng = random.Random(f"{seed}/{kind}")
        urls = self.urls[kind]
        source = (
            partial(resampled_shards, urls, random.Random(f"{seed}/{kind}/shards"))
            if train
            else partial(ordered_shards, urls, world)
        )
        batch_size = config.micro_batch_size
        if kind == "image":
            batch_size = config.image_batch_size or config.micro_batch_size
        stages = [
            source,
            partial(tar_samples, handler=stats.shard_error),
            wds.shuffle(config.shuffle_buffer, initial=config.shuffle_buffer, rng=rng)
            if train
            else None,
            partial(
                decode_samples,
                kind=kind,
                num_frames=config.num_frames,
                frame_stride=config.frame_stride,
                size=config.image_size,
                crop="center" if not train and config.crop == "random" else config.crop,
                flip=train and config.flip,
                random_start=train,
                backend=config.backend,
                rng=rng,
                stats=stats,
            ),
            wds.batched(
                batch_size,
                collation_fn=partial(collate, kind=kind, stats=stats, world=world),
                partial=not train,
            ),
        ]
        return iter(wds.DataPipeline(*stages))

    def __iter__(self) -> Iterator[dict]:
        config, world = self.config, self.world.in_worker()
        seed = reader_seed(self.seed, self.epoch, world)
        stats = WorkerStats(config.max_consecutive_errors)
        streams = {
            kind: self._stream(kind, world, seed, stats) if self.urls.get(kind) else None
            for kind in ("video", "image")
        }
        if config.mode == "eval":
            yield from chain(streams["video"], streams["image"])
            # Counters travel with batches; samples skipped after the last batch (or in a worker
            # that made none) would be lost, and evaluation reports them.
            yield {"kind": None, "keys": [], "stats": stats.snapshot(), "worker": world.worker_id}
            return
        batches = partial(interleave, streams["video"], streams["image"], config.image_batch_ratio)
        per_worker = math.ceil(config.steps_per_epoch / world.num_workers)
        yield from wds.DataPipeline(batches).with_epoch(per_worker)


@dataclass
class Batch:
    kind: Kind
    frames: torch.Tensor | Yuv420
    """uint8 as the workers sent it: RGB (B, C, T, H, W) for videos, (B, C, H, W) for images,
    a channels-last view (the workers skip the transpose); or ``Yuv420`` planes with (B, T)
    leading dims (the PyAV backend). ``pixels()`` makes float RGB of either."""
    keys: list[str]
    flip: torch.Tensor | None = None
    """(B,) bool: horizontal flips that ``pixels()`` applies; None for none."""
    worker: int = 0
    """The data-loader worker that made the batch."""

    def pixels(self, device: torch.device | str | None = None, dtype=torch.float32) -> torch.Tensor:
        """RGB in [-1, 1], (B, C, T, H, W) or (B, C, H, W), contiguous. Moved first, so only
        uint8 travels to the device, where the colour conversion, the flips and the transpose
        to channels-first happen."""
        frames = self.frames if device is None else self.frames.to(device, non_blocking=True)
        pixels = to_pixels(frames)
        if self.flip is not None and bool(self.flip.any()):
            flipped = self.flip.nonzero().squeeze(1).to(pixels.device)
            pixels[flipped] = pixels[flipped].flip(-1)
        return pixels.to(dtype).contiguous()

    @property
    def uint8(self) -> torch.Tensor:
        """RGB uint8 (B, C, T, H, W) or (B, C, H, W), as ``pixels()`` sees it: for logs, tests."""
        return to_uint8(self.pixels())


def _init_worker(_: int) -> None:
    torch.set_num_threads(1)  # one core per worker; decoding is single-threaded too
    ignore_stop_signals()  # SLURM signals every process: the rank saves, then ends the workers


class ShardLoader:
    """Iterable of ``Batch``: endless in training, one pass in evaluation; checkpointable."""

    def __init__(self, config: DataConfig, world: World | None = None) -> None:
        self.config = config
        self.world = world if world is not None else World.from_env()
        self.urls: dict[Kind, list[str]] = {}
        if config.video_shards and config.image_batch_ratio < 1.0:
            self.urls["video"] = resolve_shards(config.video_shards, "video")
        if config.image_shards and (config.image_batch_ratio > 0.0 or config.mode == "eval"):
            self.urls["image"] = resolve_shards(config.image_shards, "image")
        seed = config.seed if config.seed is not None else int.from_bytes(os.urandom(8), "big")
        self.dataset = ShardDataset(config, self.world, self.urls, seed)
        self.epoch = 0
        self.samples_seen = 0
        self.batches_seen = 0
        self._in_epoch = False
        self._stats_before: Counter = Counter()
        """Worker counters of finished epochs (and of runs before a resume)."""
        self._stats_now: dict[int, dict[str, int]] = {}
        """Latest counters per worker in the running epoch."""

    @property
    def seed(self) -> int:
        return self.dataset.seed

    def __iter__(self) -> Iterator[Batch]:
        while True:
            if self._in_epoch and self.config.mode == "train":
                self.epoch += 1  # an earlier iterator stopped mid-epoch: never replay its start
            yield from self._one_epoch()
            if self.config.mode == "eval":
                return
            self.epoch += 1

    def _one_epoch(self) -> Iterator[Batch]:
        self.dataset.epoch = self.epoch
        self._fold_stats()  # an abandoned epoch's counters too
        self._in_epoch = True
        workers = self.config.num_workers
        loader = torch.utils.data.DataLoader(
            self.dataset,
            batch_size=None,
            num_workers=workers,
            pin_memory=self.config.pin_memory,
            worker_init_fn=_init_worker if workers else None,
            prefetch_factor=self.config.prefetch_factor if workers else None,
        )
        for raw in loader:
            self._stats_now[raw["worker"]] = raw["stats"]
            if raw["kind"] is None:  # a worker's final counters, no pixels
                continue
            self.samples_seen += len(raw["keys"])
            self.batches_seen += 1
            flip = torch.tensor(raw["flip"])
            yield Batch(raw["kind"], raw["frames"], raw["keys"], flip, raw["worker"])
        self._in_epoch = False
        self._fold_stats()

    def _fold_stats(self) -> None:
        for counts in self._stats_now.values():
            self._stats_before.update(counts)
        self._stats_now = {}

    @property
    def stats(self) -> dict[str, int]:
        """Counters summed over this rank's workers and epochs (samples, batches, bad_*): log
        them, e.g. ``writer.add_scalar(f"data/{k}", v, step)``."""
        total = Counter({name: 0 for name in STAT_NAMES})
        total.update(self._stats_before)
        for counts in self._stats_now.values():
            total.update(counts)
        return dict(total)

    def state_dict(self) -> dict[str, Any]:
        return {
            "seed": self.seed,
            "epoch": self.epoch,
            "samples_seen": self.samples_seen,
            "batches_seen": self.batches_seen,
            "stats": self.stats,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continues a checkpointed run: same base seed, the next epoch's seeds (fresh samples,
        not a replay of the interrupted epoch), counters carried on."""
        self.dataset.seed = int(state["seed"])
        self.epoch = int(state["epoch"]) + 1
        self.samples_seen = int(state["samples_seen"])
        self.batches_seen = int(state["batches_seen"])
        self._stats_before = Counter(state.get("stats", {}))
        self._stats_now = {}
        self._in_epoch = False
