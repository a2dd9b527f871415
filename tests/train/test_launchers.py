"""Every common launcher forms the same job: srun's variables alone (one task per rank), torchrun
with a rendezvous endpoint, and launch/train.sh honouring CUDA_VISIBLE_DEVICES and
NPROC_PER_NODE (checked on the launcher command line it builds, with the fakes of
test_launch_guards)."""

from __future__ import annotations

import subprocess
import sys

import pytest
from test_launch_guards import RANK_ENV, WORKING, Node, started
from trainrun import CONFIG, REPO, _env, base_overrides, explain, finished, free_port, metrics

from pipeline.distributed.world import World, first_host, rendezvous_env

SRUN = {"SLURM_PROCID": "5", "SLURM_NTASKS": "16", "SLURM_LOCALID": "1", "SLURM_JOB_ID": "123"}


def test_world_from_srun_variables():
    assert World.from_env(SRUN) == World(rank=5, world_size=16, local_rank=1)
    step = {**SRUN, "SLURM_STEP_NUM_TASKS": "8"}  # the step's own count wins over the job's
    assert World.from_env(step).world_size == 8
    assert World.from_env({"SLURM_PROCID": "0", "SLURM_NTASKS": "1"}) == World()


def test_launcher_variables_inside_slurm_tasks():
    # One DeepSpeed launcher or torchrun per task (node): WORLD_SIZE is a multiple of the tasks.
    inside = {**SRUN, "SLURM_NTASKS": "2", "SLURM_PROCID": "1"}
    world = World.from_env({**inside, "RANK": "9", "WORLD_SIZE": "16", "LOCAL_RANK": "1"})
    assert world == World(rank=9, world_size=16, local_rank=1)
    with pytest.raises(ValueError, match="WORLD_SIZE=3 but SLURM started 2 tasks"):
        World.from_env({**inside, "RANK": "0", "WORLD_SIZE": "3"})
    with pytest.raises(ValueError, match="RANK=4 / LOCAL_RANK=1 but this is SLURM task 5"):
        World.from_env({**SRUN, "RANK": "4", "WORLD_SIZE": "16", "LOCAL_RANK": "1"})
    with pytest.raises(ValueError, match="SLURM_PROCID must be an integer"):
        World.from_env({**SRUN, "SLURM_PROCID": "x"})


@pytest.mark.parametrize(
    "nodelist, host",
    [
        ("gpu07", "gpu07"),
        ("gpu[07-09,12]", "gpu07"),
        ("gpu[012-015],cpu1", "gpu012"),
        ("a1,a2", "a1"),
        ("rack[3]-node[1-4]", "rack3-node[1-4]"),  # only the first bracket of a name expands
    ],
)
def test_first_host_of_a_slurm_node_list(nodelist, host):
    assert first_host(nodelist) == host


def test_rendezvous_from_slurm_fills_only_what_is_missing():
    env = {**SRUN, "SLURM_JOB_NODELIST": "gpu[07-08]"}
    world = World.from_env(env)
    assert rendezvous_env(world, env) == {
        "RANK": "5",
        "WORLD_SIZE": "16",
        "LOCAL_RANK": "1",
        "MASTER_ADDR": "gpu07",
        "MASTER_PORT": str(20000 + 123),
    }
    mine = {**env, "MASTER_ADDR": "10.0.0.1", "MASTER_PORT": "29999"}
    assert set(rendezvous_env(world, mine)) == {"RANK", "WORLD_SIZE", "LOCAL_RANK"}


