"""Building blocks: causality, shape algebra, and equality with direct formulas."""

import pytest
import torch

from model.attention import Attention, LinearAttention, TimeAttention, taylor_feature_map
from model.blocks import GateLoop, SqueezeExcite, token_shift
from model.conv import CausalConv3d, CausalConvTranspose3d, Conv3DMod
from model.sampling import (
    Blur,
    SpatialDownsample2x,
    SpatialUpsample2x,
    TimeDownsample2x,
    TimeUpsample2x,
)


def _assert_causal(fn, x, upsample: int = 1):
    """Changing input frame t leaves every output frame before upsample * t bit-identical, and
    changes output frame upsample * t."""
    base = fn(x)
    for t in range(x.shape[2]):
        changed = x.clone()
        changed[:, :, t] += 1.0
        out = fn(changed)
        first_seeing = upsample * t
        assert torch.equal(out[:, :, :first_seeing], base[:, :, :first_seeing]), t
        assert not torch.equal(out[:, :, first_seeing], base[:, :, first_seeing]), t


def test_causal_conv3d_is_causal_and_keeps_shape():
    torch.manual_seed(0)
    for pad_mode in ("constant", "replicate"):
        conv = CausalConv3d(3, 4, (3, 3, 5), pad_mode=pad_mode)
        x = torch.randn(1, 3, 6, 8, 8)
        assert conv(x).shape == (1, 4, 6, 8, 8)
        _assert_causal(conv, x)


def test_causal_conv3d_with_time_stride():
    torch.manual_seed(0)
    conv = CausalConv3d(2, 2, 3, stride=2)
    assert conv(torch.randn(1, 2, 8, 4, 4)).shape == (1, 2, 4, 4, 4)


def test_causal_conv_transpose3d():
    torch.manual_seed(0)
    conv = CausalConvTranspose3d(3, 2, (3, 3, 3), time_stride=2)
    x = torch.randn(1, 3, 4, 6, 6)
    assert conv(x).shape == (1, 2, 8, 6, 6)
    _assert_causal(conv, x, upsample=2)


def test_conv3d_mod_is_causal_and_per_sample():
    torch.manual_seed(0)
    conv = Conv3DMod(4, 5, spatial_kernel=3, time_kernel=3)
    x = torch.randn(2, 4, 5, 6, 6)
    cond = torch.randn(2, 4)
    out = conv(x, cond)
    assert out.shape == (2, 5, 5, 6, 6)
    _assert_causal(lambda v: conv(v, cond), x)
    # Sample 1 with sample 0's conditioning equals running sample 1 alone with it.
    alone = conv(x[1:], cond[:1])
    assert not torch.allclose(alone, out[1:])
    assert torch.allclose(conv(x, cond[[0, 0]])[1:], alone, atol=1e-5)


@pytest.mark.parametrize("reference_padding", [False, True])
def test_time_downsample_alignment(reference_padding):
    torch.manual_seed(0)
    down = TimeDownsample2x(2, 3, reference_padding=reference_padding)
    x = torch.randn(1, 2, 8, 2, 2)
    out = down(x)
    assert out.shape == (1, 3, 4, 2, 2)
    for t in range(8):
        changed = x.clone()
        changed[:, :, t] += 1
        moved = (down(changed) - out).abs().amax(dim=(0, 1, 3, 4)) > 0
        seen_by = [i for i in range(4) if moved[i]]
        if reference_padding:  # output i covers frames 2i-2..2i: the last frame is never seen
            assert seen_by == [i for i in range(4) if 2 * i - 2 <= t <= 2 * i]
        else:  # output i covers frames 2i-1..2i+1, ending on its own pair
            assert seen_by == [i for i in range(4) if 2 * i - 1 <= t <= 2 * i + 1]


def test_upsamplers_shapes_and_nearest_neighbour_init():
    torch.manual_seed(0)
    x = torch.randn(2, 4, 3, 5, 5)
    up = SpatialUpsample2x(4, 6)
    out = up(x)
    assert out.shape == (2, 6, 3, 10, 10)
    # Initialised as nearest-neighbour: the four sub-pixels of a pixel are equal (to rounding:
    # AVX-512 convolution kernels sum the copies of a channel in different orders).
    torch.testing.assert_close(out[..., 0::2, 0::2], out[..., 1::2, 1::2], rtol=0, atol=1e-6)
    time_up = TimeUpsample2x(4, 6)
    out = time_up(x)
    assert out.shape == (2, 6, 6, 5, 5)
    assert torch.equal(out[:, :, 0::2], out[:, :, 1::2])
    assert SpatialDownsample2x(4, 6)(x[..., :4, :4]).shape == (2, 6, 3, 2, 2)


