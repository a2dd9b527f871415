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
import logging
import math
import sys
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

import torch
from torch import Tensor

from model import VideoTokenizer
from pipeline.commands import command_name
from pipeline.data.loader import Batch, DataConfig, ShardLoader
from pipeline.distributed.collectives import (
    all_gather_objects,
    all_reduce_sum,
    device_for,
    init_distributed,
    teardown,
)
from pipeline.distributed.world import World
from pipeline.inference.arguments import add_evaluation_arguments
from pipeline.inference.eval_reports import (
    ClipScores,
    EvalResult,
    SideBySideWriter,
    VideoWriter,
    write_reports,
)
from pipeline.inference.export import load_tokenizer
from pipeline.inference.frechet import FeatureSets
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
from pipeline.logs import progress_bar, setup_logging

logger = logging.getLogger(__name__)


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
        fid_model: InceptionV3 from `pipeline.inference.video_features.load_inception` or None.
        fid_note: what to report about rFID when `fid_model` is None.
    """
    precision = resolve_precision(precision, device)
    fvd = FeatureSets(fvd_model, i3d_features, I3D_FEATURES, I3D_MIN_FRAMES, device)
    fid = FeatureSets(fid_model, inception_features, INCEPTION_FEATURES, 1, device)
    sums = _Sums(
        totals=torch.zeros(5, dtype=torch.float64, device=device),
        histogram=CodeHistogram(model.codebook_size, model.config.num_codebooks, device),
    )
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for batch in _batches(loader, max_batches, world.rank == 0):
                real, recon = _reconstruct(model, batch, device, precision, sums.histogram)
                scores = _score(real, recon, lpips_model, sums.totals)
                fvd.add(real, recon)
                fid.add(real, recon)
                for i, (key, *values) in enumerate(zip(batch.keys, *scores, strict=True)):
                    sums.rows.append(_clip_scores(key, values, lpips_model, real.shape[2]))
                    if video_writer is not None and world.rank == 0:
                        video_writer(key, real[i].cpu(), recon[i].cpu())
    finally:
        model.train(was_training)
    fvd_result = fvd.distance(unbiased=False, note=fvd_note, unit="clips")
    fid_result = fid.distance(unbiased=True, note=fid_note, unit="frames")
    lpips = (lpips_model is not None, lpips_note)
    return _result(model, loader, device, precision, sums, lpips, fvd_result, fid_result)


def _batches(loader: Iterable[Batch], max_batches: int | None, show: bool) -> Iterator[Batch]:
    """The first `max_batches` batches (all for None), with a progress bar when `show`."""
    with progress_bar(
        enabled=show, total=max_batches, desc="evaluate", unit="batch", leave=False
    ) as bar:
        for index, batch in enumerate(loader):
            if max_batches is not None and index >= max_batches:
                return
            bar.update(1)
            yield batch


@dataclass
class _Sums:
    """One rank's running sums of an evaluation."""

    totals: Tensor
    """psnr, ssim, lpips, clips, psnr_frames."""
    histogram: CodeHistogram
    rows: list[ClipScores] = field(default_factory=list)


def _reconstruct(
    model: VideoTokenizer,
    batch: Batch,
    device: torch.device,
    precision: str,
    histogram: CodeHistogram,
) -> tuple[Tensor, Tensor]:
    """(real, reconstruction) of one batch as (b, c, t, h, w) clips in [0, 1]; its codes go to
    `histogram`."""
    video = batch.pixels(device)
    if video.ndim == 4:  # images are one-frame clips
        video = video.unsqueeze(2)
    with inference_precision(device, precision):
        output = model.reconstruct(video)
    histogram.add(output.codes)
    return to_unit_range(video), to_unit_range(output.recon)


