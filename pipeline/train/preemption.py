"""Stopping a run early without losing a finished step: preemption, time limits, wall-clock saves.

SLURM sends SIGTERM to every process of a job when it is preempted or reaches its time limit
(and SIGKILL KillWait seconds later, 30 by default); `#SBATCH --signal=USR1@180` adds an early
warning. Any rank that receives SIGTERM or SIGUSR1 only sets a flag here. At every step
boundary the trainer reduces the flags of all ranks (one small all-reduce), so every rank sees
the request at the same step, writes that step's checkpoint with the others and exits with
`PREEMPTED_EXIT_CODE`. A second signal during the save only counts; the save goes on.

Data-loader workers ignore both signals (`ignore_stop_signals`, in pipeline.distributed.signals
with the signal list, so the data package need not import the trainer's): they are part of the
job too, and a worker killed by SIGTERM would make the DataLoader raise in the middle of the
save. They exit with their rank.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time

import torch

from pipeline.distributed.collectives import all_reduce_max
from pipeline.distributed.signals import STOP_SIGNALS, ignore_stop_signals

logger = logging.getLogger(__name__)

PREEMPTED_EXIT_CODE = 75
"""The trainer's exit status after a stop request was honoured (a complete checkpoint of the
step it stopped at exists): EX_TEMPFAIL, "try again". launch/train.sbatch requeues on it."""

__all__ = ["PREEMPTED_EXIT_CODE", "STOP_SIGNALS", "StopRequests", "ignore_stop_signals"]


class StopRequests:
    """Records SIGTERM / SIGUSR1 in this process; `poll` agrees on them across ranks.

    Also asks for a save when `every_minutes` have passed since the last one (each rank's own
    clock; the reduction makes the earliest rank's decision everyone's).
    """

    def __init__(self, every_minutes: float = 0.0) -> None:
        self.signal: int | None = None
        """The first stop signal received, or None."""
        self.count = 0
        """Stop signals received (a second one during the save changes nothing)."""
        self.every_s = every_minutes * 60.0
        self.last_save = time.monotonic()
        self._previous: dict[int, object] = {}

    def install(self) -> None:
        """Handle the stop signals in this process (the main thread only, as Python requires)."""
        if threading.current_thread() is not threading.main_thread():
            raise RuntimeError("StopRequests.install must run on the main thread")
        for signum in STOP_SIGNALS:
            self._previous[signum] = signal.signal(signum, self._on_signal)

    def uninstall(self) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()

    def _on_signal(self, signum: int, frame) -> None:
        self.count += 1
        if self.signal is None:
            self.signal = signum
        # os.write: a handler may run while the logging lock is held by the interrupted code.
        name = signal.Signals(signum).name
        os.write(
            2,
            f"[pid {os.getpid()}] received {name} ({self.count}): stopping at the next step "
            "boundary with a checkpoint\n".encode(),
        )

    def saved(self) -> None:
        """A checkpoint was written: the wall-clock interval starts again."""
        self.last_save = time.monotonic()

    def poll(self, device: torch.device) -> tuple[bool, bool]:
        """Collective: (stop, save_now) agreed by every rank. `stop`: some rank received a
        stop signal; `save_now`: some rank's wall-clock interval has passed."""
        due = self.every_s > 0 and time.monotonic() - self.last_save >= self.every_s
        flags = torch.tensor(
            [float(self.signal is not None), float(due)], dtype=torch.float32, device=device
        )
        all_reduce_max(flags)
        stop, save_now = (bool(v) for v in flags.tolist())
        return stop, save_now
