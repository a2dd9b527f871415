"""Crash-safe shard writing and the resume journal.

A shard is written under a hidden temporary name, fsynced and renamed: a final ``*.tar`` name
always holds a whole shard. Right after the rename the worker appends one line to its journal
(``DIR/.journal/n0000-w000.jsonl``) saying which clips of which sources the shard holds and which
sources are finished. A rerun trusts only the journals: it deletes final-named shards they do not
mention (renamed just before a kill), deletes temporary files, skips finished sources and
restarts unfinished ones after their last committed clip. So after any kill each clip ends up in
the shards exactly once.
"""

from __future__ import annotations

import errno
import io
import json
import logging
import os
import tarfile
from collections import defaultdict
from dataclasses import dataclass, field

from data_prep.format import (
    JOURNAL_DIR,
    Kind,
    ShardEntry,
    SkipEntry,
    parse_shard_name,
    partial_name,
    shard_name,
)

logger = logging.getLogger(__name__)

# Errors that mean "the output is full", not "this input is bad".
OUTPUT_FULL_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG})


def is_output_full(exc: BaseException) -> bool:
    return isinstance(exc, OSError) and exc.errno in OUTPUT_FULL_ERRNOS


def fsync_dir(directory: str) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def journal_path(directory: str, node_rank: int, worker_id: int | str) -> str:
    suffix = f"w{worker_id:03d}" if isinstance(worker_id, int) else worker_id
    return os.path.join(directory, JOURNAL_DIR, f"n{node_rank:04d}-{suffix}.jsonl")


class Journal:
    """Append-only JSON lines, each fsynced before the writer goes on."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._file = open(path, "a", encoding="utf-8")

    def append(self, record: dict) -> None:
        self._file.write(json.dumps(record, sort_keys=True) + "\n")
        self._file.flush()
        os.fsync(self._file.fileno())

    def close(self) -> None:
        self._file.close()


def read_journal(path: str) -> list[dict]:
    """Records of one journal; a torn last line (killed mid-append) is cut off the file."""
    with open(path, "rb") as f:
        data = f.read()
    end = data.rfind(b"\n") + 1
    if end < len(data):
        logger.warning("%s: dropping a torn last record (%d bytes)", path, len(data) - end)
        with open(path, "r+b") as f:
            f.truncate(end)
    return [json.loads(line) for line in data[:end].splitlines() if line.strip()]


@dataclass
class NodeProgress:
    """What the journals of one node say is durably done."""

    shards: list[ShardEntry] = field(default_factory=list)
    clips: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    """Committed clips per source path."""
    finished: set[str] = field(default_factory=set)
    notes: dict[str, str] = field(default_factory=dict)
    skipped: dict[str, SkipEntry] = field(default_factory=dict)
    """Final skips (retryable ones, such as permission errors, are left out)."""
    next_index: dict[tuple[int, Kind], int] = field(default_factory=dict)
    """Next shard index per (worker id, kind)."""


def load_progress(directory: str, node_rank: int) -> NodeProgress:
    progress = NodeProgress()
    journal_dir = os.path.join(directory, JOURNAL_DIR)
    prefix = f"n{node_rank:04d}-"
    names = sorted(n for n in os.listdir(journal_dir) if n.startswith(prefix))
    for name in names:
        if not name.endswith(".jsonl"):
            continue
        for record in read_journal(os.path.join(journal_dir, name)):
            event = record["event"]
            if event == "shard":
                entry = ShardEntry(**record["shard"])
                progress.shards.append(entry)
                _, _, worker, index = parse_shard_name(entry.name)
                key = (worker, entry.kind)
                progress.next_index[key] = max(progress.next_index.get(key, 0), index + 1)
                for path, (_, end) in record["clips"].items():
                    progress.clips[path] = max(progress.clips[path], end)
            if event in ("shard", "finished"):
                progress.finished.update(record["finished"])
                progress.notes.update(record.get("notes", {}))
            elif event == "skip" and not record.get("retry", False):
                progress.skipped[record["path"]] = SkipEntry(
                    path=record["path"], reason=record["reason"]
                )
    return progress


def clean_uncommitted(directory: str, node_rank: int, progress: NodeProgress) -> list[str]:
    """Deletes this node's temporary files and final shards that no journal mentions."""
    known = {s.name for s in progress.shards}
    removed = []
    for name in os.listdir(directory):
        stem = name[1 : -len(".partial")] if name.endswith(".partial") else name
        parsed = parse_shard_name(stem)
        if parsed is None or parsed[1] != node_rank or (stem == name and name in known):
            continue
        os.remove(os.path.join(directory, name))
        removed.append(name)
    if removed:
        logger.warning("removed %d uncommitted shard files of node %d", len(removed), node_rank)
    return removed


class ShardWriter:
    """Writes one kind of sample into numbered shards of one (node, worker)."""

    def __init__(
        self,
        directory: str,
        kind: Kind,
        node_rank: int,
        worker_id: int,
        first_index: int,
        max_samples: int,
        max_bytes: int,
    ) -> None:
        self.directory, self.kind = directory, kind
        self.node_rank, self.worker_id = node_rank, worker_id
        self.index = first_index
        self.max_samples, self.max_bytes = max_samples, max_bytes
        self._tar: tarfile.TarFile | None = None
        self._file: io.BufferedWriter | None = None
        self.num_samples = 0
        self.clips: dict[str, list[int]] = {}
        """[first, end) clip numbers per source in the open shard."""

    @property
    def name(self) -> str:
        return shard_name(self.kind, self.node_rank, self.worker_id, self.index)

    def _open(self) -> None:
        path = os.path.join(self.directory, partial_name(self.name))
        self._file = open(path, "wb")
        self._tar = tarfile.open(fileobj=self._file, mode="w", format=tarfile.PAX_FORMAT)
        self.num_samples, self.clips = 0, {}

    def write(self, sample: dict[str, bytes], source: str, clip: int) -> None:
        if self._tar is None:
            self._open()
        for extension, data in sample.items():
            if extension.startswith("__"):
                continue
            info = tarfile.TarInfo(f"{sample['__key__']}.{extension}")
            info.size, info.mode, info.mtime = len(data), 0o444, 0
            self._tar.addfile(info, io.BytesIO(data))
        self.num_samples += 1
        span = self.clips.setdefault(source, [clip, clip])
        span[1] = clip + 1

    @property
    def full(self) -> bool:
        return self._tar is not None and (
            self.num_samples >= self.max_samples or self._file.tell() >= self.max_bytes
        )

    @property
    def empty(self) -> bool:
        return self._tar is None

    def commit(self) -> ShardEntry:
        """Closes the shard, fsyncs it and gives it its final name."""
        self._tar.close()
        self._file.flush()
        os.fsync(self._file.fileno())
        size = self._file.tell()
        self._file.close()
        self._tar = self._file = None
        os.replace(
            os.path.join(self.directory, partial_name(self.name)),
            os.path.join(self.directory, self.name),
        )
        fsync_dir(self.directory)
        entry = ShardEntry(name=self.name, kind=self.kind, num_samples=self.num_samples, bytes=size)
        self.index += 1
        return entry

    def abort(self) -> None:
        """Drops the open shard (its sources will be redone by a rerun)."""
        if self._file is not None:
            try:
                self._file.close()
            except OSError:
                pass
            try:
                os.remove(os.path.join(self.directory, partial_name(self.name)))
            except FileNotFoundError:
                pass
        self._tar = self._file = None
