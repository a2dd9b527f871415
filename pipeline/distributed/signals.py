"""The stop signals of a job, a process-level concern shared by the trainer and its data workers.

SLURM sends SIGTERM (and, with `#SBATCH --signal=USR1@N`, an early SIGUSR1) to every process of a
job. The rank handles them (pipeline.train.preemption: save, then exit); data-loader workers
ignore them (`ignore_stop_signals`) and exit with their rank.
"""

from __future__ import annotations

import signal

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


def ignore_stop_signals() -> None:
    """For data-loader workers: SIGTERM and SIGUSR1 are for the rank, which saves and exits."""
    for signum in STOP_SIGNALS:
        signal.signal(signum, signal.SIG_IGN)
