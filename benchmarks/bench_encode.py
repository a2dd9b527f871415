"""Encoding speed of our tokenizer vs magvit2-pytorch 0.5.1's `tokenize`, and the memory of
any-length (chunked) encoding as the video grows.

Speed: the same config, the same weights (the reference's, converted) and the same input, the
implementations interleaved run by run, medians of --repeats runs, in clips/s:
- reference: magvit2-pytorch's `tokenize(video)` (under `torch.no_grad()`, in eval mode);
- ours-quirks: `tokenize` with `reference_quirks=True` (identical numerics; the codes are
  checked to be equal);
- ours: `tokenize` with the default settings.
Presets: "card" is the reference card's usage example (128 x 128, 17 frames, init_dim 64,
space attention at 64 x 64; batch 1, since the reference's attention matrices for a batch of 2
need over 20 GiB); "convs" and "every-kind" are smaller (--size, --init-dim, --batch). For
each preset, the peak RSS of one tokenize call per implementation, each in a fresh process.
On CPU the reference computes attention as an explicit softmax; on CUDA it calls
`scaled_dot_product_attention` as we do, so there the gap from attention is smaller.

Memory: for each video length, in a fresh subprocess, the peak of live tensor bytes during one
encode above what was live before it (the input video), from the profiler's memory timeline,
and the process's peak RSS: whole-video `encode` vs `encode_long(video, chunk_frames)`. Run
once with the speed config and once with `attend_time` added (whose exact chunked form keeps
that layer's input for the whole video).

On CUDA (`--device cuda`) every timed call sits between torch.cuda.synchronize() calls, and
memory is torch.cuda.max_memory_allocated during the call above what was allocated before it
(the input included there), measured in this process: RSS says nothing about GPU memory.
`--precision bf16` runs every implementation under torch.autocast(bfloat16), as token export
does (magvit2-pytorch has no bf16 mode of its own; both quantizers stay fp32); the codes are
then compared by agreement share, since bf16 rounding can flip a code near a bit's boundary.

    python benchmarks/bench_encode.py --out benchmarks/results/encode.json
    python benchmarks/bench_encode.py --device cuda --precision bf16 --presets card convs

Needs the bench extra (magvit2-pytorch). Not part of the test run.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

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

from model import VideoTokenizer  # noqa: E402
from model.convert import load_reference_checkpoint  # noqa: E402

PRESETS = {
    # The reference card's usage example.
    "card": {
        "layers": CARD_LAYERS,
        "size": 128,
        "init_dim": 64,
        "batch": 1,
    },
    # Convolution-heavy: residual stacks with one space attention (bench_model.py's kind).
    "convs": {
        "layers": (
            "residual",
            "compress_space",
            ("consecutive_residual", 2),
            "compress_time",
            "attend_space",
            "residual",
            "compress_time",
            "residual",
        ),
    },
    # Every unconditioned layer kind.
    "every-kind": {
        "layers": (
            "residual",
            "compress_space",
            "attend_space",
            "compress_time",
            "linear_attend_space",
            "attend_time",
            "gateloop_time",
            ("consecutive_residual", 2),
            "compress_time",
        ),
    },
}
MEMORY_PRESET = "convs"
IMPLEMENTATIONS = ("reference", "ours-quirks", "ours")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--frames", type=int, default=17)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--init-dim", type=int, default=32)
    parser.add_argument("--codebook-size", type=int, default=1024)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--memory-frames", type=int, nargs="*", default=[33, 65, 129, 257])
    parser.add_argument("--chunk-frames", type=int, default=16)
    parser.add_argument("--skip-speed", action="store_true")
    parser.add_argument("--skip-memory", action="store_true")
    parser.add_argument("--presets", nargs="*", default=list(PRESETS), choices=list(PRESETS))
    parser.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    add_device_arguments(parser)
    # internal: measure one (variant, mode, frames) or (preset, impl) in this process, print JSON
    parser.add_argument("--rss-of", nargs=2, metavar=("PRESET", "IMPL"), help=argparse.SUPPRESS)
    parser.add_argument(
        "--memory-of", nargs=3, metavar=("VARIANT", "MODE", "FRAMES"), help=argparse.SUPPRESS
    )
    return parser.parse_args(argv)


def model_kwargs(args: argparse.Namespace, layers: tuple) -> dict:
    return dict(
        image_size=args.size,
        init_dim=args.init_dim,
        layers=layers,
        codebook_size=args.codebook_size,
        use_gan=False,
        perceptual_loss_weight=0.0,
    )


def perturb_(model: torch.nn.Module, seed: int = 1) -> None:
    """Random offsets on every weight: zero-initialised gates would hide work and mismatches."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=generator) * 0.05)


