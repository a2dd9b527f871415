"""Token export: clip shards -> token shards, on every rank of a distributed job; and single files.

    torchrun --nproc_per_node 8 -m pipeline.tokenize --checkpoint runs/base/export \\
        --shards /data/shards --output /data/tokens
    python -m pipeline.tokenize encode-file talk.mp4 talk.npz --checkpoint runs/base/export
    python -m pipeline.tokenize decode-file talk.npz talk_recon.mp4 --checkpoint runs/base/export

Clip shard i goes to rank i mod world size, and becomes ``tokens-<its name>`` in the output
folder (format: data_prep/token_format.py). Each clip is decoded whole (its first 1 + k*f
frames), resized and cropped like evaluation clips, and encoded in `--precision` (bf16 autocast
on CUDA and fp32 elsewhere by default, as `encode-file`; recorded in the settings). A token
shard is written under a temporary name and renamed when complete, after its record in
``.records/``; a rerun skips finished shards, so an interrupted export resumes where it stopped.
Rank 0 writes ``manifest.json`` at the end, once every rank is done: ranks that finish early
wait up to `--finish-timeout-hours` for the others (one rank may have more or longer shards),
not the process group's timeout. The output folder must be shared by all nodes.
"""

from __future__ import annotations

import argparse
import dataclasses
import io
import json
import logging
import os
import random
import sys
import tarfile
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
import webdataset as wds

from data_prep.format import CLIP_PAYLOAD, META_KEY, SampleMeta, write_json_atomic
from data_prep.token_format import (
    CODES_KEY,
    RECORDS_DIR,
    TokenManifest,
    TokenMeta,
    TokenShardEntry,
    codes_dtype,
    token_shard_name,
)
from model import VideoTokenizer
from model.pretrained import WEIGHTS_NAME
from model.streaming import check_chunk_frames
from pipeline.commands import command_name
from pipeline.data.decode import (
    Yuv420,
    clip_size,
    crop_to_square,
    decode_image,
    decode_window,
    stack_clips,
    to_pixels,
)
from pipeline.data.loader import resolve_shards
from pipeline.distributed.collectives import (
    barrier,
    device_for,
    init_distributed,
    new_wait_group,
    teardown,
)
from pipeline.distributed.world import World
from pipeline.inference.arguments import (
    add_checkpoint_and_shards,
    add_frame_arguments,
    add_precision_argument,
)
from pipeline.inference.export import file_sha256, load_tokenizer, resolve_export_dir, usable_frames
from pipeline.inference.precision import inference_precision, resolve_precision
from pipeline.logs import progress_bar, setup_logging

logger = logging.getLogger(__name__)

SETTINGS_NAME = ".settings.json"
MANIFEST_NAME = "manifest.json"
_FILE_COMMANDS = ("encode-file", "decode-file")


class ShardError(ValueError):
    """A clip shard that is not what data_prep writes (missing members, unreadable tar)."""


def read_clip_samples(path: str) -> Iterator[tuple[str, SampleMeta, bytes]]:
    """(key, metadata, payload) of every sample of a clip shard, in order."""
    try:
        for sample in wds.tarfile_to_samples()(iter([{"url": path}])):
            key = sample["__key__"]
            members = sorted(k for k in sample if not k.startswith("__"))
            if META_KEY not in sample:
                raise ShardError(
                    f"{path}: sample {key!r} has members {members}, expected '{key}.{META_KEY}' "
                    f"(SampleMeta, data_prep/format.py) and its payload ('{key}.{CLIP_PAYLOAD}')"
                )
            meta = SampleMeta.from_json(sample[META_KEY])
            if meta.payload not in sample:
                raise ShardError(
                    f"{path}: sample {key!r} has members {members}, expected its payload "
                    f"'{key}.{meta.payload}' next to '{key}.{META_KEY}'"
                )
            yield key, meta, sample[meta.payload]
    except (tarfile.TarError, OSError) as exc:
        raise ShardError(f"{path}: not a readable tar shard ({exc})") from exc


