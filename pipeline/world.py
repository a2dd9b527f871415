"""Where this process sits: rank and world size, and inside a data-loader worker, which worker.

The only module of ``pipeline`` that reads the launcher's environment variables; everything else
receives a ``World``. Tests build ``World(rank=1, world_size=2)`` directly.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from dataclasses import dataclass

import torch


@dataclass(frozen=True, kw_only=True)
class World:
    rank: int = 0
    """Global rank of this process among all training processes."""
    world_size: int = 1
    local_rank: int = 0
    """Rank among the processes of this node (picks the device)."""
    worker_id: int = 0
    """Data-loader worker inside this rank (0 in the main process)."""
    num_workers: int = 1
    """Data-loader workers of this rank (1 when loading in the main process)."""

    def __post_init__(self) -> None:
        if self.world_size < 1 or not 0 <= self.rank < self.world_size:
            raise ValueError(f"rank must be in [0, world_size={self.world_size}), got {self.rank}")
        if self.num_workers < 1 or not 0 <= self.worker_id < self.num_workers:
            raise ValueError(
                f"worker_id must be in [0, num_workers={self.num_workers}), got {self.worker_id}"
            )

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> World:
        """From torchrun/deepspeed variables (RANK, WORLD_SIZE, LOCAL_RANK), else from an
        initialised torch.distributed, else a single process."""
        env = os.environ if env is None else env
        if "RANK" in env and "WORLD_SIZE" in env:
            return cls(
                rank=int(env["RANK"]),
                world_size=int(env["WORLD_SIZE"]),
                local_rank=int(env.get("LOCAL_RANK", "0")),
            )
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            return cls(
                rank=torch.distributed.get_rank(), world_size=torch.distributed.get_world_size()
            )
        return cls()

    def in_worker(self) -> World:
        """This world seen from the current data-loader worker (itself in the main process)."""
        info = torch.utils.data.get_worker_info()
        if info is None:
            return self
        return dataclasses.replace(self, worker_id=info.id, num_workers=info.num_workers)

    @property
    def num_readers(self) -> int:
        """Independent shard readers in the job: ranks x workers."""
        return self.world_size * self.num_workers

    @property
    def reader_index(self) -> int:
        """This reader's index in [0, num_readers)."""
        return self.rank * self.num_workers + self.worker_id
