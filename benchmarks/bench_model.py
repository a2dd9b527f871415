"""Generator and discriminator step of our tokenizer vs magvit2-pytorch 0.5.1, side by side.

Same config, same input, same (random) VGG16 weights, in one run:
- time: median of --repeats steps, the implementations interleaved step by step so that
  machine noise hits all of them alike;
- FLOPs of one step (torch.utils.flop_counter) and achieved GFLOP/s;
- peak memory of one step, each measured in a fresh subprocess: the peak of live tensor memory
  during the step above what was live before it (profiler memory timeline), and peak RSS.

On CUDA (`--device cuda`) each timed step sits between torch.cuda.synchronize() calls, and the
memory is torch.cuda.max_memory_allocated during the step above what was allocated before it,
measured in this process (the caching allocator counts tensors exactly; RSS says nothing about
GPU memory). `--precision bf16`: magvit2-pytorch has no bf16 mode of its own, so it runs under
torch.autocast(bfloat16) with fp32 weights; ours runs as the trainer's bf16 DeepSpeed engine
runs it, weights and input cast to bf16 (the quantizer stays fp32 either way). Both get the
same input values (rounded to bf16).

    python benchmarks/bench_model.py --out benchmarks/results/model.json
    python benchmarks/bench_model.py --device cuda --precision bf16 --size 128 --frames 17

Needs the bench extra (magvit2-pytorch). Not part of the test run.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import warnings
from pathlib import Path

import torch
import torchvision

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from devices import (  # noqa: E402
    add_device_arguments,
    cuda_peak_of,
    machine_info,
    resolve_device,
    timed,
)
from flop_count import count_flops  # noqa: E402
from reference_card import CARD_LAYERS  # noqa: E402
from report import write_report  # noqa: E402

from model import VideoTokenizer  # noqa: E402
from model.losses import vgg16_fc7_features  # noqa: E402

IMPLEMENTATIONS = ("reference", "ours", "ours+checkpointing")


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """The model, input and timing options `build` and `make_video` read (also
    bench_switches'), with --device / --precision and --out."""
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--frames", type=int, default=9)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--init-dim", type=int, default=32)
    parser.add_argument("--codebook-size", type=int, default=1024)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    add_device_arguments(parser)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_model_arguments(parser)
    parser.add_argument("--skip-memory", action="store_true")
    # internal: measure one (implementation, step) in this process and print JSON
    parser.add_argument(
        "--memory-of", nargs=3, metavar=("IMPL", "STEP", "MODE"), help=argparse.SUPPRESS
    )
    return parser.parse_args(argv)


def build(
    impl: str, args: argparse.Namespace, device: torch.device | None = None
) -> torch.nn.Module:
    torch.manual_seed(0)
    vgg = torchvision.models.vgg16(weights=None)  # random weights: none are available offline
    kwargs = dict(
        image_size=args.size,
        init_dim=args.init_dim,
        layers=CARD_LAYERS,
        codebook_size=args.codebook_size,
        use_gan=True,
        perceptual_loss_weight=0.1,
    )
    if impl == "reference":
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            from magvit2_pytorch import VideoTokenizer as ReferenceTokenizer
        vgg.classifier = torch.nn.Sequential(*list(vgg.classifier)[:-2])
        model = ReferenceTokenizer(**kwargs, vgg=vgg)
    else:
        model = VideoTokenizer(
            **kwargs,
            vgg=vgg16_fc7_features(copy.deepcopy(vgg)),
            gradient_checkpointing=impl.endswith("checkpointing"),
        )
    model = model.to(device or torch.device("cpu"))
    if args.precision == "bf16" and impl != "reference":
        model = model.to(torch.bfloat16)  # as DeepSpeed's bf16 engine holds it
    return model.train()


