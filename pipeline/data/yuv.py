"""8-bit 4:2:0 planes (``Yuv420``) and their BT.601 conversion to RGB.

The PyAV backend hands the loader the H.264 stream's own planes (pipeline.data.decode,
``planar=True``); they cross the worker boundary in one (shared-memory) buffer and
``yuv420_to_rgb`` turns them into RGB on the training side, on the device.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch


@dataclass(frozen=True)
class Yuv420:
    """Frames as 8-bit 4:2:0 planes, BT.601 limited range: what data_prep's H.264 clips hold.

    ``luma`` is (..., H, W) and ``chroma`` (..., 2, H/2, W/2) (Cb, Cr), with the same leading
    dims: (T,) for a clip, (B, T) for a batch. H and W are even; each chroma sample covers a
    2 x 2 block of luma, so crops at even offsets and horizontal flips keep them aligned.
    """

    luma: torch.Tensor
    chroma: torch.Tensor
    buffer: torch.Tensor | None = field(default=None, repr=False, compare=False)
    """A batch's one flat tensor that ``luma`` and then ``chroma`` fill (``stacked``): it
    crosses processes, is pinned and is copied to the device as one piece."""

    @staticmethod
    def stacked(clips: list[Yuv420], shared: bool = False) -> Yuv420:
        """A batch of clips, (B, T) leading dims, in one buffer (in shared memory if
        ``shared``: the batch is about to leave a data-loader worker)."""
        luma_shape = (len(clips), *clips[0].luma.shape)
        chroma_shape = (len(clips), *clips[0].chroma.shape)
        buffer = uint8_buffer((math.prod(luma_shape) + math.prod(chroma_shape),), shared)
        frames = Yuv420._views(buffer, luma_shape, chroma_shape)
        torch.stack([c.luma for c in clips], out=frames.luma)
        torch.stack([c.chroma for c in clips], out=frames.chroma)
        return frames

    @staticmethod
    def _views(buffer: torch.Tensor, luma_shape: tuple, chroma_shape: tuple) -> Yuv420:
        split = math.prod(luma_shape)
        return Yuv420(buffer[:split].view(luma_shape), buffer[split:].view(chroma_shape), buffer)

    def _with_buffer(self, buffer: torch.Tensor) -> Yuv420:
        return Yuv420._views(buffer, tuple(self.luma.shape), tuple(self.chroma.shape))

    def __reduce__(self):
        # Pickled by a data-loader worker: one tensor (one shared-memory handle) for both planes.
        if self.buffer is not None:
            return Yuv420._views, (self.buffer, tuple(self.luma.shape), tuple(self.chroma.shape))
        return Yuv420, (self.luma, self.chroma)

    def to(self, device: torch.device | str, non_blocking: bool = False) -> Yuv420:
        if self.buffer is not None:
            return self._with_buffer(self.buffer.to(device, non_blocking=non_blocking))
        return Yuv420(
            self.luma.to(device, non_blocking=non_blocking),
            self.chroma.to(device, non_blocking=non_blocking),
        )

    def pin_memory(self) -> Yuv420:
        """For ``DataLoader(pin_memory=True)``, which calls this on objects that have it."""
        if self.buffer is not None:
            return self._with_buffer(self.buffer.pin_memory())
        return Yuv420(self.luma.pin_memory(), self.chroma.pin_memory())


# BT.601 (Kr 0.299, Kb 0.114), limited range: Y in [16, 235], Cb/Cr in [16, 240] around 128.
_LUMA_SCALE = 255 / 219
_CHROMA_SCALE = 255 / 224
_CR_TO_R = 1.402 * _CHROMA_SCALE
_CB_TO_G = -0.114 * 1.772 / 0.587 * _CHROMA_SCALE
_CR_TO_G = -0.299 * 1.402 / 0.587 * _CHROMA_SCALE
_CB_TO_B = 1.772 * _CHROMA_SCALE


def yuv420_to_rgb(frames: Yuv420, dim: int = -1) -> torch.Tensor:
    """(*lead, H, W) + (*lead, 2, H/2, W/2) uint8 -> float32 RGB levels in [0, 255], rounded
    to whole levels as a uint8 decoder's output would be, contiguous, on the planes' device.
    The 3 channels go to position ``dim`` of ``lead`` (-1: just before H, W).

    Chroma is repeated over its 2 x 2 block (as swscale's converter does; bilinear upsampling
    would blur colour edges against the luma). Exact BT.601 coefficients: a round trip RGB ->
    swscale's yuv420p -> here is 50 dB from the source, swscale's own way back 44 dB.
    """
    lead, (height, width) = frames.luma.shape[:-2], frames.luma.shape[-2:]
    dim = dim % (len(lead) + 1)
    # One broadcast add writes the output: luma as (.., 1, .., H/2, 2, W/2, 2) plus the chroma
    # terms of each channel as (.., 3, .., H/2, 1, W/2, 1).
    luma = (frames.luma.float() - 16.0).mul_(_LUMA_SCALE).unsqueeze(dim)
    luma = luma.reshape(*luma.shape[:-2], height // 2, 2, width // 2, 2)
    cb, cr = (frames.chroma.float() - 128.0).unbind(-3)
    terms = torch.stack((_CR_TO_R * cr, _CB_TO_G * cb + _CR_TO_G * cr, _CB_TO_B * cb), dim=dim)
    rgb = luma + terms[..., :, None, :, None]
    return rgb.view(*rgb.shape[:-4], height, width).round_().clamp_(0.0, 255.0)


def yuv420_to_rgb_uint8(frames: Yuv420) -> torch.Tensor:
    """(T, H, W, C) uint8 RGB: for the rare batch that must mix planar and RGB clips."""
    return yuv420_to_rgb(frames).to(torch.uint8).movedim(-3, -1).contiguous()


def uint8_buffer(shape: tuple[int, ...], shared: bool) -> torch.Tensor:
    """An uninitialised uint8 tensor; ``shared``: allocated in shared memory (as
    ``default_collate`` does in workers; ``share_memory_()`` would allocate twice and copy)."""
    if not shared:
        return torch.empty(shape, dtype=torch.uint8)
    storage = torch.UntypedStorage._new_shared(math.prod(shape))
    return torch.empty(0, dtype=torch.uint8).set_(storage).view(shape)
