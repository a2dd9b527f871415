"""Command-line arguments of the evaluation and token export commands."""

from __future__ import annotations

import argparse
from pathlib import Path

from pipeline.inference.precision import PRECISIONS


def add_precision_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--precision",
        choices=PRECISIONS,
        default="auto",
        help="encoder arithmetic: fp32 (IEEE), bf16 (autocast), or auto = bf16 on CUDA, fp32 "
        "elsewhere; recorded with the codes (default: %(default)s)",
    )


def add_checkpoint_and_shards(parser: argparse.ArgumentParser, shards_help: str) -> None:
    """``--checkpoint`` and ``--shards``, as the evaluation and export commands take them."""
    parser.add_argument(
        "--checkpoint",
        required=True,
        help="export folder (or a training output folder with an export/ subfolder)",
    )
    parser.add_argument(
        "--shards", nargs="+", required=True, metavar="DIR_OR_TAR", help=shards_help
    )


def add_frame_arguments(parser: argparse.ArgumentParser) -> None:
    """How clips are sized for the model: evaluate's and tokenize's --image-size and --crop."""
    parser.add_argument(
        "--image-size", type=int, default=None, help="frame size (default: the model's)"
    )
    parser.add_argument(
        "--crop",
        choices=("center", "resize"),
        default="center",
        help="center square after resizing the short side, or resize the whole frame "
        "(default: %(default)s)",
    )


def add_evaluation_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of `python -m pipeline.evaluate` (pipeline.inference.evaluate)."""
    add_checkpoint_and_shards(
        parser, "video shards: dataset folders, tar paths, globs or brace patterns"
    )
    parser.add_argument(
        "--image-shards",
        nargs="*",
        default=(),
        metavar="DIR_OR_TAR",
        help="image shards, for per-image metrics (default: none)",
    )
    parser.add_argument(
        "--out", type=Path, default=Path("eval"), help="report folder (default: %(default)s)"
    )
    parser.add_argument(
        "--batch-size", type=int, default=4, help="clips per batch per rank (default: %(default)s)"
    )
    parser.add_argument(
        "--num-frames",
        type=int,
        default=None,
        help="frames per clip, 1 + k*f (default: 17 where it fits)",
    )
    add_frame_arguments(parser)
    parser.add_argument(
        "--num-workers",
        type=int,
        default=2,
        help="data-loader workers per rank (default: %(default)s)",
    )
    parser.add_argument(
        "--max-batches", type=int, default=None, help="batches per rank (default: all)"
    )
    parser.add_argument(
        "--num-videos",
        type=int,
        default=4,
        help="side-by-side mp4s to write (default: %(default)s)",
    )
    parser.add_argument(
        "--lpips",
        choices=("auto", "off"),
        default="auto",
        help="LPIPS (AlexNet); auto: where the weights are found (default: %(default)s)",
    )
    parser.add_argument(
        "--lpips-weights",
        default=None,
        help="AlexNet ImageNet weights (default: the torch hub cache)",
    )
    parser.add_argument(
        "--fvd", choices=("auto", "off"), default="auto", help="rFVD (I3D) (default: %(default)s)"
    )
    parser.add_argument(
        "--i3d-weights",
        default=None,
        help="StyleGAN-V's TorchScript i3d_torchscript.pt (default: the torch hub cache, "
        "$TORCH_HOME/hub/checkpoints/i3d_torchscript.pt)",
    )
    parser.add_argument(
        "--fid",
        choices=("auto", "off"),
        default="auto",
        help="rFID per frame (InceptionV3) (default: %(default)s)",
    )
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
