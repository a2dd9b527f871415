"""Process-group set-up and small collectives shared by training, evaluation and token export.

Launchers (deepspeed, torchrun, srun via launch/train.sh) set RANK, WORLD_SIZE, LOCAL_RANK,
MASTER_ADDR and MASTER_PORT; `World.from_env` reads them. One process without them is a world
of one and needs no process group.
"""

from __future__ import annotations

import datetime
import logging
import os

import torch
import torch.distributed as dist

from pipeline.world import World

logger = logging.getLogger(__name__)


def default_backend() -> str:
    return "nccl" if torch.cuda.is_available() else "gloo"


def device_for(world: World) -> torch.device:
    if torch.cuda.is_available():
        torch.cuda.set_device(world.local_rank)
        return torch.device("cuda", world.local_rank)
    return torch.device("cpu")


def init_distributed(timeout_s: float = 600.0, backend: str | None = None) -> World:
    """Joins the process group when the launcher started several ranks.

    The timeout bounds how long a rank waits for a dead peer in a collective, so a job whose
    rank was killed stops instead of hanging.
    """
    world = World.from_env()
    if world.world_size > 1 and not dist.is_initialized():
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", "29500")
        dist.init_process_group(
            backend=backend or default_backend(),
            timeout=datetime.timedelta(seconds=timeout_s),
            rank=world.rank,
            world_size=world.world_size,
        )
    return world


def teardown() -> None:
    """Destroys the process group (explicitly: gloo has aborted at interpreter exit otherwise)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """In-place sum across ranks (a no-op on one process)."""
    if is_distributed():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def all_gather_objects(obj: object) -> list[object]:
    """Every rank's `obj` (picklable), in rank order, on every rank ([obj] on one process)."""
    if not is_distributed():
        return [obj]
    gathered: list[object] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, obj)
    return gathered
