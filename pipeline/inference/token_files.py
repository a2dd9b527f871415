"""Single-file commands of `python -m pipeline.tokenize`: a video file to a codes file and back.

Both stream: frames are read, encoded and quantized one chunk at a time (`model.streaming`), and
decoded frames are written to the mp4 as they come, so a video of any length fits in memory.
"""

from __future__ import annotations

import argparse
import logging
import sys

import av
import numpy as np
import torch

from data_prep.token_format import CodesMeta, codes_dtype, load_codes, save_codes
from data_prep.video_io import open_video
from model import TokenizerConfig, VideoTokenizer
from model.pretrained import WEIGHTS_NAME
from model.streaming import (
    StreamingDecoder,
    StreamingEncoder,
    check_chunk_frames,
    chunk_bounds,
    inference_mode,
)
from pipeline.commands import command_name
from pipeline.data.decode import (
    Yuv420,
    clip_size,
    crop_to_square,
    frames_as_loaded,
    resize_short_side,
    stack_clips,
    to_pixels,
    to_uint8,
    yuv420_to_rgb_uint8,
)
from pipeline.distributed.collectives import device_for
from pipeline.distributed.world import World
from pipeline.inference.arguments import add_precision_argument
from pipeline.inference.export import file_sha256, load_tokenizer, resolve_export_dir, usable_frames
from pipeline.inference.mp4 import Mp4Writer
from pipeline.inference.precision import inference_precision, resolve_precision

logger = logging.getLogger(__name__)

# Fields that decide what a code means; the others (losses, GAN, checkpointing) do not.
_TRAINING_ONLY = {
    "lfq_entropy_loss_weight",
    "lfq_commitment_loss_weight",
    "lfq_diversity_gamma",
    "quantizer_aux_loss_weight",
    "perceptual_loss_weight",
    "vgg_weights",
    "discriminator",
    "use_gan",
    "adversarial_loss_weight",
    "grad_penalty_loss_weight",
    "attn_dropout",
    "multiscale_adversarial_loss_weight",
    "flash_attn",
    "gradient_checkpointing",
}


def architecture_differences(config: TokenizerConfig, recorded: dict) -> list[str]:
    """Fields in which a codes file's tokenizer and `config` differ (training-only ones aside)."""
    mine = config.to_dict()
    try:
        theirs = TokenizerConfig.from_dict(recorded).to_dict()
    except (TypeError, ValueError) as exc:
        return [f"unreadable tokenizer config ({exc})"]
    return [
        f"{k}: {theirs.get(k)!r} in the file, {mine[k]!r} in the checkpoint"
        for k in sorted(mine)
        if k not in _TRAINING_ONLY and theirs.get(k) != mine[k]
    ]


class LoaderFrames:
    """A video file's frames in order, as the training loader decodes a clip's (4:2:0 planes
    converted on the device by the trainer's BT.601 code, not swscale's RGB), so a clip encoded
    from its file gets the codes the shard export gives it."""

    def __init__(self, path: str) -> None:
        self._container = av.open(path)
        stream = self._container.streams.video[0]
        stream.codec_context.thread_count = 1
        self._frames = self._container.decode(stream)
        self._next = 0

    def read(self, start: int, end: int) -> torch.Tensor | Yuv420:
        """Frames [start, end) (start at or after the last read's end); EOFError if the stream
        ends first."""
        frames = []
        while self._next < end:
            try:
                frame = next(self._frames)
            except StopIteration:
                raise EOFError from None
            if self._next >= start:
                frames.append(frame)
            self._next += 1
        return frames_as_loaded(frames)

    def close(self) -> None:
        self._container.close()

    def __enter__(self) -> LoaderFrames:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _shaped(frames: torch.Tensor | Yuv420, size: int, crop: bool) -> torch.Tensor | Yuv420:
    """The loader's center crop (short side resized to `size`), or the resized whole frame."""
    if crop:
        return crop_to_square(frames, size, "center", None)
    rgb = yuv420_to_rgb_uint8(frames) if isinstance(frames, Yuv420) else frames
    return resize_short_side(rgb, size)


def _frames_to_encode(
    source: str, size: int, time_factor: int, max_frames: int | None
) -> tuple[int, float]:
    """(frames to encode, frame rate): the file's frames (decord's index), at most `max_frames`,
    cut to the 1 + k * time_factor the tokenizer takes."""
    with open_video(source, size, None) as probe:
        total = probe.num_frames if probe.num_frames is not None else probe.count_frames()
        fps = probe.fps
    num_frames = usable_frames(min(total, max_frames or total), time_factor)
    if num_frames < 1:
        raise ValueError(f"{source}: no frames to encode")
    return num_frames, fps


def _checked_sides(frames: torch.Tensor | Yuv420, factor: int, source: str) -> tuple[int, int]:
    """(height, width) of the shaped frames, which the tokenizer must be able to downsample."""
    height, width = clip_size(frames)[1:]
    if height % factor or width % factor:
        raise ValueError(
            f"{source}: frames of {width}x{height} after resizing; the tokenizer needs "
            f"sides divisible by {factor}: keep the center crop or pass another --size"
        )
    return height, width


