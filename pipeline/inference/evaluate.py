"""Evaluation on held-out shards: PSNR, SSIM, LPIPS, rFVD and rFID (each when its weights are on
disk), codebook usage and perplexity, per clip and in total; a few real | reconstruction videos.

    torchrun --nproc_per_node 8 -m pipeline.evaluate --checkpoint runs/base/export \\
        --shards /data/heldout --out runs/base/eval

Every rank reads its own shards once, in order (`ShardLoader` in eval mode); sums and code counts
are reduced across ranks and rank 0 writes `clips.csv`, `summary.json` and `videos/*.mp4`. The
trainer calls `evaluate(...)` at its evaluation interval and logs `EvalResult.scalars()`.

rFVD compares I3D features of the real and reconstructed clips, rFID InceptionV3 features of their
frames (pipeline.inference.video_features gives the exact conventions): each rank sums the features'
float64 moments (count, sum, sum of outer products), the sums are all-reduced and every rank
computes the Fréchet distance (pipeline.inference.frechet) of the two sets.
"""

from __future__ import annotations

import argparse
import csv
import logging
import math
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from data_prep.format import write_json_atomic
from model import VideoTokenizer
from pipeline.data.loader import Batch, DataConfig, ShardLoader
from pipeline.distributed.collectives import (
    all_gather_objects,
    all_reduce_max,
    all_reduce_sum,
    device_for,
    init_distributed,
    teardown,
)
from pipeline.distributed.world import World
from pipeline.inference.arguments import add_checkpoint_and_shards, add_precision_argument
from pipeline.inference.contact_sheet import sheet_frames, write_contact_sheet
from pipeline.inference.export import load_tokenizer
from pipeline.inference.frechet import FeatureMoments, frechet_from_moments
from pipeline.inference.mp4 import Mp4Writer
from pipeline.inference.precision import inference_precision, resolve_precision
from pipeline.inference.quality import (
    CodeHistogram,
    load_lpips,
    lpips_per_clip,
    psnr_frame_mean,
    psnr_per_clip,
    ssim_per_clip,
    to_unit_range,
)
from pipeline.inference.video_features import (
    I3D_FEATURES,
    I3D_MIN_FRAMES,
    INCEPTION_FEATURES,
    i3d_features,
    inception_features,
    load_i3d,
    load_inception,
)

logger = logging.getLogger(__name__)

SHEET_NAME = "contact_sheet.png"
"""Real | reconstruction stills of the written clips, next to their videos/ folder."""

VideoWriter = Callable[[str, Tensor, Tensor], None]
"""Called as writer(key, real, recon) with (C, T, H, W) clips in [0, 1], on rank 0."""


@dataclass(frozen=True)
class ClipScores:
    key: str
    psnr: float
    ssim: float
    lpips: float | None
    num_frames: int
    psnr_frames: float


@dataclass
class EvalResult:
    num_clips: int
    psnr: float
    """Mean over clips of the clip's PSNR (dB over all its pixels, frames in [0, 1])."""
    psnr_frames: float
    """Mean over clips of the mean over frames of each frame's PSNR (VidTok's convention)."""
    ssim: float
    lpips: float | None
    """Mean LPIPS (AlexNet), None when unavailable (see lpips_note)."""
    codebook_usage: float
    """Share of codebook entries used at least once (mean over codebooks)."""
    perplexity: float
    """exp(entropy) of the code distribution over the whole evaluation."""
    codebook_size: int
    num_codebooks: int
    clips: list[ClipScores] = field(default_factory=list)
    """Every clip of every rank, sorted by key."""
    skipped: dict[str, int] = field(default_factory=dict)
    """Samples the loader skipped, by reason (missing keys, undecodable, too short, ...)."""
    lpips_note: str = ""
    precision: str = ""
    """The arithmetic the model ran in ('fp32' or 'bf16')."""
    fvd: float | None = None
    """rFVD: Fréchet distance of I3D features, real vs reconstructed; None if unavailable."""
    fvd_note: str = ""
    """The I3D used and the number of clips (with any warning), or why rFVD is unavailable."""
    fid: float | None = None
    """rFID: Fréchet distance of InceptionV3 features of every frame; None when unavailable."""
    fid_note: str = ""

    def scalars(self, prefix: str = "eval/") -> dict[str, float]:
        """For TensorBoard: writer.add_scalar(name, value, step) for each item."""
        values = {
            "psnr": self.psnr,
            "psnr_frames": self.psnr_frames,
            "ssim": self.ssim,
            "codebook_usage": self.codebook_usage,
            "perplexity": self.perplexity,
            "num_clips": float(self.num_clips),
        }
        if self.lpips is not None:
            values["lpips"] = self.lpips
        if self.fvd is not None:
            values["rfvd"] = self.fvd
        if self.fid is not None:
            values["rfid"] = self.fid
        return {prefix + k: v for k, v in values.items()}

    def summary(self) -> dict:
        out = {k: v for k, v in asdict(self).items() if k != "clips"}
        out["psnr_min"] = min((c.psnr for c in self.clips), default=math.nan)
        return out


