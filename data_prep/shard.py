"""``python -m data_prep shard``: raw videos and images -> WebDataset shards + manifest.json.

One process per node hands sources to N worker processes (each with its own shards and journal)
and keeps the node's accounting; see ``writer`` for how a rerun resumes after a crash or kill.
"""

from __future__ import annotations

import argparse
import fcntl
import json
import logging
import multiprocessing
import os
import re
import sys
import time
from collections import deque
from dataclasses import dataclass, field
from multiprocessing.connection import wait

from tqdm import tqdm

from data_prep.clips import ClipConfig
from data_prep.format import FORMAT_VERSION, JOURNAL_DIR, Manifest
from data_prep.inputs import InputError, list_inputs, node_from_env, partition
from data_prep.manifest import merge_parts, node_manifest, write_part
from data_prep.worker import WorkerSettings, run_worker
from data_prep.writer import Journal, clean_uncommitted, journal_path, load_progress

logger = logging.getLogger(__name__)

EXIT_OK, EXIT_USAGE, EXIT_INCOMPLETE, EXIT_INTERRUPTED = 0, 2, 3, 130


def available_cpus() -> int:
    """Cores this process may run on (the SLURM allocation, a taskset), not the machine's."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


class RunError(Exception):
    """The run itself cannot go on (bad arguments, unwritable output); the message says the fix."""


@dataclass(frozen=True, kw_only=True)
class ShardConfig:
    inputs: tuple[str, ...]
    """Folders (searched recursively), video or image files, or .txt/.csv lists of paths."""
    output: str
    """Dataset folder for the shards and manifest.json; shared by all nodes."""
    clip: ClipConfig = field(default_factory=ClipConfig)
    num_workers: int = field(default_factory=lambda: available_cpus())
    """Worker processes on this node (one core each)."""
    num_nodes: int = 1
    node_rank: int = 0
    max_shard_samples: int = 5000
    """A shard is closed after this many samples ..."""
    max_shard_bytes: int = 1_000_000_000
    """... or once it holds this many bytes, whichever comes first."""
    progress: bool = True
    """Show a tqdm progress bar (clips/s) on stderr."""
    stall_timeout_s: float = 600.0
    """A worker silent this long on one file (a hung decoder) is killed and the file skipped."""

    def __post_init__(self) -> None:
        if not self.inputs:
            raise ValueError("inputs must name at least one folder, file or list")
        if self.num_workers < 1:
            raise ValueError(f"num_workers must be >= 1, got {self.num_workers}")
        if self.num_nodes < 1 or not 0 <= self.node_rank < self.num_nodes:
            raise ValueError(
                f"node_rank must be in [0, num_nodes={self.num_nodes}), got {self.node_rank}"
            )
        if self.max_shard_samples < 1 or self.max_shard_bytes < 1:
            raise ValueError("max_shard_samples and max_shard_bytes must be positive")
        if not self.stall_timeout_s > 0:
            raise ValueError(f"stall_timeout_s must be positive, got {self.stall_timeout_s}")

    def settings(self) -> dict:
        """What every node and every rerun must agree on (written to the manifest)."""
        return {
            "format_version": FORMAT_VERSION,
            "num_nodes": self.num_nodes,
            "clip": self.clip.to_dict(),
        }


@dataclass
class RunResult:
    manifest: Manifest
    exit_code: int
    message: str
    elapsed_s: float
    clips_written: int


@dataclass
class _WorkerState:
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


def _prepare_output(config: ShardConfig) -> None:
    journal_dir = os.path.join(config.output, JOURNAL_DIR)
    try:
        os.makedirs(journal_dir, exist_ok=True)
        probe = os.path.join(journal_dir, f".probe-{os.getpid()}")
        with open(probe, "w") as f:
            f.write("ok")
        os.remove(probe)
    except OSError as exc:
        raise RunError(
            f"cannot write to the output folder {config.output}: {exc.strerror}; "
            "choose a writable --output"
        ) from exc
    settings_path = os.path.join(journal_dir, "settings.json")
    try:
        with open(settings_path, "x", encoding="utf-8") as f:
            json.dump(config.settings(), f, indent=1, sort_keys=True)
    except FileExistsError:
        with open(settings_path, encoding="utf-8") as f:
            saved = json.load(f)
        if saved != config.settings():
            raise RunError(
                f"{config.output} holds shards made with other settings ({saved}, now "
                f"{config.settings()}); rerun with the original settings or use a new --output"
            ) from None


def _lock_node(config: ShardConfig):
    path = os.path.join(config.output, JOURNAL_DIR, f"n{config.node_rank:04d}.lock")
    lock = open(path, "w")
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        raise RunError(
            f"another shard run for node {config.node_rank} is writing {config.output}; "
            "wait for it or stop it"
        ) from None
    return lock


def _start_worker(config: ShardConfig, worker_id: int) -> _WorkerState:
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
    return _WorkerState(process=process, conn=parent)


def run(config: ShardConfig) -> RunResult:
    """Shards this node's part of the inputs, resuming whatever an earlier run left.

    Raises:
        RunError: the output folder is unusable, the settings differ from an earlier run there,
            or an input named directly does not exist.
    """
    start = time.perf_counter()
    try:
        listing = list_inputs(config.inputs)
    except InputError as exc:
        raise RunError(str(exc)) from exc
    _prepare_output(config)
    with _lock_node(config):
        mine = partition(listing, config.num_nodes, config.node_rank)
        progress = load_progress(config.output, config.node_rank)
        clean_uncommitted(config.output, config.node_rank, progress)
        todo = [
            (source, progress.clips.get(source.path, 0))
            for source in mine.sources
            if source.path not in progress.finished and source.path not in progress.skipped
        ]
        todo.sort(key=lambda item: -_size(item[0].path))  # big files first balance the workers

        reasons: dict[str, str] = {}
        status = _Dispatcher(config, todo, reasons).run(len(mine.sources))
        progress = load_progress(config.output, config.node_rank)
        manifest = node_manifest(
            mine, progress, reasons, config.settings(), config.num_nodes, config.node_rank
        )
        write_part(config.output, manifest)
        merged = merge_parts(config.output)
    elapsed = time.perf_counter() - start
    return RunResult(merged, status.exit_code, status.error or "", elapsed, status.clips)


def _size(path: str) -> int:
    try:
        return os.path.getsize(path)
    except OSError:
        return 0


@dataclass
class _Status:
    clips: int = 0
    error: str | None = None
    """Why the run stopped early; sources it did not finish carry it as their skip reason."""
    exit_code: int = EXIT_OK

    def stop(self, error: str, exit_code: int) -> None:
        if self.error is None:  # the first cause is the one to report
            self.error, self.exit_code = error, exit_code


class _Dispatcher:
    """Feeds sources to the workers and follows their reports; restarts a worker that crashes."""

    def __init__(self, config: ShardConfig, todo: list, reasons: dict[str, str]) -> None:
        self.config, self.queue, self.reasons = config, deque(todo), reasons
        self.status = _Status()
        self.main_journal: Journal | None = None

    def run(self, num_sources: int) -> _Status:
        if not self.queue:  # everything was done by earlier runs
            return self.status
        num_workers = max(1, min(self.config.num_workers, len(self.queue)))
        workers = {i: _start_worker(self.config, i) for i in range(num_workers)}
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

    def _feed(self, worker: _WorkerState) -> None:
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

    def _receive(self, worker_id: int, worker: _WorkerState, workers: dict) -> None:
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

    def _output_failed(self, worker: _WorkerState, kind: str, detail: str) -> None:
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

    def _crashed(self, worker_id: int, worker: _WorkerState, workers: dict) -> None:
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
        replacement = _start_worker(self.config, worker_id)
        workers[worker_id] = replacement
        self._feed(replacement)


def settings_from_args(args: argparse.Namespace) -> ShardConfig:
    """ShardConfig from the command line; node rank and count fall back to SLURM's variables."""
    node = node_from_env(os.environ) or (0, 1)
    num_nodes = args.num_nodes if args.num_nodes is not None else node[1]
    node_rank = args.node_rank if args.node_rank is not None else node[0]
    clip = ClipConfig(
        num_frames=args.num_frames,
        fps=args.fps,
        stride=args.stride,
        size=args.size,
        crop=args.crop,
        crf=args.crf,
        keyframe_interval=args.keyframe_interval,
        preset=args.preset,
        passthrough=args.passthrough,
        image_quality=args.image_quality,
    )
    return ShardConfig(
        inputs=tuple(args.inputs),
        output=args.output,
        clip=clip,
        num_workers=args.workers or available_cpus(),
        num_nodes=num_nodes,
        node_rank=node_rank,
        max_shard_samples=args.shard_samples,
        max_shard_bytes=args.shard_bytes,
        progress=not args.no_progress,
        stall_timeout_s=args.stall_timeout,
    )


def summary(result: RunResult) -> str:
    totals = result.manifest.totals()
    reasons: dict[str, int] = {}
    for skip in result.manifest.skipped:
        key = re.split(r"[:(]", skip.reason)[0].strip()
        reasons[key] = reasons.get(key, 0) + 1
    sharded = totals["num_inputs"] - totals["num_skipped"]
    lines = [
        f"inputs {totals['num_inputs']}: {sharded} sharded, "
        f"{totals['num_skipped']} skipped" + (f" {reasons}" if reasons else ""),
        f"samples {totals['num_samples']} ({totals['num_video_clips']} clips, "
        f"{totals['num_images']} images) in {totals['num_shards']} shards, "
        f"{totals['bytes'] / 1e6:.1f} MB",
        f"this run wrote {result.clips_written} samples in {result.elapsed_s:.1f} s "
        f"({result.clips_written / max(result.elapsed_s, 1e-9):.1f}/s)",
    ]
    if not result.manifest.complete:
        missing = sorted(set(range(result.manifest.num_nodes)) - set(result.manifest.nodes_done))
        lines.append(f"manifest waits for nodes {missing}")
    if result.message:
        lines.append(f"ERROR: {result.message}")
    return "\n".join(lines)
