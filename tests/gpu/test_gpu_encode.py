"""Encoding on CUDA: chunked (`encode_long`) vs whole-video encoding, and bf16 vs fp32 codes.

On CPU in fp32 chunked encoding is bit-identical to whole encoding. On CUDA cuDNN picks its
algorithms per shape, so chunks (other shapes) round differently; in IEEE fp32 (TF32 off) that
is a relative 1e-6 or so (more where it picks a Winograd or FFT algorithm), and a code changes
only where a latent lies that close to 0. Stated tolerances: codes agree on >= 99.9 % of
positions, latents within 1e-3 of their largest magnitude (a state carried wrongly between
chunks is an error of order 1). bf16 autocast rounds far more (8 bits of mantissa): >= 90 %
of the codes agree with fp32 on a fixed seeded input (0.977 on CPU). The shares are printed
and recorded in the junit XML.
"""

from __future__ import annotations

import pytest
import torch
from export_helpers import LAYERS as TIME_STATE_LAYERS
from gpurun import agreement

from pipeline.inference.precision import inference_precision

from helpers import ALL_UNCONDITIONED, randomize_, tiny_tokenizer, video

CHUNKED_CODES_FLOOR = 0.999
CHUNKED_LATENTS_RTOL = 1e-3
BF16_CODES_FLOOR = 0.9


def _model(layers, size: int, seed: int = 0, **overrides):
    model = tiny_tokenizer(seed=seed, image_size=size, layers=layers, **overrides)
    randomize_(model, seed=seed + 1)
    return model.cuda().eval()


@pytest.mark.parametrize(
    "name, layers, size",
    [("time_state_layers", TIME_STATE_LAYERS, 32), ("every_layer_kind", ALL_UNCONDITIONED, 16)],
)
def test_chunked_encoding_on_cuda_equals_whole_encoding(name, layers, size, record_property):
    model = _model(layers, size)
    f = model.time_downsample_factor
    clip = video(batch=2, frames=1 + 8 * f, size=size).cuda()  # 4 chunks of 2 f frames + frame 0
    with inference_precision(clip.device, "fp32"), torch.no_grad():  # IEEE: no TF32
        whole_latents = model.encode(clip)
        chunked_latents = model.encode_long(clip, 2 * f, quantize=False)
        whole = model.tokenize(clip)
        chunked = model.encode_long(clip, 2 * f)
    share = agreement(chunked, whole)
    error = float((chunked_latents - whole_latents).abs().max() / whole_latents.abs().max())
    record_property(f"{name}_codes_agreement", share)
    record_property(f"{name}_latents_relative_error", error)
    print(f"{name}: chunked vs whole codes agreement {share:.6f}, latents error {error:.2e}")
    assert chunked.shape == whole.shape
    assert share >= CHUNKED_CODES_FLOOR, share
    assert error <= CHUNKED_LATENTS_RTOL, error


def _bits(codes: torch.Tensor, num_bits: int) -> torch.Tensor:
    return (codes[..., None] >> torch.arange(num_bits, device=codes.device)) & 1


def test_bf16_codes_agree_with_fp32_on_a_fixed_input(record_property):
    model = _model(TIME_STATE_LAYERS, 32, codebook_size=64)
    clip = video(batch=2, frames=17, size=32, seed=3).cuda()
    device = clip.device
    with torch.no_grad():
        with inference_precision(device, "fp32"):
            fp32 = model.tokenize(clip)
        with inference_precision(device, "bf16"):
            autocast = model.tokenize(clip)
        cast = model.to(torch.bfloat16).tokenize(clip.bfloat16())  # the trainer's bf16 engine
    figures = {
        "bf16_autocast_codes_agreement": agreement(autocast, fp32),
        "bf16_autocast_bits_agreement": agreement(_bits(autocast, 6), _bits(fp32, 6)),
        "bf16_cast_model_codes_agreement": agreement(cast, fp32),
        "bf16_cast_model_bits_agreement": agreement(_bits(cast, 6), _bits(fp32, 6)),
    }
    for key, value in figures.items():
        record_property(key, value)
    print(figures)
    assert figures["bf16_autocast_codes_agreement"] >= BF16_CODES_FLOOR, figures
