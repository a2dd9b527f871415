"""One logging setup for every multi-rank command (train, evaluate, tokenize), and their progress
bars.

Each record carries `[rank R/W]` and the time; rank 0 logs at INFO and the other ranks at WARNING
by default, so a 64-rank job prints one copy of the routine lines and every rank's problems. The
levels come from `pipeline.distributed.world.log_levels` (LOG_LEVEL and LOG_LEVEL_OTHER_RANKS).
When stderr is not a terminal (a SLURM log file), a progress bar prints at most every 30 s and
never redraws to the terminal's width.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Iterable
from typing import Any

from tqdm import tqdm

from pipeline.distributed.world import World, log_levels

LOG_FILE_INTERVAL_S = 30.0
"""Seconds between two prints of a progress bar when stderr is a file."""


def setup_logging(
    world: World, level: str | int | None = None, other_ranks_level: str | int | None = None
) -> None:
    """Configures the root logger of this process (replacing any handler set before): rank 0 at
    `level`, the other ranks at `other_ranks_level`; None: from the environment, else INFO and
    WARNING."""
    env_level, env_other = log_levels()
    rank0 = level if level is not None else env_level or logging.INFO
    others = other_ranks_level if other_ranks_level is not None else env_other or logging.WARNING
    logging.basicConfig(
        level=_level(rank0 if world.rank == 0 else others),
        format=f"[rank {world.rank}/{world.world_size}] %(asctime)s %(levelname)s "
        "%(name)s: %(message)s",
        datefmt="%Y-%m-%d %H:%M:%S",
        force=True,
    )


def _level(value: str | int) -> int:
    if isinstance(value, int):
        return value
    level = logging.getLevelName(value.upper())
    if not isinstance(level, int):
        raise ValueError(f"unknown log level {value!r} (DEBUG, INFO, WARNING, ERROR)")
    return level


def progress_bar(
    iterable: Iterable | None = None, *, enabled: bool = True, stream: Any = None, **kwargs: Any
) -> tqdm:
    """A tqdm bar on stderr (`enabled`: typically rank 0 only): redrawn live on a terminal, and
    printed at most every 30 s, without width probing, when stderr is a log file."""
    stream = sys.stderr if stream is None else stream
    interactive = hasattr(stream, "isatty") and stream.isatty()
    options: dict[str, Any] = (
        {"dynamic_ncols": True}
        if interactive
        else {"mininterval": LOG_FILE_INTERVAL_S, "maxinterval": LOG_FILE_INTERVAL_S, "ncols": 100}
    )
    options.update(kwargs)
    return tqdm(iterable, disable=not enabled, file=stream, **options)
