"""Any-length encoding and decoding: a video in temporal chunks, causal state carried across them.

    codes = tokenizer.encode_long(video, chunk_frames=16)          # == tokenizer.tokenize(video)
    video = tokenizer.decode_long(codes, chunk_latent_frames=4)   # == decode_from_code_indices

Memory is set by the chunk, not by the video: activations exist for one chunk at a time, and each
layer keeps only what its causal reach needs (model/chunked_layers.py). The exception is
`attend_time` (and `cond_attend_time`), whose exact chunked form needs the layer's input for the
whole video at latent resolution.

Chunking of an encoded video of T = 1 + K*f frames (f = the time compression): the first chunk
holds frame 0 and `chunk_frames` more frames, every later chunk `chunk_frames` frames (the last
one may be shorter), so chunk boundaries fall on latent-frame boundaries at every level of the
encoder (`chunk_frames` must be a multiple of f). Chunk i > 0 gives chunk_frames / f latent
frames, the first one more. Decoding splits the latent frames into chunks of any size.

On CPU in fp32 the codes equal whole-video encoding exactly and decoded chunks equal whole
decoding exactly; on CUDA, to rounding (see model/chunked_layers.py for why).

Legend: B batch, C channels, T frames, H/W pixels, D latent channels, t/h/w latent grid.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import Tensor

from model.chunked_layers import WholeLengthConvs, chunked_layer
from model.conv import pad_time_past
from model.tokenizer import Tokenizer


def check_chunk_frames(chunk_frames: int, time_factor: int) -> None:
    """ValueError unless `chunk_frames` is a positive multiple of the time compression."""
    if isinstance(chunk_frames, bool) or not isinstance(chunk_frames, int):
        raise ValueError(f"chunk_frames must be an int, got {chunk_frames!r}")
    if chunk_frames < 1 or chunk_frames % time_factor:
        examples = ", ".join(str(time_factor * k) for k in (1, 2, 4, 8))
        raise ValueError(
            f"chunk_frames must be a positive multiple of the time compression {time_factor} "
            f"(so that chunks end on latent-frame boundaries at every level), e.g. {examples}; "
            f"got {chunk_frames}"
        )


def chunk_bounds(num_frames: int, chunk_frames: int) -> list[tuple[int, int]]:
    """[start, end) of each chunk: frame 0 plus `chunk_frames` frames, then `chunk_frames` each."""
    bounds, start, end = [], 0, min(num_frames, 1 + chunk_frames)
    while start < num_frames:
        bounds.append((start, end))
        start, end = end, min(num_frames, end + chunk_frames)
    return bounds


class StreamingEncoder:
    """Encodes one video (or a batch of equally long videos) chunk by chunk.

    `num_frames` is the length the whole video will have: the encoder reproduces the whole-video
    computation, whose kernels depend on that length. Chunks follow the rule of `chunk_bounds`
    (the first 1 + k*f frames, later ones k*f frames, k may change from chunk to chunk). Run it
    under `torch.no_grad()` with the model in eval mode (`encode_long` does both).
    """

    def __init__(self, model: Tokenizer, num_frames: int, cond: Tensor | None = None) -> None:
        config = model.config
        if not config.num_frames_ok(num_frames):
            f = config.time_downsample_factor
            raise ValueError(f"expected a video of 1 + k*{f} frames, got num_frames={num_frames}")
        self.model = model
        self.num_frames = num_frames
        self.frames_done = 0
        self.cond_input = cond
        self._cond: Tensor | None = None
        f = model.time_downsample_factor
        padded = num_frames + f - 1  # after the encoder's f - 1 zero frames in front
        encoder = model.encoder
        self._separate_first = encoder.conv_in_first_frame is not None
        self._stem = chunked_layer(
            encoder.conv_in, num_frames - 1 if self._separate_first else padded
        )
        self._layers = []
        for spec, layer, takes_cond in zip(
            config.layers, encoder.layers, encoder.takes_cond, strict=True
        ):
            self._layers.append(chunked_layer(layer, padded, takes_cond))
            if spec.compresses_time:
                padded //= 2

    def _check_chunk(self, frames: Tensor) -> None:
        first = self.frames_done == 0
        self.model.check_video(frames, contains_first_frame=first, exact_size=False)
        if self.frames_done + frames.shape[2] > self.num_frames:
            raise ValueError(
                f"this chunk of {frames.shape[2]} frames runs past the video's announced "
                f"{self.num_frames} frames ({self.frames_done} done)"
            )

    def encode(self, frames: Tensor) -> Tensor:
        """Next chunk (B, C, n, H, W) -> its latents (B, D, n', h, w), before quantization."""
        self._check_chunk(frames)
        model, encoder = self.model, self.model.encoder
        if self.frames_done == 0:
            self._cond = encoder.embed_cond(self.cond_input, len(frames))
        with WholeLengthConvs() as convs:
            x = frames
            if self.frames_done == 0:
                pad = model.time_downsample_factor - 1
                if self._separate_first:
                    x = encoder.conv_in_first_frame(frames[:, :, 0]).unsqueeze(2)  # (b, d, 1, h, w)
                    if frames.shape[2] > 1:
                        rest = self._stem(frames[:, :, 1:], None, convs)
                        x = torch.cat((x, rest), dim=2)
                    x = pad_time_past(x, pad)
                else:
                    x = self._stem(pad_time_past(frames, pad), None, convs)
            else:
                x = self._stem(frames, None, convs)  # (b, d, n, h, w)
            for layer in self._layers:
                x = layer(x, self._cond, convs)
            if not model.config.reference_quirks:
                x = encoder.norm(x)  # (b, D, n / f, h, w)
        self.frames_done += frames.shape[2]
        return x


class StreamingDecoder:
    """Decodes quantized latents chunk by chunk (any number of latent frames per chunk).

    `num_latent_frames` is the whole sequence's length; the first chunk gives 1 + (n - 1)*f
    frames, every later one n*f. Run it under `torch.no_grad()` in eval mode.
    """

    def __init__(
        self, model: Tokenizer, num_latent_frames: int, cond: Tensor | None = None
    ) -> None:
        if num_latent_frames < 1:
            raise ValueError(f"num_latent_frames must be >= 1, got {num_latent_frames}")
        config = model.config
        self.model = model
        self.num_latent_frames = num_latent_frames
        self.latent_frames_done = 0
        self.cond_input = cond
        self._cond: Tensor | None = None
        length = num_latent_frames
        decoder = model.decoder
        self._layers = []
        for spec, layer, takes_cond in zip(
            reversed(config.layers), decoder.layers, decoder.takes_cond, strict=True
        ):
            self._layers.append(chunked_layer(layer, length, takes_cond))
            if spec.compresses_time:
                length *= 2
        f = model.time_downsample_factor
        self._separate_first = decoder.conv_out_first_frame is not None
        self._tail = chunked_layer(decoder.conv_out, length - f if self._separate_first else length)

    def decode(self, latents: Tensor) -> Tensor:
        """Next chunk of quantized latents (B, D, n, h, w) -> its frames (B, C, n', H, W)."""
        model, dim = self.model, self.model.config.latent_dim
        if latents.ndim != 5 or latents.shape[1] != dim or latents.shape[2] < 1:
            raise ValueError(
                f"expected latents (B, {dim}, t, h, w) with t >= 1, got {tuple(latents.shape)}"
            )
        if self.latent_frames_done + latents.shape[2] > self.num_latent_frames:
            raise ValueError(
                f"this chunk of {latents.shape[2]} latent frames runs past the announced "
                f"{self.num_latent_frames} ({self.latent_frames_done} done)"
            )
        first = self.latent_frames_done == 0
        if first:
            self._cond = model.decoder.embed_cond(self.cond_input, len(latents))
        pad = model.time_downsample_factor - 1
        with WholeLengthConvs() as convs:
            x = latents.contiguous()  # as Decoder.forward
            for layer in self._layers:
                x = layer(x, self._cond, convs)  # (b, d, n * f, h, w) at the end
            if not first:
                out = self._tail(x, None, convs)
            elif self._separate_first:
                out = model.decoder.conv_out_first_frame(x[:, :, pad]).unsqueeze(2)
                if x.shape[2] > pad + 1:
                    out = torch.cat((out, self._tail(x[:, :, pad + 1 :], None, convs)), dim=2)
            else:
                out = self._tail(x, None, convs)[:, :, pad:]  # (b, C, frames, H, W)
        self.latent_frames_done += latents.shape[2]
        return out


@contextmanager
def inference_mode(model: torch.nn.Module) -> Iterator[None]:
    """No gradients and eval mode (dropout off, no quantizer losses); restores the mode."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        model.train(was_training)


def encode_long(
    model: Tokenizer,
    video: Tensor,
    chunk_frames: int,
    cond: Tensor | None = None,
    quantize: bool = True,
) -> Tensor:
    """Encodes a video of any length in chunks of `chunk_frames` frames (a multiple of the time
    compression f; the first chunk also holds frame 0).

    Args:
        video: (B, C, T, H, W) in [-1, 1], T = 1 + k*f.
        quantize: return codes (B, t, h, w), or (B, t, h, w, c) with c codebooks; False: the
            latents before quantization (B, D, t, h, w).

    Returns:
        The same codes (or latents) as `model.encode` on the whole video: bit-identical on CPU.
    """
    if video.ndim == 4:
        video = video.unsqueeze(2)
    model.check_video(video, exact_size=False)
    check_chunk_frames(chunk_frames, model.time_downsample_factor)
    outs = []
    with inference_mode(model):
        encoder = StreamingEncoder(model, video.shape[2], cond)
        for start, end in chunk_bounds(video.shape[2], chunk_frames):
            latents = encoder.encode(video[:, :, start:end])
            outs.append(model.quantizer(latents).codes if quantize else latents)
    return torch.cat(outs, dim=1 if quantize else 2)


def decode_long(
    model: Tokenizer,
    codes_or_latents: Tensor,
    chunk_latent_frames: int,
    cond: Tensor | None = None,
) -> Tensor:
    """Decodes integer codes (as `decode_from_code_indices` takes them) or quantized latents
    (B, D, t, h, w) in chunks of `chunk_latent_frames` latent frames; returns (B, C, T, H, W)."""
    if isinstance(chunk_latent_frames, bool) or not isinstance(chunk_latent_frames, int):
        raise ValueError(f"chunk_latent_frames must be an int, got {chunk_latent_frames!r}")
    if chunk_latent_frames < 1:
        raise ValueError(f"chunk_latent_frames must be >= 1, got {chunk_latent_frames}")
    is_codes = not codes_or_latents.is_floating_point()
    if is_codes:
        codes = model.check_codes(codes_or_latents)  # (B, t, h, w[, c])
        num_latent_frames = codes.shape[1]
    else:
        latents = codes_or_latents
        if latents.ndim != 5:
            raise ValueError(
                f"expected integer codes or latents (B, D, t, h, w), got {tuple(latents.shape)}"
            )
        num_latent_frames = latents.shape[2]
    outs = []
    with inference_mode(model):
        decoder = StreamingDecoder(model, num_latent_frames, cond)
        for start in range(0, num_latent_frames, chunk_latent_frames):
            end = min(start + chunk_latent_frames, num_latent_frames)
            if is_codes:
                chunk = model.quantizer.indices_to_codes(codes[:, start:end])  # (b, D, n, h, w)
            else:
                chunk = latents[:, :, start:end]
            outs.append(decoder.decode(chunk))
    return torch.cat(outs, dim=2)
