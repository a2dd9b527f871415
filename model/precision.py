"""IEEE fp32 on demand: autocast off and no TF32 (or CPU bf16) passes inside a block.

torch lets a caller trade fp32 accuracy for speed globally (TF32 matmuls through
`set_float32_matmul_precision("high")`, TF32 cuDNN convolutions by default). Code whose results
are decisions rather than approximations (LFQ's code probabilities from logits up to |4 000|; codes
exported in fp32) needs real fp32 whatever the caller chose, and must leave the caller's choice as
it was. The settings use torch's per-backend `fp32_precision` API (torch >= 2.9): mixing it with
the legacy `allow_tf32` flags inside a block makes torch refuse to read either.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch


def _matmul_settings() -> list:
    """cuBLAS and oneDNN matmul settings that this torch has."""
    mkldnn = getattr(torch.backends, "mkldnn", None)
    candidates = (getattr(torch.backends.cuda, "matmul", None), getattr(mkldnn, "matmul", None))
    return [c for c in candidates if hasattr(c, "fp32_precision")]


def _convolution_settings() -> list:
    conv = getattr(torch.backends.cudnn, "conv", None)
    return [conv] if hasattr(conv, "fp32_precision") else []


@contextlib.contextmanager
def ieee_fp32(device_type: str, *, convolutions: bool = False) -> Iterator[None]:
    """Autocast off for `device_type` and IEEE fp32 matrix products inside (and convolutions
    too when `convolutions`); the caller's settings are restored on exit."""
    settings = _matmul_settings() + (_convolution_settings() if convolutions else [])
    saved = [setting.fp32_precision for setting in settings]
    try:
        for setting in settings:
            setting.fp32_precision = "ieee"
        if device_type == "meta":  # shape-only runs (the trainer's dry run): no autocast there
            yield
        else:
            with torch.autocast(device_type=device_type, enabled=False):
                yield
    finally:
        for setting, value in zip(settings, saved, strict=True):
            setting.fp32_precision = value
