"""Preemption: a stop signal on any rank ends the job at the next step boundary with a complete
checkpoint of that step, and rerunning the same command resumes from it.

The job runs as users start it, `launch/train.sh` on 2 CPU ranks under the real DeepSpeed
launcher, in its own session, so that "every process of the job" is its process group (what
SLURM signals on preemption and at the time limit).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch
from trainrun import (
    CONFIG,
    REPO,
    _env,
    base_overrides,
    checkpoints,
    dump_stacks,
    explain,
    free_port,
    metrics,
    run,
    trainer_processes,
)

from pipeline.distributed.signals import STACK_DUMP_SIGNAL
from pipeline.train.checkpointing import latest_checkpoint
from pipeline.train.preemption import PREEMPTED_EXIT_CODE, StopRequests, ignore_stop_signals


def test_stop_requests_record_signals_and_agree_without_a_process_group():
    before = signal.getsignal(signal.SIGTERM)  # an in-process main() elsewhere may have set one
    stop = StopRequests()
    stop.install()
    try:
        assert stop.poll(torch.device("cpu")) == (False, False)
        os.kill(os.getpid(), signal.SIGUSR1)
        os.kill(os.getpid(), signal.SIGTERM)  # the second one only counts
        assert (stop.signal, stop.count) == (signal.SIGUSR1, 2)
        assert stop.poll(torch.device("cpu")) == (True, False)
    finally:
        stop.uninstall()
    assert signal.getsignal(signal.SIGTERM) is before


def test_wall_clock_saves_are_due_after_the_interval():
    stop = StopRequests(every_minutes=0.5 / 60)  # half a second
    assert stop.poll(torch.device("cpu")) == (False, False)
    time.sleep(0.6)
    assert stop.poll(torch.device("cpu")) == (False, True)
    stop.saved()
    assert stop.poll(torch.device("cpu")) == (False, False)


def test_loader_workers_ignore_stop_signals():
    """In a forked child as in a data-loader worker: both signals are ignored."""
    pid = os.fork()
    if pid == 0:  # the child: ignore, signal itself, survive to exit 0
        ignore_stop_signals()
        os.kill(os.getpid(), signal.SIGTERM)
        os.kill(os.getpid(), signal.SIGUSR1)
        os._exit(0)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0


def test_sigusr2_prints_every_threads_stack_and_the_process_goes_on(tmp_path):
    """In a rank blocked where no timeout reaches, and in its forked worker."""
    script = """
import os, threading, time
from pipeline.distributed.signals import enable_stack_dumps
enable_stack_dumps()
def blocked_in_a_lock():
    lock = threading.Lock(); lock.acquire(); lock.acquire(timeout=3)
if os.fork() == 0:
    time.sleep(3); os._exit(0)