@pytest.mark.slow
def test_two_processes_with_slurm_variables_only_form_one_job(tmp_path, video_shards):
    """As `srun --ntasks=2 python -m pipeline.train ...` starts them: no RANK, no MASTER_*."""
    output = tmp_path / "run"
    overrides = base_overrides(output, video_shards, num_steps=2, checkpoint_every=2)
    port = next(p for p in iter(free_port, None) if 20000 <= p < 40000)  # the job id's port
    job = {"SLURM_NTASKS": "2", "SLURM_JOB_ID": str(port - 20000), "SLURM_NODELIST": "localhost"}
    processes = [
        subprocess.Popen(
            [sys.executable, "-m", "pipeline.train", "--config", str(CONFIG), *overrides],
            cwd=REPO,
            env=_env(SLURM_PROCID=str(rank), SLURM_LOCALID=str(rank), **job),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for rank in range(2)
    ]
    outputs = [p.communicate(timeout=300) for p in processes]
    results = [
        subprocess.CompletedProcess(p.args, p.returncode, out, err)
        for p, (out, err) in zip(processes, outputs, strict=True)
    ]
    assert finished(results[0]), explain(results[0])
    assert "resolved config (2 rank(s))" in results[0].stdout, explain(results[0])
    assert metrics(output)[2]["perf/clips_per_s"] > 0


@pytest.mark.slow
def test_torchrun_with_a_rendezvous_endpoint(tmp_path, video_shards):
    """torchrun as on several nodes (--nnodes, c10d rendezvous at an endpoint), here 1 x 2."""
    output = tmp_path / "run"
    overrides = base_overrides(output, video_shards, num_steps=2, checkpoint_every=2)
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nnodes=1",
        "--nproc_per_node=2",
        "--rdzv_backend=c10d",
        f"--rdzv_endpoint=127.0.0.1:{free_port()}",
        "--rdzv_id=test",
        "-m",
        "pipeline.train",
        "--config",
        str(CONFIG),
        *overrides,
    ]
    result = subprocess.run(
        command, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=300
    )
    assert finished(result), explain(result)
    assert "resolved config (2 rank(s))" in result.stdout


def test_cuda_visible_devices_reaches_the_launcher(tmp_path):
    """The DeepSpeed runner drops CUDA_VISIBLE_DEVICES when given --num_gpus: train.sh names
    the devices instead (2 visible GPUs, stub torch)."""
    node = Node(tmp_path, gpu=True, stub_torch={**WORKING, "gpus": 2})
    result, calls = node.run(CUDA_VISIBLE_DEVICES="2,3")
    assert result.returncode == 0, result.stderr
    (launch,) = started(calls)
    assert "--include localhost:2,3" in launch and "--num_gpus" not in launch, launch
    result, calls = node.run(CUDA_VISIBLE_DEVICES="2,3", NPROC_PER_NODE="1")
    assert "--include localhost:2 " in started(calls)[-1], calls
    result, _ = node.run(CUDA_VISIBLE_DEVICES="2,3", NPROC_PER_NODE="4")
    assert result.returncode == 2 and "NPROC_PER_NODE=4 but torch sees 2 GPU(s)" in result.stderr


def test_nproc_per_node_on_several_nodes(tmp_path):
    node = Node(tmp_path, gpu=True, stub_torch=WORKING)
    hostfile = tmp_path / "hosts"
    hostfile.write_text("node0 slots=8\nnode1 slots=8\n")
    env = {"NNODES": "2", "NODE_RANK": "1", "HOSTFILE": str(hostfile), "NPROC_PER_NODE": "4"}
    result, calls = node.run(**env)
    assert result.returncode == 0, result.stderr
    (launch,) = started(calls)
    assert "--node_rank 1" in launch and "--num_gpus 4" in launch, launch


@pytest.mark.parametrize(
    "env, per_rank",
    [
        ({"SLURM_PROCID": "3", "SLURM_NTASKS": "16", "SLURM_NNODES": "2"}, True),  # a GPU each
        ({"SLURM_PROCID": "1", "SLURM_NTASKS": "2", "SLURM_NNODES": "2"}, False),  # a node each
        ({"SLURM_PROCID": "1", "SLURM_NTASKS": "16", "NODE_RANK": "1"}, False),  # train.sbatch
        (RANK_ENV, True),
    ],
)
def test_srun_layouts(tmp_path, env, per_rank):
    """One srun task per GPU runs the trainer directly; one per node runs that node's launcher."""
    node = Node(tmp_path, gpu=True, stub_torch=WORKING, cores=64)
    extra = {"HOSTFILE": str(tmp_path / "hosts"), "NNODES": "2"} if "NODE_RANK" in env else {}
    if extra:
        (tmp_path / "hosts").write_text("node0 slots=8\nnode1 slots=8\n")
    result, calls = node.run(FAKE_TRAINER="1", **env, **extra)
    assert result.returncode == 0, result.stderr
    (start,) = started(calls)
    assert start.startswith("python -m pipeline.train" if per_rank else "deepspeed "), start
