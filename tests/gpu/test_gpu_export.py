"""The two export paths on the GPU in bf16: shard export (`python -m pipeline.tokenize`) and
`encode-file` record the precision they ran in, and each gives the codes its own pixels give
under bf16 autocast; the same clip through both paths gives the same codes.

Both decode as the training loader does (the stream's 4:2:0 planes, converted on the device by
pipeline.data.decode; encode-file through token_files.LoaderFrames), so the pixels are equal and
only CUDA's run-to-run differences remain: a floor, with the pixel difference reported beside it.
"""

from __future__ import annotations

import io
import json
import tarfile

import numpy as np
import torch
from gpurun import agreement
from media import read_samples

from data_prep.token_format import load_codes
from pipeline.data.decode import crop_to_square, decode_window, stack_clips, to_pixels
from pipeline.inference.export import load_tokenizer
from pipeline.inference.precision import inference_precision
from pipeline.inference.token_files import LoaderFrames
from pipeline.inference.tokenize import main, parse_args

SIZE, FRAMES, CHUNK = 32, 9, 4  # the export model's frames; chunks of 4 frames (f = 2)
SAME_PATH_FLOOR = 0.999
"""A path's codes vs the same computation done directly (same kernels, same shapes)."""
CROSS_PATH_FLOOR = SAME_PATH_FLOOR
"""Shard export vs encode-file on the same clip: the same pixels and shapes (on CPU in fp32 the
codes are equal, tests/inference/test_tokenize.py)."""


def _token_shard_codes(folder) -> dict[str, np.ndarray]:
    codes = {}
    for path in sorted(folder.glob("tokens-*.tar")):
        with tarfile.open(path) as tar:
            for info in tar.getmembers():
                key, _, ext = info.name.partition(".")
                if ext == "npy":
                    codes[key] = np.load(io.BytesIO(tar.extractfile(info).read()))
    return codes


def test_shard_export_and_encode_file_agree_in_bf16(
    gpu_shards, export_dir, tmp_path, record_property
):
    key, (meta, payload, shard_name) = sorted(read_samples(str(gpu_shards)).items())[0]
    output = tmp_path / "tokens"
    args = ["--checkpoint", str(export_dir), "--shards", str(gpu_shards / shard_name)]
    args += ["--output", str(output), "--batch-size", "1", "--chunk-frames", str(CHUNK)]
    assert main(parse_args([*args, "--precision", "bf16"])) == 0
    settings = json.loads((output / "manifest.json").read_text())["settings"]
    assert settings["precision"] == "bf16", settings
    from_shards = _token_shard_codes(output)[key]  # (t, h, w)

    clip = tmp_path / "clip.mp4"  # the same clip as a file: the sample's own mp4
    clip.write_bytes(payload)
    codes_file = tmp_path / "clip.npz"
    file_args = ["encode-file", str(clip), str(codes_file), "--checkpoint", str(export_dir)]
    file_args += ["--size", str(SIZE), "--chunk-frames", str(CHUNK), "--precision", "bf16"]
    assert main(parse_args(file_args)) == 0
    from_file, file_meta = load_codes(codes_file)
    assert file_meta.precision == "bf16", file_meta
    assert from_file.shape == from_shards.shape, (from_file.shape, from_shards.shape)

    # Each path against the same computation done here, from the pixels that path decodes.
    device = torch.device("cuda")
    model = load_tokenizer(export_dir, device)
    planes = decode_window(payload, FRAMES, 1, 0, None, "pyav", meta.fps, planar=True)
    shard_pixels = to_pixels(stack_clips([crop_to_square(planes, SIZE, "center", None)]).to(device))
    with LoaderFrames(str(clip)) as reader:
        frames = crop_to_square(reader.read(0, FRAMES), SIZE, "center", None)
    file_pixels = to_pixels(stack_clips([frames]).to(device)).contiguous()
    with inference_precision(device, "bf16"):
        direct_shards = model.encode_long(shard_pixels.contiguous(), CHUNK)[0]
        direct_file = model.encode_long(file_pixels, CHUNK)[0]
    shards_vs_direct = agreement(torch.from_numpy(from_shards.astype(np.int64)), direct_shards)
    file_vs_direct = agreement(torch.from_numpy(from_file.astype(np.int64)), direct_file)
    across = agreement(torch.from_numpy(from_shards), torch.from_numpy(from_file))
    levels = ((shard_pixels - file_pixels) * 127.5).abs()
    figures = {
        "shard_export_vs_direct": shards_vs_direct,
        "encode_file_vs_direct": file_vs_direct,
        "shard_export_vs_encode_file": across,
        "decoders_max_level_difference": float(levels.max()),
        "decoders_share_of_differing_values": float((levels > 0.5).double().mean()),
    }
    for name, value in figures.items():
        record_property(name, value)
    print(figures)
    assert shards_vs_direct >= SAME_PATH_FLOOR and file_vs_direct >= SAME_PATH_FLOOR, figures
    assert across >= CROSS_PATH_FLOOR, figures
