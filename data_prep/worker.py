"""One sharding worker process: takes sources from its pipe, writes its own shards and journal.

Messages to the parent (tuples): ``("ready",)`` once started; ``("clip",)`` per clip written;
``("done", path, num_clips, durable)`` when a source ends (``durable``: its finish is already in
the journal); ``("skip", path, reason)``; ``("commit", shard_entry, finished_paths)`` after a
shard is renamed and journaled; ``("full", message)`` or ``("error", message)`` when writing
fails; and ``("bye",)``.
"""

from __future__ import annotations

import ctypes
import dataclasses
import logging
import signal
from multiprocessing.connection import Connection

from data_prep.clips import ClipConfig, SkipSource, SourceReport, source_samples
from data_prep.format import Kind
from data_prep.inputs import Source
from data_prep.writer import (
    Journal,
    ShardWriter,
    is_output_full,
    journal_path,
    load_progress,
)

logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True, kw_only=True)
class WorkerSettings:
    output: str
    node_rank: int
    worker_id: int
    clip: ClipConfig
    max_shard_samples: int
    max_shard_bytes: int


def _die_with_parent() -> None:
    """Linux: the kernel kills this worker when the parent dies, even by SIGKILL."""
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except OSError:
        pass


class Worker:
    def __init__(self, settings: WorkerSettings, conn: Connection) -> None:
        self.settings, self.conn = settings, conn
        self.journal = Journal(
            journal_path(settings.output, settings.node_rank, settings.worker_id)
        )
        progress = load_progress(settings.output, settings.node_rank)
        self.next_index = {
            kind: index
            for (worker, kind), index in progress.next_index.items()
            if worker == settings.worker_id
        }
        self.writers: dict[Kind, ShardWriter] = {}
        self.pending: dict[Kind, list[str]] = {}
        """Sources whose last clips sit in the open shard of that kind."""
        self.notes: dict[str, str] = {}

    def _writer(self, kind: Kind) -> ShardWriter:
        if kind not in self.writers:
            s = self.settings
            self.writers[kind] = ShardWriter(
                s.output,
                kind,
                s.node_rank,
                s.worker_id,
                self.next_index.get(kind, 0),
                s.max_shard_samples,
                s.max_shard_bytes,
            )
            self.pending[kind] = []
        return self.writers[kind]

    def _commit(self, kind: Kind) -> None:
        writer = self.writers[kind]
        clips = writer.clips
        entry = writer.commit()
        finished, self.pending[kind] = self.pending[kind], []
        notes = {path: self.notes.pop(path) for path in finished if path in self.notes}
        self.journal.append(
            {
                "event": "shard",
                "shard": dataclasses.asdict(entry),
                "clips": clips,
                "finished": finished,
                "notes": notes,
            }
        )
        self.conn.send(("commit", dataclasses.asdict(entry), finished))

    def process(self, source: Source, first_clip: int) -> None:
        """Writes the source's clips; output errors propagate, source errors become skips."""
        report = SourceReport()
        writer = self._writer(source.kind)
        samples = source_samples(source, self.settings.clip, first_clip, report)
        written = 0
        while True:
            try:
                sample = next(samples)
            except StopIteration:
                break
            except SkipSource as exc:
                reason = str(exc)
                # A permission problem may be fixed before the rerun, so it is tried again.
                self._skip(source.path, reason, retry=reason.startswith("permission denied"))
                return
            except Exception as exc:  # a decoder or encoder failure: this source's problem
                detail = f"{type(exc).__name__}: {str(exc)[:200]}"
                if report.num_clips == 0:
                    self._skip(source.path, f"error: {detail}", retry=False)
                    return
                report.note = f"stopped after {report.num_clips} clips: {detail}"
                break
            writer.write(sample, source.path, report.num_clips - 1)
            written += 1
            self.conn.send(("clip",))
            if writer.full:
                self._commit(source.kind)
        if report.note:
            self.notes[source.path] = report.note
        if written == 0 or writer.empty:
            # Every clip of the source is already committed: record the finish right away.
            note = self.notes.pop(source.path, "")
            self.journal.append(
                {
                    "event": "finished",
                    "finished": [source.path],
                    "notes": {source.path: note} if note else {},
                }
            )
            self.conn.send(("done", source.path, report.num_clips, True))
        else:
            self.pending[source.kind].append(source.path)
            self.conn.send(("done", source.path, report.num_clips, False))

    def _skip(self, path: str, reason: str, retry: bool) -> None:
        self.journal.append({"event": "skip", "path": path, "reason": reason, "retry": retry})
        self.conn.send(("skip", path, reason))

    def finish(self) -> None:
        for kind, writer in self.writers.items():
            if not writer.empty:
                self._commit(kind)

    def abort(self) -> None:
        for writer in self.writers.values():
            writer.abort()


def run_worker(settings: WorkerSettings, conn: Connection) -> None:
    """Process entry point (spawned)."""
    _die_with_parent()
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent handles Ctrl-C for the node
    worker = None
    try:
        worker = Worker(settings, conn)
        conn.send(("ready",))
        while True:
            try:
                message = conn.recv()
            except EOFError:  # the parent is gone: leave the open shard uncommitted
                worker.abort()
                return
            if message[0] == "finish":
                worker.finish()
                conn.send(("bye",))
                return
            _, source, first_clip = message
            worker.process(source, first_clip)
    except Exception as exc:  # writing failed: the parent decides (full disk or unwritable)
        if worker is not None:
            worker.abort()
        status = "full" if is_output_full(exc) else "error"
        try:
            conn.send((status, f"{type(exc).__name__}: {exc}"))
        except OSError:
            pass
