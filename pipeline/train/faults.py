"""Fault injection for the failure-path tests (config section `faults`; all off by default): a
`TrainerCallback` that pipeline.train.cli installs only when the config asks for a fault.

Each fault fires once per output folder: a marker file records it, so rerunning the same command
after an injected crash resumes instead of crashing again.
"""

from __future__ import annotations

import logging
import os
import signal
from collections.abc import Callable
from pathlib import Path

import torch

from pipeline.train.callbacks import TrainerCallback
from pipeline.train.config import FaultInjection

logger = logging.getLogger(__name__)


class Faults(TrainerCallback):
    def __init__(self, config: FaultInjection, rank: int, output_dir: Path) -> None:
        self.config, self.rank = config, rank
        self.markers = output_dir / ".faults"

    def _fire_once(self, name: str) -> bool:
        marker = self.markers / name
        if marker.exists():
            return False
        self.markers.mkdir(parents=True, exist_ok=True)
        marker.touch()
        return True

    def _kill(self, name: str) -> None:
        if self._fire_once(name):
            logger.error("fault injection: SIGKILL of rank %d (%s)", self.rank, name)
            os.kill(os.getpid(), signal.SIGKILL)

    def on_step_start(self, step: int) -> None:
        if self.config.kill_at_step == step and self.rank == self.config.on_rank:
            self._kill(f"kill_at_step_{step}")

    def on_batch(self, step: int, video: torch.Tensor) -> torch.Tensor:
        if self.config.nan_at_step == step and self.rank == self.config.on_rank:
            logger.error("fault injection: NaN batch at step %d on rank %d", step, self.rank)
            return torch.full_like(video, float("nan"))
        return video

    def during_save(self, step: int, stopping: bool = False) -> Callable[[], None] | None:
        """A hook for the checkpointer, or None."""
        if self.rank != self.config.on_rank:
            return None
        if stopping and self.config.signal_group_during_stop_save:
            return self._signal_group
        if self.config.kill_during_save_at_step != step:
            return None
        return lambda: self._kill(f"kill_during_save_{step}")

    def _signal_group(self) -> None:
        logger.error("fault injection: SIGTERM to process group %d mid-save", os.getpgid(0))
        os.killpg(os.getpgid(0), signal.SIGTERM)


def fault_callbacks(config: FaultInjection, rank: int, output_dir: Path) -> list[TrainerCallback]:
    """[Faults] when the config asks for any fault, else no callback at all."""
    if config == FaultInjection():
        return []
    return [Faults(config, rank, output_dir)]
