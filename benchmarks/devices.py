"""Device and precision options shared by the model, encode, train and GPU-train benchmarks:
`--device {cpu,cuda}`, `--precision {fp32,bf16}`, synchronized timing, peak CUDA memory, and
the machine description every JSON report carries."""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from pathlib import Path

import torch

DEVICES = ("cpu", "cuda")
PRECISIONS = ("fp32", "bf16")


def add_device_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--device",
        choices=DEVICES,
        default="cpu",
        help="cuda: synchronized timings, peak CUDA memory instead of RSS (default: %(default)s)",
    )
    parser.add_argument("--precision", choices=PRECISIONS, default="fp32")


def resolve_device(name: str) -> torch.device:
    """The device to run on; exits with the reason where CUDA is asked for and absent."""
    if name == "cuda" and not torch.cuda.is_available():
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        sys.exit(
            f"--device cuda: no CUDA device is visible (torch {torch.__version__}, built for "
            f"CUDA {torch.version.cuda or 'none'}; CUDA_VISIBLE_DEVICES={visible!r})"
        )
    return torch.device(name)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device: torch.device) -> float:
    """Seconds of one call, with the device's queued work inside the measurement."""
    synchronize(device)
    start = time.perf_counter()
    fn()
    synchronize(device)
    return time.perf_counter() - start


def cuda_peak_of(fn, device: torch.device) -> dict:
    """Peak CUDA memory allocated during one call, above (and including) what was allocated
    before it."""
    synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    fn()
    synchronize(device)
    peak = torch.cuda.max_memory_allocated(device)
    return {
        "peak_step_bytes": peak - before,
        "peak_live_bytes": peak,
        "memory_source": "torch.cuda.max_memory_allocated",
    }


def rss_bytes() -> int:
    """This process's resident set size now."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_rss_bytes(reset: bool = False) -> int:
    """VmHWM, the peak RSS; `reset` restarts it from the current RSS (ru_maxrss cannot be
    reset, and a child inherits its parent's across exec)."""
    if reset:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    with open("/proc/self/status") as f:
        line = next(line for line in f if line.startswith("VmHWM:"))
    return int(line.split()[1]) * 1024


def _cpu_model_and_flags() -> dict:
    """The CPU's model name and its vector-extension flags (AVX2 / AVX-512 machines differ),
    from /proc/cpuinfo where there is one."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return {}
    fields = dict(line.split(":", 1) for line in text.splitlines()[:40] if ":" in line)
    fields = {key.strip(): value.strip() for key, value in fields.items()}
    flags = sorted(f for f in fields.get("flags", "").split() if f.startswith(("avx", "amx")))
    return {
        "cpu_model": fields.get("model name", ""),
        "cpu_flags": flags,
        "cpu_cores": os.cpu_count(),
    }


def machine_info(device: torch.device) -> dict:
    info = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cpu": platform.processor() or platform.machine(),
        **_cpu_model_and_flags(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "device": str(device),
    }
    if device.type == "cuda":
        info.update(
            gpu=torch.cuda.get_device_name(device),
            cuda=torch.version.cuda,
            cudnn=torch.backends.cudnn.version(),
        )
    return info