def precision_context(args: argparse.Namespace, device: torch.device):
    if args.precision == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def build_models(
    args: argparse.Namespace, layers: tuple, device: torch.device | None = None
) -> dict[str, torch.nn.Module]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from magvit2_pytorch import VideoTokenizer as ReferenceTokenizer
    torch.manual_seed(0)
    reference = ReferenceTokenizer(**model_kwargs(args, layers))
    perturb_(reference)
    quirks = VideoTokenizer(**model_kwargs(args, layers), reference_quirks=True)
    load_reference_checkpoint(quirks, reference.state_dict())
    ours = VideoTokenizer(**model_kwargs(args, layers))
    with warnings.catch_warnings():  # "outputs will differ": the point of the default settings
        warnings.simplefilter("ignore")
        load_reference_checkpoint(ours, reference.state_dict())
    models = {"reference": reference, "ours-quirks": quirks, "ours": ours}
    return {name: model.to(device or torch.device("cpu")).eval() for name, model in models.items()}


def make_video(batch: int, frames: int, size: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    return torch.rand(batch, 3, frames, size, size, generator=generator) * 2 - 1


def preset_settings(args: argparse.Namespace, preset: str) -> argparse.Namespace:
    """The command-line settings with the preset's own size, init_dim and batch."""
    own = {k: v for k, v in PRESETS[preset].items() if k != "layers"}
    return argparse.Namespace(**{**vars(args), **own})


def speed(args: argparse.Namespace, preset: str, device: torch.device) -> dict:
    settings = preset_settings(args, preset)
    models = build_models(settings, PRESETS[preset]["layers"], device)
    video = make_video(settings.batch, settings.frames, settings.size).to(device)

    def tokenize(model: torch.nn.Module):
        def run() -> torch.Tensor:
            with precision_context(args, device):
                return model.tokenize(video)

        return run

    fns = {impl: tokenize(models[impl]) for impl in IMPLEMENTATIONS}
    codes = {impl: fn() for impl, fn in fns.items()}  # warm-up, and the equality check
    same = torch.equal(codes["ours-quirks"], codes["reference"].long())
    agreement = float((codes["ours-quirks"] == codes["reference"].long()).double().mean())
    del codes
    times: dict[str, list[float]] = {impl: [] for impl in fns}
    for _ in range(args.repeats):
        for impl, fn in fns.items():
            times[impl].append(timed(fn, device))
    rows = {}
    for impl in fns:
        median = statistics.median(times[impl])
        rows[impl] = {
            "seconds_median": median,
            "clips_per_s": settings.batch / median,
            "seconds_all": times[impl],
            **(
                cuda_peak_of(fns[impl], device)
                if device.type == "cuda"
                else rss_in_subprocess(preset, impl, args)
            ),
        }
    del models
    for impl in ("ours-quirks", "ours"):
        rows[impl]["speedup_vs_reference"] = (
            rows["reference"]["seconds_median"] / rows[impl]["seconds_median"]
        )
    settings_out = {k: getattr(settings, k) for k in ("size", "init_dim", "batch", "frames")}
    return {
        "settings": settings_out,
        "rows": rows,
        "ours_quirks_codes_equal_reference": same,
        "ours_quirks_codes_agreement_with_reference": agreement,
    }


def measure_rss(preset: str, impl: str, args: argparse.Namespace) -> dict:
    """Peak RSS of one tokenize call of `impl` in this (fresh) process, and its growth."""
    settings = preset_settings(args, preset)
    kwargs = model_kwargs(settings, PRESETS[preset]["layers"])
    torch.manual_seed(0)
    if impl == "reference":
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            from magvit2_pytorch import VideoTokenizer as ReferenceTokenizer
        model = ReferenceTokenizer(**kwargs)
    else:
        model = VideoTokenizer(**kwargs, reference_quirks=impl == "ours-quirks")
    video = make_video(settings.batch, settings.frames, settings.size)
    peak_rss_bytes(reset=True)
    rss_before = rss_bytes()
    with precision_context(args, torch.device("cpu")):
        model.eval().tokenize(video)
    peak = peak_rss_bytes()
    return {"peak_rss_bytes": peak, "peak_rss_above_start_bytes": peak - rss_before}


def rss_in_subprocess(preset: str, impl: str, args: argparse.Namespace) -> dict:
    command = [sys.executable, __file__, "--rss-of", preset, impl]
    command += ["--frames", str(args.frames), "--threads", str(args.threads)]
    command += ["--size", str(args.size), "--init-dim", str(args.init_dim)]
    command += ["--batch", str(args.batch), "--codebook-size", str(args.codebook_size)]
    command += ["--precision", args.precision]
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="131072")  # see memory_in_subprocess
    result = subprocess.run(command, capture_output=True, text=True, check=True, env=env)
    return json.loads(result.stdout.strip().splitlines()[-1])


