"""pipeline.data.loader seeding and checkpointable state: distinct per rank/worker/epoch,
deterministic for a fixed seed, and a resumed run continues with fresh samples instead of
replaying."""

from __future__ import annotations

import json

import torch

from pipeline.data.loader import DataConfig, ShardLoader
from pipeline.data.stages import reader_seed
from pipeline.distributed.world import World


def _config(dataset: str, **overrides) -> DataConfig:
    base = dict(
        video_shards=(dataset,),
        num_frames=9,
        image_size=32,
        micro_batch_size=2,
        num_workers=2,
        mode="train",
        steps_per_epoch=4,
        shuffle_buffer=8,
        seed=7,
    )
    return DataConfig(**{**base, **overrides})


def _run(loader: ShardLoader, count: int) -> tuple[list[str], torch.Tensor]:
    batches = [b for _, b in zip(range(count), loader, strict=False)]
    return [k for b in batches for k in b.keys], torch.stack([b.uint8 for b in batches])


def test_reader_seeds_differ_across_ranks_workers_and_epochs():
    seeds = {
        reader_seed(7, epoch, World(rank=rank, world_size=2, worker_id=worker, num_workers=2))
        for epoch in range(3)
        for rank in range(2)
        for worker in range(2)
    }
    assert len(seeds) == 12
    assert reader_seed(7, 0, World()) == reader_seed(7, 0, World())
    assert reader_seed(7, 0, World()) != reader_seed(8, 0, World())


def test_fixed_seed_is_deterministic(synthetic_dataset):
    keys_a, pixels_a = _run(ShardLoader(_config(synthetic_dataset), World()), 6)
    keys_b, pixels_b = _run(ShardLoader(_config(synthetic_dataset), World()), 6)
    assert keys_a == keys_b and torch.equal(pixels_a, pixels_b)
    keys_c, _ = _run(ShardLoader(_config(synthetic_dataset, seed=8), World()), 6)
    assert keys_c != keys_a
    other_rank = ShardLoader(_config(synthetic_dataset), World(rank=1, world_size=2))
    assert _run(other_rank, 6)[0] != keys_a


def test_resume_continues_with_fresh_samples(synthetic_dataset):
    first = ShardLoader(_config(synthetic_dataset), World())
    keys_first, pixels_first = _run(first, 6)  # 1.5 epochs of 4 batches
    assert first.epoch == 1 and first.samples_seen == 12
    state = json.loads(json.dumps(first.state_dict()))  # checkpoints may store it as JSON
    assert state["epoch"] == 1 and state["stats"]["samples"] >= 12

    resumed = ShardLoader(_config(synthetic_dataset, seed=None), World())  # a random seed...
    resumed.load_state_dict(state)  # ...replaced by the checkpoint's
    keys_resumed, pixels_resumed = _run(resumed, 6)
    assert resumed.seed == first.seed and resumed.epoch == 3
    assert resumed.samples_seen == 24 and resumed.stats["samples"] >= 24

    # A restart without the state replays the first run exactly; the resumed run does not
    # replay the interrupted epoch or the first one.
    replay_keys, replay_pixels = _run(ShardLoader(_config(synthetic_dataset), World()), 12)
    assert replay_keys[:12] == keys_first and torch.equal(replay_pixels[:6], pixels_first)
    assert keys_resumed != keys_first and keys_resumed != replay_keys[12:]
    assert not torch.equal(pixels_resumed, pixels_first)
    # Same clip, different window/crop/flip: even repeated keys come out differently.
    assert not torch.equal(pixels_resumed, replay_pixels[6:])


def test_reiterating_after_a_break_does_not_replay(synthetic_dataset):
    loader = ShardLoader(_config(synthetic_dataset), World())
    keys_first, _ = _run(loader, 2)  # stops inside epoch 0
    samples_first = loader.stats["samples"]
    keys_again, _ = _run(loader, 2)  # a new iterator: epoch 1, not epoch 0 again
    assert loader.epoch == 1 and keys_again != keys_first
    assert loader.samples_seen == 8 and loader.stats["samples"] > samples_first
