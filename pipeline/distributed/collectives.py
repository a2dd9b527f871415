"""Process-group set-up and every collective that training, evaluation and token export use.

Launchers (deepspeed, torchrun, srun via launch/train.sh) set RANK, WORLD_SIZE, LOCAL_RANK,
MASTER_ADDR and MASTER_PORT; `pipeline.distributed.world` reads them. One process without them is a
world of one and needs no process group.

The only module of the project that calls `torch.distributed` collectives (a test enforces it).
A backend only reduces tensors on the devices it serves: NCCL has no CPU path, so a CPU tensor
all-reduced in an NCCL group fails with "No backend type associated with device type cpu" (and
gloo on a CUDA tensor copies through the host). Each collective here moves its tensor to the
group's communication device when the tensor's own device is not served, and copies the result
back, so callers keep their tensors where they are convenient (host counters, device sums).
"""

from __future__ import annotations

import datetime
import logging

import torch
import torch.distributed as dist

from pipeline.distributed.world import World, export_rendezvous

logger = logging.getLogger(__name__)

# Which device types a backend's collectives take, for backends named without a device map.
_BACKEND_DEVICES = {
    "nccl": ("cuda",),
    "gloo": ("cpu", "cuda"),
    "mpi": ("cpu", "cuda"),
    "ccl": ("cpu", "xpu"),
    "xccl": ("xpu",),
    "hccl": ("hpu",),
}


def default_backend() -> str:
    return "nccl" if torch.cuda.is_available() else "gloo"


def device_for(world: World, requested: str = "auto") -> torch.device:
    """This rank's device: 'auto' (CUDA device `local_rank` where torch can use CUDA, else the
    CPU), 'cuda' (an error without CUDA) or 'cpu'."""
    if requested == "cuda" and not torch.cuda.is_available():
        raise ValueError("device cuda: torch cannot use CUDA on this machine")
    if requested != "cpu" and torch.cuda.is_available():
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
        export_rendezvous(world, {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29500"})
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


def in_process_group() -> bool:
    """A process group exists (of any size). Collectives run then even on one rank, so that a
    one-GPU job exercises the same device placement as a 64-GPU one."""
    return dist.is_available() and dist.is_initialized()


# Where tensors must be for a backend.


def backend_devices(backend: str) -> dict[str, str]:
    """Device type -> backend, from a backend name ("nccl", "gloo") or a device map
    ("cpu:gloo,cuda:nccl", as `torch.distributed.get_backend_config()` writes it)."""
    spec = backend.strip().lower()
    if not spec:
        raise ValueError("empty backend name")
    served: dict[str, str] = {}
    for part in spec.split(","):
        if ":" in part:
            device_type, name = (s.strip() for s in part.split(":", 1))
            served[device_type] = name
        else:
            for device_type in _BACKEND_DEVICES.get(part, ("cpu",)):
                served.setdefault(device_type, part)
    return served


def communication_device(
    tensor_device: torch.device | str | None = None, backend: str | None = None
) -> torch.device:
    """The device a collective of `backend` (default: the current group's) takes a tensor of
    `tensor_device` on: the tensor's own device if the backend serves it, else the backend's
    device (the current CUDA device for NCCL)."""
    if backend is None:
        backend = _current_backend()
    served = backend_devices(backend)
    device = torch.device(tensor_device if tensor_device is not None else "cpu")
    if device.type in served:
        return device
    if "cuda" in served:
        return torch.device("cuda", torch.cuda.current_device())
    if "cpu" in served:
        return torch.device("cpu")
    device_type = next(iter(served))
    return torch.device(device_type, getattr(torch, device_type).current_device())


def _current_backend(group: dist.ProcessGroup | None = None) -> str:
    try:
        return str(dist.get_backend_config(group))
    except (AttributeError, RuntimeError, ValueError):  # older torch: the name alone
        return str(dist.get_backend(group))


def _on_comm_device(tensor: torch.Tensor, group: dist.ProcessGroup | None) -> torch.Tensor:
    target = communication_device(tensor.device, _current_backend(group))
    return tensor if target == tensor.device else tensor.to(target)


# Collectives. Each is a no-op without a process group.


def _all_reduce(
    tensor: torch.Tensor, op: dist.ReduceOp, group: dist.ProcessGroup | None = None
) -> torch.Tensor:
    if not in_process_group():
        return tensor
    moved = _on_comm_device(tensor, group)
    dist.all_reduce(moved, op=op, group=group)
    if moved is not tensor:
        tensor.copy_(moved)
    return tensor


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """In-place sum across ranks; returns `tensor`."""
    return _all_reduce(tensor, dist.ReduceOp.SUM)


def all_reduce_max(tensor: torch.Tensor) -> torch.Tensor:
    """In-place elementwise maximum across ranks; returns `tensor`."""
    return _all_reduce(tensor, dist.ReduceOp.MAX)


def all_reduce_mean(tensor: torch.Tensor) -> torch.Tensor:
    """In-place mean across ranks (floating point); returns `tensor`."""
    _all_reduce(tensor, dist.ReduceOp.SUM)
    if in_process_group():
        tensor /= dist.get_world_size()
    return tensor


def differentiable_mean(tensor: torch.Tensor) -> torch.Tensor:
    """Mean across ranks that autograd differentiates (LFQ's batch code distribution): the
    gradient of each rank's share flows back to that rank."""
    if not is_distributed():
        return tensor
    import torch.distributed.nn

    moved = _on_comm_device(tensor, None)
    reduced = torch.distributed.nn.all_reduce(moved) / dist.get_world_size()
    return reduced.to(tensor.device)


def all_gather_tensors(tensor: torch.Tensor) -> list[torch.Tensor]:
    """Every rank's `tensor` (same shape on every rank), in rank order, on `tensor`'s device."""
    if not in_process_group():
        return [tensor]
    moved = _on_comm_device(tensor, None)
    gathered = [torch.empty_like(moved) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, moved)
    return [t.to(tensor.device) for t in gathered]


def all_gather_objects(obj: object) -> list[object]:
    """Every rank's `obj` (picklable), in rank order, on every rank ([obj] on one process).
    With NCCL the pickles travel through the current CUDA device, which `device_for` sets."""
    if not in_process_group():
        return [obj]
    gathered: list[object] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, obj)
    return gathered


def barrier(group: dist.ProcessGroup | None = None) -> None:
    """Waits for every rank of `group` (default: all), up to the group's timeout."""
    if not in_process_group():
        return
    served = backend_devices(_current_backend(group))
    if "cpu" not in served and served.get("cuda") == "nccl":
        # Without device_ids NCCL guesses the device from the rank and warns.
        dist.barrier(group=group, device_ids=[torch.cuda.current_device()])
    else:
        dist.barrier(group=group)


def new_wait_group(timeout_s: float) -> dist.ProcessGroup | None:
    """A gloo group of all ranks whose collectives wait up to `timeout_s`, for a final wait
    that may legitimately last longer than the default group's timeout (one rank with more
    work than the others). Collective: every rank calls it at the same point, early, before
    the work starts. None without a process group."""
    if not in_process_group():
        return None
    return dist.new_group(backend="gloo", timeout=datetime.timedelta(seconds=timeout_s))
