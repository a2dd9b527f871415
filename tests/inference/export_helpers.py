"""Helpers for the evaluation and token-export tests: a tiny tokenizer with random weights and
running a module as a CLI (one process, or several under torchrun)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from helpers import randomize_, repo_env, tiny_tokenizer

REPO = Path(__file__).resolve().parents[2]
NUM_FRAMES = 9
SIZE = 32
# Every layer kind with time state, time compression f = 2 (9 = 1 + 4f), space /2.
LAYERS = (
    "residual",
    "compress_space",
    "compress_time",
    "attend_space",
    "gateloop_time",
    "attend_time",
)


def tiny_export_model(seed: int = 0, **overrides):
    model = tiny_tokenizer(seed=seed, image_size=SIZE, layers=LAYERS, **overrides)
    randomize_(model, seed=seed + 1)
    return model.eval()


def run_module(module: str, args: list[str], ranks: int = 1, timeout: int = 240):
    """`python -m module args`, or under torchrun with `ranks` CPU processes."""
    # CUDA hidden: CPU ranks on gloo even on a GPU machine (the GPU tests are in tests/gpu/).
    env = repo_env(OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")
    if ranks == 1:
        command = [sys.executable, "-m", module, *args]
    else:
        command = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node",
            str(ranks),
            "-m",
            module,
            *args,
        ]
    return subprocess.run(
        command, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout
    )
