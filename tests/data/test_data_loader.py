"""pipeline.data.loader: rank/worker splits, resampling, bad shards and samples, mixed batches."""

from __future__ import annotations

import io
import os
import shutil
import signal
import tarfile
from collections import defaultdict

import av
import numpy as np
import pytest
import torch
from media import pattern_frames, read_samples, shard, write_video

from data_prep.format import SampleMeta
from pipeline.data.loader import DataConfig, ShardLoader, resolve_shards
from pipeline.distributed.world import World


def _config(shards, **overrides) -> DataConfig:
    base = dict(
        video_shards=tuple(shards),
        num_frames=9,
        image_size=32,
        micro_batch_size=2,
        num_workers=2,
        mode="eval",
        seed=0,
    )
    return DataConfig(**{**base, **overrides})


def _take(loader, count: int) -> list:
    """First ``count`` batches; fails instead of hanging if the loader stalls."""

    def on_alarm(*_):
        raise TimeoutError("the loader stalled")

    previous = signal.signal(signal.SIGALRM, on_alarm)
    signal.alarm(60)
    try:
        return [batch for _, batch in zip(range(count), loader, strict=False)]
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def test_world_from_env(monkeypatch):
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert World.from_env() == World(rank=3, world_size=4, local_rank=1)
    assert World.from_env({}) == World()
    with pytest.raises(ValueError, match="rank"):
        World(rank=2, world_size=2)


def test_config_validation():
    with pytest.raises(ValueError, match=r"1 \+ k \* time_compression"):
        DataConfig(video_shards=("x",), num_frames=16)
    with pytest.raises(ValueError, match="crop must be one of"):
        DataConfig(video_shards=("x",), crop="zoom")
    with pytest.raises(ValueError, match="image_shards is empty"):
        DataConfig(video_shards=("x",), image_batch_ratio=0.5)
    with pytest.raises(ValueError, match="unknown data config keys"):
        DataConfig.from_dict({"video_shards": ["x"], "batch": 3})
    assert DataConfig.from_dict({"video_shards": ["x"], "num_frames": 5}).video_shards == ("x",)


def test_ordered_mode_splits_shards_over_ranks_and_workers(synthetic_dataset):
    samples = read_samples(synthetic_dataset)
    shard_of = {key: name for key, (_, _, name) in samples.items()}
    video_keys = {k for k, (m, _, _) in samples.items() if m.kind == "video"}
    assert len(set(shard_of[k] for k in video_keys)) >= 6  # more shards than 2 x 2 readers
    readers: dict[tuple[int, int], list[str]] = defaultdict(list)
    for rank in (0, 1):
        loader = ShardLoader(_config([synthetic_dataset]), World(rank=rank, world_size=2))
        for batch in loader:
            readers[rank, batch.worker] += batch.keys
    assert set(readers) == {(0, 0), (0, 1), (1, 0), (1, 1)}
    all_keys = [k for keys in readers.values() for k in keys]
    assert len(all_keys) == len(set(all_keys)) == len(video_keys)
    assert set(all_keys) == video_keys
    shards = {reader: {shard_of[k] for k in keys} for reader, keys in readers.items()}
    for a in shards:
        for b in shards:
            assert a == b or not shards[a] & shards[b], (a, b)


def test_resampled_mode_never_stalls_with_one_shard(tmp_path):
    path = write_video(str(tmp_path / "v.mp4"), pattern_frames(27, 48, 32))
    shard([path], str(tmp_path / "out"), num_frames=9, size=32, workers=1)
    assert len(resolve_shards((str(tmp_path / "out"),), "video")) == 1
    for rank in (0, 1):
        config = _config([str(tmp_path / "out")], mode="train", steps_per_epoch=3, seed=rank)
        batches = _take(ShardLoader(config, World(rank=rank, world_size=2)), 8)
        assert len(batches) == 8 and {b.worker for b in batches} == {0, 1}
        assert all(b.uint8.shape == (2, 3, 9, 32, 32) for b in batches)


