"""Any-length encoding: chunked encoding gives the whole-video latents and codes bit for bit, and
chunked decoding the whole-video reconstruction, for configs covering every layer kind (CPU,
fp32, one thread, randomized weights); with several threads, equal to rounding; clear errors for
chunk sizes and inputs that cannot work.

One thread: on an AVX-512 Xeon (Sapphire Rapids) the batched matmuls of the per-frame layers
(linear space attention) split their reduction across threads depending on the batch size,
i.e. on the number of frames in the call, so with 2 threads chunked and whole latents differed
in the last bits (<= 2e-6); with one thread they are equal. AVX2 EPYCs were exact with 2.
"""

import pytest
import torch
from torch import nn
from torch.profiler import ProfilerActivity, profile

from model import chunked_layers
from model.chunked_layers import (
    ONEDNN_MIN_ELEMENTS,
    OverlappedLayer,
    chunked_layer,
    conv3d_on_backend_for,
    onednn_picks,
)
from model.streaming import StreamingEncoder, chunk_bounds, decode_long, encode_long

from helpers import ALL_CONDITIONED, ALL_UNCONDITIONED, randomize_, tiny_tokenizer, video


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# name: (tokenizer kwargs, batch, chunk sizes in units of the time compression f)
CONFIGS = {
    "every-unconditioned-kind": (dict(layers=ALL_UNCONDITIONED, codebook_size=256), 2, (1, 3)),
    "every-conditioned-kind": (
        dict(layers=ALL_CONDITIONED, codebook_size=64, dim_cond=4),
        2,
        (1, 3),
    ),
    "first-frame-stem-fsq-replicate-7-frame-stem": (
        dict(
            layers=(
                "residual",
                "compress_space",
                "compress_time",
                "gateloop_time",
                "compress_time",
                "attend_time",
            ),
            use_fsq=True,
            fsq_levels=[5, 5, 3],
            codebook_size=None,
            separate_first_frame_encoding=True,
            pad_mode="replicate",
            input_conv_kernel_size=(7, 3, 3),
        ),
        2,
        (1, 2),
    ),
    # One clip at 32 px and width 16: convs switch between PyTorch's native and oneDNN kernels
    # with the input length here, so this config fails unless chunks use the whole call's kernel.
    "reference-quirks-one-clip-32px": (
        dict(
            layers=ALL_UNCONDITIONED,
            codebook_size=256,
            reference_quirks=True,
            init_dim=16,
            image_size=32,
        ),
        1,
        (1, 3),
    ),
    "2-codebooks-wide-kernels": (
        dict(
            layers=(("consecutive_residual", 2), "compress_space", "compress_time", "residual"),
            codebook_size=16,
            num_codebooks=2,
            residual_conv_kernel_size=5,
            input_conv_kernel_size=(5, 5, 5),
        ),
        2,
        (1, 2),
    ),
}


