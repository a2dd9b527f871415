"""Entry point: `python -m pipeline.train --config launch/configs/NAME.yaml [key.sub=value ...]`
(the console script `magvit-train`; `--help` lists every config key).

Run one process per device under a launcher (deepspeed, torchrun, srun via launch/train.sh), or
a single process without one. The config is fully validated, and the shard lists resolved,
before any process group starts.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from pipeline.commands import command_name
from pipeline.data.loader import resolve_shards
from pipeline.distributed.signals import enable_stack_dumps
from pipeline.distributed.world import World, omp_threads
from pipeline.logs import setup_logging
from pipeline.train.checkpointing import init_source
from pipeline.train.config import TrainConfig, dump_config, load_config
from pipeline.train.config_help import config_reference
from pipeline.train.preemption import PREEMPTED_EXIT_CODE, StopRequests


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog=command_name("pipeline.train"),
        description="Train the video tokenizer (two DeepSpeed engines).",
        epilog=config_reference(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--config", required=True, help="YAML file, e.g. launch/configs/tiny_cpu.yaml"
    )
    parser.add_argument(
        "overrides",
        nargs="*",
        metavar="KEY=VALUE",
        help="dotted config overrides, e.g. num_steps=20 generator_optim.lr=2e-4 (the keys "
        "are listed below)",
    )
    parser.add_argument(
        "--print-config",
        action="store_true",
        help="print the resolved config (--config and the overrides) as YAML and exit",
    )
    parser.add_argument(
        "--dry-run",
        action="store_true",
        help="validate the config and print parameters, FLOPs per clip and memory per rank, "
        "without starting anything (no process group, no GPU memory)",
    )
    parser.add_argument(
        "--world-size",
        type=int,
        default=None,
        help="ranks the --dry-run estimate is for (default: the launcher's WORLD_SIZE, or 1)",
    )
    parser.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def check_before_start(config: TrainConfig, world: World) -> None:
    """Everything that can be checked without a process group: ValueError if anything is off."""
    config.check_world_size(world.world_size)
    if config.device == "cuda" and not torch.cuda.is_available():
        raise ValueError("device cuda: torch cannot use CUDA on this machine")
    if config.init_from:
        init_source(Path(config.init_from))
    if config.precision == "fp16" and (config.device == "cpu" or not torch.cuda.is_available()):
        raise ValueError("precision fp16 needs a CUDA device; use bf16 or fp32 on CPU")
    for section in (config.data, config.eval_data):
        if section is None:
            continue
        if section.video_shards and section.image_batch_ratio < 1:
            resolve_shards(section.video_shards, "video", require_existing=True)
        if section.image_shards and (section.image_batch_ratio > 0 or section.mode == "eval"):
            resolve_shards(section.image_shards, "image", require_existing=True)


def dry_run_main(args: argparse.Namespace, world: World) -> int:
    from pipeline.train.dry_run import dry_run

    world_size = args.world_size or world.world_size
    try:
        config = load_config(args.config, args.overrides)
        config.check_world_size(world_size)
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    if world.rank == 0:
        print("\n".join(dry_run(config, world_size).lines()), flush=True)
    return 0


def print_config_main(args: argparse.Namespace) -> int:
    """`--print-config`: the resolved config as YAML; no process group, nothing started."""
    try:
        config = load_config(args.config, args.overrides)
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(dump_config(config), end="", flush=True)
    return 0


def main(args: argparse.Namespace) -> int:
    if args.print_config:
        return print_config_main(args)
    # First, so that a stop signal during the (slow) start-up is honoured, not fatal.
    stop = StopRequests()
    stop.install()
    enable_stack_dumps()
    try:
        world = World.from_env()
    except ValueError as error:  # the launcher's and SLURM's variables disagree
        print(f"error: {error}", file=sys.stderr)
        return 2
    setup_logging(world)
    if args.dry_run:
        return dry_run_main(args, world)
    try:
        config = load_config(args.config, args.overrides)
        check_before_start(config, world)
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    if world.rank == 0:
        print(f"resolved config ({world.world_size} rank(s)):\n{dump_config(config)}", flush=True)

    from pipeline.distributed.collectives import device_for, teardown
    from pipeline.train import engines
    from pipeline.train.faults import fault_callbacks
    from pipeline.train.trainer import Trainer

    device = device_for(world, config.device)
    if world.world_size > 1 and device.type == "cpu":
        torch.set_num_threads(omp_threads())
    engines.init_deepspeed_distributed(world, config.process_group_timeout_s, device)
    try:
        callbacks = fault_callbacks(config.faults, world.rank, Path(config.output_dir))
        trainer = Trainer(config, world, device, stop, callbacks)
        trainer.train()
    finally:
        teardown()
    if trainer.stopped:
        if world.rank == 0:
            print(f"training stopped at step {trainer.step}: {config.output_dir}", flush=True)
        return PREEMPTED_EXIT_CODE
    if world.rank == 0:
        print(f"training finished at step {trainer.step}: {config.output_dir}", flush=True)
    return 0
