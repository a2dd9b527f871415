"""What the run shows (rank 0 only; pipeline.train.run_log sends it to TensorBoard and/or wandb):
scalars, codebook statistics, and real | reconstruction clips side by side (in TensorBoard as
animated GIFs written directly into the event file, since `SummaryWriter.add_video` silently logs
nothing without moviepy 1.x)."""

from __future__ import annotations

import io
import logging
import math
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from pipeline.distributed.collectives import all_reduce_sum
from pipeline.inference.quality import CodeHistogram

logger = logging.getLogger(__name__)


class CodebookStats:
    """Code histogram over a window of steps, summed across ranks when read: the share of the
    codebook in use and the perplexity (exp of the code entropy; the codebook size at best)."""

    def __init__(
        self, codebook_size: int, num_codebooks: int, device: torch.device | str = "cpu"
    ) -> None:
        # On the training device: counting there needs no device -> host copy per micro-step.
        self.histogram = CodeHistogram(codebook_size, num_codebooks, torch.device(device))

    def add(self, codes: torch.Tensor) -> None:
        self.histogram.add(codes)

    def read_and_reset(self) -> dict[str, float]:
        """Collective: every rank must call it at the same step."""
        all_reduce_sum(self.histogram.counts)
        perplexity = self.histogram.perplexity()
        values = {
            "codebook/usage": self.histogram.usage(),
            "codebook/perplexity": perplexity,
            "codebook/perplexity_fraction": perplexity / self.histogram.codebook_size,
        }
        self.histogram.counts.zero_()
        return values


def side_by_side_gif(
    real: torch.Tensor, fake: torch.Tensor, fps: int = 8
) -> tuple[bytes, int, int]:
    """(B, C, T, H, W) real and reconstruction in [-1, 1] -> GIF bytes of [real | fake] rows."""
    pair = torch.cat([real, fake], dim=-1)  # (b, c, t, h, 2w)
    pair = torch.cat(list(pair), dim=-2)  # (c, t, b*h, 2w)
    frames = ((pair.float().clamp(-1, 1) + 1) * 127.5).round().byte()
    frames = frames.permute(1, 2, 3, 0).cpu().numpy()  # (t, H, W, c)
    if frames.shape[-1] == 1:
        frames = np.repeat(frames, 3, axis=-1)
    images = [Image.fromarray(frame[..., :3]) for frame in frames]
    buffer = io.BytesIO()
    images[0].save(
        buffer,
        format="GIF",
        save_all=True,
        append_images=images[1:],
        duration=int(1000 / fps),
        loop=0,
    )
    return buffer.getvalue(), frames.shape[1], frames.shape[2]


class TensorBoard:
    """A SummaryWriter in `log_dir` (pipeline.train.run_log creates it on rank 0 only)."""

    def __init__(self, log_dir: Path) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(str(log_dir))

    def scalars(self, values: dict[str, float], step: int) -> None:
        for tag, value in values.items():
            if value is not None and math.isfinite(value):
                self.writer.add_scalar(tag, value, step)

    def video(self, tag: str, real: torch.Tensor, fake: torch.Tensor, step: int) -> None:
        from tensorboard.compat.proto.summary_pb2 import Summary

        gif, height, width = side_by_side_gif(real, fake)
        image = Summary.Image(height=height, width=width, colorspace=3, encoded_image_string=gif)
        summary = Summary(value=[Summary.Value(tag=tag, image=image)])
        self.writer.file_writer.add_summary(summary, step)  # set up by SummaryWriter()

    def text(self, tag: str, text: str) -> None:
        self.writer.add_text(tag, text.replace("\n", "  \n"), 0)

    def flush(self) -> None:
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


def memory_bytes(device: torch.device | None = None) -> int:
    """Peak memory of the CUDA `device`, or current resident memory of this process (CPU)."""
    if device is not None and device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    try:
        with open("/proc/self/statm") as f:
            import os

            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        return 0
