"""launch/train.sh on a GPU node, checked on a CPU machine: the node is faked around the script.

A fake `nvidia-smi` on PATH makes this machine look like a GPU node whose driver supports CUDA
12.2; the real torch here cannot use CUDA, as a CUDA-13 wheel on that driver could not. The
script must then stop before any launcher or trainer starts, unless CPU was asked for. The
launcher and the trainer are recorded by a fake `deepspeed` next to a `python` that logs its
calls and runs the real interpreter, so the script's own code runs unchanged. For the thread
share on a working GPU node, a stub `torch` (on PYTHONPATH) reports 8 usable GPUs and a fake
`nproc` 64 cores.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from trainrun import CONFIG, REPO

DRIVER = "535.104.05"

NVIDIA_SMI = f"""#!/bin/sh
case "$*" in
    -L) echo "GPU 0: NVIDIA H100 80GB HBM3 (UUID: GPU-00000000-0000-0000-0000-000000000000)" ;;
    *--query-gpu=driver_version*) echo "{DRIVER}" ;;
    *) cat <<'HEADER'
+-----------------------------------------------------------------------------------------+
| NVIDIA-SMI {DRIVER}             Driver Version: {DRIVER}     CUDA Version: 12.2         |
+-----------------------------------------------------------------------------------------+
HEADER
    ;;
esac
"""

# Logs each call (arguments, OMP_NUM_THREADS), then runs the real interpreter; with
# FAKE_TRAINER=1 the trainer itself (`-m pipeline.train`) is only logged.
PYTHON = f"""#!/bin/sh
echo "python $* | OMP_NUM_THREADS=${{OMP_NUM_THREADS-unset}}" >> "$CALLS"
if [ "${{FAKE_TRAINER:-}}" = 1 ] && [ "$1 $2" = "-m pipeline.train" ]; then exit 0; fi
exec "{sys.executable}" "$@"
"""

DEEPSPEED = """#!/bin/sh
echo "deepspeed $* | OMP_NUM_THREADS=${OMP_NUM_THREADS-unset}" >> "$CALLS"
"""

STUB_TORCH = """__version__ = "{version}"
class version:
    cuda = {cuda!r}
class cuda:
    @staticmethod
    def is_available():
        import warnings
        if {warning!r}:
            warnings.warn({warning!r})
        return {gpus} > 0
    device_count = staticmethod(lambda: {gpus})
