"""pipeline.inference.tokenize: token export on 2 ranks covers every clip once and decodes to the
evaluator's PSNR; resuming; file commands round trip; bad shards, codes files and chunk sizes are
clear errors."""

import csv
import io
import json
import os
import tarfile
from pathlib import Path

import av
import numpy as np
import pytest
import torch
from export_helpers import NUM_FRAMES, SIZE, run_module, tiny_export_model
from media import read_samples

from data_prep.token_format import CodesMeta, TokenMeta, load_codes, save_codes
from pipeline.data.decode import (
    crop_to_square,
    decode_window,
    frames_as_loaded,
    stack_clips,
    to_pixels,
    to_uint8,
)
from pipeline.inference import evaluate, token_files
from pipeline.inference.quality import psnr_per_clip, to_unit_range
from pipeline.inference.tokenize import main, parse_args


def read_token_shards(directory: Path) -> dict[str, tuple[np.ndarray, TokenMeta, str]]:
    """key -> (codes, metadata, shard name); a key in two shards fails the test."""
    samples = {}
    for path in sorted(directory.glob("tokens-*.tar")):
        members: dict[str, dict[str, bytes]] = {}
        with tarfile.open(path) as tar:
            for info in tar.getmembers():
                key, _, ext = info.name.partition(".")
                members.setdefault(key, {})[ext] = tar.extractfile(info).read()
        for key, parts in members.items():
            assert key not in samples, f"{key} is in two token shards"
            codes = np.load(io.BytesIO(parts["npy"]))
            samples[key] = (codes, TokenMeta.from_json(parts["json"]), path.name)
    return samples


def _export_args(export_dir, clip_dataset, output) -> list[str]:
    return [
        "--checkpoint",
        str(export_dir),
        "--shards",
        str(clip_dataset),
        "--output",
        str(output),
        "--batch-size",
        "2",
    ]


@pytest.mark.distributed
def test_two_rank_export_covers_every_clip_once_and_decodes_to_the_evaluated_psnr(
    clip_dataset, export_dir, tmp_path
):
    output = tmp_path / "tokens"
    result = run_module("pipeline.tokenize", _export_args(export_dir, clip_dataset, output), 2)
    assert result.returncode == 0, result.stderr[-3000:]
    clips = read_samples(str(clip_dataset))
    tokens = read_token_shards(output)
    assert sorted(tokens) == sorted(clips)  # every clip exactly once
    manifest = json.loads((output / "manifest.json").read_text())
    assert manifest["complete"] and manifest["missing"] == []
    assert manifest["settings"]["precision"] == "fp32"  # 'auto' on CPU, as encode-file's
    assert manifest["totals"]["num_samples"] == len(clips)
    assert manifest["totals"]["num_skipped"] == 0
    assert len(manifest["shards"]) == len({name for _, _, name in clips.values()})
    # The evaluator's per-clip PSNR, and the same clips decoded from their tokens.
    assert (
        evaluate.main(
            evaluate.parse_args(
                [
                    "--checkpoint",
                    str(export_dir),
                    "--shards",
                    str(clip_dataset),
                    "--num-frames",
                    str(NUM_FRAMES),
                    "--num-workers",
                    "0",
                    "--num-videos",
                    "0",
                    "--out",
                    str(tmp_path / "eval"),
                ]
            )
        )
        == 0
    )
    evaluated = {
        r["key"]: float(r["psnr"]) for r in csv.DictReader(open(tmp_path / "eval" / "clips.csv"))
    }
    model = tiny_export_model()
    for key, (codes, meta, _) in tokens.items():
        clip_meta, payload, shard_name = clips[key]
        assert meta.source == json.loads(clip_meta.to_json()) and meta.source_shard == shard_name
        assert codes.dtype == np.int16 and list(codes.shape) == meta.shape == [5, 16, 16]
        # Decoded as the evaluation loader decodes (its PyAV planes, converted by to_pixels).
        frames = decode_window(payload, NUM_FRAMES, 1, 0, None, "pyav", clip_meta.fps, planar=True)
        real = to_pixels(stack_clips([crop_to_square(frames, SIZE, "center", None)]))
        with torch.no_grad():
            recon = model.decode_from_code_indices(torch.from_numpy(codes.astype(np.int64))[None])
        psnr = float(psnr_per_clip(to_unit_range(real), to_unit_range(recon)))
        assert psnr == pytest.approx(evaluated[key], abs=1e-3), key


