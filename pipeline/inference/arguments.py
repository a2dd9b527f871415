"""Command-line arguments the evaluation and token export commands share."""

from __future__ import annotations

import argparse

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
