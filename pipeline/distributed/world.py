"""Where this process sits: rank and world size, and inside a data-loader worker, which worker.

The only module of ``pipeline`` that reads or sets environment variables (the launcher's:
torchrun's, DeepSpeed's, srun's; the rendezvous variables; DeepSpeed's accelerator choice;
OMP_NUM_THREADS; the log levels; cuBLAS's workspace for deterministic runs); everything else
receives a ``World`` or calls a function here. Tests build ``World(rank=1, world_size=2)``
directly.
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
        """From torchrun / deepspeed variables (RANK, WORLD_SIZE, LOCAL_RANK); else from srun's
        (SLURM_PROCID, SLURM_NTASKS, SLURM_LOCALID: one task per rank); else from an initialised
        torch.distributed; else a single process. ValueError when the launcher's variables and
        SLURM's contradict each other."""
        env = os.environ if env is None else env
        slurm = _slurm_task(env)
        if "RANK" in env and "WORLD_SIZE" in env:
            world = cls(
                rank=_int(env, "RANK"),
                world_size=_int(env, "WORLD_SIZE"),
                local_rank=_int(env, "LOCAL_RANK", "0"),
            )
            if slurm is not None:
                _check_against_slurm(world, *slurm)
            return world
        if slurm is not None and slurm[1] > 1:
            rank, world_size, local_rank = slurm
            return cls(rank=rank, world_size=world_size, local_rank=local_rank)
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


def rendezvous_env(world: World, env: Mapping[str, str] | None = None) -> dict[str, str]:
    """The variables torch.distributed's env:// rendezvous reads, for those the launcher did not
    set: under srun (one task per rank) RANK / WORLD_SIZE / LOCAL_RANK from SLURM, the first host
    of the job's node list as MASTER_ADDR and a port derived from the job id (as
    launch/train.sbatch does), so two jobs sharing a node do not collide."""
    env = os.environ if env is None else env
    out = {
        "RANK": str(world.rank),
        "WORLD_SIZE": str(world.world_size),
        "LOCAL_RANK": str(world.local_rank),
    }
    nodes = (
        env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST")
    )
    if nodes:
        out["MASTER_ADDR"] = first_host(nodes)
    if "SLURM_JOB_ID" in env:
        out["MASTER_PORT"] = str(20000 + _int(env, "SLURM_JOB_ID") % 20000)
    return {k: v for k, v in out.items() if k not in env}


def export_rendezvous(world: World, defaults: Mapping[str, str] | None = None) -> None:
    """Sets the rendezvous variables torch.distributed's env:// (and DeepSpeed's) reads, keeping
    any the launcher set: `defaults` when given; else for a world of one a local address and a
    free port (without a launcher DeepSpeed falls back to MPI discovery, mpi4py); else
    `rendezvous_env` (under srun: from SLURM's variables)."""
    if defaults is not None:
        variables = dict(defaults)
    elif world.world_size == 1:
        variables = {
            "RANK": "0",
            "WORLD_SIZE": "1",
            "LOCAL_RANK": "0",
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(_free_port()),
        }
    else:
        variables = rendezvous_env(world)
    for key, value in variables.items():
        os.environ.setdefault(key, value)


def use_cpu_accelerator() -> None:
    """Makes DeepSpeed pick its CPU accelerator (it picks one once, at first use, from
    DS_ACCELERATOR or else from what torch can see): for CPU ranks on a GPU machine."""
    os.environ["DS_ACCELERATOR"] = "cpu"


def omp_threads() -> int:
    """The launcher's OMP_NUM_THREADS (at least 1; 1 when unset)."""
    return max(1, int(os.environ.get("OMP_NUM_THREADS", "1")))


def log_levels(env: Mapping[str, str] | None = None) -> tuple[str | None, str | None]:
    """(rank 0's, the other ranks') log level from LOG_LEVEL and LOG_LEVEL_OTHER_RANKS (e.g.
    LOG_LEVEL_OTHER_RANKS=INFO to hear every rank); None where unset."""
    env = os.environ if env is None else env
    return env.get("LOG_LEVEL") or None, env.get("LOG_LEVEL_OTHER_RANKS") or None


def deterministic_cublas() -> None:
    """cuBLAS's fixed workspace, which `torch.use_deterministic_algorithms` needs for
    deterministic matmuls on CUDA >= 10.2 (kept when the launcher set one); takes effect before
    the first cuBLAS call."""
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def first_host(nodelist: str) -> str:
    """The first host of a SLURM node list: 'gpu[07-09,12],cpu1' -> 'gpu07'."""
    head = nodelist.strip()
    depth = 0
    for i, char in enumerate(head):  # the first entry: up to a comma outside brackets
        depth += {"[": 1, "]": -1}.get(char, 0)
        if char == "," and depth == 0:
            head = head[:i]
            break
    if "[" not in head:
        return head
    prefix, rest = head.split("[", 1)
    ranges, suffix = rest.split("]", 1)
    return prefix + ranges.split(",")[0].split("-")[0] + suffix


def _slurm_task(env: Mapping[str, str]) -> tuple[int, int, int] | None:
    """(rank, tasks, local rank) of a task srun started, or None outside one."""
    if "SLURM_PROCID" not in env:
        return None
    tasks = env.get("SLURM_STEP_NUM_TASKS") or env.get("SLURM_NTASKS")
    if tasks is None:
        return None
    return (
        _int(env, "SLURM_PROCID"),
        int(tasks),
        _int(env, "SLURM_LOCALID", "0"),
    )


def _check_against_slurm(world: World, task: int, tasks: int, local_task: int) -> None:
    """A launcher inside SLURM tasks starts the same number of ranks in each: WORLD_SIZE is a
    multiple of the tasks, and with one rank per task, RANK is the task's."""
    if world.world_size % tasks:
        raise ValueError(
            f"WORLD_SIZE={world.world_size} but SLURM started {tasks} tasks (SLURM_NTASKS): "
            "WORLD_SIZE must be a multiple of them (one launcher per task, or one rank per task)"
        )
    if world.world_size == tasks and (world.rank, world.local_rank) != (task, local_task):
        raise ValueError(
            f"RANK={world.rank} / LOCAL_RANK={world.local_rank} but this is SLURM task "
            f"{task} / local task {local_task} of {tasks} (one rank per task): unset RANK, "
            "WORLD_SIZE and LOCAL_RANK under srun, or set them consistently"
        )


def _int(env: Mapping[str, str], name: str, default: str | None = None) -> int:
    value = env.get(name, default)
    try:
        return int(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be an integer, got {value!r}") from None