def memory_run(variant: str, mode: str, frames: int, args: argparse.Namespace, device):
    """(one encode of the memory preset as a call, its input video)."""
    layers = PRESETS[MEMORY_PRESET]["layers"]
    layers = (*layers, "attend_time") if variant == "with-attend-time" else layers
    torch.manual_seed(0)
    model = VideoTokenizer(**model_kwargs(args, layers)).to(device).eval()
    video = make_video(1, frames, args.size).to(device)

    def run():
        with precision_context(args, device):
            if mode == "whole":
                return model.tokenize(video)
            return model.encode_long(video, args.chunk_frames)

    return run, video


def measure_cuda_memory(variant: str, mode: str, frames: int, args, device) -> dict:
    """Peak CUDA memory of one encode above what was allocated before it (model and input)."""
    run, video = memory_run(variant, mode, frames, args, device)
    run()  # warm-up: kernels chosen, workspaces allocated
    seconds = timed(run, device)
    peak = cuda_peak_of(run, device)
    return {
        "peak_encode_bytes": peak["peak_step_bytes"],
        "peak_live_bytes": peak["peak_live_bytes"],
        "input_bytes": video.numel() * video.element_size(),
        "seconds": seconds,
        "memory_source": peak["memory_source"],
    }


def measure_memory(variant: str, mode: str, frames: int, args: argparse.Namespace) -> dict:
    """Peak live tensor bytes of one encode above the bytes live before it (profiler), and the
    process's peak RSS over an unprofiled run (model, input and all)."""
    from torch.profiler import ProfilerActivity, profile

    run, video = memory_run(variant, mode, frames, args, torch.device("cpu"))
    peak_rss_bytes(reset=True)
    rss_before = rss_bytes()
    run()  # warm-up (lazily created state), and the run whose peak RSS is reported
    peak_rss = peak_rss_bytes()
    with profile(
        activities=[ProfilerActivity.CPU], profile_memory=True, record_shapes=True, with_stack=True
    ) as prof:
        start = time.perf_counter()
        run()
        seconds = time.perf_counter() - start
    with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        path = Path(tmp) / "timeline.json"
        prof.export_memory_timeline(str(path), device="cpu")
        _, sizes = json.loads(path.read_text())
    totals = [sum(row) for row in sizes]
    return {
        "peak_encode_bytes": max(totals) - totals[0],
        "input_bytes": video.numel() * video.element_size(),
        "peak_rss_bytes": peak_rss,
        "rss_before_bytes": rss_before,
        "seconds_under_profiler": seconds,
    }


