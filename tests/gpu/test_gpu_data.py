"""The data path's device side on CUDA: the 4:2:0 -> RGB conversion, flips and layout of
`Batch.pixels(device)` equal the CPU's, and pinned batches arrive on the GPU unchanged.

Tolerance of the conversion: it rounds to whole 8-bit levels, and a value within float
rounding of a half level can round either way on the two devices (fused multiply-adds on the
GPU), so at most one level (2/255 in [-1, 1]) on at most 0.1 % of the values; bytes copied to
the device are compared exactly.
"""

from __future__ import annotations

import torch
from gpurun import agreement

from pipeline.data.decode import Yuv420
from pipeline.data.loader import Batch, DataConfig, ShardLoader
from pipeline.distributed.world import World

ONE_LEVEL = 2 / 255 + 1e-6  # in [-1, 1]
MAX_DIFFERING_SHARE = 1e-3


def random_planes(batch: int, frames: int, height: int, width: int, seed: int = 0) -> Yuv420:
    """Every 8-bit value, the out-of-range ones that the conversion clamps included."""
    generator = torch.Generator().manual_seed(seed)
    luma = torch.randint(0, 256, (batch, frames, height, width), generator=generator)
    chroma = torch.randint(0, 256, (batch, frames, 2, height // 2, width // 2), generator=generator)
    return Yuv420(luma.to(torch.uint8), chroma.to(torch.uint8))


def assert_same_pixels(gpu: torch.Tensor, cpu: torch.Tensor, record_property, name: str) -> None:
    assert gpu.device.type == "cuda" and gpu.shape == cpu.shape and gpu.is_contiguous()
    difference = (gpu.cpu() - cpu).abs()
    share = float((difference > 1e-6).double().mean())
    record_property(f"{name}_max_difference", float(difference.max()))
    record_property(f"{name}_differing_share", share)
    assert float(difference.max()) <= ONE_LEVEL, float(difference.max())
    assert share <= MAX_DIFFERING_SHARE, share


def test_yuv420_to_rgb_on_cuda_equals_the_cpu(record_property):
    planes = random_planes(3, 5, 32, 48)
    flip = torch.tensor([True, False, True])
    clips = [Yuv420(planes.luma[i], planes.chroma[i]) for i in range(3)]
    for name, frames in (("separate_planes", planes), ("one_buffer", Yuv420.stacked(clips))):
        batch = Batch("video", frames, ["a", "b", "c"], flip)
        cpu = batch.pixels()
        assert cpu.shape == (3, 3, 5, 32, 48)
        assert_same_pixels(batch.pixels("cuda"), cpu, record_property, name)
        in_bf16 = batch.pixels("cuda", torch.bfloat16)
        assert in_bf16.dtype == torch.bfloat16
        assert float((in_bf16.float().cpu() - cpu).abs().max()) <= 2**-8 + ONE_LEVEL


def test_rgb_batches_on_cuda_equal_the_cpu():
    generator = torch.Generator().manual_seed(1)
    # As the workers send RGB: a channels-last view of (B, T, H, W, C) uint8.
    rgb = torch.randint(0, 256, (2, 3, 16, 16, 3), generator=generator).to(torch.uint8)
    batch = Batch("video", rgb.permute(0, 4, 1, 2, 3), ["a", "b"], torch.tensor([False, True]))
    cpu, gpu = batch.pixels(), batch.pixels("cuda")
    # x / 127.5 - 1 may be computed with the reciprocal on the GPU: an ulp, never a level.
    assert float((gpu.cpu() - cpu).abs().max()) <= 1e-6


def test_pinned_batches_arrive_on_the_gpu_unchanged():
    planes = random_planes(2, 3, 16, 16, seed=2)
    stacked = Yuv420.stacked([Yuv420(planes.luma[i], planes.chroma[i]) for i in range(2)])
    pinned = stacked.pin_memory()
    assert pinned.buffer is not None and pinned.buffer.is_pinned()
    assert pinned.luma.is_pinned() and pinned.chroma.is_pinned()  # views of the pinned buffer
    moved = pinned.to("cuda", non_blocking=True)
    torch.cuda.synchronize()
    assert torch.equal(moved.luma.cpu(), planes.luma)
    assert torch.equal(moved.chroma.cpu(), planes.chroma)
    separate = Yuv420(planes.luma.clone(), planes.chroma.clone()).pin_memory()
    assert separate.luma.is_pinned() and separate.chroma.is_pinned()


def test_the_loader_pins_batches_that_convert_on_the_gpu_as_on_the_cpu(gpu_shards, record_property):
    """DataLoader(pin_memory=True) pins what the workers send (Yuv420.pin_memory)."""
    config = DataConfig(
        video_shards=(str(gpu_shards),),
        num_frames=9,
        image_size=32,
        micro_batch_size=2,
        num_workers=1,
        pin_memory=True,
        mode="eval",
        seed=0,
    )
    seen = 0
    for batch in ShardLoader(config, World()):
        assert isinstance(batch.frames, Yuv420), type(batch.frames)  # the PyAV backend's planes
        assert batch.frames.luma.is_pinned() and batch.frames.chroma.is_pinned()
        gpu, cpu = batch.pixels("cuda"), batch.pixels()
        assert_same_pixels(gpu, cpu, record_property, f"loader_batch{seen}")
        record_property(f"loader_batch{seen}_equal_share", agreement(gpu.cpu(), cpu))
        seen += 1
        if seen == 3:
            break
    assert seen > 0