def test_blur_is_normalised_and_causal_in_time():
    blur = Blur()
    constant = torch.full((1, 2, 5, 6, 6), 3.0)
    assert torch.allclose(blur(constant), constant)
    assert torch.allclose(blur(constant[:, :, 0], space_only=True), constant[:, :, 0])
    x = torch.randn(1, 2, 6, 4, 4)
    _assert_causal(lambda v: blur(v, time_only=True), x)
    _assert_causal(blur, x)


def test_attention_equals_direct_softmax_with_memory_and_causal_mask():
    torch.manual_seed(0)
    attn = Attention(8, causal=True, dim_head=4, heads=2, num_memory_kv=3)
    x = torch.randn(3, 5, 8)
    out = attn(x)
    normed = attn.norm(x)
    q, k, v = attn.to_qkv(normed).view(3, 5, 3, 2, 4).permute(2, 0, 3, 1, 4)
    k = torch.cat((attn.mem_kv[0].expand(3, -1, -1, -1), k), dim=2)
    v = torch.cat((attn.mem_kv[1].expand(3, -1, -1, -1), v), dim=2)
    scores = q @ k.transpose(-1, -2) / 2.0
    future = torch.ones(5, 8, dtype=torch.bool).triu(4)  # query i sees 3 memories + keys <= i
    weights = scores.masked_fill(future, float("-inf")).softmax(-1)
    expected = attn.to_out((weights @ v).transpose(1, 2).reshape(3, 5, 8))
    assert torch.allclose(out, expected, atol=1e-5)


def test_time_attention_is_causal():
    torch.manual_seed(0)
    attn = TimeAttention(6, dim_head=4, heads=2)
    _assert_causal(attn, torch.randn(2, 6, 5, 3, 3))


def test_linear_attention_equals_quadratic_taylor_attention():
    torch.manual_seed(0)
    attn = LinearAttention(6, dim_head=3, heads=2)
    x = torch.randn(2, 7, 6)
    normed = attn.norm(x)
    q = attn.to_q(normed).view(2, 7, 2, 3).transpose(1, 2) * 3**-0.5
    k, v = attn.to_kv(normed).view(2, 7, 2, 2, 3).permute(2, 0, 3, 1, 4)
    dots = q @ k.transpose(-1, -2)
    weights = 1 + dots + dots**2 / 2  # second-order Taylor expansion of exp
    expected = (weights / weights.sum(-1, keepdim=True)) @ v
    expected = attn.to_out(expected.transpose(1, 2).reshape(2, 7, 6))
    assert torch.allclose(attn(x), expected, atol=1e-5)
    a, b = torch.randn(4, 3), torch.randn(4, 3)
    kernel = (taylor_feature_map(a) * taylor_feature_map(b)).sum(-1)
    dot = (a * b).sum(-1)
    assert torch.allclose(kernel, 1 + dot + dot**2 / 2, atol=1e-5)


def test_gate_loop_matches_recurrence_and_carries_state():
    torch.manual_seed(0)
    layer = GateLoop(4)
    x = torch.randn(3, 6, 4)
    out, state = layer(x)
    q, kv, a = layer.to_qkva(layer.norm(x)).chunk(3, dim=-1)
    h = torch.zeros(3, 4)
    for t in range(6):
        h = a[:, t].sigmoid() * h + kv[:, t]
        assert torch.allclose(out[:, t], q[:, t] * h, atol=1e-6)
    first, mid_state = layer(x[:, :4])
    second, _ = layer(x[:, 4:], mid_state)
    assert torch.allclose(torch.cat((first, second), dim=1), out, atol=1e-6)


def test_token_shift_and_squeeze_excite():
    x = torch.arange(2 * 4 * 3, dtype=torch.float32).view(1, 4, 3, 1, 2)
    shifted = token_shift(x)
    assert torch.equal(shifted[:, :2], x[:, :2])
    assert torch.equal(shifted[:, 2:, 1:], x[:, 2:, :-1])
    assert torch.equal(shifted[:, 2:, 0], torch.zeros_like(x[:, 2:, 0]))
    se = SqueezeExcite(4)
    y = torch.randn(2, 4, 3, 5, 5)
    torch.manual_seed(0)
    # Gates act per (sample, channel, frame): a frame's output depends only on that frame.
    changed = y.clone()
    changed[:, :, 1] += 1
    with torch.no_grad():
        se.out.weight.normal_()
        assert torch.equal(se(changed)[:, :, 0], se(y)[:, :, 0])
        assert not torch.equal(se(changed)[:, :, 1], se(y)[:, :, 1])