def test_export_resumes_and_refuses_other_settings(clip_dataset, export_dir, tmp_path, capsys):
    output = tmp_path / "tokens"
    args = _export_args(export_dir, clip_dataset, output)
    assert main(parse_args(args)) == 0
    shards = sorted(output.glob("tokens-*.tar"))
    first = {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in shards}
    # A killed run: one shard missing, a half-written temporary file left behind.
    os.remove(shards[1])
    (output / f".{shards[1].name}.partial").write_bytes(b"half a tar")
    assert main(parse_args(args)) == 0
    for path in sorted(output.glob("tokens-*.tar")):
        mtime, data = first[path.name]
        assert path.read_bytes() == data  # deterministic, and the same shard list
        assert (path.stat().st_mtime_ns == mtime) == (path != shards[1])  # only that one redone
    assert not list(output.glob(".*.partial"))
    manifest = json.loads((output / "manifest.json").read_text())
    assert manifest["complete"] and len(manifest["shards"]) == len(shards)
    capsys.readouterr()
    assert main(parse_args([*args, "--max-frames", "5"])) == 2
    assert "other settings (settings.max_frames differ" in capsys.readouterr().err


def _write_tar(path: Path, members: dict[str, bytes]) -> None:
    with tarfile.open(path, "w") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def test_shards_without_the_expected_keys_are_a_clear_error(
    clip_dataset, export_dir, tmp_path, capsys
):
    no_meta = tmp_path / "clips-n0000-w000-000000.tar"
    _write_tar(no_meta, {"k1.mp4": b"x", "k1.txt": b"y"})
    args = ["--checkpoint", str(export_dir), "--output", str(tmp_path / "tokens")]
    assert main(parse_args([*args, "--shards", str(no_meta)])) == 2
    err = capsys.readouterr().err
    assert "sample 'k1' has members ['mp4', 'txt'], expected 'k1.json'" in err
    meta, payload, _ = next(iter(read_samples(str(clip_dataset)).values()))
    no_payload = tmp_path / "clips-n0000-w000-000001.tar"
    _write_tar(no_payload, {"k2.json": meta.to_json()})
    assert (
        main(
            parse_args(
                [*args.copy()[:2], "--output", str(tmp_path / "t2"), "--shards", str(no_payload)]
            )
        )
        == 2
    )
    assert "expected its payload 'k2.mp4'" in capsys.readouterr().err
    assert not list((tmp_path / "t2").glob("tokens-*.tar"))  # never a tar under a final name


def _frames_of(path: Path, count: int) -> torch.Tensor:
    """What encode-file feeds the model: the file decoded as the loader decodes a clip (4:2:0
    planes, BT.601 here, not swscale's RGB), the short side resized, the center square."""
    with av.open(str(path)) as container:
        frames = [f for _, f in zip(range(count), container.decode(video=0), strict=False)]
    square = crop_to_square(frames_as_loaded(frames), SIZE, "center", None)
    return to_pixels(stack_clips([square]))  # (1, C, T, H, W)


@pytest.mark.parametrize("suffix", [".npz", ".safetensors"])
def test_file_commands_round_trip(source_videos, export_dir, tmp_path, suffix, monkeypatch):
    source = source_videos["carphone60.mp4"]  # real frames; 60 -> 59 = 1 + 29 * 2 encoded
    codes_file, video_file = tmp_path / f"carphone{suffix}", tmp_path / "carphone.mp4"
    common = ["--checkpoint", str(export_dir)]
    args = ["encode-file", str(source), str(codes_file), *common, "--chunk-frames", "6"]
    assert main(parse_args(args)) == 0
    codes, meta = load_codes(codes_file)
    assert codes.dtype == np.int16 and codes.shape == (30, 16, 16) and meta.num_frames == 59
    assert (meta.frame_width, meta.frame_height, meta.fps) == (SIZE, SIZE, 25.0)
    assert meta.precision == "fp32"  # 'auto' on CPU, recorded
    model = tiny_export_model()
    whole = model.tokenize(_frames_of(source, 59))[0]
    assert torch.equal(torch.from_numpy(codes.astype(np.int64)), whole)  # chunked == whole
    written = []  # the frames handed to the mp4 encoder, before its lossy compression
    original_write = token_files.Mp4Writer.write
    monkeypatch.setattr(
        token_files.Mp4Writer,
        "write",
        lambda self, frames: (written.append(frames.clone()), original_write(self, frames)),
    )
    args = ["decode-file", str(codes_file), str(video_file), *common, "--chunk-latent-frames", "4"]
    assert main(parse_args(args)) == 0
    with torch.no_grad():
        expected = to_uint8(model.decode_from_code_indices(whole[None])[0]).permute(1, 2, 3, 0)
    assert len(written) == 8  # 30 latent frames in chunks of 4
    assert (torch.cat(written).int() - expected.int()).abs().max() <= 1
    with av.open(str(video_file)) as container:
        stream = container.streams.video[0]
        assert (stream.width, stream.height, float(stream.average_rate)) == (SIZE, SIZE, 25.0)
        assert sum(1 for _ in container.decode(stream)) == 59