print("ready", flush=True)
blocked_in_a_lock()
print("went on", flush=True)
"""
    process = subprocess.Popen(
        [sys.executable, "-c", script],
        cwd=REPO,
        env=_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert process.stdout.readline() == "ready\n"
    time.sleep(0.5)
    for pid in [process.pid, *(c.pid for c in psutil.Process(process.pid).children())]:
        os.kill(pid, STACK_DUMP_SIGNAL)
        time.sleep(0.5)  # one at a time: both write to the same pipe
    out, err = process.communicate(timeout=30)
    assert process.returncode == 0 and out == "went on\n", err
    assert err.count("most recent call first") == 2, err  # the rank's and the worker's dumps
    assert "in blocked_in_a_lock" in err, err


def test_a_command_past_its_time_limit_is_killed_with_its_children(tmp_path):
    pid_file = tmp_path / "grandchild"
    script = f"sleep 60 & echo $! > {pid_file}; wait"
    with pytest.raises(AssertionError, match="still running after 1 s"):
        run(["bash", "-c", script], timeout=1)
    grandchild = int(pid_file.read_text())
    deadline = time.monotonic() + 10  # SIGKILL is delivered, not yet acted on, when kill returns
    while time.monotonic() < deadline and _alive(grandchild):
        time.sleep(0.1)
    assert not _alive(grandchild)


def _alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


class Job:
    """`launch/train.sh` with 2 CPU ranks in a session of its own."""

    def __init__(self, output: Path, overrides: list[str]) -> None:
        self.output = output
        self.log = open(output.parent / f"{output.name}.log", "w")  # noqa: SIM115
        env = _env(NPROC_PER_NODE="2", MASTER_PORT=str(free_port()))
        self.process = subprocess.Popen(
            ["bash", "launch/train.sh", "--config", str(CONFIG), *overrides],
            cwd=REPO,
            env=env,
            stdout=self.log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    def wait_for_step(self, step: int, timeout: float = 240) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.process.poll() is None, self.text()
            path = self.output / "metrics.jsonl"
            if path.exists() and max(metrics(self.output), default=0) >= step:
                return
            time.sleep(0.2)
        raise AssertionError(self.hung(f"step {step} not reached in {timeout} s"))

    def wait_for_text(self, text: str, timeout: float = 240) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.process.poll() is None, self.text()
            if text in self.text():
                return
            time.sleep(0.2)
        raise AssertionError(self.hung(f"{text!r} not in the log after {timeout} s"))

    def rank_pid(self, local_rank: int) -> int:
        for child, command in trainer_processes(self.process.pid):
            if f"--local_rank={local_rank}" in command:
                return child.pid
        raise AssertionError(f"no rank {local_rank} among the job's processes")

    def wait(self, timeout: float) -> int:
        try:
            return self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(self.hung(f"still running after {timeout} s")) from None
        finally:
            self.log.flush()

    def hung(self, what: str) -> str:
        """`what`, and the log with every rank's and worker's thread stacks."""
        dumped = dump_stacks(self.process.pid)
        return f"{what}; stacks of {dumped}:\n{self.text(chars=40000)}"

    def everything_exited(self) -> bool:
        try:
            os.killpg(self.process.pid, 0)
        except ProcessLookupError:
            return True
        return False

    def text(self, chars: int = 6000) -> str:
        self.log.flush()
        return (self.output.parent / f"{self.output.name}.log").read_text()[-chars:]

    def close(self) -> None:
        if not self.everything_exited():
            os.killpg(self.process.pid, signal.SIGKILL)
        self.log.close()


def _overrides(output: Path, shards: Path, **extra) -> list[str]:
    # No periodic checkpoint is due: whatever exists afterwards, the stop request wrote it.
    values = {"num_steps": 400, "checkpoint_every": 1000, "export_on_finish": "false", **extra}
    return base_overrides(output, shards, **values)


def _resume_and_finish(output: Path, shards: Path, stopped_at: int) -> None:
    job = Job(output, _overrides(output, shards, num_steps=stopped_at + 2))
    try:
        assert job.wait(timeout=240) == 0, job.text()
        log = job.text()
        if stopped_at:
            assert f"at step {stopped_at}" in log and "resumed from" in log, log
        assert f"training finished at step {stopped_at + 2}" in log, log
    finally:
        job.close()


@pytest.mark.slow
@pytest.mark.parametrize(
    "how",
    ["sigterm_to_all", "sigusr1_to_rank_0", "second_sigterm_during_save", "before_first_step"],
)
def test_a_stop_signal_saves_the_step_and_a_rerun_resumes(tmp_path, video_shards, how):
    output = tmp_path / "run"
    extra = {"faults.signal_group_during_stop_save": "true"} if how.startswith("second") else {}
    job = Job(output, _overrides(output, video_shards, **extra))
    try:
        if how == "before_first_step":  # the ranks are up, no step has run
            job.wait_for_text("resolved config")
            signalled_at = 0
        else:
            job.wait_for_step(3)
            signalled_at = max(metrics(output))
        start = time.monotonic()
        if how == "sigusr1_to_rank_0":
            os.kill(job.rank_pid(0), signal.SIGUSR1)
        else:
            os.killpg(job.process.pid, signal.SIGTERM)
        code = job.wait(timeout=60)
        deadline = time.monotonic() + 45  # the data-loader workers follow their ranks
        while not job.everything_exited() and time.monotonic() < deadline:
            time.sleep(0.2)
        seconds = time.monotonic() - start
        assert job.everything_exited(), job.text()
        assert seconds < 60, seconds
        if how == "sigusr1_to_rank_0":  # the launcher passes the ranks' status on
            assert code == PREEMPTED_EXIT_CODE, job.text()
        else:  # its SIGTERM handler ends it with 1 after the ranks have exited
            assert code != 0, job.text()
        log = job.text()
        assert "stopped at step" in log and "stop signal" in log, log
        latest = latest_checkpoint(output / "checkpoints")
        if how == "before_first_step":  # nothing trained, nothing saved; a rerun starts anew
            assert latest is None, log
            _resume_and_finish(output, video_shards, 0)
            return
        assert latest is not None, log
        assert latest.step >= signalled_at, (latest.step, signalled_at)
        assert [p.name for p in checkpoints(output)] == [latest.path.name]  # one, complete
        assert not list((output / "checkpoints").glob(".partial-*"))
        size = sum(f.stat().st_size for f in latest.path.rglob("*") if f.is_file())
        print(
            f"{how}: exit {code} {seconds:.1f} s after the signal; step {latest.step}, "
            f"{size / 2**20:.1f} MiB"
        )
    finally:
        job.close()
    _resume_and_finish(output, video_shards, latest.step)


def test_a_rank_that_disagrees_with_slurm_is_a_clear_error(tmp_path, video_shards):
    command = [sys.executable, "-m", "pipeline.train", "--config", str(CONFIG)]
    overrides = base_overrides(tmp_path / "run", video_shards)
    slurm = {"SLURM_PROCID": "0", "SLURM_NTASKS": "2"}
    result = run([*command, *overrides], RANK="0", WORLD_SIZE="3", LOCAL_RANK="0", **slurm)
    assert result.returncode == 2, explain(result)
    assert "WORLD_SIZE=3 but SLURM started 2 tasks" in result.stderr


@pytest.mark.slow
def test_wall_clock_checkpoints_without_a_step_interval(tmp_path, video_shards):
    """checkpoint_every_minutes saves although no step interval is due (one rank)."""
    from trainrun import finished, single_process

    output = tmp_path / "run"
    overrides = base_overrides(
        output,
        video_shards,
        num_steps=4,
        checkpoint_every=1000,
        keep_checkpoints=10,
        checkpoint_every_minutes=0.0001,  # 6 ms: due at every step boundary
    )
    result = single_process(overrides)
    assert finished(result), explain(result)
    # At the boundaries after steps 1-3 (none before the first step), and the final save.
    assert [c.name for c in checkpoints(output)] == [f"step_{s:08d}" for s in (1, 2, 3, 4)]