@dataclasses.dataclass(frozen=True, kw_only=True)
class ExportSettings:
    image_size: int
    """Frames are resized and cropped to this size (see `crop`)."""
    crop: str
    """"center": short side to image_size, then a center square; "resize": the whole frame
    squeezed to image_size x image_size."""
    max_frames: int | None
    """Frames of a clip to encode at most (None: all its 1 + k*f frames)."""
    chunk_frames: int | None
    """encode_long chunk size (None: each clip in one piece)."""
    batch_size: int
    precision: str


class ClipEncoder:
    """Decodes, crops and encodes clips in batches of equally shaped clips."""

    def __init__(self, model: VideoTokenizer, settings: ExportSettings, device: torch.device):
        self.model, self.settings, self.device = model, settings, device
        self.dtype = codes_dtype(model.codebook_size)
        self._rng = random.Random(0)  # unused: windows start at frame 0

    def frames(self, meta: SampleMeta, payload: bytes) -> torch.Tensor | Yuv420:
        """The cropped clip as the training loader makes it (the same pixels, so the same
        tokens): 4:2:0 planes (T, ...) or uint8 RGB (T, H, W, C); raises for undecodable or
        empty payloads."""
        s = self.settings
        if meta.kind == "image":
            frames = decode_image(payload)[None]
        else:
            available = min(meta.num_frames, s.max_frames or meta.num_frames)
            count = usable_frames(available, self.model.time_downsample_factor)
            frames = decode_window(payload, count, 1, 0, self._rng, "pyav", meta.fps, planar=True)
        return crop_to_square(frames, s.image_size, s.crop, None)

    def encode(self, batch: list[torch.Tensor | Yuv420]) -> list[np.ndarray]:
        """Equally shaped clips (``frames``) -> codes (t, h, w[, c]) per clip."""
        video = to_pixels(stack_clips(batch).to(self.device))  # (B, C, T, H, W) in [-1, 1]
        f = self.model.time_downsample_factor
        # Without a chunk size, one chunk holds the whole clip: frame 0 and T - 1 more frames.
        chunk = self.settings.chunk_frames or max(f, video.shape[2] - 1)
        with inference_precision(self.device, self.settings.precision):
            codes = self.model.encode_long(video.contiguous(), chunk)  # (b, t, h, w[, c])
        return [c.cpu().numpy().astype(self.dtype) for c in codes]


def _tar_add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mode, info.mtime = len(data), 0o444, 0
    tar.addfile(info, io.BytesIO(data))


Pending = list[tuple[str, SampleMeta, torch.Tensor | Yuv420]]
"""Clips of one size waiting to be encoded as one batch: (key, metadata, frames)."""


def export_shard(source: str, output: Path, encoder: ClipEncoder) -> TokenShardEntry:
    """Writes the token shard of one clip shard; returns its record (also written to disk)."""
    name = token_shard_name(source)
    partial = output / f".{name}.partial"
    skipped: list[dict[str, str]] = []
    num_samples = 0
    with (
        open(partial, "wb") as file,
        tarfile.open(fileobj=file, mode="w", format=tarfile.PAX_FORMAT) as tar,
    ):
        pending: Pending = []
        for key, meta, payload in read_clip_samples(source):
            try:
                frames = encoder.frames(meta, payload)
            except Exception as exc:  # a broken clip is the data's problem: record it, go on
                skipped.append({"key": key, "reason": f"{type(exc).__name__}: {exc}"[:300]})
                logger.warning("%s: skipping %s: %s", source, key, exc)
                continue
            if pending and clip_size(frames) != clip_size(pending[0][2]):
                num_samples += _write_batch(tar, source, encoder, pending)
            pending.append((key, meta, frames))
            if len(pending) >= encoder.settings.batch_size:
                num_samples += _write_batch(tar, source, encoder, pending)
        num_samples += _write_batch(tar, source, encoder, pending)
    entry = TokenShardEntry(
        name=name,
        source_shard=source,
        num_samples=num_samples,
        bytes=partial.stat().st_size,
        skipped=skipped,
    )
    _publish(partial, output, entry)
    return entry


