"""Building one node's manifest part from its journals, and merging all parts into manifest.json.

Each node writes ``.journal/part-n0000.json`` when it ends and then rewrites ``manifest.json`` from
every part present (under a file lock), so the last node to finish leaves the complete manifest
and no node waits for another. ``python -m data_prep merge DIR`` (and ``verify``) redo the merge.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
from collections.abc import Mapping

from data_prep.format import (
    JOURNAL_DIR,
    MANIFEST_NAME,
    Manifest,
    SkipEntry,
    SourceEntry,
    write_json_atomic,
)
from data_prep.inputs import Listing
from data_prep.writer import NodeProgress

logger = logging.getLogger(__name__)

NOT_REACHED = "not processed: the run stopped before this file; rerun the same command to resume"


def part_path(directory: str, node_rank: int) -> str:
    return os.path.join(directory, JOURNAL_DIR, f"part-n{node_rank:04d}.json")


def node_manifest(
    listing: Listing,
    progress: NodeProgress,
    reasons: Mapping[str, str],
    settings: dict,
    num_nodes: int,
    node_rank: int,
) -> Manifest:
    """Accounts for every source of one node: sharded (complete or not) or skipped with a reason.

    Args:
        listing: the node's part of the inputs.
        progress: what the node's journals record (the only evidence of durable work).
        reasons: why unfinished sources are unfinished in this run (full disk, permissions).
    """
    manifest = Manifest(
        settings=settings,
        num_nodes=num_nodes,
        nodes_done=[node_rank],
        shards=sorted(progress.shards, key=lambda s: s.name),
        skipped=list(listing.skipped),
        num_ignored_files=listing.num_ignored_files,
    )
    for source in listing.sources:
        path = source.path
        clips = progress.clips.get(path, 0)
        if path in progress.finished:
            note = progress.notes.get(path, "")
            manifest.sources.append(SourceEntry(path=path, num_clips=clips, note=note))
            continue
        if clips:  # some clips are in committed shards, the rest are not
            manifest.sources.append(SourceEntry(path=path, num_clips=clips, complete=False))
        if path in progress.skipped:
            manifest.skipped.append(progress.skipped[path])
        else:
            manifest.skipped.append(SkipEntry(path=path, reason=reasons.get(path, NOT_REACHED)))
    manifest.sources.sort(key=lambda s: s.path)
    manifest.skipped.sort(key=lambda s: s.path)
    return manifest


def merge_parts(directory: str) -> Manifest:
    """Merges every node part in ``directory`` and rewrites ``manifest.json``; returns it.

    Raises:
        ValueError: no parts, or parts made with different settings.
    """
    journal_dir = os.path.join(directory, JOURNAL_DIR)
    names = []
    if os.path.isdir(journal_dir):
        names = sorted(n for n in os.listdir(journal_dir) if n.startswith("part-n"))
    if not names:
        raise ValueError(f"{directory} has no manifest parts: no shard run has finished there")
    with open(os.path.join(journal_dir, "merge.lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # two nodes finishing together must not interleave
        parts = []
        for name in names:
            with open(os.path.join(journal_dir, name), encoding="utf-8") as f:
                parts.append(Manifest.from_dict(json.load(f)))
        merged = Manifest(settings=parts[0].settings, num_nodes=parts[0].num_nodes)
        for part in parts:
            if part.settings != merged.settings or part.num_nodes != merged.num_nodes:
                raise ValueError(
                    f"manifest parts in {journal_dir} disagree on settings: "
                    f"{part.settings} vs {merged.settings}"
                )
            merged.nodes_done.extend(part.nodes_done)
            merged.shards.extend(part.shards)
            merged.sources.extend(part.sources)
            merged.skipped.extend(part.skipped)
            merged.num_ignored_files += part.num_ignored_files
        merged.nodes_done.sort()
        merged.shards.sort(key=lambda s: s.name)
        merged.sources.sort(key=lambda s: s.path)
        merged.skipped.sort(key=lambda s: s.path)
        write_json_atomic(os.path.join(directory, MANIFEST_NAME), merged.to_dict())
    if not merged.complete:
        missing = sorted(set(range(merged.num_nodes)) - set(merged.nodes_done))
        logger.warning("manifest of %s lacks nodes %s (still running?)", directory, missing)
    return merged


def write_part(directory: str, manifest: Manifest) -> None:
    write_json_atomic(part_path(directory, manifest.nodes_done[0]), manifest.to_dict())
