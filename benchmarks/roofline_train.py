"""Where a training iteration's time goes, ours vs magvit2-pytorch 0.5.1: FLOPs, seconds and
GFLOP/s of each part, against the rate this machine reaches on the same convolutions alone.

bench_train's configuration (the card's layers at 64 x 64, 9 frames, init_dim 32, codebook 1024,
GAN, no perceptual loss, batch 2, fp32), one process, --threads threads. Parts, each timed as a
median of --repeats calls with the implementations interleaved:
- generator: ours `GeneratorObjective(video)` + backward (what the generator engine runs, here
  without DeepSpeed), the reference `model(video, return_loss=True)` + backward;
- discriminator, discriminator_gp: ours `DiscriminatorObjective` on the generator's detached
  reconstruction + backward, the reference `model(video, return_discr_loss=True,
  apply_gradient_penalty=...)` + backward (which runs its tokenizer again), without and with the
  gradient penalty (every 4th step in both trainers).
FLOPs: counted op by op (benchmarks/flop_count.py). The roofline of a part: every nn.Conv2d /
nn.Conv3d call in it is recorded (module and input shape) and then timed alone, forward and
backward (input and weight gradients), median of 3; the part's convolution rate is the FLOPs of
those solo calls over their summed time: what this CPU reaches on exactly those shapes. An
iteration is generator + (3 discriminator + discriminator_gp) / 4.

    python benchmarks/roofline_train.py --out benchmarks/results/roofline_train.json

Needs the bench extra (magvit2-pytorch). Not part of the test run.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch
from torch import nn

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench_train import BATCH, FRAMES, SIZE, model_kwargs  # noqa: E402
from devices import machine_info  # noqa: E402
from flop_count import count_flops  # noqa: E402
from report import write_report  # noqa: E402

from model.config import TokenizerConfig  # noqa: E402
from model.critics import build_training_networks  # noqa: E402
from pipeline.train.objectives import (  # noqa: E402
    DiscriminatorObjective,
    GeneratorObjective,
    frozen_parameters,
)

PARTS = ("generator", "discriminator", "discriminator_gp")


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--out", type=Path, default=None)
    return parser.parse_args(argv)


def our_parts(video: torch.Tensor) -> dict:
    torch.manual_seed(0)
    config = TokenizerConfig.from_dict(dict(model_kwargs(), layers=list(model_kwargs()["layers"])))
    tokenizer, perceptual, critics = build_training_networks(config)
    generator = GeneratorObjective(tokenizer, perceptual, critics).train()
    discriminator = DiscriminatorObjective(critics, config).train()
    with torch.no_grad():
        recon = tokenizer(video).recon.detach()

    def generator_step() -> None:
        with frozen_parameters(critics):
            loss, *_ = generator(video, 1.0)
            loss.backward()
        generator.zero_grad(set_to_none=True)

    def discriminator_step(penalty: bool):
        def step() -> None:
            loss, *_ = discriminator(video, recon, penalty, 4.0)
            loss.backward()
            discriminator.zero_grad(set_to_none=True)

        return step

    modules = (generator, discriminator)
    return modules, {
        "generator": generator_step,
        "discriminator": discriminator_step(False),
        "discriminator_gp": discriminator_step(True),
    }


def reference_parts(video: torch.Tensor) -> dict:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from magvit2_pytorch import VideoTokenizer as ReferenceTokenizer
    torch.manual_seed(0)
    model = ReferenceTokenizer(**model_kwargs()).train()

    def generator_step() -> None:
        loss, _ = model(video, return_loss=True, adversarial_loss_weight=1.0)
        loss.backward()
        model.zero_grad(set_to_none=True)

    def discriminator_step(penalty: bool):
        def step() -> None:
            loss, _ = model(video, return_discr_loss=True, apply_gradient_penalty=penalty)
            loss.backward()
            model.zero_grad(set_to_none=True)

        return step

    return (model,), {
        "generator": generator_step,
        "discriminator": discriminator_step(False),
        "discriminator_gp": discriminator_step(True),
    }


def conv_calls(modules, fn) -> list[tuple[nn.Module, tuple[int, ...]]]:
    """Every nn.Conv2d / nn.Conv3d call during fn(): (module, input shape)."""
    calls = []
    handles = [
        m.register_forward_pre_hook(lambda mod, args: calls.append((mod, tuple(args[0].shape))))
        for root in modules
        for m in root.modules()
        if isinstance(m, nn.Conv2d | nn.Conv3d)
    ]
    try:
        fn()
    finally:
        for handle in handles:
            handle.remove()
    return calls


def solo_convs(calls) -> dict:
    """The recorded convolutions alone, forward + backward: FLOPs and median seconds, summed
    over the calls (each distinct module and shape timed once)."""
    flops = seconds = 0.0
    timed: dict[tuple[int, tuple[int, ...]], tuple[float, float]] = {}
    for module, shape in calls:
        key = (id(module), shape)
        if key not in timed:
            x = torch.randn(shape, requires_grad=True)
            grad_out = torch.randn_like(module(x))
            was = [p.requires_grad for p in module.parameters()]
            for p in module.parameters():
                p.requires_grad_(True)

            def step(module=module, x=x, grad_out=grad_out) -> None:
                module(x).backward(grad_out)

            step_flops = count_flops(step)
            times = []
            for _ in range(3):
                start = time.perf_counter()
                step()
                times.append(time.perf_counter() - start)
            for p, flag in zip(module.parameters(), was, strict=True):
                p.requires_grad_(flag)
                p.grad = None
            timed[key] = (step_flops, statistics.median(times))
        flops += timed[key][0]
        seconds += timed[key][1]
    return {"conv_calls": len(calls), "conv_flops": flops, "conv_solo_seconds": seconds}


def main(args: argparse.Namespace) -> dict:
    torch.set_num_threads(args.threads)
    video = torch.rand(BATCH, 3, FRAMES, SIZE, SIZE, generator=torch.Generator().manual_seed(0))
    video = video * 2 - 1
    impls = {"reference": reference_parts(video), "ours": our_parts(video)}
    rows: dict = {part: {} for part in PARTS}
    for part in PARTS:
        times: dict[str, list[float]] = {name: [] for name in impls}
        for _, fns in impls.values():
            fns[part]()  # warm-up
        for _ in range(args.repeats):
            for name, (_, fns) in impls.items():
                start = time.perf_counter()
                fns[part]()
                times[name].append(time.perf_counter() - start)
        for name, (modules, fns) in impls.items():
            flops = count_flops(fns[part])
            seconds = statistics.median(times[name])
            convs = solo_convs(conv_calls(modules, fns[part]))
            rows[part][name] = row = {"flops": flops, "seconds": seconds, **convs}
            row["gflop_per_s"] = flops / seconds / 1e9
            row["conv_peak_gflop_per_s"] = convs["conv_flops"] / convs["conv_solo_seconds"] / 1e9
            row["share_of_conv_peak"] = row["gflop_per_s"] / row["conv_peak_gflop_per_s"]
            # the part's time if all its FLOPs ran at the rate of its convolutions alone
            row["seconds_at_conv_peak"] = flops / (row["conv_peak_gflop_per_s"] * 1e9)
        print_part(part, rows[part])
    results = {"machine": machine_info(torch.device("cpu")), "parts": rows}
    results["iteration"] = iteration(rows)
    print_iteration(results["iteration"])
    write_report(results, args.out)
    return results


def iteration(rows: dict) -> dict:
    """Generator + (3 discriminator + discriminator_gp) / 4, measured and at the conv peak."""

    def weighted(name: str, key: str) -> float:
        part = rows["generator"][name][key]
        return (
            part + (3 * rows["discriminator"][name][key] + rows["discriminator_gp"][name][key]) / 4
        )

    out = {
        name: {k: weighted(name, k) for k in ("flops", "seconds", "seconds_at_conv_peak")}
        for name in ("reference", "ours")
    }
    out["speedup"] = out["reference"]["seconds"] / out["ours"]["seconds"]
    # what ours would reach against the measured reference if all its work ran at the peak
    out["speedup_bound"] = out["reference"]["seconds"] / out["ours"]["seconds_at_conv_peak"]
    out["flop_ratio"] = out["reference"]["flops"] / out["ours"]["flops"]
    return out


def print_part(part: str, rows: dict) -> None:
    print(f"\n{part}")
    for name, r in rows.items():
        print(
            f"  {name:10s} {r['flops'] / 1e9:8.1f} GFLOP {r['seconds']:7.2f} s "
            f"{r['gflop_per_s']:6.1f} GFLOP/s  conv peak {r['conv_peak_gflop_per_s']:6.1f} "
            f"({r['share_of_conv_peak']:.0%})  at peak {r['seconds_at_conv_peak']:6.2f} s"
        )
    sys.stdout.flush()


def print_iteration(it: dict) -> None:
    print(
        f"\niteration: reference {it['reference']['seconds']:.2f} s, ours "
        f"{it['ours']['seconds']:.2f} s ({it['speedup']:.2f}x); FLOPs {it['flop_ratio']:.2f}x "
        "fewer; ours at the conv peak "
        f"{it['ours']['seconds_at_conv_peak']:.2f} s: at most {it['speedup_bound']:.2f}x"
    )


if __name__ == "__main__":
    main(parse_args())