def test_corrupt_shards_are_skipped(synthetic_dataset, tmp_path):
    good = resolve_shards((synthetic_dataset,), "video")[:4]
    truncated = str(tmp_path / "truncated.tar")
    data = open(good[0], "rb").read()
    open(truncated, "wb").write(data[: len(data) // 2])
    garbage = str(tmp_path / "garbage.tar")
    open(garbage, "wb").write(b"not a tar at all" * 100)
    missing = str(tmp_path / "missing.tar")
    shards = [truncated, good[1], garbage, good[2], missing, good[3]]
    expected = {
        k
        for k, (_, _, n) in read_samples(synthetic_dataset).items()
        if os.path.join(synthetic_dataset, n) in good[1:]
    }
    loader = ShardLoader(_config(shards), World())
    keys = [k for batch in loader for k in batch.keys]
    assert expected <= set(keys) and len(keys) == len(set(keys))
    assert loader.stats["bad_shard"] >= 3  # truncated, garbage, missing
    train = ShardLoader(_config(shards, mode="train", steps_per_epoch=4), World())
    assert len(_take(train, 10)) == 10


def _tar(path: str, members: dict[str, bytes]) -> str:
    with tarfile.open(path, "w") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def test_bad_samples_are_counted_and_skipped(synthetic_dataset, tmp_path):
    samples = read_samples(synthetic_dataset)
    key, (meta, payload, _) = next((k, s) for k, s in samples.items() if s[0].kind == "video")
    image_meta, image_payload, _ = next(s for s in samples.values() if s[0].kind == "image")
    short = write_video(str(tmp_path / "short.mp4"), pattern_frames(3, 32, 32))
    short_meta = SampleMeta.from_json(meta.to_json())  # the clip's metadata fits any payload
    members = {
        "a.json": meta.to_json(),
        "a.mp4": payload,  # good
        "b.json": meta.to_json(),  # payload missing
        "c.json": meta.to_json(),
        "c.mp4": b"\x00\x00\x00\x18ftypmp42 broken",  # undecodable
        "d.json": short_meta.to_json(),
        "d.mp4": open(short, "rb").read(),  # too short
        "e.json": b"{not json",
        "e.mp4": payload,  # bad metadata
        "f.json": image_meta.to_json(),
        "f.jpg": image_payload,  # an image among videos
    }
    shards = [_tar(str(tmp_path / f"bad{i}.tar"), members) for i in range(2)]
    loader = ShardLoader(_config(shards, micro_batch_size=1), World())
    keys = [k for batch in loader for k in batch.keys]
    assert keys == ["a", "a"]
    stats = loader.stats  # summed over the two workers
    assert stats["samples"] == 2 and stats["batches"] == 2
    assert (stats["bad_missing_key"], stats["bad_metadata"], stats["bad_undecodable"]) == (2, 2, 2)
    assert (stats["bad_too_short"], stats["bad_wrong_kind"]) == (2, 2)
    assert key  # the good sample came from the real dataset


def test_mixed_image_and_video_batches(synthetic_dataset):
    config = _config(
        [synthetic_dataset],
        image_shards=(synthetic_dataset,),
        mode="train",
        image_batch_ratio=0.25,
        image_batch_size=3,
        num_workers=0,
    )
    batches = _take(ShardLoader(config, World()), 8)
    assert [b.kind for b in batches] == ["video", "video", "video", "image"] * 2
    for batch in batches:
        pixels = batch.pixels()
        shape = (2, 3, 9, 32, 32) if batch.kind == "video" else (3, 3, 32, 32)
        assert pixels.shape == shape and pixels.dtype == torch.float32
        assert -1.0 <= pixels.min() < 0 < pixels.max() <= 1.0


def test_pyav_backend_matches_decord(synthetic_dataset):
    """Same clips, same geometry; the colours differ by the conversion only: decord's swscale
    fast path reads about 1.2 levels darker than the exact BT.601 of ``yuv420_to_rgb``."""
    results = {}
    for backend in ("decord", "pyav"):
        loader = ShardLoader(_config([synthetic_dataset], backend=backend, crop="center"), World())
        results[backend] = {k: x for b in loader for k, x in zip(b.keys, b.uint8, strict=True)}
    assert results["decord"].keys() == results["pyav"].keys()
    for key, clip in results["decord"].items():
        diff = (clip.float() - results["pyav"][key].float()).abs()
        assert diff.max() <= 4 and diff.mean() < 1.5, (key, diff.max(), diff.mean())


@pytest.mark.parametrize("num_workers", [0, 2])
def test_eval_mode_counts_skips_after_the_last_batch(synthetic_dataset, num_workers):
    """Counters travel with batches; a worker whose samples are all skipped still reports them
    (the evaluator's summary lists the skipped samples)."""
    videos = [m for m, _, _ in read_samples(synthetic_dataset).values() if m.kind == "video"]
    loader = ShardLoader(_config([synthetic_dataset], num_frames=1001, num_workers=num_workers))
    assert _take(loader, 100) == []
    assert loader.stats["bad_too_short"] == len(videos) > 0
    assert loader.stats["samples"] == loader.stats["batches"] == 0


def test_eval_mode_with_fewer_shards_than_readers(tmp_path):
    path = write_video(str(tmp_path / "v.mp4"), pattern_frames(27, 48, 32))
    shard([path], str(tmp_path / "out"), num_frames=9, size=32, workers=1)
    keys = []
    for rank in (0, 1):
        loader = ShardLoader(_config([str(tmp_path / "out")]), World(rank=rank, world_size=2))
        keys += [k for batch in _take(loader, 100) for k in batch.keys]
    assert sorted(keys) == sorted(read_samples(str(tmp_path / "out")))
    shutil.rmtree(tmp_path / "out")


@pytest.mark.parametrize("backend", ["decord", "pyav"])
def test_window_decoding_seeks_to_the_right_frames(tmp_path, backend):
    """Windows from the middle of a long file (keyframes every 8 frames) equal the same frames
    of a full decode: seeking lands on the right frame with either backend."""
    import random

    from media import decode_all

    from pipeline.data.decode import decode_window

    frames = pattern_frames(60, 64, 48)
    path = str(tmp_path / "long.mp4")
    with av.open(path, "w") as container:
        stream = container.add_stream("libx264", rate=25)
        stream.width, stream.height, stream.pix_fmt = 64, 48, "yuv420p"
        stream.options = {"g": "8", "keyint_min": "8", "crf": "16"}
        for frame in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode())
    payload = open(path, "rb").read()
    full = decode_all(payload)
    for start in (0, 5, 8, 19, 43):
        window = decode_window(payload, 9, 2, start, random.Random(0), backend, 25.0)
        assert window.shape == (9, 48, 64, 3)
        assert np.array_equal(window.numpy(), full[start : start + 17 : 2]), start
    with pytest.raises(ValueError, match="needs 17"):  # TooShort
        decode_window(payload, 9, 2, 44, random.Random(0), backend, 25.0)
