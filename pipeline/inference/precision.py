"""The arithmetic of evaluation and token export (and of the trainer's evaluation): which
precision a device gets, and the autocast / IEEE-fp32 context that runs it."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

from model.precision import ieee_fp32

PRECISIONS = ("auto", "fp32", "bf16")
"""Arithmetic of evaluation and token export: 'fp32' is IEEE fp32 (no TF32 convolutions or
matmuls), 'bf16' autocast (the quantizer stays fp32), 'auto' bf16 on CUDA devices that support
it and fp32 elsewhere. Every path that encodes resolves it here, so the same precision gives the
same codes whichever command made them."""


def resolve_precision(requested: str, device: torch.device) -> str:
    """'auto' -> 'bf16' or 'fp32' for `device`; ValueError for bf16 a CUDA device lacks."""
    if requested not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {requested!r}")
    cuda_bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported()
    if requested == "auto":
        return "bf16" if cuda_bf16 else "fp32"
    if requested == "bf16" and device.type == "cuda" and not cuda_bf16:
        raise ValueError(f"precision bf16: {torch.cuda.get_device_name(device)} has no bf16")
    return requested


@contextlib.contextmanager
def inference_precision(device: torch.device, precision: str) -> Iterator[None]:
    """Runs the block in a resolved precision ('fp32' or 'bf16', see PRECISIONS)."""
    if precision == "bf16":
        with torch.autocast(device.type, dtype=torch.bfloat16):
            yield
        return
    if precision != "fp32":
        raise ValueError(f"resolve the precision first (fp32 or bf16), got {precision!r}")
    # TF32 is on by default for cuDNN convolutions: IEEE fp32 means switching it off too.
    with ieee_fp32(device.type, convolutions=True):
        yield
