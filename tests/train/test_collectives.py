"""Collectives go through pipeline.distributed.collectives, which puts each tensor where the backend
can reduce it: NCCL has no CPU path, so a host tensor all-reduced in an NCCL group crashes the job
("No backend type associated with device type cpu") at its first log step."""

from __future__ import annotations

import ast
import datetime
import os
import time
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from trainrun import REPO, free_port

from pipeline.distributed import collectives as distributed
from pipeline.distributed.collectives import backend_devices, communication_device

# torch.distributed calls that communicate (or create groups, a collective too).
COLLECTIVES = {
    "all_reduce",
    "all_reduce_coalesced",
    "all_gather",
    "all_gather_into_tensor",
    "all_gather_object",
    "all_to_all",
    "all_to_all_single",
    "barrier",
    "monitored_barrier",
    "broadcast",
    "broadcast_object_list",
    "gather",
    "gather_object",
    "reduce",
    "reduce_scatter",
    "reduce_scatter_tensor",
    "scatter",
    "scatter_object_list",
    "send",
    "recv",
    "isend",
    "irecv",
    "new_group",
}
ALLOWED = {Path("pipeline/distributed/collectives.py")}


@pytest.mark.parametrize(
    "backend, expected",
    [
        ("nccl", {"cuda": "nccl"}),
        ("gloo", {"cpu": "gloo", "cuda": "gloo"}),
        ("cpu:gloo,cuda:nccl", {"cpu": "gloo", "cuda": "nccl"}),
        ("cuda:nccl", {"cuda": "nccl"}),
        ("cpu:gloo,cuda:gloo", {"cpu": "gloo", "cuda": "gloo"}),
        ("mpi", {"cpu": "mpi", "cuda": "mpi"}),
    ],
)
def test_backend_names_map_to_the_devices_they_serve(backend, expected):
    assert backend_devices(backend) == expected


def test_host_tensors_go_to_the_cuda_device_under_nccl_and_stay_put_otherwise(monkeypatch):
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 3)
    cuda3, cpu = torch.device("cuda", 3), torch.device("cpu")
    assert communication_device("cpu", "nccl") == cuda3  # the crash this module prevents
    assert communication_device("cpu", "cuda:nccl") == cuda3
    assert communication_device("cuda:1", "nccl") == torch.device("cuda", 1)
    assert communication_device("cpu", "gloo") == cpu
    assert communication_device("cpu", "cpu:gloo,cuda:nccl") == cpu  # a host-side backend
    assert communication_device("cuda:0", "cpu:gloo,cuda:nccl") == torch.device("cuda", 0)
    assert communication_device("cuda:0", "cpu:gloo") == cpu


def _calls(path: Path) -> list[str]:
    """`dist.X(...)`, `torch.distributed.X(...)`, `torch.distributed.nn.X(...)` and names
    imported from torch.distributed, for X a collective."""
    tree = ast.parse(path.read_text(), str(path))
    aliases = {"torch.distributed", "torch.distributed.nn", "torch.distributed.nn.functional"}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            aliases |= {a.asname for a in node.names if a.name.startswith("torch.distributed")}
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("torch.distributed"):
            found += [
                f"from {node.module} import {a.name}" for a in node.names if a.name in COLLECTIVES
            ]
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
            owner = ast.unparse(node.func.value)
            if node.func.attr in COLLECTIVES and owner in aliases:
                found.append(f"line {node.lineno}: {ast.unparse(node.func)}")
    return found


def test_no_module_calls_torch_distributed_collectives_directly():
    offenders = {}
    for folder in ("pipeline", "model", "data_prep", "benchmarks"):
        for path in sorted((REPO / folder).rglob("*.py")):
            relative = path.relative_to(REPO)
            if relative not in ALLOWED and (calls := _calls(path)):
                offenders[str(relative)] = calls
    assert not offenders, f"use pipeline.distributed.collectives instead: {offenders}"


def test_the_guard_finds_direct_calls(tmp_path):
    sample = tmp_path / "sample.py"
    sample.write_text(
        "import torch\nimport torch.distributed as dist\nimport torch.distributed.nn\n"
        "from torch.distributed import barrier\n"
        "dist.all_reduce(x)\ntorch.distributed.barrier()\ntorch.distributed.nn.all_reduce(y)\n"
        "dist.get_rank()\n"
    )
    assert len(_calls(sample)) == 4


def _wait_worker(rank: int, port: int, results) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.distributed.init_process_group(
        "gloo", rank=rank, world_size=2, timeout=datetime.timedelta(seconds=2)
    )
    try:
        wait_group = distributed.new_wait_group(60)
        total = distributed.all_reduce_sum(torch.tensor([rank + 1.0], dtype=torch.float64))
        maximum = distributed.all_reduce_max(torch.tensor([float(rank)]))
        mean = distributed.all_reduce_mean(torch.tensor([2.0 * rank]))
        start = time.monotonic()
        if rank == 1:
            time.sleep(4)  # more work than the group's 2 s timeout allows
        distributed.barrier(wait_group)
        results[rank] = (total.item(), maximum.item(), mean.item(), time.monotonic() - start)
    finally:
        distributed.teardown()


@pytest.mark.distributed
def test_collectives_on_two_gloo_ranks_and_a_wait_longer_than_the_group_timeout():
    """The token export's final wait: a rank with more shards finishes long after the others,
    which must not abort the job at the default timeout."""
    with mp.Manager() as manager:
        results = manager.dict()
        mp.spawn(_wait_worker, args=(free_port(), results), nprocs=2, join=True)
        results = dict(results)
    assert results[0][:3] == (3.0, 1.0, 1.0) and results[1][:3] == (3.0, 1.0, 1.0)
    assert results[0][3] > 3.5  # rank 0 waited past the 2 s timeout, and was not aborted