class SideBySideWriter:
    """Writes the first `max_videos` clips as `DIR/<key>.mp4`, real on the left, and a PNG
    contact sheet of them (first, middle and last frame; `sheet_path`, default
    `DIR/../contact_sheet.png`), rewritten as each clip arrives."""

    def __init__(
        self,
        directory: str | Path,
        max_videos: int = 4,
        fps: float = 8.0,
        sheet_path: str | Path | None = None,
    ) -> None:
        self.directory, self.max_videos, self.fps = Path(directory), max_videos, fps
        self.sheet_path = Path(sheet_path) if sheet_path else self.directory.parent / SHEET_NAME
        self.written: list[Path] = []
        self._sheet_clips: list[tuple[str, Tensor, Tensor]] = []

    def __call__(self, key: str, real: Tensor, recon: Tensor) -> None:
        if len(self.written) >= self.max_videos:
            return
        both = torch.cat((real, recon), dim=-1)  # (c, t, h, 2w)
        frames = both.mul(255).round().clamp(0, 255).to(torch.uint8).permute(1, 2, 3, 0)
        if frames.shape[-1] == 1:
            frames = frames.expand(-1, -1, -1, 3)
        with Mp4Writer(self.directory / f"{key}.mp4", self.fps) as writer:
            writer.write(frames[..., :3].contiguous())
        self.written.append(writer.path)
        frames_shown = sheet_frames(real.shape[1])
        self._sheet_clips.append((key, real[:, frames_shown], recon[:, frames_shown]))
        write_contact_sheet(self.sheet_path, self._sheet_clips)


