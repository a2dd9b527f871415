"""The stop signals of a job, a process-level concern shared by the trainer and its data workers.

SLURM sends SIGTERM (and, with `#SBATCH --signal=USR1@N`, an early SIGUSR1) to every process of a
job. The rank handles them (pipeline.train.preemption: save, then exit); data-loader workers
ignore them (`ignore_stop_signals`) and exit with their rank.

SIGUSR2 asks a rank (or a worker) for the Python stack of every thread on stderr, for a job
that hangs where no timeout reaches (`kill -USR2 PID`, py-spy's `dump` without py-spy).
"""

from __future__ import annotations

import faulthandler
import signal

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)
STACK_DUMP_SIGNAL = signal.SIGUSR2


def enable_stack_dumps() -> None:
    """SIGUSR2 prints every thread's stack to stderr; the process goes on. A C-level handler
    (faulthandler): it runs even while the main thread is blocked in a lock or a collective,
    and forked data-loader workers inherit it. It writes to file descriptor 2 itself, which
    exists where `sys.stderr` has been replaced by an object without one (pytest's capture)."""
    faulthandler.register(STACK_DUMP_SIGNAL, file=2, all_threads=True, chain=False)


def ignore_stop_signals() -> None:
    """For data-loader workers: SIGTERM and SIGUSR1 are for the rank, which saves and exits."""
    for signum in STOP_SIGNALS:
        signal.signal(signum, signal.SIG_IGN)