def _write_batch(tar: tarfile.TarFile, source: str, encoder: ClipEncoder, pending: Pending) -> int:
    """Encodes the pending clips as one batch, adds their codes and metadata to the shard and
    empties `pending`; returns how many were written."""
    if not pending:
        return 0
    codes = encoder.encode([frames for _, _, frames in pending])
    for (key, meta, frames), array in zip(pending, codes, strict=True):
        num_frames, height, width = clip_size(frames)
        token_meta = TokenMeta(
            source=dataclasses.asdict(meta),
            source_shard=Path(source).name,
            num_frames=num_frames,
            frame_height=height,
            frame_width=width,
            shape=list(array.shape),
            dtype=str(array.dtype),
            codebook_size=encoder.model.codebook_size,
            num_codebooks=encoder.model.config.num_codebooks,
        )
        buffer = io.BytesIO()
        np.save(buffer, array)
        _tar_add(tar, f"{key}.{CODES_KEY}", buffer.getvalue())
        _tar_add(tar, f"{key}.{META_KEY}", token_meta.to_json())
    written = len(pending)
    pending.clear()
    return written


def _publish(partial: Path, output: Path, entry: TokenShardEntry) -> None:
    """The written shard, synced, under its final name; its record first, so a final-named
    shard always has one."""
    with open(partial, "rb+") as f:
        os.fsync(f.fileno())
    write_json_atomic(str(output / RECORDS_DIR / f"{entry.name}.json"), dataclasses.asdict(entry))
    partial.replace(output / entry.name)


def _check_settings(output: Path, settings: dict, world: World) -> None:
    """The first run writes its settings; a rerun with other settings (or another checkpoint)
    is refused, so that one token dataset never mixes two encodings."""
    path = output / SETTINGS_NAME
    if world.rank == 0 and not path.exists():
        output.mkdir(parents=True, exist_ok=True)
        (output / RECORDS_DIR).mkdir(exist_ok=True)
        write_json_atomic(str(path), settings)
    barrier()
    existing = json.loads(path.read_text())
    wanted = json.loads(json.dumps(settings))  # tuples -> lists, as read back
    if existing != wanted:
        changed = [
            f"{name}.{k}" if isinstance(value, dict) else name
            for name, value in wanted.items()
            for k in (value if isinstance(value, dict) else [None])
            if (existing.get(name, {}).get(k) if isinstance(value, dict) else existing.get(name))
            != (value[k] if isinstance(value, dict) else value)
        ]
        raise ValueError(
            f"{output} holds tokens made with other settings ({', '.join(changed)} differ; see "
            f"{path}): use a new --output folder, or rerun with the same settings to resume"
        )