def evaluate(
    model: VideoTokenizer,
    loader: Iterable[Batch],
    world: World,
    device: torch.device,
    *,
    max_batches: int | None = None,
    video_writer: VideoWriter | None = None,
    lpips_model: torch.nn.Module | None = None,
    lpips_note: str = "",
    precision: str = "auto",
    fvd_model: torch.nn.Module | None = None,
    fvd_note: str = "",
    fid_model: torch.nn.Module | None = None,
    fid_note: str = "",
) -> EvalResult:
    """One pass over `loader` (an eval-mode ShardLoader: every clip once across ranks);
    collective, so every rank must call it. Restores the model's training mode.

    Args:
        model: the tokenizer (under DeepSpeed, the engine's `.module`), on `device`.
        max_batches: stop each rank after this many batches (a quick check in training).
        video_writer: called on rank 0 with clips for side-by-side videos.
        lpips_model: from `pipeline.inference.quality.load_lpips`; None leaves LPIPS out.
        lpips_note: what to report about LPIPS (`LpipsStatus.note`).
        precision: 'auto', 'fp32' or 'bf16' (pipeline.inference.precision.PRECISIONS): the token
            export's policy, so evaluated reconstructions come from the exported codes.
        fvd_model: the I3D from `pipeline.inference.video_features.load_i3d`; None leaves rFVD out.
        fvd_note: what to report about rFVD when `fvd_model` is None (`FeatureNet.note`).
        fid_model: the InceptionV3 from `pipeline.inference.video_features.load_inception`; None
        leaves
            rFID out.
        fid_note: what to report about rFID when `fid_model` is None.
    """
    precision = resolve_precision(precision, device)
    was_training = model.training
    model.eval()
    histogram = CodeHistogram(model.codebook_size, model.config.num_codebooks, device)
    # psnr, ssim, lpips, clips, psnr_frames
    totals = torch.zeros(5, dtype=torch.float64, device=device)
    rows: list[ClipScores] = []
    fvd = _FeatureSets(fvd_model, i3d_features, I3D_FEATURES, I3D_MIN_FRAMES, device)
    fid = _FeatureSets(fid_model, inception_features, INCEPTION_FEATURES, 1, device)
    try:
        with torch.no_grad():
            for index, batch in enumerate(loader):
                if max_batches is not None and index >= max_batches:
                    break
                video = batch.pixels(device)
                if video.ndim == 4:  # images are one-frame clips
                    video = video.unsqueeze(2)
                with inference_precision(device, precision):
                    output = model.reconstruct(video)
                histogram.add(output.codes)
                real, recon = to_unit_range(video), to_unit_range(output.recon)  # (b, c, t, h, w)
                psnr, ssim = psnr_per_clip(real, recon), ssim_per_clip(real, recon)
                lpips = lpips_per_clip(lpips_model, real, recon) if lpips_model else 0 * psnr
                fvd.add(real, recon)
                fid.add(real, recon)
                psnr_frames = psnr_frame_mean(real, recon)
                count = psnr.new_tensor(float(len(psnr)))
                totals += torch.stack(
                    (psnr.sum(), ssim.sum(), lpips.sum(), count, psnr_frames.sum())
                ).double()
                scores = zip(
                    batch.keys,
                    psnr.tolist(),
                    ssim.tolist(),
                    lpips.tolist(),
                    psnr_frames.tolist(),
                    strict=True,
                )
                for i, (key, clip_psnr, clip_ssim, clip_lpips, frames_psnr) in enumerate(scores):
                    rows.append(
                        ClipScores(
                            key,
                            clip_psnr,
                            clip_ssim,
                            clip_lpips if lpips_model is not None else None,
                            num_frames=video.shape[2],
                            psnr_frames=frames_psnr,
                        )
                    )
                    if video_writer is not None and world.rank == 0:
                        video_writer(key, real[i].cpu(), recon[i].cpu())
    finally:
        model.train(was_training)
    all_reduce_sum(totals)
    all_reduce_sum(histogram.counts)
    stats = getattr(loader, "stats", {})
    skipped = torch.tensor([stats.get(name, 0) for name in _SKIP_REASONS], device=device)
    all_reduce_sum(skipped)
    clips = sorted((c for part in all_gather_objects(rows) for c in part), key=lambda c: c.key)
    fvd_value, fvd_note = fvd.distance(unbiased=False, note=fvd_note, unit="clips")
    fid_value, fid_note = fid.distance(unbiased=True, note=fid_note, unit="frames")
    num_clips = int(totals[3])
    means = (totals / max(num_clips, 1)).tolist() if num_clips else [math.nan] * 5
    return EvalResult(
        num_clips=num_clips,
        psnr=means[0],
        psnr_frames=means[4],
        ssim=means[1],
        lpips=means[2] if lpips_model is not None and num_clips else None,
        codebook_usage=histogram.usage(),
        perplexity=histogram.perplexity(),
        codebook_size=model.codebook_size,
        num_codebooks=model.config.num_codebooks,
        clips=clips,
        skipped={k: v for k, v in zip(_SKIP_REASONS, skipped.tolist(), strict=True) if v},
        lpips_note=lpips_note or ("computed" if lpips_model is not None else "not requested"),
        precision=precision,
        fvd=fvd_value,
        fvd_note=fvd_note,
        fid=fid_value,
        fid_note=fid_note,
    )


