"""Helpers of the GPU tests: launching training on the GPU (GPUs visible, a one-rank NCCL
group), comparing codes. A plain module with a name no other test folder uses.

The CPU tests hide GPUs from the ranks they launch (tests/train/trainrun.py); these helpers never
touch CUDA_VISIBLE_DEVICES, so a launched rank sees what pytest sees.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch
from trainrun import CONFIG, REPO, free_port

DRIVER = Path(__file__).resolve().with_name("forced_collectives.py")
_LAUNCHER_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


def agreement(a: torch.Tensor, b: torch.Tensor) -> float:
    """Share of equal entries of two equally shaped tensors."""
    assert a.shape == b.shape, (tuple(a.shape), tuple(b.shape))
    return float((a.cpu() == b.cpu()).double().mean())


def one_rank_env(**extra: str) -> dict[str, str]:
    """A world of one for a subprocess: what DeepSpeed needs to form its NCCL group of one rank
    without a launcher (or MPI discovery). The project on PYTHONPATH, whatever else is there (the
    GPU machine installs dependencies to a folder named by PYTHONPATH)."""
    env = {k: v for k, v in os.environ.items() if k not in _LAUNCHER_VARIABLES}
    path = [str(REPO), *filter(None, env.get("PYTHONPATH", "").split(os.pathsep))]
    env.update(
        RANK="0",
        WORLD_SIZE="1",
        LOCAL_RANK="0",
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(free_port()),
        PYTHONPATH=os.pathsep.join(path),
        PYTHONUNBUFFERED="1",
        NCCL_DEBUG=os.environ.get("NCCL_DEBUG", "WARN"),  # says why, should NCCL fail to start
    )
    env.update(extra)
    return env


def train_on_gpu(
    overrides: list[str], report: Path, timeout: float = 120
) -> subprocess.CompletedProcess:
    """`python -m pipeline.train --config tiny_cpu.yaml OVERRIDES` in a world of one on the GPU,
    with every multi-rank code path forced on (forced_collectives.py); `report` receives which
    collectives ran, from where, on which devices."""
    command = [sys.executable, str(DRIVER), "--report", str(report), "train"]
    command += ["--config", str(CONFIG), *overrides]
    return subprocess.run(
        command, cwd=REPO, env=one_rank_env(), capture_output=True, text=True, timeout=timeout
    )


def collectives_selftest(report: Path, timeout: float = 120) -> subprocess.CompletedProcess:
    """pipeline.distributed.collectives's collectives on a one-rank NCCL group, CPU and CUDA
    tensors."""
    command = [sys.executable, str(DRIVER), "--report", str(report), "selftest"]
    return subprocess.run(
        command, cwd=REPO, env=one_rank_env(), capture_output=True, text=True, timeout=timeout
    )


def read_report(path: Path) -> dict:
    return json.loads(path.read_text()) if path.is_file() else {}


def pipeline_collectives(report: dict) -> dict[str, list[str]]:
    """{'module:op': device types} of the collectives pipeline code issued."""
    return {k: v for k, v in report.get("calls", {}).items() if k.startswith("pipeline")}