"""
WORKING = {"version": "2.14.1+cu126", "cuda": "12.6", "gpus": 8, "warning": ""}
TOO_NEW = {  # what torch says on a too-old driver, but a 2-line warning in one
    "version": "2.14.1+cu130",
    "cuda": "13.0",
    "gpus": 0,
    "warning": "CUDA initialization: The NVIDIA driver on your system is too old\n"
    "(found version 12020).",
}
CPU_BUILD = {"version": "2.14.1+cpu", "cuda": None, "gpus": 0, "warning": ""}
FITS = {"version": "2.14.1+cu121", "cuda": "12.1", "gpus": 0, "warning": ""}

RANK_ENV = {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1"}


def executable(path: Path, text: str) -> None:
    path.write_text(text)
    path.chmod(0o755)


class Node:
    """A temp dir of fakes; `run` starts launch/train.sh with them and returns (result, calls)."""

    def __init__(self, root: Path, *, gpu: bool, stub_torch: dict | None = None, cores: int = 0):
        self.bin = root / "bin"
        self.bin.mkdir()
        self.calls = root / "calls.log"
        executable(self.bin / "python", PYTHON)
        executable(self.bin / "deepspeed", DEEPSPEED)
        if gpu:
            executable(self.bin / "nvidia-smi", NVIDIA_SMI)
        if cores:
            executable(self.bin / "nproc", f"#!/bin/sh\necho {cores}\n")
        self.pythonpath = ""
        if stub_torch:
            (root / "stub" / "torch").mkdir(parents=True)
            (root / "stub" / "torch" / "__init__.py").write_text(STUB_TORCH.format(**stub_torch))
            self.pythonpath = str(root / "stub")

    def run(self, *args: str, **env: str) -> tuple[subprocess.CompletedProcess, list[str]]:
        base = {
            k: v
            for k, v in os.environ.items()
            if k
            not in (
                *RANK_ENV,
                "OMP_NUM_THREADS",
                "CUDA_VISIBLE_DEVICES",
                "ALLOW_CPU_ON_GPU_NODE",
                "NPROC_PER_NODE",
                "NNODES",
                "LOCAL_WORLD_SIZE",
                "LOCAL_SIZE",
                "PYTHONPATH",
            )
            and not k.startswith("SLURM_")
        }
        base.update(
            PATH=f"{self.bin}{os.pathsep}{os.environ['PATH']}",
            PYTHON=str(self.bin / "python"),
            CALLS=str(self.calls),
        )
        if self.pythonpath:
            base["PYTHONPATH"] = self.pythonpath
        base.update(env)
        command = ["bash", "launch/train.sh", "--config", str(CONFIG), *args]
        result = subprocess.run(
            command, cwd=REPO, env=base, capture_output=True, text=True, timeout=120
        )
        calls = self.calls.read_text().splitlines() if self.calls.exists() else []
        return result, calls


def started(calls: list[str]) -> list[str]:
    """The launcher and trainer starts among the logged calls (not the script's probes)."""
    return [c for c in calls if c.startswith("deepspeed ") or "-m pipeline.train" in c]


def omp_of(call: str) -> str:
    return call.rsplit("OMP_NUM_THREADS=", 1)[1]


@pytest.fixture
def gpu_node(tmp_path):
    return Node(tmp_path, gpu=True)


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a torch that cannot use CUDA")
@pytest.mark.parametrize("per_rank", [False, True], ids=["launcher", "per-rank"])
def test_gpu_node_without_usable_cuda_fails_fast(gpu_node, per_rank):
    begin = time.monotonic()
    result, calls = gpu_node.run(CUDA_VISIBLE_DEVICES="0", **(RANK_ENV if per_rank else {}))
    elapsed = time.monotonic() - begin
    assert result.returncode != 0, result.stdout + result.stderr
    assert started(calls) == [], calls
    assert elapsed < 30
    message = result.stderr
    assert "torch cannot use CUDA" in message
    assert f"driver {DRIVER}" in message and "CUDA up to 12.2" in message
    assert f"torch {torch.__version__}" in message
    assert f"CUDA {torch.version.cuda}" in message if torch.version.cuda else "CPU-only" in message
    assert "ALLOW_CPU_ON_GPU_NODE=1" in message and "CUDA_VISIBLE_DEVICES=" in message


@pytest.mark.parametrize(
    "stub, expected",
    [
        (
            TOO_NEW,
            [
                "torch 2.14.1+cu130, built for CUDA 13.0",
                "torch says: CUDA initialization: "
                "The NVIDIA driver on your system is too old (found version 12020).",
                "built for CUDA 12.x",
                "whl/cu126",
                "update the NVIDIA driver",
            ],
        ),
        (CPU_BUILD, ["torch 2.14.1+cpu, a CPU-only build", "install a CUDA build of torch"]),
        (FITS, ["torch's CUDA 12.1 fits this driver", "CUDA_VISIBLE_DEVICES=0"]),
    ],
    ids=["wheel-too-new", "cpu-build", "versions-fit"],
)
def test_the_message_names_the_cause(tmp_path, stub, expected):
    node = Node(tmp_path, gpu=True, stub_torch=stub)
    result, calls = node.run(CUDA_VISIBLE_DEVICES="0")
    assert result.returncode == 2 and started(calls) == [], result.stderr
    for text in expected:
        assert text in result.stderr


@pytest.mark.parametrize(
    "cpu_on_purpose",
    [{"CUDA_VISIBLE_DEVICES": ""}, {"CUDA_VISIBLE_DEVICES": "0", "ALLOW_CPU_ON_GPU_NODE": "1"}],
    ids=["CUDA_VISIBLE_DEVICES-empty", "override"],
)
def test_cpu_on_purpose_reaches_the_launcher(gpu_node, cpu_on_purpose):
    result, calls = gpu_node.run(NPROC_PER_NODE="2", **cpu_on_purpose)
    assert result.returncode == 0, result.stderr
    (launch,) = started(calls)
    assert launch.startswith("deepspeed --master_addr 127.0.0.1 --master_port 29500 --num_gpus 2")
    assert "--module pipeline.train --config" in launch


@pytest.mark.parametrize(
    "cpu_on_purpose",
    [{"CUDA_VISIBLE_DEVICES": ""}, {"CUDA_VISIBLE_DEVICES": "0", "ALLOW_CPU_ON_GPU_NODE": "1"}],
    ids=["CUDA_VISIBLE_DEVICES-empty", "override"],
)
def test_cpu_on_purpose_per_rank_runs_the_real_trainer(gpu_node, cpu_on_purpose):
    result, calls = gpu_node.run("--help", **RANK_ENV, **cpu_on_purpose)
    assert result.returncode == 0, result.stderr
    assert "usage:" in result.stdout and "--config CONFIG" in result.stdout
    assert len(started(calls)) == 1, calls


def test_thread_share_on_a_working_gpu_node(tmp_path):
    """8 usable GPUs (stub torch), 64 cores: each rank gets half of its 8-core share."""
    node = Node(tmp_path, gpu=True, stub_torch=WORKING, cores=64)
    result, calls = node.run()
    assert result.returncode == 0, result.stderr
    (launch,) = started(calls)
    assert "--num_gpus 8" in launch and omp_of(launch) == "4"


@pytest.mark.parametrize(
    "env, threads",
    [
        ({"LOCAL_WORLD_SIZE": "4"}, "8"),  # torchrun's
        ({"LOCAL_SIZE": "4"}, "8"),  # the deepspeed launcher's
        ({"SLURM_NTASKS_PER_NODE": "2"}, "16"),  # srun's
        ({}, "4"),  # unknown: one rank per GPU
        ({"LOCAL_WORLD_SIZE": "4", "OMP_NUM_THREADS": "3"}, "3"),  # the user's choice wins
    ],
)
def test_thread_share_per_rank_on_a_working_gpu_node(tmp_path, env, threads):
    node = Node(tmp_path, gpu=True, stub_torch=WORKING, cores=64)
    result, calls = node.run(**RANK_ENV, FAKE_TRAINER="1", **env)
    assert result.returncode == 0, result.stderr
    (trainer,) = started(calls)
    assert omp_of(trainer) == threads


@pytest.mark.skipif(
    torch.cuda.is_available() or Path("/dev/nvidia0").exists(), reason="needs a CPU-only machine"
)
def test_thread_share_on_a_cpu_machine_is_unchanged(tmp_path):
    node = Node(tmp_path, gpu=False, cores=64)
    result, calls = node.run(NPROC_PER_NODE="2")
    assert result.returncode == 0, result.stderr
    (launch,) = started(calls)
    assert "--num_gpus 2" in launch and omp_of(launch) == "32"
