"""Turns the user's inputs (folders, files, path lists) into the sources one node shards.

Every node lists the same inputs in the same order and keeps the sources whose path hashes to its
rank, so many nodes shard one dataset without talking to each other.
"""

from __future__ import annotations

import csv
import hashlib
import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from data_prep.format import IMAGE_EXTENSIONS, VIDEO_EXTENSIONS, Kind, SkipEntry

logger = logging.getLogger(__name__)

LIST_EXTENSIONS = (".txt", ".csv", ".lst")
_CSV_PATH_COLUMNS = ("path", "video", "videos", "file", "filename", "filepath", "video_path")
"""Header names of a CSV list's path column ('videos': VidTok's meta files)."""


class InputError(ValueError):
    """An input named on the command line cannot be used (the run's own failure)."""


@dataclass(frozen=True)
class Source:
    path: str
    """Real path (symlinks resolved): the identity used for duplicates and the node partition."""
    kind: Kind


@dataclass
class Listing:
    sources: list[Source] = field(default_factory=list)
    skipped: list[SkipEntry] = field(default_factory=list)
    """Inputs rejected while listing: duplicates, listed paths that do not exist, unreadable
    folders."""
    num_ignored_files: int = 0


def kind_of(path: str) -> Kind | None:
    extension = os.path.splitext(path)[1].lower().lstrip(".")
    if extension in VIDEO_EXTENSIONS:
        return "video"
    if extension in IMAGE_EXTENSIONS:
        return "image"
    return None


def read_path_list(list_path: str) -> list[str]:
    """Paths from a .txt (one per line, '#' comments) or .csv (a path column, or the first column).

    Relative paths are relative to the list's own folder, so a list travels with its data.
    """
    base = os.path.dirname(os.path.abspath(list_path))
    with open(list_path, encoding="utf-8", newline="") as f:
        if list_path.lower().endswith(".csv"):
            rows = [row for row in csv.reader(f) if row and row[0].strip()]
            column = 0
            header = [cell.strip().lower() for cell in rows[0]] if rows else []
            named = [i for i, cell in enumerate(header) if cell in _CSV_PATH_COLUMNS]
            if named:
                column, rows = named[0], rows[1:]
            paths = [row[column].strip() for row in rows if len(row) > column]
        else:
            lines = (line.strip() for line in f)
            paths = [line for line in lines if line and not line.startswith("#")]
    return [p if os.path.isabs(p) else os.path.join(base, p) for p in paths]


def _walk_folder(folder: str, listing: Listing) -> list[tuple[str, Kind]]:
    found: list[tuple[str, Kind]] = []

    def on_error(exc: OSError) -> None:
        listing.skipped.append(SkipEntry(path=exc.filename or folder, reason=f"cannot list: {exc}"))

    visited = {os.path.realpath(folder)}
    for root, dirs, files in os.walk(folder, onerror=on_error, followlinks=True):
        # Symlinked folders are followed, but each real folder once, so a link cycle ends.
        kept = []
        for name in sorted(dirs):
            real = os.path.realpath(os.path.join(root, name))
            if not name.startswith(".") and real not in visited:
                visited.add(real)
                kept.append(name)
        dirs[:] = kept
        for name in sorted(files):
            kind = kind_of(name)
            if kind is None or name.startswith("."):
                listing.num_ignored_files += 1
                continue
            found.append((os.path.join(root, name), kind))
    return found


def list_inputs(inputs: Sequence[str]) -> Listing:
    """Lists all sources of ``inputs`` in a deterministic order, dropping duplicate paths.

    Raises:
        InputError: an input named directly does not exist or a list file cannot be read.
    """
    listing = Listing()
    candidates: list[tuple[str, Kind | None]] = []
    for item in inputs:
        if os.path.isdir(item):
            candidates.extend(_walk_folder(item, listing))
        elif item.lower().endswith(LIST_EXTENSIONS) and os.path.isfile(item):
            try:
                paths = read_path_list(item)
            except (OSError, UnicodeDecodeError) as exc:
                raise InputError(f"cannot read the path list {item}: {exc}") from exc
            candidates.extend((p, kind_of(p)) for p in paths)
        elif os.path.lexists(item):
            candidates.append((item, kind_of(item)))
        else:
            raise InputError(f"input {item!r} does not exist: pass folders, video files or lists")

    first_seen: dict[str, str] = {}
    for given, kind in candidates:
        path = os.path.realpath(given)
        if path in first_seen:
            listing.skipped.append(
                SkipEntry(path=given, reason=f"duplicate path: same file as {first_seen[path]}")
            )
            continue
        first_seen[path] = given
        if not os.path.lexists(given):
            listing.skipped.append(SkipEntry(path=given, reason="not found"))
            continue
        # A file named explicitly with an unknown extension is probed as a video.
        listing.sources.append(Source(path=path, kind=kind or "video"))
    return listing


def node_of(path: str, num_nodes: int) -> int:
    """The node that owns ``path``: a hash, so the split is stable and needs no coordination."""
    digest = hashlib.sha1(os.path.realpath(path).encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") % num_nodes


def partition(listing: Listing, num_nodes: int, node_rank: int) -> Listing:
    """The part of ``listing`` that node ``node_rank`` of ``num_nodes`` is responsible for."""
    return Listing(
        sources=[s for s in listing.sources if node_of(s.path, num_nodes) == node_rank],
        skipped=[s for s in listing.skipped if node_of(s.path, num_nodes) == node_rank],
        num_ignored_files=listing.num_ignored_files if node_rank == 0 else 0,
    )


def node_from_env(env: Mapping[str, str]) -> tuple[int, int] | None:
    """(node rank, number of nodes) from SLURM, or None outside SLURM.

    In a job array (``sbatch --array=0-15``) the rank is the array task id itself, so a rerun of
    some tasks (``--array=3,7`` with ``--num-nodes 16``) keeps their ranks; the node count is the
    array's task count. In a multi-task job (``srun -n 16``) they are the task id and count.
    This is the only place data_prep reads the cluster's environment.
    """
    if "SLURM_ARRAY_TASK_ID" in env:
        if "SLURM_ARRAY_TASK_COUNT" in env:
            count = int(env["SLURM_ARRAY_TASK_COUNT"])
        else:
            count = int(env["SLURM_ARRAY_TASK_MAX"]) - int(env.get("SLURM_ARRAY_TASK_MIN", "0")) + 1
        return int(env["SLURM_ARRAY_TASK_ID"]), count
    if "SLURM_PROCID" in env and "SLURM_NTASKS" in env:
        return int(env["SLURM_PROCID"]), int(env["SLURM_NTASKS"])
    return None
