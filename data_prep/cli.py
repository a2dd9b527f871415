"""Command line: ``python -m data_prep {shard,verify,merge}`` and the ``magvit-*`` scripts."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from data_prep.clips import ClipConfig

_DEFAULTS = ClipConfig()


def _size(text: str) -> int:
    """Bytes from '1000000', '500M', '1G' or '1.5GB' (decimal units)."""
    units = {"K": 10**3, "M": 10**6, "G": 10**9, "T": 10**12}
    text = text.strip().upper().removesuffix("B")
    if text and text[-1] in units:
        return int(float(text[:-1]) * units[text[-1]])
    return int(text)


def _add_shard_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "inputs",
        nargs="+",
        metavar="INPUT",
        help="folders (recursive), video/image files, or .txt/.csv path lists",
    )
    parser.add_argument(
        "--output",
        "-o",
        required=True,
        metavar="DIR",
        help="dataset folder for the shards and manifest.json (shared by nodes)",
    )
    clip = parser.add_argument_group("clips")
    clip.add_argument(
        "--num-frames",
        type=int,
        default=_DEFAULTS.num_frames,
        help="frames per clip (default %(default)s)",
    )
    clip.add_argument(
        "--fps",
        type=float,
        default=None,
        help="target frame rate (default: each source's own; never upsampled)",
    )
    clip.add_argument(
        "--stride",
        type=int,
        default=None,
        help="frames between clip starts at the target fps (default: --num-frames, "
        "no overlap; smaller values overlap clips)",
    )
    clip.add_argument(
        "--size",
        type=int,
        default=_DEFAULTS.size,
        help="short side after resizing (default %(default)s)",
    )
    clip.add_argument(
        "--crop",
        type=int,
        default=None,
        help="square center crop after resizing (default: none, keep aspect)",
    )
    clip.add_argument(
        "--crf",
        type=int,
        default=_DEFAULTS.crf,
        help="x264 quality, lower is better (default %(default)s)",
    )
    clip.add_argument(
        "--keyframe-interval",
        type=int,
        default=_DEFAULTS.keyframe_interval,
        help="frames between keyframes (default %(default)s)",
    )
    clip.add_argument(
        "--preset", default=_DEFAULTS.preset, help="x264 preset (default %(default)s)"
    )
    clip.add_argument(
        "--passthrough",
        action="store_true",
        help="store each source's original bytes as one sample (no clipping)",
    )
    clip.add_argument(
        "--image-quality",
        type=int,
        default=_DEFAULTS.image_quality,
        help="JPEG quality of re-encoded images (default %(default)s)",
    )
    run = parser.add_argument_group("run")
    run.add_argument(
        "--workers",
        "-j",
        type=int,
        default=None,
        help="worker processes (default: the cores this process may use)",
    )
    run.add_argument(
        "--num-nodes",
        type=int,
        default=None,
        help="nodes sharing the work (default: SLURM array/task count, else 1)",
    )
    run.add_argument(
        "--node-rank",
        type=int,
        default=None,
        help="this node's rank (default: SLURM array task/proc id, else 0)",
    )
    run.add_argument(
        "--shard-samples",
        type=int,
        default=5000,
        help="samples per shard at most (default %(default)s)",
    )
    run.add_argument(
        "--shard-bytes",
        type=_size,
        default=10**9,
        help="bytes per shard at most, e.g. 500M or 1G (default 1G)",
    )
    run.add_argument(
        "--stall-timeout",
        type=float,
        default=600.0,
        help="seconds without progress on one file before its worker is killed and the file "
        "skipped (default %(default)s)",
    )
    run.add_argument("--no-progress", action="store_true", help="no progress bar")


def _program() -> str:
    """The console script's name when run as one (`magvit-shard`), else `python -m data_prep`."""
    name = Path(sys.argv[0]).name if sys.argv and sys.argv[0] else ""
    if not name or name.endswith(".py") or name in ("-c", "-m"):
        return "python -m data_prep"
    return name


def parse_args(argv: Sequence[str] | None = None, command: str | None = None) -> argparse.Namespace:
    """Parses ``argv``; ``command`` fixes the subcommand (for the ``magvit-*`` scripts)."""
    top = _program()
    parser = argparse.ArgumentParser(
        prog=top, description="Raw video -> WebDataset shards of clips."
    )

    def prog(name: str) -> str:  # magvit-shard is `shard` itself, magvit-data its parent
        return top if command == name and not top.startswith("python ") else f"{top} {name}"

    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    commands = parser.add_subparsers(dest="command", required=True)
    shard = commands.add_parser(
        "shard",
        prog=prog("shard"),
        parents=[common],
        help="cut, resize and encode inputs into shards",
    )
    _add_shard_arguments(shard)
    verify = commands.add_parser(
        "verify",
        prog=prog("verify"),
        parents=[common],
        help="read the shards back and check the manifest",
    )
    verify.add_argument("directory", metavar="DIR")
    verify.add_argument(
        "--num-decode",
        type=int,
        default=32,
        help="samples to decode fully, spread over the shards (default 32)",
    )
    verify.add_argument("--seed", type=int, default=0, help="which samples get decoded")
    merge = commands.add_parser(
        "merge",
        prog=prog("merge"),
        parents=[common],
        help="rebuild manifest.json from the node parts",
    )
    merge.add_argument("directory", metavar="DIR")
    argv = list(sys.argv[1:] if argv is None else argv)
    return parser.parse_args(argv if command is None else [command, *argv])


def main(args: argparse.Namespace) -> int:
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    if args.command == "shard":
        from data_prep.shard import RunError, run, settings_from_args, summary

        try:
            result = run(settings_from_args(args))
        except (RunError, ValueError) as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        print(summary(result))
        return result.exit_code
    if args.command == "verify":
        from data_prep.verify import verify

        report = verify(args.directory, num_decode=args.num_decode, seed=args.seed)
        print(report.summary())
        return 0 if report.ok else 1
    from data_prep.manifest import merge_parts

    try:
        manifest = merge_parts(args.directory)
    except (ValueError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"manifest.json: {manifest.totals()}, complete: {manifest.complete}")
    return 0


def cli() -> None:
    sys.exit(main(parse_args()))


def shard_cli() -> None:
    sys.exit(main(parse_args(command="shard")))


def verify_cli() -> None:
    sys.exit(main(parse_args(command="verify")))