def _score(
    real: Tensor, recon: Tensor, lpips_model: torch.nn.Module | None, totals: Tensor
) -> tuple[list[float], list[float], list[float], list[float]]:
    """Per-clip (psnr, ssim, lpips, frame-mean psnr) lists; their sums and the clip count are
    added to `totals` (psnr, ssim, lpips, clips, psnr_frames)."""
    psnr, ssim = psnr_per_clip(real, recon), ssim_per_clip(real, recon)
    lpips = lpips_per_clip(lpips_model, real, recon) if lpips_model else 0 * psnr
    psnr_frames = psnr_frame_mean(real, recon)
    count = psnr.new_tensor(float(len(psnr)))
    totals += torch.stack((psnr.sum(), ssim.sum(), lpips.sum(), count, psnr_frames.sum())).double()
    return psnr.tolist(), ssim.tolist(), lpips.tolist(), psnr_frames.tolist()


def _clip_scores(
    key: str, values: list[float], lpips_model: torch.nn.Module | None, num_frames: int
) -> ClipScores:
    clip_psnr, clip_ssim, clip_lpips, frames_psnr = values
    return ClipScores(
        key,
        clip_psnr,
        clip_ssim,
        clip_lpips if lpips_model is not None else None,
        num_frames=num_frames,
        psnr_frames=frames_psnr,
    )


def _result(
    model: VideoTokenizer,
    loader: Iterable[Batch],
    device: torch.device,
    precision: str,
    sums: _Sums,
    lpips: tuple[bool, str],
    fvd: tuple[float | None, str],
    fid: tuple[float | None, str],
) -> EvalResult:
    """Every rank's sums, counts and clips reduced into the result (collective). `lpips`: (an
    LPIPS model was used, the note about it)."""
    totals, histogram, rows = sums.totals, sums.histogram, sums.rows
    (lpips_on, lpips_note) = lpips
    all_reduce_sum(totals)
    all_reduce_sum(histogram.counts)
    stats = getattr(loader, "stats", {})
    skipped = torch.tensor([stats.get(name, 0) for name in _SKIP_REASONS], device=device)
    all_reduce_sum(skipped)
    clips = sorted((c for part in all_gather_objects(rows) for c in part), key=lambda c: c.key)
    num_clips = int(totals[3])
    means = (totals / max(num_clips, 1)).tolist() if num_clips else [math.nan] * 5
    return EvalResult(
        num_clips=num_clips,
        psnr=means[0],
        psnr_frames=means[4],
        ssim=means[1],
        lpips=means[2] if lpips_on and num_clips else None,
        codebook_usage=histogram.usage(),
        perplexity=histogram.perplexity(),
        codebook_size=model.codebook_size,
        num_codebooks=model.config.num_codebooks,
        clips=clips,
        skipped={k: v for k, v in zip(_SKIP_REASONS, skipped.tolist(), strict=True) if v},
        lpips_note=lpips_note or ("computed" if lpips_on else "not requested"),
        precision=precision,
        fvd=fvd[0],
        fvd_note=fvd[1],
        fid=fid[0],
        fid_note=fid[1],
    )


_SKIP_REASONS = (
    "bad_missing_key",
    "bad_metadata",
    "bad_undecodable",
    "bad_too_short",
    "bad_wrong_kind",
    "bad_shard",
)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog=command_name("pipeline.evaluate"), description=__doc__.split("\n\n")[0]
    )
    add_evaluation_arguments(parser)
    return parser.parse_args(argv)


def main(args: argparse.Namespace) -> int:
    setup_logging(World.from_env())
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
    result = _evaluate_with_args(args, model, ShardLoader(config, world), world, device)
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


def _evaluate_with_args(
    args: argparse.Namespace,
    model: VideoTokenizer,
    loader: ShardLoader,
    world: World,
    device: torch.device,
) -> EvalResult:
    """`evaluate` with the networks and options the command line asks for."""
    lpips = load_lpips(device, args.lpips_weights) if args.lpips == "auto" else None
    i3d = load_i3d(device, args.i3d_weights) if args.fvd == "auto" else None
    inception = load_inception(device, args.inception_weights) if args.fid == "auto" else None
    writer = None
    if world.rank == 0 and args.num_videos > 0:
        writer = SideBySideWriter(args.out / "videos", args.num_videos)
    return evaluate(
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