def test_shard_export_and_encode_file_give_a_clip_the_same_codes(
    clip_dataset, export_dir, tmp_path
):
    """The same clip through both export paths (the shard, and its mp4 as a file) in the same
    precision: the same pixels (the loader's decode), so the same codes."""
    output = tmp_path / "tokens"
    assert (
        main(parse_args([*_export_args(export_dir, clip_dataset, output), "--precision", "fp32"]))
        == 0
    )
    tokens = read_token_shards(output)
    for key, (_, payload, _) in sorted(read_samples(str(clip_dataset)).items())[:3]:
        clip, codes_file = tmp_path / f"{key}.mp4", tmp_path / f"{key}.npz"
        clip.write_bytes(payload)
        args = ["encode-file", str(clip), str(codes_file), "--checkpoint", str(export_dir)]
        assert main(parse_args([*args, "--size", str(SIZE), "--precision", "fp32"])) == 0
        from_file, file_meta = load_codes(codes_file)
        from_shard = tokens[key][0]
        assert file_meta.num_frames == NUM_FRAMES and file_meta.precision == "fp32"
        assert np.array_equal(from_file, from_shard), key


def test_bad_codes_files_and_chunk_sizes_are_clear_errors(
    source_videos, export_dir, tmp_path, capsys
):
    common = ["--checkpoint", str(export_dir)]
    good = tmp_path / "good.npz"
    assert (
        main(parse_args(["encode-file", str(source_videos["synthetic2.mp4"]), str(good), *common]))
        == 0
    )
    codes, meta = load_codes(good)

    def decode(path: Path) -> str:
        assert main(parse_args(["decode-file", str(path), str(tmp_path / "out.mp4"), *common])) == 2
        return capsys.readouterr().err

    floats = tmp_path / "floats.npz"
    np.savez(floats, codes=codes.astype(np.float32), meta=np.array(json.dumps(meta.__dict__)))
    assert "expected integer codes (int16 or int32), got float32" in decode(floats)
    flat = tmp_path / "flat.safetensors"
    from safetensors.numpy import save_file

    save_file(
        {"codes": codes.reshape(len(codes), -1)},
        str(flat),
        metadata={"meta": json.dumps(meta.__dict__)},
    )
    assert "expected codes of shape (t, h, w) or (t, h, w, codebooks)" in decode(flat)
    out_of_range = tmp_path / "range.npz"
    save_codes(out_of_range, np.full_like(codes, 64), meta)
    assert "codes must lie in [0, 64)" in decode(out_of_range)
    other = tmp_path / "other.npz"
    config = dict(meta.tokenizer, codebook_size=256)
    save_codes(other, codes, CodesMeta(**{**meta.__dict__, "tokenizer": config}))
    assert "another configuration: codebook_size: 256 in the file, 64 in the checkpoint" in decode(
        other
    )
    assert "not a readable codes file" in decode(tmp_path / "missing.npz")
    assert not (tmp_path / "out.mp4").exists()
    assert (
        main(
            parse_args(
                [
                    "encode-file",
                    str(source_videos["synthetic2.mp4"]),
                    str(tmp_path / "x.npz"),
                    *common,
                    "--chunk-frames",
                    "3",
                ]
            )
        )
        == 2
    )
    assert "multiple of the time compression 2" in capsys.readouterr().err
