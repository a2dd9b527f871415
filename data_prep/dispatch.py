"""The node's coordinator: feeds sources to worker processes and follows their reports.

Each worker gets up to two sources ahead, so it never waits. The dispatcher keeps the node's
accounting of what is in flight and what is finished but not yet committed, restarts a worker
that dies (its file is skipped, the rest of its open shard is redone), kills one that stalls,
and stops the run cleanly when the output fills up or cannot be written.
"""

from __future__ import annotations

import logging
import multiprocessing
import sys
import time
from collections import deque
from dataclasses import dataclass, field
from multiprocessing.connection import wait

from tqdm import tqdm

from data_prep.shard_config import ShardConfig
from data_prep.worker import WorkerSettings, run_worker
from data_prep.writer import Journal, journal_path, load_progress

logger = logging.getLogger(__name__)

EXIT_OK, EXIT_USAGE, EXIT_INCOMPLETE, EXIT_INTERRUPTED = 0, 2, 3, 130


@dataclass
class WorkerState:
    process: multiprocessing.process.BaseProcess
    conn: multiprocessing.connection.Connection
    in_flight: deque = field(default_factory=deque)
    """(source, first_clip) sent and not yet reported; the first one is being processed."""
    uncommitted: list = field(default_factory=list)
    """(source, first_clip) finished into a shard that is not committed yet."""
    ready: bool = False
    """Started up: a worker that dies before this is broken, not the file it was given."""
    finishing: bool = False
    """Told to commit its shards and exit."""
    done: bool = False
    last_heard: float = field(default_factory=time.monotonic)
    """When it last reported (or was given work while idle): the stall watchdog's clock."""
    stalled: bool = False


def start_worker(config: ShardConfig, worker_id: int) -> WorkerState:
    context = multiprocessing.get_context("spawn")  # no inherited threads or decoder state
    parent, child = context.Pipe()
    settings = WorkerSettings(
        output=config.output,
        node_rank=config.node_rank,
        worker_id=worker_id,
        clip=config.clip,
        max_shard_samples=config.max_shard_samples,
        max_shard_bytes=config.max_shard_bytes,
    )
    process = context.Process(target=run_worker, args=(settings, child), daemon=True)
    process.start()
    child.close()
    return WorkerState(process=process, conn=parent)


@dataclass
class Status:
    clips: int = 0
    error: str | None = None
    """Why the run stopped early; sources it did not finish carry it as their skip reason."""
    exit_code: int = EXIT_OK

    def stop(self, error: str, exit_code: int) -> None:
        if self.error is None:  # the first cause is the one to report
            self.error, self.exit_code = error, exit_code