def memory_in_subprocess(variant: str, mode: str, frames: int, args) -> dict:
    command = [
        sys.executable,
        __file__,
        "--memory-of",
        variant,
        mode,
        str(frames),
        "--size",
        str(args.size),
        "--init-dim",
        str(args.init_dim),
        "--codebook-size",
        str(args.codebook_size),
        "--chunk-frames",
        str(args.chunk_frames),
        "--threads",
        str(args.threads),
        "--precision",
        args.precision,
    ]
    # A fixed mmap threshold: glibc otherwise raises it as large blocks are freed and keeps them
    # in its heap, and RSS would track that heap's growth rather than live memory.
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="131072")
    result = subprocess.run(command, capture_output=True, text=True, check=True, env=env)
    return json.loads(result.stdout.strip().splitlines()[-1])


def main(args: argparse.Namespace) -> dict:
    torch.set_num_threads(args.threads)
    if args.memory_of:
        variant, mode, frames = args.memory_of
        print(json.dumps(measure_memory(variant, mode, int(frames), args)))
        return {}
    if args.rss_of:
        print(json.dumps(measure_rss(*args.rss_of, args)))
        return {}
    device = resolve_device(args.device)
    results: dict = {
        "config": {
            "presets": PRESETS,
            "memory_preset": MEMORY_PRESET,
            "size": args.size,
            "frames": args.frames,
            "batch": args.batch,
            "init_dim": args.init_dim,
            "codebook_size": args.codebook_size,
            "threads": args.threads,
            "chunk_frames": args.chunk_frames,
            "device": args.device,
            "precision": args.precision,
        },
        "machine": machine_info(device),
    }
    if not args.skip_speed:
        results["speed"] = {name: speed(args, name, device) for name in args.presets}
    results["memory"] = {}
    for variant in () if args.skip_memory else ("speed-config", "with-attend-time"):
        rows = {}
        for frames in args.memory_frames:
            rows[frames] = {
                mode: measure_cuda_memory(variant, mode, frames, args, device)
                if device.type == "cuda"
                else memory_in_subprocess(variant, mode, frames, args)
                for mode in ("whole", "chunked")
            }
        results["memory"][variant] = rows
    print_tables(results)
    write_report(results, args.out)
    return results


def print_tables(results: dict) -> None:
    # CUDA: peak allocated above the start (RSS is not measured there).
    cuda = results["config"].get("device") == "cuda"
    peak_key, peak_name = (
        ("peak_step_bytes", "peak CUDA MiB") if cuda else ("peak_rss_bytes", "peak RSS MiB")
    )
    for preset, result in results.get("speed", {}).items():
        print(f"\nspeed ({preset}, {result['settings']}): tokenize")
        print(f"{'impl':<14}{'median s':>10}{'clips/s':>9}{'vs ref':>8}{peak_name:>14}")
        for impl, row in result["rows"].items():
            a = row.get("speedup_vs_reference")
            print(
                f"{impl:<14}{row['seconds_median']:>10.3f}{row['clips_per_s']:>9.2f}"
                f"{(f'{a:.2f}x' if a else '-'):>8}{row[peak_key] / 2**20:>14.0f}"
            )
        print(
            "ours-quirks codes == reference codes:",
            result["ours_quirks_codes_equal_reference"],
            f"(agreement {result['ours_quirks_codes_agreement_with_reference']:.4f})",
        )
    for variant, rows in results["memory"].items():
        what = "peak CUDA MiB above the start" if cuda else "peak tensor MiB above the input"
        print(f"\nmemory ({MEMORY_PRESET} preset, {variant}): {what}", end="")
        print("" if cuda else " | peak RSS MiB of the process")
        rss = "" if cuda else f"{'whole RSS':>11}{'chunked RSS':>13}"
        print(f"{'frames':>7}{'whole':>10}{'chunked':>10}{rss}")
        for frames, row in rows.items():
            w, c = row["whole"], row["chunked"]
            line = f"{frames:>7}{w['peak_encode_bytes'] / 2**20:>10.1f}"
            line += f"{c['peak_encode_bytes'] / 2**20:>10.1f}"
            if not cuda:
                line += f"{w['peak_rss_bytes'] / 2**20:>11.0f}{c['peak_rss_bytes'] / 2**20:>13.0f}"
            print(line)


if __name__ == "__main__":
    main(parse_args())