def run_export(args: argparse.Namespace, world: World) -> int:
    start = time.monotonic()
    device = device_for(world)
    model = load_tokenizer(args.checkpoint, device)
    export_dir = resolve_export_dir(args.checkpoint)
    settings = ExportSettings(
        image_size=args.image_size or model.config.image_size,
        crop=args.crop,
        max_frames=args.max_frames,
        chunk_frames=args.chunk_frames,
        batch_size=args.batch_size,
        precision=resolve_precision("fp32" if args.no_autocast else args.precision, device),
    )
    if args.chunk_frames is not None:
        check_chunk_frames(args.chunk_frames, model.time_downsample_factor)
    sources = resolve_shards(tuple(args.shards), "video")
    output = Path(args.output)
    record = {
        "tokenizer": model.config.to_dict(),
        "checkpoint_sha256": file_sha256(export_dir / WEIGHTS_NAME),
        "settings": dataclasses.asdict(settings),
        "sources": sources,
    }
    _check_settings(output, record, world)
    # Made now, while every rank is here: creating a group is itself a collective.
    finish_group = new_wait_group(args.finish_timeout_hours * 3600)
    encoder = ClipEncoder(model, settings, device)
    mine = sources[world.rank :: world.world_size]
    done = 0
    for source in progress_bar(mine, enabled=world.rank == 0, desc="tokenize", unit="shard"):
        if (output / token_shard_name(source)).exists():
            logger.info("%s: done in an earlier run", token_shard_name(source))
            continue
        entry = export_shard(source, output, encoder)
        done += 1
        logger.info("%s: %d samples, %d skipped", entry.name, entry.num_samples, len(entry.skipped))
    barrier(finish_group)
    if world.rank == 0:
        manifest = _manifest(output, sources, record, str(args.checkpoint))
        write_json_atomic(str(output / MANIFEST_NAME), manifest.to_dict())
        totals = manifest.to_dict()["totals"]
        print(
            f"{totals['num_samples']} clips in {totals['num_shards']} token shards "
            f"({totals['num_skipped']} skipped) in {time.monotonic() - start:.1f} s; "
            f"{'complete' if manifest.complete else 'INCOMPLETE'}: {output / MANIFEST_NAME}"
        )
    return 0


def _manifest(output: Path, sources: list[str], record: dict, checkpoint: str) -> TokenManifest:
    manifest = TokenManifest(
        tokenizer=record["tokenizer"],
        checkpoint=checkpoint,
        checkpoint_sha256=record["checkpoint_sha256"],
        settings=record["settings"],
    )
    for source in sources:
        name = token_shard_name(source)
        path = output / RECORDS_DIR / f"{name}.json"
        if (output / name).exists() and path.exists():
            manifest.shards.append(TokenShardEntry(**json.loads(path.read_text())))
        else:
            manifest.missing.append(source)
    return manifest


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in _FILE_COMMANDS:
        from pipeline.inference.token_files import parse_file_args

        return parse_file_args(argv)
    prog = command_name("pipeline.tokenize")
    parser = argparse.ArgumentParser(
        prog=prog,
        description=__doc__.split("\n\n")[0],
        epilog=f"Single files: `{prog} encode-file --help`, `{prog} decode-file --help`.",
    )
    add_checkpoint_and_shards(
        parser, "clip shards: dataset folders, tar paths, globs or brace patterns"
    )
    parser.add_argument("--output", required=True, help="token dataset folder (shared by nodes)")
    parser.add_argument(
        "--batch-size", type=int, default=8, help="clips per batch per rank (default: %(default)s)"
    )
    add_frame_arguments(parser)
    parser.add_argument(
        "--max-frames", type=int, default=None, help="frames per clip (default: all)"
    )
    parser.add_argument(
        "--chunk-frames",
        type=int,
        default=None,
        help="encode clips in chunks of this many frames, for long passthrough clips "
        "(default: whole clips)",
    )
    add_precision_argument(parser)
    parser.add_argument(
        "--finish-timeout-hours",
        type=float,
        default=24.0,
        help="how long ranks that are done wait for the others before the manifest "
        "(default: %(default)s)",
    )
    parser.add_argument("--no-autocast", action="store_true", help=argparse.SUPPRESS)  # = fp32
    # The deepspeed launcher passes --local_rank; the rank comes from the environment (World).
    parser.add_argument("--local_rank", "--local-rank", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.command = "shards"
    return args


def main(args: argparse.Namespace) -> int:
    setup_logging(World.from_env())
    if args.command != "shards":
        from pipeline.inference.token_files import run_file_command

        return run_file_command(args)
    world = init_distributed()
    try:
        return run_export(args, world)
    except ValueError as exc:  # ShardError included: bad input, said plainly
        print(f"error: {exc}", file=sys.stderr)
        return 2
    finally:
        teardown()