class _FeatureSets:
    """One rank's feature moments of real and reconstructed clips for one Fréchet metric
    (moments rather than features: O(D²) memory however many clips or frames, and one
    all-reduce across ranks whatever each rank's count)."""

    def __init__(
        self,
        model: torch.nn.Module | None,
        extract: Callable[[torch.nn.Module, Tensor], Tensor],
        width: int,
        min_frames: int,
        device: torch.device,
    ) -> None:
        self.model, self.extract, self.min_frames = model, extract, min_frames
        self.real = FeatureMoments(width, device)
        self.recon = FeatureMoments(width, device)
        self.shortest = 0  # frames of the shortest clip seen below min_frames, 0 if none

    def add(self, real: Tensor, recon: Tensor) -> None:
        """(B, C, T, H, W) clips in [0, 1]."""
        if self.model is None:
            return
        frames = real.shape[2]
        if frames < self.min_frames:
            self.shortest = frames if not self.shortest else min(self.shortest, frames)
            return
        self.real.add(self.extract(self.model, real))
        self.recon.add(self.extract(self.model, recon))

    def distance(self, *, unbiased: bool, note: str, unit: str) -> tuple[float | None, str]:
        """Collective when a model is set (every rank has one or none): the distance over every
        rank's features and the note for the summary."""
        if self.model is None:
            return None, note or "not requested"
        short = self.real.packed.new_tensor([self.shortest])
        all_reduce_max(short)  # any too-short clip on any rank disables the metric everywhere
        if int(short):
            return None, (
                f"unavailable: clips of {int(short)} frame(s); the I3D needs at least "
                f"{self.min_frames} (pass --num-frames 17)"
            )
        all_reduce_sum(self.real.packed)
        all_reduce_sum(self.recon.packed)
        if self.real.count < 2:
            return None, f"unavailable: {self.real.count} {unit} evaluated, at least 2 are needed"
        result = frechet_from_moments(self.real, self.recon, unbiased=unbiased)
        if result.warning:
            logger.warning("Fréchet distance on %d %s: %s", result.num_real, unit, result.warning)
        parts = [
            note,
            f"on {result.num_real} {unit}",
            result.warning and f"warning: {result.warning}",
        ]
        return result.value, "; ".join(p for p in parts if p)


_SKIP_REASONS = (
    "bad_missing_key",
    "bad_metadata",
    "bad_undecodable",
    "bad_too_short",
    "bad_wrong_kind",
    "bad_shard",
)