class Dispatcher:
    """Feeds sources to the workers and follows their reports; restarts a worker that crashes."""

    def __init__(self, config: ShardConfig, todo: list, reasons: dict[str, str]) -> None:
        self.config, self.queue, self.reasons = config, deque(todo), reasons
        self.status = Status()
        self.main_journal: Journal | None = None

    def run(self, num_sources: int) -> Status:
        if not self.queue:  # everything was done by earlier runs
            return self.status
        num_workers = max(1, min(self.config.num_workers, len(self.queue)))
        workers = {i: start_worker(self.config, i) for i in range(num_workers)}
        done_before = num_sources - len(self.queue)
        self.bar = tqdm(
            unit="clip",
            desc=f"node {self.config.node_rank}",
            disable=not self.config.progress,
            mininterval=1.0 if sys.stderr.isatty() else 30.0,
            dynamic_ncols=True,
        )
        self.sources_done, self.num_sources = done_before, num_sources
        try:
            for worker in workers.values():
                self._feed(worker)
            while any(not w.done for w in workers.values()):
                ready = wait([w.conn for w in workers.values() if not w.done], timeout=1.0)
                for worker_id, worker in list(workers.items()):
                    if worker.conn in ready and not worker.done:
                        worker.last_heard = time.monotonic()
                        self._receive(worker_id, worker, workers)
                self._kill_stalled(workers)
        except KeyboardInterrupt:
            self.status.stop("interrupted; rerun the same command to resume", EXIT_INTERRUPTED)
            for worker in workers.values():
                worker.process.kill()
        finally:
            self.bar.close()
            for worker in workers.values():
                worker.process.join(timeout=30)
            if self.main_journal is not None:
                self.main_journal.close()
        for source, _ in self.queue:
            self.reasons.setdefault(source.path, self.status.error or "not processed")
        return self.status

    def _feed(self, worker: WorkerState) -> None:
        """Keeps two sources queued per worker so it never waits; then tells it to finish."""
        if worker.finishing:
            return
        try:
            if not worker.in_flight:
                worker.last_heard = time.monotonic()  # idle until now: the clock starts here
            while len(worker.in_flight) < 2 and self.queue and self.status.error is None:
                worker.conn.send(("source", *self.queue[0]))
                worker.in_flight.append(self.queue.popleft())
            if not worker.in_flight and (not self.queue or self.status.error is not None):
                worker.conn.send(("finish",))
                worker.finishing = True
        except OSError:  # the worker is dead; its end of the pipe reports that next
            pass

    def _receive(self, worker_id: int, worker: WorkerState, workers: dict) -> None:
        try:
            message = worker.conn.recv()
        except (EOFError, OSError):
            self._crashed(worker_id, worker, workers)
            return
        kind = message[0]
        if kind == "ready":
            worker.ready = True
        elif kind == "clip":
            self.status.clips += 1
            self.bar.update(1)
            return
        elif kind in ("done", "skip"):
            source, first_clip = worker.in_flight.popleft()
            assert source.path == message[1], (source.path, message[1])
            if kind == "skip":
                self.reasons[source.path] = message[2]
            elif not message[3]:
                worker.uncommitted.append((source, first_clip))
            self.sources_done += 1
            self.bar.set_postfix_str(f"sources {self.sources_done}/{self.num_sources}")
        elif kind == "commit":
            finished = set(message[2])
            worker.uncommitted = [u for u in worker.uncommitted if u[0].path not in finished]
        elif kind == "bye":
            worker.done = True
            return
        elif kind in ("full", "error"):
            self._output_failed(worker, kind, message[1])
            return
        self._feed(worker)

    def _kill_stalled(self, workers: dict) -> None:
        now = time.monotonic()
        for worker in workers.values():
            busy = worker.in_flight and not worker.done and not worker.stalled
            if busy and now - worker.last_heard > self.config.stall_timeout_s:
                logger.warning(
                    "%s: no progress for %.0f s, killing its worker",
                    worker.in_flight[0][0].path,
                    now - worker.last_heard,
                )
                worker.stalled = True
                worker.process.kill()  # its pipe reports EOF next: handled as a crash

    def _output_failed(self, worker: WorkerState, kind: str, detail: str) -> None:
        if kind == "full":
            error = (
                f"the output is full ({detail}); free space on {self.config.output} and "
                "rerun the same command to resume"
            )
            self.status.stop(error, EXIT_INCOMPLETE)
        else:
            error = f"cannot write to {self.config.output} ({detail}); fix it and rerun to resume"
            self.status.stop(error, EXIT_USAGE)
        for source, _ in list(worker.in_flight) + worker.uncommitted:
            if source is not None:
                self.reasons[source.path] = error
        worker.in_flight.clear()
        worker.uncommitted.clear()
        worker.done = True

    def _crashed(self, worker_id: int, worker: WorkerState, workers: dict) -> None:
        """A worker died (a decoder crash, the OOM killer): skip its file, redo its open shard."""
        worker.process.join(timeout=10)
        code = worker.process.exitcode
        if not worker.ready:  # it never got to a file: retrying would fail the same way
            self.status.stop(
                f"a worker process failed to start (exit code {code}; its error is above). "
                "Scripts that call data_prep.shard.run need an `if __name__ == '__main__':` guard",
                EXIT_USAGE,
            )
            self.queue.extendleft(reversed(worker.in_flight))
            worker.done = True
            return
        pending = [source for source, _ in worker.in_flight]
        if pending:
            reason = f"the worker died (exit code {code}) while processing this file"
            if worker.stalled:
                reason = f"no progress for {self.config.stall_timeout_s:g} s (a hung decoder?)"
            logger.warning("%s: %s", pending[0].path, reason)
            if self.main_journal is None:
                path = journal_path(self.config.output, self.config.node_rank, "main")
                self.main_journal = Journal(path)
            self.main_journal.append(
                {"event": "skip", "path": pending[0].path, "reason": reason, "retry": False}
            )
            self.reasons[pending[0].path] = reason
            self.sources_done += 1
            pending = pending[1:]
        # The journals say how many clips of each source survived in committed shards.
        committed = load_progress(self.config.output, self.config.node_rank).clips
        redo = [source for source, _ in worker.uncommitted] + pending
        self.queue.extendleft(reversed([(s, committed.get(s.path, 0)) for s in redo]))
        replacement = start_worker(self.config, worker_id)
        workers[worker_id] = replacement
        self._feed(replacement)