def make_video(args: argparse.Namespace, impl: str = "ours", device=None) -> torch.Tensor:
    """The same values for every implementation: bf16-rounded under --precision bf16, in bf16
    for ours (a bf16 model takes bf16 input) and in fp32 for the reference (autocast casts)."""
    generator = torch.Generator().manual_seed(0)
    shape = (args.batch, 3, args.frames, args.size, args.size)
    video = torch.rand(shape, generator=generator) * 2 - 1
    if args.precision == "bf16":
        video = video.bfloat16() if impl != "reference" else video.bfloat16().float()
    return video.to(device or torch.device("cpu"))


def precision_context(impl: str, args: argparse.Namespace, device: torch.device):
    """Autocast for the reference under bf16; ours is cast instead (see `build`)."""
    if args.precision == "bf16" and impl == "reference":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def generator_step(model: torch.nn.Module, video: torch.Tensor) -> None:
    loss, _ = model(video, return_loss=True)
    loss.backward()
    model.zero_grad(set_to_none=True)


def discriminator_step(model: torch.nn.Module, video: torch.Tensor, recon: torch.Tensor) -> None:
    if isinstance(model, VideoTokenizer):
        # What our trainer does: the discriminator sees the generator step's reconstruction.
        loss, _ = model.discriminator_loss(video, recon)
    else:
        # The reference's only discriminator API runs the tokenizer again.
        loss, _ = model(video, return_discr_loss=True)
    loss.backward()
    model.zero_grad(set_to_none=True)


def step_fn(step: str, model: torch.nn.Module, video: torch.Tensor, context=None):
    """One step as a call; `context` (a factory of context managers) wraps it, e.g. autocast."""
    context = context or contextlib.nullcontext
    if step == "generator":

        def generator() -> None:
            with context():
                generator_step(model, video)

        return generator
    with torch.no_grad(), context():
        recon = model(video).detach()

    def discriminator() -> None:
        with context():
            discriminator_step(model, video, recon)

    return discriminator


def measure_memory(impl: str, step: str, args: argparse.Namespace, profiled: bool) -> dict:
    """Profiled: peak of live tensor bytes during one step, above the bytes live before it.
    Not profiled (the profiler's own records would dominate): peak RSS above the RSS before."""
    from torch.profiler import ProfilerActivity, profile

    model, video = build(impl, args), make_video(args, impl)
    fn = step_fn(step, model, video, lambda: precision_context(impl, args, torch.device("cpu")))
    fn()  # warm-up: lazily created state (VGG, optimizer-free grads) exists before measuring
    if not profiled:
        rss_before = _rss_bytes()
        fn()
        peak_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        return {"peak_rss_above_start_bytes": max(0, peak_rss - rss_before)}
    with profile(
        activities=[ProfilerActivity.CPU], profile_memory=True, record_shapes=True, with_stack=True
    ) as prof:
        fn()
    with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        path = Path(tmp) / "timeline.json"
        prof.export_memory_timeline(str(path), device="cpu")
        _, sizes = json.loads(path.read_text())
    totals = [sum(row) for row in sizes]
    return {"peak_step_bytes": max(totals) - totals[0], "peak_live_bytes": max(totals)}


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def memory_in_subprocess(impl: str, step: str, args: argparse.Namespace) -> dict:
    """Both memory measures, each in a fresh process (a clean allocator)."""
    out = {}
    for mode in ("profiled", "rss"):
        out.update(_one_memory_subprocess(impl, step, mode, args))
    return out


def _one_memory_subprocess(impl: str, step: str, mode: str, args: argparse.Namespace) -> dict:
    command = [
        sys.executable,
        __file__,
        "--memory-of",
        impl,
        step,
        mode,
        "--size",
        str(args.size),
        "--frames",
        str(args.frames),
        "--batch",
        str(args.batch),
        "--init-dim",
        str(args.init_dim),
        "--codebook-size",
        str(args.codebook_size),
        "--threads",
        str(args.threads),
        "--precision",
        args.precision,
    ]
    result = subprocess.run(command, capture_output=True, text=True, check=True)
    return json.loads(result.stdout.strip().splitlines()[-1])