def write_reports(result: EvalResult, out: Path, extra: dict) -> None:
    """clips.csv (one row per clip) and summary.json, each written atomically."""
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / ".clips.csv.partial"
    with open(tmp, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["key", "psnr", "ssim", "lpips", "num_frames", "psnr_frames"])
        for c in result.clips:
            lpips = "" if c.lpips is None else f"{c.lpips:.6f}"
            writer.writerow(
                [
                    c.key,
                    f"{c.psnr:.6f}",
                    f"{c.ssim:.6f}",
                    lpips,
                    c.num_frames,
                    f"{c.psnr_frames:.6f}",
                ]
            )
    tmp.replace(out / "clips.csv")
    write_json_atomic(str(out / "summary.json"), {**result.summary(), **extra})


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_checkpoint_and_shards(
        parser, "video shards: dataset folders, tar paths, globs or brace patterns"
    )
    parser.add_argument("--image-shards", nargs="*", default=(), metavar="DIR_OR_TAR")
    parser.add_argument("--out", type=Path, default=Path("eval"), help="report folder")
    parser.add_argument("--batch-size", type=int, default=4, help="clips per batch per rank")
    parser.add_argument(
        "--num-frames",
        type=int,
        default=None,
        help="frames per clip, 1 + k*f (default 17 where it fits)",
    )
    parser.add_argument("--image-size", type=int, default=None, help="default: the model's")
    parser.add_argument("--crop", choices=("center", "resize"), default="center")
    parser.add_argument("--num-workers", type=int, default=2)
    parser.add_argument("--max-batches", type=int, default=None, help="per rank")
    parser.add_argument("--num-videos", type=int, default=4, help="side-by-side mp4s to write")
    parser.add_argument("--lpips", choices=("auto", "off"), default="auto")
    parser.add_argument(
        "--lpips-weights",
        default=None,
        help="AlexNet ImageNet weights (default: the torch hub cache)",
    )
    parser.add_argument("--fvd", choices=("auto", "off"), default="auto", help="rFVD (I3D)")
    parser.add_argument(
        "--i3d-weights",
        default=None,
        help="StyleGAN-V's TorchScript i3d_torchscript.pt (default: the torch hub cache, "
        "$TORCH_HOME/hub/checkpoints/i3d_torchscript.pt)",
    )
    parser.add_argument("--fid", choices=("auto", "off"), default="auto", help="rFID per frame")
    parser.add_argument(
        "--inception-weights",
        default=None,
        help="torch-fidelity's weights-inception-2015-12-05-6726825d.pth (default: the torch "
        "hub cache, $TORCH_HOME/hub/checkpoints/)",
    )
    add_precision_argument(parser)
    parser.add_argument("--no-autocast", action="store_true", help=argparse.SUPPRESS)  # = fp32
    # The deepspeed launcher passes --local_rank; the rank comes from the environment (World).
    parser.add_argument("--local_rank", "--local-rank", type=int, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    world = init_distributed()
    try:
        return _run(args, world)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    finally:
        teardown()


def _run(args: argparse.Namespace, world: World) -> int:
    start = time.monotonic()
    device = device_for(world)
    model = load_tokenizer(args.checkpoint, device)
    f = model.time_downsample_factor
    num_frames = args.num_frames or (17 if 16 % f == 0 else 1 + f)
    config = DataConfig(
        video_shards=tuple(args.shards),
        image_shards=tuple(args.image_shards),
        num_frames=num_frames,
        time_compression=f,
        image_size=args.image_size or model.config.image_size,
        crop=args.crop,
        micro_batch_size=args.batch_size,
        num_workers=args.num_workers,
        mode="eval",
        seed=0,
    )
    loader = ShardLoader(config, world)
    lpips = load_lpips(device, args.lpips_weights) if args.lpips == "auto" else None
    i3d = load_i3d(device, args.i3d_weights) if args.fvd == "auto" else None
    inception = load_inception(device, args.inception_weights) if args.fid == "auto" else None
    writer = None
    if world.rank == 0 and args.num_videos > 0:
        writer = SideBySideWriter(args.out / "videos", args.num_videos)
    result = evaluate(
        model,
        loader,
        world,
        device,
        max_batches=args.max_batches,
        video_writer=writer,
        lpips_model=lpips.model if lpips else None,
        lpips_note=lpips.note if lpips else "off (--lpips off)",
        precision="fp32" if args.no_autocast else args.precision,
        fvd_model=i3d.model if i3d else None,
        fvd_note=i3d.note if i3d else "off (--fvd off)",
        fid_model=inception.model if inception else None,
        fid_note=inception.note if inception else "off (--fid off)",
    )
    if result.num_clips == 0:
        raise ValueError(
            f"no clip could be evaluated in {args.shards} (skipped: {result.skipped or 'all'}): "
            "each sample needs a '<key>.json' member (data_prep/format.py SampleMeta) and its "
            f"payload ('<key>.mp4'), with at least {num_frames} frames"
        )
    if result.skipped:
        logger.warning("skipped samples: %s", result.skipped)
    if world.rank == 0:
        extra = {
            "checkpoint": str(args.checkpoint),
            "shards": list(args.shards),
            "num_frames": num_frames,
            "image_size": config.image_size,
            "world_size": world.world_size,
            "seconds": time.monotonic() - start,
        }
        write_reports(result, args.out, extra)
        scalars = ", ".join(
            f"{k.removeprefix('eval/')} {v:.4f}" for k, v in result.scalars().items()
        )
        print(
            f"{scalars}; LPIPS: {result.lpips_note}; rFVD: {result.fvd_note}; "
            f"rFID: {result.fid_note}; wrote {args.out}"
        )
    return 0
