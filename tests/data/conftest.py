"""Session fixtures for the data-path tests (helpers live in media.py)."""

from __future__ import annotations

import os

import numpy as np
import pytest
from media import pattern_frames, shard, write_video


@pytest.fixture(scope="session")
def synthetic_sources(tmp_path_factory) -> dict[str, np.ndarray]:
    """Five small videos of different sizes, rates and containers, and two images."""
    folder = tmp_path_factory.mktemp("synthetic")
    specs = {  # name: (frames, width, height, fps, codec, container)
        "wide.mp4": (52, 80, 48, 25, "libx264", None),
        "tall.mkv": (40, 48, 64, 25, "libx264", None),
        "fast.mp4": (70, 64, 48, 50, "libx264", None),
        "sub/vp9.webm": (36, 64, 64, 25, "libvpx-vp9", None),
        "sub/vp8.OGV": (35, 64, 48, 25, "libvpx", "ogg"),  # decord cannot open Ogg: PyAV path
    }
    sources = {}
    for i, (name, (n, w, h, fps, codec, fmt)) in enumerate(specs.items()):
        path = folder / name
        path.parent.mkdir(exist_ok=True)
        frames = pattern_frames(n, w, h, phase=i / 7)
        write_video(str(path), frames, fps, codec, fmt)
        sources[str(path)] = frames
    from PIL import Image

    for i, (w, h) in enumerate(((96, 64), (40, 56))):
        frame = pattern_frames(1, w, h, phase=i / 3)[0]
        path = folder / "images" / f"img{i}.png"
        path.parent.mkdir(exist_ok=True)
        Image.fromarray(frame).save(path)
        sources[str(path)] = frame
    return sources


@pytest.fixture(scope="session")
def synthetic_dataset(synthetic_sources, tmp_path_factory) -> str:
    """The synthetic sources sharded at 32 px, 9-frame clips, at most 3 samples per shard."""
    folder = os.path.dirname(next(iter(synthetic_sources)))
    output = str(tmp_path_factory.mktemp("synthetic_shards"))
    result = shard([folder], output, num_frames=9, size=32, max_shard_samples=3)
    assert result.exit_code == 0, result.message
    return output