def encode_file(
    model: VideoTokenizer,
    source: str,
    output: str,
    *,
    chunk_frames: int,
    size: int | None = None,
    crop: bool = True,
    max_frames: int | None = None,
    checkpoint_sha256: str = "",
    precision: str = "fp32",
) -> CodesMeta:
    """Encodes a video file into a codes file, `chunk_frames` frames at a time, in `precision`
    ('fp32' or 'bf16', as pipeline.inference.precision resolves it; recorded in the file). Frames
    are decoded, resized and cropped as the loader and the shard export do (LoaderFrames)."""
    f = model.time_downsample_factor
    check_chunk_frames(chunk_frames, f)
    size = size or model.config.image_size
    device = next(model.parameters()).device
    num_frames, fps = _frames_to_encode(source, size, f, max_frames)
    codes: list[torch.Tensor] = []
    with (
        LoaderFrames(source) as reader,
        inference_mode(model),
        inference_precision(device, precision),
    ):
        encoder = StreamingEncoder(model, num_frames)
        for start, end in chunk_bounds(num_frames, chunk_frames):
            try:
                frames = _shaped(reader.read(start, end), size, crop)
            except EOFError:  # the container promised more frames than it holds
                logger.warning("%s ends after frame %d of %d", source, start, num_frames)
                num_frames = start
                break
            height, width = _checked_sides(frames, model.config.space_downsample_factor, source)
            video = to_pixels(stack_clips([frames]).to(device))  # (1, C, n, H, W)
            codes.append(model.quantizer(encoder.encode(video.contiguous())).codes[0].cpu())
    if not codes:
        raise ValueError(f"{source}: no frames could be decoded")
    array = torch.cat(codes).numpy().astype(codes_dtype(model.codebook_size))
    meta = CodesMeta(
        tokenizer=model.config.to_dict(),
        checkpoint_sha256=checkpoint_sha256,
        shape=list(array.shape),
        dtype=str(array.dtype),
        num_frames=num_frames,
        fps=fps,
        frame_height=height,
        frame_width=width,
        source=str(source),
        precision=precision,
    )
    save_codes(output, array, meta)
    return meta


def decode_file(
    model: VideoTokenizer,
    source: str,
    output: str,
    *,
    chunk_latent_frames: int,
    fps: float | None = None,
    checkpoint_sha256: str = "",
) -> int:
    """Decodes a codes file into an mp4, `chunk_latent_frames` latent frames at a time; returns
    the number of frames written."""
    array, meta = load_codes(source)
    differences = architecture_differences(model.config, meta.tokenizer)
    if differences:
        raise ValueError(
            f"{source} was made by a tokenizer of another configuration: "
            + "; ".join(differences[:6])
        )
    if checkpoint_sha256 and meta.checkpoint_sha256 not in ("", checkpoint_sha256):
        logger.warning(
            "%s was encoded with other weights (%s...) than this checkpoint's",
            source,
            meta.checkpoint_sha256[:12],
        )
    codes = model.check_codes(torch.from_numpy(array.astype(np.int64))[None])  # (1, t, h, w...)
    if chunk_latent_frames < 1:
        raise ValueError(f"chunk_latent_frames must be >= 1, got {chunk_latent_frames}")
    device = next(model.parameters()).device
    num_latent = codes.shape[1]
    with inference_mode(model), Mp4Writer(output, fps or meta.fps) as writer:
        decoder = StreamingDecoder(model, num_latent)
        for start in range(0, num_latent, chunk_latent_frames):
            chunk = codes[:, start : start + chunk_latent_frames].to(device)
            video = decoder.decode(model.quantizer.indices_to_codes(chunk))  # (1, C, n, H, W)
            writer.write(to_uint8(video[0].permute(1, 2, 3, 0).clamp(-1, 1)))
    return writer.num_frames


def parse_file_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog=command_name("pipeline.tokenize"))
    commands = parser.add_subparsers(dest="command", required=True)
    enc = commands.add_parser("encode-file", help="video file -> codes file (.npz/.safetensors)")
    enc.add_argument("input")
    enc.add_argument("output", help="codes file: .npz or .safetensors")
    enc.add_argument("--checkpoint", required=True)
    enc.add_argument(
        "--chunk-frames",
        type=int,
        default=None,
        help="frames per chunk, a multiple of the time compression (default: 4 "
        "latent frames' worth)",
    )
    enc.add_argument(
        "--size",
        type=int,
        default=None,
        help="short side after resizing (default: the model's image size)",
    )
    enc.add_argument(
        "--no-crop",
        action="store_true",
        help="keep the whole resized frame instead of a center square",
    )
    enc.add_argument("--max-frames", type=int, default=None, help="frames to encode (default: all)")
    add_precision_argument(enc)
    dec = commands.add_parser("decode-file", help="codes file -> mp4")
    dec.add_argument("input", help="codes file: .npz or .safetensors")
    dec.add_argument("output", help=".mp4")
    dec.add_argument("--checkpoint", required=True)
    dec.add_argument(
        "--chunk-latent-frames",
        type=int,
        default=4,
        help="latent frames decoded at a time (default: %(default)s)",
    )
    dec.add_argument("--fps", type=float, default=None, help="frame rate (default: the source's)")
    return parser.parse_args(argv)


def run_file_command(args: argparse.Namespace) -> int:
    try:
        device = device_for(World())
        model = load_tokenizer(args.checkpoint, device)
        sha = file_sha256(resolve_export_dir(args.checkpoint) / WEIGHTS_NAME)
        if args.command == "encode-file":
            chunk = args.chunk_frames or 4 * model.time_downsample_factor
            meta = encode_file(
                model,
                args.input,
                args.output,
                chunk_frames=chunk,
                size=args.size,
                crop=not args.no_crop,
                max_frames=args.max_frames,
                checkpoint_sha256=sha,
                precision=resolve_precision(args.precision, device),
            )
            print(
                f"{args.output}: codes {meta.dtype} {tuple(meta.shape)} from {meta.num_frames} "
                f"frames of {meta.frame_width}x{meta.frame_height}"
            )
        else:
            count = decode_file(
                model,
                args.input,
                args.output,
                chunk_latent_frames=args.chunk_latent_frames,
                fps=args.fps,
                checkpoint_sha256=sha,
            )
            print(f"{args.output}: {count} frames")
        return 0
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