def main(args: argparse.Namespace) -> dict:
    torch.set_num_threads(args.threads)
    if args.memory_of:
        impl, step, mode = args.memory_of
        print(json.dumps(measure_memory(impl, step, args, profiled=mode == "profiled")))
        return {}
    device = resolve_device(args.device)
    models = {impl: build(impl, args, device) for impl in IMPLEMENTATIONS}
    videos = {impl: make_video(args, impl, device) for impl in IMPLEMENTATIONS}
    results: dict = {
        "config": {
            "layers": CARD_LAYERS,
            "size": args.size,
            "frames": args.frames,
            "batch": args.batch,
            "init_dim": args.init_dim,
            "codebook_size": args.codebook_size,
            "threads": args.threads,
            "perceptual": "VGG16 fc7 (random weights)",
            "gan": True,
            "device": args.device,
            "precision": args.precision,
            "bf16": {
                "reference": "torch.autocast(bfloat16), fp32 weights",
                "ours": "weights and input cast to bf16 (the DeepSpeed bf16 engine's way)",
            }
            if args.precision == "bf16"
            else None,
        },
        "machine": machine_info(device),
        "steps": {},
    }
    for step in ("generator", "discriminator"):
        fns = {
            impl: step_fn(
                step,
                model,
                videos[impl],
                lambda impl=impl: precision_context(impl, args, device),
            )
            for impl, model in models.items()
        }
        flops = {impl: count_flops(fn) for impl, fn in fns.items()}
        if device.type == "cuda":  # kernels chosen and workspaces allocated before timing
            for fn in fns.values():
                fn()
        times: dict[str, list[float]] = {impl: [] for impl in fns}
        for _ in range(args.repeats):
            for impl, fn in fns.items():
                times[impl].append(timed(fn, device))
        step_results = {}
        for impl in fns:
            median = statistics.median(times[impl])
            step_results[impl] = {
                "seconds_median": median,
                "seconds_all": times[impl],
                "gflop": flops[impl] / 1e9,
                "gflop_per_s": flops[impl] / 1e9 / median,
            }
            if args.skip_memory:
                continue
            if device.type == "cuda":
                step_results[impl].update(cuda_peak_of(fns[impl], device))
            else:
                step_results[impl].update(memory_in_subprocess(impl, step, args))
        reference = step_results["reference"]
        for impl in ("ours", "ours+checkpointing"):
            step_results[impl]["speedup_vs_reference"] = (
                reference["seconds_median"] / step_results[impl]["seconds_median"]
            )
            if not args.skip_memory:
                step_results[impl]["peak_step_memory_vs_reference"] = (
                    step_results[impl]["peak_step_bytes"] / reference["peak_step_bytes"]
                )
        if not args.skip_memory:
            step_results["ours+checkpointing"]["peak_step_memory_vs_ours"] = (
                step_results["ours+checkpointing"]["peak_step_bytes"]
                / step_results["ours"]["peak_step_bytes"]
            )
        results["steps"][step] = step_results
    print_table(results)
    write_report(results, args.out)
    return results


def print_table(results: dict) -> None:
    header = f"{'step':<14}{'impl':<20}{'median s':>9}{'GFLOP':>8}{'GFLOP/s':>9}{'speedup':>9}"
    if results["config"].get("device") == "cuda":
        header += f"{'peak CUDA MiB':>15}"
    else:
        header += f"{'peak step MiB':>15}{'RSS +MiB':>14}"
    print(header)
    for step, rows in results["steps"].items():
        for impl, row in rows.items():
            speedup = row.get("speedup_vs_reference")
            line = (
                f"{step:<14}{impl:<20}{row['seconds_median']:>9.2f}{row['gflop']:>8.1f}"
                f"{row['gflop_per_s']:>9.1f}{(f'{speedup:.2f}x' if speedup else '-'):>9}"
            )
            if "peak_step_bytes" in row:
                line += f"{row['peak_step_bytes'] / 2**20:>15.0f}"
            if "peak_rss_above_start_bytes" in row:  # CPU only: RSS says nothing about a GPU
                line += f"{row['peak_rss_above_start_bytes'] / 2**20:>14.0f}"
            print(line)


if __name__ == "__main__":
    main(parse_args())