def _build(name: str):
    kwargs, batch, chunks = CONFIGS[name]
    model = tiny_tokenizer(**kwargs).eval()
    randomize_(model)
    f = model.time_downsample_factor
    # 41 frames for the one-clip config (its convs cross oneDNN's size threshold), else 25
    groups = 10 if batch == 1 else 6
    x = video(batch=batch, frames=1 + groups * f, size=model.config.image_size)
    cond = torch.randn(batch, 4, generator=torch.Generator().manual_seed(2))
    cond = cond if model.config.is_conditioned else None
    return model, x, cond, [k * f for k in chunks]


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_chunked_encoding_and_decoding_equal_whole_video(name):
    model, x, cond, chunk_sizes = _build(name)
    f = model.time_downsample_factor
    with torch.no_grad():
        latents = model.encode(x, cond=cond)
        codes = model.quantizer(latents).codes
        recon = model.decode_from_code_indices(codes, cond)
    for chunk in (*chunk_sizes, x.shape[2] - 1):  # the last: one chunk
        chunked = encode_long(model, x, chunk, cond, quantize=False)
        assert torch.equal(chunked, latents), (name, chunk)
        assert torch.equal(model.encode_long(x, chunk, cond), codes), (name, chunk)
    for chunk in (1, 3, chunk_sizes[-1] // f):
        decoded = model.decode_long(codes, chunk, cond)
        assert decoded.shape == recon.shape
        assert (decoded - recon).abs().max() <= 1e-5, (name, chunk)
        assert torch.equal(decoded, recon), (name, chunk)  # on CPU it is in fact exact
    latents_in = model.quantizer.indices_to_codes(codes)
    assert torch.equal(decode_long(model, latents_in, 2, cond), recon)


@pytest.mark.parametrize("name", ["every-unconditioned-kind", "every-conditioned-kind"])
def test_chunked_encoding_with_several_threads_equals_whole_to_rounding(name):
    torch.set_num_threads(2)
    model, x, cond, chunk_sizes = _build(name)
    with torch.no_grad():
        latents = model.encode(x, cond=cond)
        codes = model.quantizer(latents).codes
        for chunk in chunk_sizes:
            chunked = encode_long(model, x, chunk, cond, quantize=False)
            assert (chunked - latents).abs().max() <= 1e-5, (name, chunk)
            agreement = (model.encode_long(x, chunk, cond) == codes).double().mean()
            assert agreement >= 0.999, (name, chunk, agreement)


def test_chunks_of_changing_size_and_bounded_state():
    model, x, _, _ = _build("every-unconditioned-kind")
    f = model.time_downsample_factor
    with torch.no_grad():
        latents = model.encode(x)
        encoder = StreamingEncoder(model, x.shape[2])
        bounds = [0, 1 + f, 1 + 3 * f, 1 + 4 * f, x.shape[2]]  # 1 + f, 2f, f, 2f frames
        parts = [encoder.encode(x[:, :, a:b]) for a, b in zip(bounds, bounds[1:], strict=False)]
    assert torch.equal(torch.cat(parts, dim=2), latents)
    for layer in encoder._layers:  # kept frames never exceed a layer's causal reach
        if isinstance(layer, OverlappedLayer):
            assert layer.cache is None or layer.cache.shape[2] <= layer.history


def test_naive_chunked_convs_would_differ():
    """The kernel choice matters: a chunk's conv on its own kernel gives other last bits."""
    torch.manual_seed(0)
    conv = nn.Conv3d(64, 64, 3)
    x = torch.randn(1, 64, 40, 18, 18)  # oneDNN for the whole, the native kernel for chunks
    starts = range(0, 38, 2)  # 4 input frames, 2 output frames per chunk
    with torch.no_grad():
        whole = conv(x)
        naive = torch.cat([conv(x[:, :, s : s + 4]) for s in starts], dim=2)
        matched = [
            conv3d_on_backend_for(36, x[:, :, s : s + 4], conv.weight, conv.bias) for s in starts
        ]
        matched = torch.cat(matched, dim=2)
    assert not torch.equal(naive, whole)
    assert torch.equal(matched, whole)


@pytest.mark.parametrize(
    "kernel, stride, dilation, frames, time_pad",
    [
        ((3, 3, 3), 1, 1, 4, 0),  # two output frames: one from each window of the pair
        ((3, 3, 3), 1, 1, 3, 0),  # one output frame: the second window lies past the end
        ((3, 1, 1), 2, 1, 6, 0),  # the time downsampler's strided conv
        ((3, 1, 1), 2, 1, 7, 0),
        ((3, 3, 3), 1, 2, 7, 0),
        ((3, 3, 3), 1, 1, 5, 1),  # time padding: zero frames appended instead
    ],
)
def test_chunk_convs_run_on_the_whole_calls_kernel(kernel, stride, dilation, frames, time_pad):
    """Every way of moving a short batch-1 chunk onto oneDNN (the whole call's kernel) gives the
    whole call's output frames bit for bit."""
    torch.manual_seed(0)
    conv = nn.Conv3d(16, 16, kernel, (stride, 1, 1), (time_pad, 0, 0), (dilation, 1, 1))
    x = torch.randn(1, 16, 80, 18, 18)  # oneDNN for the whole, the native kernel for a chunk
    start = 0 if time_pad else 4 * stride  # time padding: only the first chunk is comparable
    chunk = x[:, :, start : start + frames]
    with torch.no_grad():
        whole = conv(x)
        naive = conv(chunk)
        args = (chunk, conv.weight, conv.bias, conv.stride, conv.padding, conv.dilation)
        matched = conv3d_on_backend_for(x.shape[2] - frames, *args)
    assert matched.shape == naive.shape and matched.is_contiguous()
    kept = naive.shape[2] - time_pad  # with time padding the last output reads a padded frame
    expected = whole[:, :, start // stride : start // stride + kept]
    assert torch.equal(matched[:, :, :kept], expected)


def _ran_onednn(x: torch.Tensor, weight: torch.Tensor, **kwargs) -> bool:
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        torch.conv3d(x, weight, **kwargs)
    return "aten::mkldnn_convolution" in {event.name for event in prof.events()}


@pytest.mark.parametrize("threads", [1, 2])
def test_restated_kernel_rule_is_the_one_pytorch_applies(threads, monkeypatch):
    """`onednn_picks` restates PyTorch's size rule; the profiler shows which kernel ran. A
    PyTorch release that changes the rule fails here (chunks would then round differently)."""
    torch.set_num_threads(threads)
    c, h = 8, 10  # oneDNN above ONEDNN_MIN_ELEMENTS / (c * h) = 256 frames for batch 1
    limit = ONEDNN_MIN_ELEMENTS // (c * h)
    cases = [  # (batch, frames, kernel, stride, groups)
        (1, limit, (3, 3, 3), 1, 1),
        (1, limit + 1, (3, 3, 3), 1, 1),
        (1, 4, (3, 1, 1), 2, 1),
        (1, limit + 1, (3, 1, 1), 2, 1),
        (1, limit + 1, (1, 1, 1), 1, 1),
        (1, 4, (3, 3, 3), 1, 2),
        (1, 4, (3, 5, 5), 1, 1),
        (2, 4, (3, 3, 3), 1, 1),
    ]
    for batch, frames, kernel, stride, groups in cases:
        x = torch.zeros(batch, c, frames, h, h)
        weight = torch.zeros(c, c // groups, *kernel)
        predicted = onednn_picks(x.shape, weight, [stride, 1, 1], [1, 1, 1], groups)
        ran = _ran_onednn(x, weight, stride=(stride, 1, 1), groups=groups)
        assert predicted == ran, (threads, batch, frames, kernel, stride, groups, ran)
    monkeypatch.setattr(torch.backends.mkldnn, "enabled", False)  # oneDNN switched off
    x, weight = torch.zeros(2, c, 4, h, h), torch.zeros(c, c, 3, 3, 3)
    assert not onednn_picks(x.shape, weight, [1, 1, 1], [1, 1, 1], 1)
    assert not _ran_onednn(x, weight)


def test_kernel_matching_is_what_makes_one_clip_exact(monkeypatch):
    """Without kernel matching, chunked latents of one 32 px clip differ from the whole video's:
    the equality test above can fail."""
    model = tiny_tokenizer(layers=("residual", "compress_time"), init_dim=16, image_size=32)
    randomize_(model.eval())
    x = video(batch=1, frames=41, size=32)
    with torch.no_grad():
        latents = model.encode(x)
    assert torch.equal(encode_long(model, x, 2, quantize=False), latents)
    plain = lambda extra, *args, **kwargs: torch.conv3d(*args, **kwargs)  # noqa: E731
    monkeypatch.setattr(chunked_layers, "conv3d_on_backend_for", plain)
    assert not torch.equal(encode_long(model, x, 2, quantize=False), latents)


def test_chunk_bounds_and_images():
    assert chunk_bounds(17, 8) == [(0, 9), (9, 17)]
    assert chunk_bounds(21, 8) == [(0, 9), (9, 17), (17, 21)]
    assert chunk_bounds(1, 4) == [(0, 1)]
    model = tiny_tokenizer().eval()
    one_frame = video(frames=1)
    assert torch.equal(model.encode_long(one_frame, 2), model.tokenize(one_frame))


def test_mode_is_restored():
    model = tiny_tokenizer().train()
    model.encode_long(video(frames=5), 2)
    model.decode_long(model.tokenize(video(frames=5)), 1)
    assert model.training


def test_bad_chunk_sizes_and_inputs_are_clear_errors():
    model = tiny_tokenizer(layers=("compress_time", "compress_time", "residual")).eval()  # f = 4
    x = video(frames=9)
    with pytest.raises(ValueError, match=r"multiple of the time compression 4.*4, 8, 16, 32"):
        model.encode_long(x, 6)
    with pytest.raises(ValueError, match="chunk_frames must be an int"):
        model.encode_long(x, 4.0)
    with pytest.raises(ValueError, match=r"1 \+ k\*4"):
        model.encode_long(video(frames=8), 4)
    with pytest.raises(ValueError, match="chunk_latent_frames must be >= 1"):
        model.decode_long(model.tokenize(x), 0)
    with pytest.raises(ValueError, match="codes must lie in"):
        model.decode_long(torch.full((1, 3, 16, 16), 64), 1)
    encoder = StreamingEncoder(model, 9)
    with torch.no_grad(), pytest.raises(ValueError, match=r"1 \+ k\*4"):
        encoder.encode(x[:, :, :4])  # the first chunk holds frame 0 and whole groups
    with torch.no_grad():
        encoder.encode(x[:, :, :5])
        with pytest.raises(ValueError, match=r"k\*4"):
            encoder.encode(x[:, :, 5:7])
        with pytest.raises(ValueError, match="past the video's announced 9 frames"):
            encoder.encode(video(frames=8))
    with pytest.raises(ValueError, match="LSTM cannot be run in chunks"):
        chunked_layer(nn.LSTM(4, 4), 10)
