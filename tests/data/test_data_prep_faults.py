"""data_prep against bad inputs and bad luck: corrupt files, SIGKILL mid-run, a full disk."""

from __future__ import annotations

import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter

import pytest
from media import REPO, pattern_frames, read_samples, real_videos, run_cli, shard, write_video

from data_prep.format import JOURNAL_DIR, read_manifest
from data_prep.verify import verify
from data_prep.writer import read_journal

from helpers import repo_env


def _reasons(manifest) -> dict[str, str]:
    return {os.path.basename(s.path): s.reason for s in manifest.skipped}


def test_corrupt_folder(tmp_path):
    """Each bad kind of input is listed with its reason; every clip of every good file is in."""
    folder = tmp_path / "mixed"
    folder.mkdir()
    good = {
        "good1.mp4": write_video(str(folder / "good1.mp4"), pattern_frames(30, 64, 48)),
        "good2.webm": write_video(
            str(folder / "good2.webm"), pattern_frames(20, 48, 64, 0.3), codec="libvpx-vp9"
        ),
    }
    (folder / "zero.mp4").write_bytes(b"")
    (folder / "text.mp4").write_text("this is not a video\n" * 50)
    write_video(str(folder / "short.mp4"), pattern_frames(5, 32, 32))
    bikes = open(real_videos()["bikes.mp4"], "rb").read()  # its index (moov) is at the end
    (folder / "truncated.mp4").write_bytes(bikes[: len(bikes) // 2])
    (folder / "image.jpg").write_bytes(b"\xff\xd8\xff\xe0 broken jpeg")
    os.symlink(folder / "good1.mp4", folder / "link_to_good1.mp4")
    listed = tmp_path / "list.txt"
    listed.write_text("mixed/good1.mp4\n# a comment\nmixed/ghost.mp4\n")

    result = run_cli(
        [
            "shard",
            str(folder),
            str(listed),
            "--output",
            str(tmp_path / "out"),
            "--num-frames",
            "9",
            "--size",
            "32",
            "--no-progress",
        ]
    )
    assert result.returncode == 0, result.stderr
    manifest = read_manifest(str(tmp_path / "out"))
    reasons = _reasons(manifest)
    assert reasons["zero.mp4"] == "empty file (0 bytes)"
    assert reasons["text.mp4"].startswith("not a readable video")
    assert reasons["truncated.mp4"].startswith("not a readable video")
    assert reasons["short.mp4"].startswith("too short: 5 frames")
    assert reasons["image.jpg"].startswith("not a readable image")
    assert reasons["ghost.mp4"] == "not found"
    duplicates = [s for s in manifest.skipped if s.reason.startswith("duplicate path")]
    assert len(duplicates) == 2  # the symlink and the list's second mention of good1.mp4
    assert {os.path.basename(s.path): s.num_clips for s in manifest.sources} == {
        "good1.mp4": 3,
        "good2.webm": 2,
    }
    assert manifest.totals()["num_inputs"] == 10
    assert "inputs 10: 2 sharded, 8 skipped" in result.stdout
    samples = read_samples(str(tmp_path / "out"))
    per_source = Counter(os.path.basename(m.source) for m, _, _ in samples.values())
    assert per_source == {"good1.mp4": 3, "good2.webm": 2}
    assert sorted(m.index for m, _, _ in samples.values() if m.source.endswith("good1.mp4")) == [
        0,
        1,
        2,
    ]
    assert verify(str(tmp_path / "out")).ok
    assert all(os.path.isfile(p) for p in good.values())


def test_truncated_streamable_mp4_keeps_its_good_clips(tmp_path):
    """An mp4 with its index first (faststart) cut in half: PyAV decodes the first half."""
    import av

    source = real_videos()["bikes.mp4"]
    whole = str(tmp_path / "faststart.mp4")
    with av.open(source) as src, av.open(whole, "w", options={"movflags": "faststart"}) as dst:
        stream = dst.add_stream_from_template(src.streams.video[0])
        for packet in src.demux(src.streams.video[0]):
            if packet.dts is not None:
                packet.stream = stream
                dst.mux(packet)
    data = open(whole, "rb").read()
    cut = tmp_path / "in" / "cut.mp4"
    cut.parent.mkdir()
    cut.write_bytes(data[: len(data) // 2])
    result = shard([str(cut)], str(tmp_path / "out"), num_frames=17, size=32, workers=1)
    [entry] = result.manifest.sources
    assert 0 < entry.num_clips < 250 // 17 and entry.note.startswith("decoding stopped")
    assert len(read_samples(str(tmp_path / "out"))) == entry.num_clips


@pytest.mark.skipif(
    shutil.which("setpriv") is None and os.geteuid() == 0,
    reason="root reads any file; setpriv is needed to drop that capability",
)
def test_unreadable_file_is_skipped_then_retried(tmp_path):
    folder = tmp_path / "in"
    folder.mkdir()
    write_video(str(folder / "ok.mp4"), pattern_frames(18, 32, 32))
    locked = write_video(str(folder / "locked.mp4"), pattern_frames(18, 32, 32))
    os.chmod(locked, 0)
    prefix = []
    if os.geteuid() == 0:  # drop root's power to read any file, as a normal user would be
        caps = "-dac_override,-dac_read_search"
        prefix = ["setpriv", f"--inh-caps={caps}", f"--bounding-set={caps}"]
    args = [
        "shard",
        str(folder),
        "--output",
        str(tmp_path / "out"),
        "--num-frames",
        "9",
        "--size",
        "32",
        "--no-progress",
    ]
    env = repo_env()
    command = [*prefix, sys.executable, "-m", "data_prep", *args]
    first = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert first.returncode == 0, first.stderr
    assert _reasons(read_manifest(str(tmp_path / "out"))) == {
        "locked.mp4": "permission denied: Permission denied"
    }
    os.chmod(locked, 0o644)  # fixed by the user: the rerun picks it up
    second = run_cli(args)
    assert second.returncode == 0, second.stderr
    manifest = read_manifest(str(tmp_path / "out"))
    assert manifest.skipped == [] and len(manifest.sources) == 2


def _make_sources(folder, count: int, num_frames: int) -> None:
    folder.mkdir()
    for i in range(count):
        write_video(str(folder / f"v{i:02d}.mp4"), pattern_frames(num_frames, 48, 32, i / count))


def test_kill_and_rerun_keeps_each_clip_once(tmp_path):
    folder, out = tmp_path / "in", tmp_path / "out"
    _make_sources(folder, 16, 64)
    args = [
        sys.executable,
        "-m",
        "data_prep",
        "shard",
        str(folder),
        "--output",
        str(out),
        "--num-frames",
        "9",
        "--size",
        "32",
        "--shard-samples",
        "4",
        "--workers",
        "2",
        "--preset",
        "medium",
        "--no-progress",
    ]
    env = repo_env()
    process = subprocess.Popen(
        args,
        cwd=REPO,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    journals = out / JOURNAL_DIR
    deadline = time.monotonic() + 60
    committed = 0
    while time.monotonic() < deadline and process.poll() is None:
        records = [r for p in journals.glob("n0000-w*.jsonl") for r in read_journal(str(p))]
        committed = sum(r["event"] == "shard" for r in records)
        if committed >= 3:
            break
        time.sleep(0.05)
    assert process.poll() is None, "the run ended before it could be killed; make it longer"
    os.killpg(process.pid, signal.SIGKILL)  # the whole node dies: parent and workers
    process.wait()
    assert committed >= 3
    assert not (out / "manifest.json").exists()

    rerun = run_cli(args[3:])
    assert rerun.returncode == 0, rerun.stderr
    samples = read_samples(str(out))  # fails on a key in two shards
    clips = Counter((m.source, m.index) for m, _, _ in samples.values())
    assert len(clips) == 16 * 7 and set(clips.values()) == {1}
    manifest = read_manifest(str(out))
    assert all(s.num_clips == 7 and s.complete for s in manifest.sources)
    assert len(manifest.sources) == 16 and manifest.skipped == []
    assert not [n for n in os.listdir(out) if n.endswith(".partial")]
    assert verify(str(out)).ok


def test_torn_journal_line_is_dropped(tmp_path):
    path = tmp_path / "n0000-w000.jsonl"
    path.write_text('{"event": "skip", "path": "a", "reason": "x"}\n{"event": "sh')
    assert read_journal(str(path)) == [{"event": "skip", "path": "a", "reason": "x"}]
    assert path.read_text().endswith("}\n")


def test_full_disk_then_resume(tmp_path):
    """Writes fail past 60 kB (RLIMIT_FSIZE stands in for a full disk): exit 3 with the fix in
    the message, every source accounted for; a rerun with room completes each clip once."""
    folder, out = tmp_path / "in", tmp_path / "out"
    _make_sources(folder, 6, 46)
    args = [
        "shard",
        str(folder),
        "--output",
        str(out),
        "--num-frames",
        "9",
        "--size",
        "32",
        "--crf",
        "0",
        "--workers",
        "1",
        "--no-progress",
    ]

    def limit_file_size() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (60_000, 60_000))

    full = run_cli(args, preexec_fn=limit_file_size)
    assert full.returncode == 3, full.stderr + full.stdout
    assert "the output is full" in full.stdout and "rerun the same command" in full.stdout
    manifest = json.load(open(out / "manifest.json"))
    accounted = {s["path"] for s in manifest["skipped"]} | {
        s["path"] for s in manifest["sources"] if s["complete"]
    }
    assert len(accounted) == 6
    assert any("output is full" in s["reason"] for s in manifest["skipped"])

    again = run_cli(args)
    assert again.returncode == 0, again.stderr
    samples = read_samples(str(out))
    clips = Counter((m.source, m.index) for m, _, _ in samples.values())
    assert len(clips) == 6 * 5 and set(clips.values()) == {1}
    assert verify(str(out)).ok


def _worker_pids(children_file: str) -> list[str]:
    """Child processes that are sharding workers (not multiprocessing's resource tracker)."""
    pids = []
    for pid in open(children_file).read().split():
        try:
            if b"spawn_main" in open(f"/proc/{pid}/cmdline", "rb").read():
                pids.append(pid)
        except FileNotFoundError:  # exited meanwhile
            pass
    return pids


def test_worker_crash_skips_its_file_and_redoes_its_shard(tmp_path):
    """SIGKILL one worker (as a decoder segfault or the OOM killer would): the file it was on
    is skipped with the reason, its uncommitted shard is redone by a new worker, exit 0."""
    folder, out = tmp_path / "in", tmp_path / "out"
    _make_sources(folder, 12, 64)
    args = [
        sys.executable,
        "-m",
        "data_prep",
        "shard",
        str(folder),
        "--output",
        str(out),
        "--num-frames",
        "9",
        "--size",
        "32",
        "--shard-samples",
        "5",
        "--workers",
        "2",
        "--preset",
        "medium",
        "--no-progress",
    ]
    env = repo_env()
    process = subprocess.Popen(
        args, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    children_file = f"/proc/{process.pid}/task/{process.pid}/children"
    deadline = time.monotonic() + 60
    victim = None
    while time.monotonic() < deadline and process.poll() is None and victim is None:
        records = [
            r for p in (out / JOURNAL_DIR).glob("n0000-w*.jsonl") for r in read_journal(str(p))
        ]
        workers = _worker_pids(children_file)
        if any(r["event"] == "shard" for r in records) and len(workers) >= 2:
            victim = int(workers[0])
        time.sleep(0.02)
    assert victim is not None, "the run ended before a worker could be killed"
    os.kill(victim, signal.SIGKILL)
    stdout, stderr = process.communicate(timeout=120)
    assert process.returncode == 0, stderr
    manifest = read_manifest(str(out))
    crashed = [s for s in manifest.skipped if "worker died" in s.reason]
    assert len(crashed) == 1 and len(manifest.skipped) == 1, manifest.skipped
    complete = [s for s in manifest.sources if s.complete]
    assert len(complete) + len(crashed) == 12 and all(s.num_clips == 7 for s in complete)
    samples = read_samples(str(out))
    clips = Counter((m.source, m.index) for m, _, _ in samples.values())
    assert set(clips.values()) == {1}
    assert sum(s.num_clips for s in manifest.sources) == len(samples)
    assert verify(str(out)).ok


def test_stalled_worker_is_killed_and_its_file_skipped(tmp_path):
    """A file the worker cannot get through (here: hashing 16 GB of a sparse file) is given up
    after --stall-timeout; the other files are sharded and the run exits 0."""
    folder = tmp_path / "in"
    _make_sources(folder, 2, 18)
    with open(folder / "huge.mp4", "wb") as f:
        f.truncate(16 << 30)  # sparse: no disk used, but reading it takes many seconds
    result = run_cli(
        [
            "shard",
            str(folder),
            "--output",
            str(tmp_path / "out"),
            "--num-frames",
            "9",
            "--size",
            "32",
            "--workers",
            "1",
            "--stall-timeout",
            "2",
            "--no-progress",
        ]
    )
    assert result.returncode == 0, result.stderr
    manifest = read_manifest(str(tmp_path / "out"))
    assert _reasons(manifest) == {"huge.mp4": "no progress for 2 s (a hung decoder?)"}
    assert len(manifest.sources) == 2 and all(s.num_clips == 2 for s in manifest.sources)
