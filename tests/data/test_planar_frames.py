"""The PyAV backend's 4:2:0 planes: decoded exactly, converted to RGB accurately, and cropped,
flipped and batched so that the RGB the trainer sees is the RGB path's."""

from __future__ import annotations

import io
import random

import av
import numpy as np
import pytest
import torch
from media import pattern_frames, psnr, real_videos, write_video

from pipeline.data.decode import (
    Yuv420,
    crop_to_square,
    decode_window,
    yuv420_to_rgb,
    yuv420_to_rgb_uint8,
)
from pipeline.data.loader import Batch
from pipeline.data.stages import WorkerStats, collate
from pipeline.distributed.world import World


def _payload(tmp_path, frames: np.ndarray) -> bytes:
    return open(write_video(str(tmp_path / "clip.mp4"), frames), "rb").read()


def _decoder_planes(payload: bytes) -> list[np.ndarray]:
    """Each frame's yuv420p as PyAV lays it out: (H * 3/2, W), Y then Cb then Cr."""
    with av.open(io.BytesIO(payload)) as container:
        return [f.to_ndarray(format="yuv420p") for f in container.decode(video=0)]


@pytest.mark.parametrize("width", [48, 64])  # rows padded in the decoder's buffers, or not
def test_planes_are_the_decoders_own(tmp_path, width):
    payload = _payload(tmp_path, pattern_frames(20, width, 32))
    window = decode_window(payload, 9, 2, 3, random.Random(0), "pyav", 25.0, planar=True)
    assert isinstance(window, Yuv420)
    assert window.luma.shape == (9, 32, width) and window.chroma.shape == (9, 2, 16, width // 2)
    for i, packed in enumerate(_decoder_planes(payload)[3:20:2]):
        assert np.array_equal(window.luma[i].numpy(), packed[:32])
        cb, cr = packed[32:].reshape(2, 16, width // 2)  # PyAV packs each chroma plane row-major
        assert np.array_equal(window.chroma[i, 0].numpy(), cb)
        assert np.array_equal(window.chroma[i, 1].numpy(), cr)


def test_planar_rgb_matches_swscale_and_the_source(tmp_path):
    """Real footage: within a few levels of swscale's RGB, and at least as close to the source
    frames as swscale's RGB is."""
    path = real_videos()["carphone_pristine.mp4"]
    with av.open(path) as container:
        source = np.stack(
            [
                f.to_ndarray(format="rgb24")
                for _, f in zip(range(9), container.decode(video=0), strict=False)
            ]
        )
    payload = _payload(tmp_path, source)
    planar = decode_window(payload, 9, 1, 0, random.Random(0), "pyav", 25.0, planar=True)
    rgb = decode_window(payload, 9, 1, 0, random.Random(0), "pyav", 25.0)
    ours = yuv420_to_rgb_uint8(planar).numpy()
    assert ours.shape == rgb.shape == source.shape
    diff = np.abs(ours.astype(int) - rgb.numpy().astype(int))
    assert diff.max() <= 4 and diff.mean() < 1.5
    assert psnr(ours, source) >= psnr(rgb.numpy(), source) - 0.1 >= 30


def test_conversion_of_known_levels():
    """BT.601 limited range: black, white, grey and the primaries land where they should."""
    ycbcr = {  # (Y, Cb, Cr) -> RGB
        (16, 128, 128): (0, 0, 0),
        (235, 128, 128): (255, 255, 255),
        (126, 128, 128): (128, 128, 128),
        (81, 90, 240): (255, 0, 0),
        (145, 54, 34): (0, 255, 0),
        (41, 240, 110): (0, 0, 255),
    }
    for (y, cb, cr), expected in ycbcr.items():
        frames = Yuv420(
            torch.full((2, 2), y, dtype=torch.uint8),
            torch.tensor([cb, cr], dtype=torch.uint8).view(2, 1, 1),
        )
        rgb = yuv420_to_rgb(frames)  # (3, 2, 2)
        assert (rgb - torch.tensor(expected).view(3, 1, 1)).abs().max() <= 1, (y, cb, cr)


def _random_planes(shape=(3, 40, 56)) -> Yuv420:
    generator = torch.Generator().manual_seed(0)
    t, h, w = shape
    luma = torch.randint(16, 236, (t, h, w), dtype=torch.uint8, generator=generator)
    chroma = torch.randint(16, 241, (t, 2, h // 2, w // 2), dtype=torch.uint8, generator=generator)
    return Yuv420(luma, chroma)


def _smooth_planes(shape: tuple[int, int, int]) -> Yuv420:
    """Real-looking 4:2:0 planes: smooth waves through swscale's RGB -> yuv420p."""
    t, h, w = shape
    packed = np.stack(
        [
            av.VideoFrame.from_ndarray(f, format="rgb24").reformat(format="yuv420p").to_ndarray()
            for f in pattern_frames(t, w, h)
        ]
    )
    chroma = packed[:, h:].reshape(t, 2, h // 2, w // 2)
    return Yuv420(torch.from_numpy(packed[:, :h].copy()), torch.from_numpy(chroma.copy()))


@pytest.mark.parametrize("shape", [(3, 32, 56), (3, 56, 32)])
def test_random_crops_keep_chroma_on_its_blocks(shape):
    """A random crop of the planes, converted, equals the converted frame cropped at an even
    offset: the chroma stayed aligned with its 2 x 2 luma blocks."""
    planes = _random_planes(shape)
    full = yuv420_to_rgb_uint8(planes)  # (T, H, W, 3), the short side already 32
    rng = random.Random(0)
    offsets = set()
    for _ in range(20):
        crop = crop_to_square(planes, 32, "random", rng)
        assert isinstance(crop, Yuv420) and crop.luma.shape == (3, 32, 32)
        rgb = yuv420_to_rgb_uint8(crop)
        found = [
            (top, left)
            for top in range(0, shape[1] - 31)
            for left in range(0, shape[2] - 31)
            if torch.equal(rgb, full[:, top : top + 32, left : left + 32])
        ]
        assert len(found) == 1 and found[0][0] % 2 == found[0][1] % 2 == 0, found
        offsets.add(found[0])
    assert len(offsets) > 5  # really random


@pytest.mark.parametrize(
    ("shape", "size", "planar"),
    [
        ((3, 32, 56), 32, True),  # even center offset 12
        ((3, 32, 58), 32, False),  # odd center offset 13: RGB, as the RGB path crops it
        ((3, 64, 96), 32, True),  # resized to 32 x 48, then cropped at 8
        ((3, 64, 90), 32, False),  # resized to 32 x 45: an odd side
        ((3, 32, 56), 31, False),  # odd size
    ],
)
def test_center_crops_keep_the_rgb_geometry(shape, size, planar):
    planes = _smooth_planes(shape)
    out = crop_to_square(planes, size, "center", None)
    assert isinstance(out, Yuv420) == planar
    rgb = yuv420_to_rgb_uint8(out) if planar else out
    reference = crop_to_square(yuv420_to_rgb_uint8(planes), size, "center", None)
    assert rgb.shape == reference.shape == (3, size, size, 3)
    diff = (rgb.float() - reference.float()).abs()
    if shape[1] == 64:  # resizing planes and resizing RGB round differently
        assert diff.max() <= 8 and psnr(rgb.numpy(), reference.numpy()) > 40
    else:
        assert diff.max() == 0


def _batch_of(clips: list, flips: list[bool]) -> Batch:
    samples = [
        {"pixels": c, "flip": f, "key": str(i)}
        for i, (c, f) in enumerate(zip(clips, flips, strict=True))
    ]
    raw = collate(samples, kind="video", stats=WorkerStats(10), world=World())
    return Batch("video", raw["frames"], raw["keys"], torch.tensor(raw["flip"]))


def test_batches_of_planes_convert_and_flip_like_rgb_batches():
    planes = [_random_planes((3, 32, 32)) for _ in range(3)]
    planes[1] = Yuv420(planes[1].luma.flip(-1).contiguous(), planes[1].chroma)
    flips = [False, True, True]
    batch = _batch_of(planes, flips)
    assert isinstance(batch.frames, Yuv420) and batch.frames.luma.shape == (3, 3, 32, 32)
    rgb = [yuv420_to_rgb_uint8(p) for p in planes]
    expected = _batch_of(rgb, flips)
    assert isinstance(expected.frames, torch.Tensor)
    assert torch.equal(batch.pixels(), expected.pixels())
    assert batch.pixels().shape == (3, 3, 3, 32, 32) and batch.pixels().is_contiguous()
    unflipped = torch.stack([r.permute(3, 0, 1, 2) for r in rgb])
    assert torch.equal(batch.uint8[0], unflipped[0])
    assert torch.equal(batch.uint8[2], unflipped[2].flip(-1))


def test_a_batch_mixing_planes_and_rgb_becomes_rgb():
    planes = _random_planes((3, 32, 32))
    rgb = yuv420_to_rgb_uint8(planes)
    batch = _batch_of([planes, rgb], [False, False])
    assert isinstance(batch.frames, torch.Tensor) and batch.frames.shape == (2, 3, 3, 32, 32)
    assert torch.equal(batch.uint8[0], batch.uint8[1])


def test_odd_sized_or_full_range_streams_decode_to_rgb(tmp_path):
    frames = pattern_frames(9, 48, 32)
    path = str(tmp_path / "full.mp4")
    with av.open(path, "w") as container:
        stream = container.add_stream("libx264", rate=25)
        stream.width, stream.height, stream.pix_fmt = 48, 32, "yuvj420p"  # full range
        for frame in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode())
    window = decode_window(open(path, "rb").read(), 9, 1, 0, None, "pyav", 25.0, planar=True)
    assert isinstance(window, torch.Tensor) and window.shape == (9, 32, 48, 3)
    assert psnr(window.numpy(), frames) > 30


def test_a_batch_of_planes_travels_as_one_buffer():
    """Workers send a batch's planes as one tensor (one shared-memory handle, not two)."""
    import pickle

    clips = [_random_planes((3, 32, 32)) for _ in range(2)]
    batch = Yuv420.stacked(clips)
    assert batch.chroma.data_ptr() == batch.luma.data_ptr() + batch.luma.numel()
    _, args = batch.__reduce__()
    assert sum(isinstance(a, torch.Tensor) for a in args) == 1
    copy = pickle.loads(pickle.dumps(batch))
    assert torch.equal(copy.luma, torch.stack([c.luma for c in clips]))
    assert torch.equal(copy.chroma, torch.stack([c.chroma for c in clips]))
    assert copy.chroma.data_ptr() == copy.luma.data_ptr() + copy.luma.numel()
    moved = copy.to("cpu")
    assert torch.equal(moved.luma, copy.luma) and moved.buffer is not None
