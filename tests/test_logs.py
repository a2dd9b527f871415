"""pipeline.logs: rank-prefixed logging (rank 0 at INFO, the others at WARNING) and progress bars
that print every 30 s when stderr is a file."""

from __future__ import annotations

import io
import logging

import pytest
import torch

from pipeline.distributed.world import World
from pipeline.logs import LOG_FILE_INTERVAL_S, progress_bar, setup_logging


@pytest.fixture
def restore_logging():
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


def _emit(world: World, **levels) -> str:
    setup_logging(world, **levels)
    stream = io.StringIO()
    logging.getLogger().handlers[0].setStream(stream)
    logging.getLogger("x").info("routine")
    logging.getLogger("x").warning("problem")
    return stream.getvalue()


def test_rank_zero_logs_info_and_the_others_warnings(restore_logging):
    first = _emit(World(rank=0, world_size=64))
    assert "[rank 0/64]" in first and "routine" in first and "problem" in first
    other = _emit(World(rank=5, world_size=64))
    assert "[rank 5/64]" in other and "routine" not in other and "problem" in other
    assert "routine" in _emit(World(rank=5, world_size=64), other_ranks_level="INFO")
    with pytest.raises(ValueError, match="unknown log level"):
        setup_logging(World(), level="LOUD")


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_bars_print_every_30_s_into_a_file():
    bar = progress_bar(total=3, stream=io.StringIO())
    assert bar.mininterval == LOG_FILE_INTERVAL_S and not bar.dynamic_ncols
    live = progress_bar(total=3, stream=_Terminal())
    assert live.mininterval < 1 and live.dynamic_ncols
    assert progress_bar(range(3), enabled=False).disable


def test_deterministic_turns_on_deterministic_algorithms():
    from pipeline.train.trainer import use_deterministic_algorithms

    before = (torch.are_deterministic_algorithms_enabled(), torch.backends.cudnn.deterministic)
    try:
        use_deterministic_algorithms()
        assert torch.are_deterministic_algorithms_enabled()
        assert torch.is_deterministic_algorithms_warn_only_enabled()
        assert torch.backends.cudnn.deterministic and not torch.backends.cudnn.benchmark
    finally:
        torch.use_deterministic_algorithms(before[0])
        torch.backends.cudnn.deterministic = before[1]
