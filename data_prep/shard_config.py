"""The settings of one shard run (``ShardConfig``), shared by the node's coordinator (``shard``)
and the dispatcher that feeds its workers (``dispatch``); it imports neither of them.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from data_prep.clips import ClipConfig
from data_prep.format import FORMAT_VERSION


def available_cpus() -> int:
    """Cores this process may run on (the SLURM allocation, a taskset), not the machine's."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


@dataclass(frozen=True, kw_only=True)
class ShardConfig:
    inputs: tuple[str, ...]
    """Folders (searched recursively), video or image files, or .txt/.csv lists of paths."""
    output: str
    """Dataset folder for the shards and manifest.json; shared by all nodes."""
    clip: ClipConfig = field(default_factory=ClipConfig)
    num_workers: int = field(default_factory=lambda: available_cpus())
    """Worker processes on this node (one core each)."""
    num_nodes: int = 1
    node_rank: int = 0
    max_shard_samples: int = 5000
    """A shard is closed after this many samples ..."""
    max_shard_bytes: int = 1_000_000_000
    """... or once it holds this many bytes, whichever comes first."""
    progress: bool = True
    """Show a tqdm progress bar (clips/s) on stderr."""
    stall_timeout_s: float = 600.0
    """A worker silent this long on one file (a hung decoder) is killed and the file skipped."""

    def __post_init__(self) -> None:
        if not self.inputs:
            raise ValueError("inputs must name at least one folder, file or list")
        if self.num_workers < 1:
            raise ValueError(f"num_workers must be >= 1, got {self.num_workers}")
        if self.num_nodes < 1 or not 0 <= self.node_rank < self.num_nodes:
            raise ValueError(
                f"node_rank must be in [0, num_nodes={self.num_nodes}), got {self.node_rank}"
            )
        if self.max_shard_samples < 1 or self.max_shard_bytes < 1:
            raise ValueError("max_shard_samples and max_shard_bytes must be positive")
        if not self.stall_timeout_s > 0:
            raise ValueError(f"stall_timeout_s must be positive, got {self.stall_timeout_s}")

    def settings(self) -> dict:
        """What every node and every rerun must agree on (written to the manifest)."""
        return {
            "format_version": FORMAT_VERSION,
            "num_nodes": self.num_nodes,
            "clip": self.clip.to_dict(),
        }
