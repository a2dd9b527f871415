"""Without decord (PyAV only, as on aarch64): sharding, loading and evaluation still work, in a
fresh interpreter where `import decord` fails."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from helpers import repo_env

TESTS = Path(__file__).resolve().parents[1]

SCRIPT = """
import sys
sys.modules["decord"] = None  # `import decord` raises ImportError from here on
sys.path[:0] = [{tests!r}, {tests!r} + "/data", {tests!r} + "/inference"]
from pathlib import Path

import data_prep.video_io
import pipeline.data.decode
from export_helpers import NUM_FRAMES, SIZE, tiny_export_model
from media import pattern_frames, shard, write_video

from model.pretrained import save_pretrained
from pipeline.data.loader import DataConfig, ShardLoader
from pipeline.distributed.world import World
from pipeline.inference.evaluate import main, parse_args

assert data_prep.video_io.decord is None and pipeline.data.decode.decord is None
root = Path({root!r})
write_video(str(root / "a.mp4"), pattern_frames(30, 40, 32), 25)
result = shard([str(root / "a.mp4")], str(root / "shards"), workers=1, num_frames=NUM_FRAMES,
               size=SIZE, stride=9)
assert result.exit_code == 0, result.message
for backend in ("pyav", "decord"):  # "decord" asked for, PyAV decodes
    config = DataConfig(video_shards=(str(root / "shards"),), num_frames=NUM_FRAMES,
                        time_compression=2, image_size=SIZE, micro_batch_size=2, num_workers=0,
                        mode="eval", seed=0, backend=backend)
    batches = list(ShardLoader(config, World()))
    assert sum(len(b.keys) for b in batches) == 3, [b.keys for b in batches]
    assert batches[0].pixels("cpu").shape[-3:] == (NUM_FRAMES, SIZE, SIZE)
save_pretrained(tiny_export_model(), root / "export")
args = ["--checkpoint", str(root / "export"), "--shards", str(root / "shards"),
        "--out", str(root / "eval"), "--num-frames", str(NUM_FRAMES),
        "--lpips", "off", "--fvd", "off", "--fid", "off"]
assert main(parse_args(args)) == 0
assert (root / "eval" / "summary.json").exists()
print("WITHOUT DECORD OK")
"""


def test_shard_load_and_evaluate_without_decord(tmp_path):
    script = SCRIPT.format(tests=str(TESTS), root=str(tmp_path))
    env = {k: v for k, v in repo_env().items() if k not in ("RANK", "WORLD_SIZE")}
    result = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    assert "WITHOUT DECORD OK" in result.stdout
