"""``python -m data_prep shard``: raw videos and images -> WebDataset shards + manifest.json.

One process per node lists the inputs, keeps its share of them, resumes from the journals, hands
the rest to N worker processes (``dispatch``; each worker has its own shards and journal) and
writes the node's manifest part. ``writer`` explains how a rerun resumes after a crash or kill.
"""

from __future__ import annotations

import argparse
import fcntl
import json
import logging
import os
import re
import time
from dataclasses import dataclass

from data_prep.clips import ClipConfig
from data_prep.dispatch import Dispatcher
from data_prep.format import JOURNAL_DIR, Manifest
from data_prep.inputs import InputError, list_inputs, node_from_env, partition
from data_prep.manifest import merge_parts, node_manifest, write_part
from data_prep.shard_config import ShardConfig, available_cpus
from data_prep.writer import clean_uncommitted, load_progress

logger = logging.getLogger(__name__)


class RunError(Exception):
    """The run itself cannot go on (bad arguments, unwritable output); the message says the fix."""


@dataclass
class RunResult:
    manifest: Manifest
    exit_code: int
    message: str
    elapsed_s: float
    clips_written: int


def _prepare_output(config: ShardConfig) -> None:
    journal_dir = os.path.join(config.output, JOURNAL_DIR)
    try:
        os.makedirs(journal_dir, exist_ok=True)
        probe = os.path.join(journal_dir, f".probe-{os.getpid()}")
        with open(probe, "w") as f:
            f.write("ok")
        os.remove(probe)
    except OSError as exc:
        raise RunError(
            f"cannot write to the output folder {config.output}: {exc.strerror}; "
            "choose a writable --output"
        ) from exc
    settings_path = os.path.join(journal_dir, "settings.json")
    try:
        with open(settings_path, "x", encoding="utf-8") as f:
            json.dump(config.settings(), f, indent=1, sort_keys=True)
    except FileExistsError:
        with open(settings_path, encoding="utf-8") as f:
            saved = json.load(f)
        if saved != config.settings():
            raise RunError(
                f"{config.output} holds shards made with other settings ({saved}, now "
                f"{config.settings()}); rerun with the original settings or use a new --output"
            ) from None


def _lock_node(config: ShardConfig):
    path = os.path.join(config.output, JOURNAL_DIR, f"n{config.node_rank:04d}.lock")
    lock = open(path, "w")
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        raise RunError(
            f"another shard run for node {config.node_rank} is writing {config.output}; "
            "wait for it or stop it"
        ) from None
    return lock


def run(config: ShardConfig) -> RunResult:
    """Shards this node's part of the inputs, resuming whatever an earlier run left.

    Raises:
        RunError: the output folder is unusable, the settings differ from an earlier run there,
            or an input named directly does not exist.
    """
    start = time.perf_counter()
    try:
        listing = list_inputs(config.inputs)
    except InputError as exc:
        raise RunError(str(exc)) from exc
    _prepare_output(config)
    with _lock_node(config):
        mine = partition(listing, config.num_nodes, config.node_rank)
        progress = load_progress(config.output, config.node_rank)
        clean_uncommitted(config.output, config.node_rank, progress)
        todo = [
            (source, progress.clips.get(source.path, 0))
            for source in mine.sources
            if source.path not in progress.finished and source.path not in progress.skipped
        ]
        todo.sort(key=lambda item: -_size(item[0].path))  # big files first balance the workers

        reasons: dict[str, str] = {}
        status = Dispatcher(config, todo, reasons).run(len(mine.sources))
        progress = load_progress(config.output, config.node_rank)
        manifest = node_manifest(
            mine, progress, reasons, config.settings(), config.num_nodes, config.node_rank
        )
        write_part(config.output, manifest)
        merged = merge_parts(config.output)
    elapsed = time.perf_counter() - start
    return RunResult(merged, status.exit_code, status.error or "", elapsed, status.clips)


def _size(path: str) -> int:
    try:
        return os.path.getsize(path)
    except OSError:
        return 0


def settings_from_args(args: argparse.Namespace) -> ShardConfig:
    """ShardConfig from the command line; node rank and count fall back to SLURM's variables."""
    node = node_from_env(os.environ) or (0, 1)
    num_nodes = args.num_nodes if args.num_nodes is not None else node[1]
    node_rank = args.node_rank if args.node_rank is not None else node[0]
    clip = ClipConfig(
        num_frames=args.num_frames,
        fps=args.fps,
        stride=args.stride,
        size=args.size,
        crop=args.crop,
        crf=args.crf,
        keyframe_interval=args.keyframe_interval,
        preset=args.preset,
        passthrough=args.passthrough,
        image_quality=args.image_quality,
    )
    return ShardConfig(
        inputs=tuple(args.inputs),
        output=args.output,
        clip=clip,
        num_workers=args.workers or available_cpus(),
        num_nodes=num_nodes,
        node_rank=node_rank,
        max_shard_samples=args.shard_samples,
        max_shard_bytes=args.shard_bytes,
        progress=not args.no_progress,
        stall_timeout_s=args.stall_timeout,
    )


def summary(result: RunResult) -> str:
    totals = result.manifest.totals()
    reasons: dict[str, int] = {}
    for skip in result.manifest.skipped:
        key = re.split(r"[:(]", skip.reason)[0].strip()
        reasons[key] = reasons.get(key, 0) + 1
    sharded = totals["num_inputs"] - totals["num_skipped"]
    lines = [
        f"inputs {totals['num_inputs']}: {sharded} sharded, "
        f"{totals['num_skipped']} skipped" + (f" {reasons}" if reasons else ""),
        f"samples {totals['num_samples']} ({totals['num_video_clips']} clips, "
        f"{totals['num_images']} images) in {totals['num_shards']} shards, "
        f"{totals['bytes'] / 1e6:.1f} MB",
        f"this run wrote {result.clips_written} samples in {result.elapsed_s:.1f} s "
        f"({result.clips_written / max(result.elapsed_s, 1e-9):.1f}/s)",
    ]
    if not result.manifest.complete:
        missing = sorted(set(range(result.manifest.num_nodes)) - set(result.manifest.nodes_done))
        lines.append(f"manifest waits for nodes {missing}")
    if result.message:
        lines.append(f"ERROR: {result.message}")
    return "\n".join(lines)
