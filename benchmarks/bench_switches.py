"""The speed switches (pipeline.train SpeedConfig) on and off, side by side in one run.

Variants of our tokenizer with the same weights (bench_model's card configuration: GAN, VGG
perceptual loss with random weights): `off`, `channels_last_3d` (the Conv3d inputs),
`channels_last` (the Conv2d inputs: discriminator, VGG), `compile` (regional torch.compile of
the encoder and decoder layers and the discriminator stages) and `all`. Parts timed, the
variants interleaved call by call, medians of --repeats after one warm-up call (for `compile`,
the warm-up call compiles; each variant's is reported as `first_call_s`):
- generator: bench_model's generator step (loss with GAN and perceptual terms, backward);
- discriminator: bench_model's discriminator step without the gradient penalty (what 3 of 4
  steps do at gradient_penalty_every 4);
- encode: `tokenize` under no_grad (bench_encode's speed measure);
- discriminator_gp: the same with the penalty (`discriminator_loss` runs the penalised pass
  eagerly: no double backward through compiled code).
The JSON is rewritten after each part, so a run cut short keeps the parts it finished.
Ratios are off / variant (above 1: the switch is faster).

    python benchmarks/bench_switches.py --out benchmarks/results/switches.json
    python benchmarks/bench_switches.py --device cuda --precision bf16 --size 128 --frames 17

Needs the bench extra (torchvision's VGG16 class). Not part of the test run.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench_model import add_model_arguments, build, make_video  # noqa: E402
from devices import machine_info, resolve_device, timed  # noqa: E402
from report import write_report  # noqa: E402

from model.compilation import compile_blocks  # noqa: E402
from model.memory_format import channels_last_share, use_channels_last  # noqa: E402

VARIANTS = {
    "off": dict(conv3d=False, conv2d=False, compile=False),
    "channels_last_3d": dict(conv3d=True, conv2d=False, compile=False),
    "channels_last": dict(conv3d=False, conv2d=True, compile=False),
    "compile": dict(conv3d=False, conv2d=False, compile=True),
    "all": dict(conv3d=True, conv2d=True, compile=True),
}
PARTS = ("generator", "discriminator", "encode", "discriminator_gp")


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_model_arguments(parser)  # bench_model's: build() reads them
    parser.add_argument("--variants", nargs="*", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--parts", nargs="*", default=list(PARTS), choices=list(PARTS))
    return parser.parse_args(argv)


def switched_model(variant: str, args: argparse.Namespace, device: torch.device):
    model = build("ours", args, device)  # seeded: every variant holds the same weights
    switches = VARIANTS[variant]
    use_channels_last(model, conv3d=switches["conv3d"], conv2d=switches["conv2d"])
    if switches["compile"]:
        compile_blocks(model)
    return model


def part_fn(part: str, model, video: torch.Tensor, recon: torch.Tensor):
    def generator() -> None:
        loss, _ = model(video, return_loss=True)
        loss.backward()
        model.zero_grad(set_to_none=True)

    def discriminator(penalty: bool) -> None:
        loss, _ = model.discriminator_loss(video, recon, apply_gradient_penalty=penalty)
        loss.backward()
        model.zero_grad(set_to_none=True)

    def encode() -> None:
        with torch.no_grad():
            model.tokenize(video)

    return {
        "generator": generator,
        "discriminator_gp": lambda: discriminator(True),
        "discriminator": lambda: discriminator(False),
        "encode": encode,
    }[part]


def main(args: argparse.Namespace) -> dict:
    torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    video = make_video(args, "ours", device)
    models = {v: switched_model(v, args, device) for v in args.variants}
    with torch.no_grad():
        recon = models[args.variants[0]](video).detach()
    results: dict = {
        "machine": machine_info(device),
        "config": {k: getattr(args, k) for k in ("size", "frames", "batch", "init_dim")}
        | {"codebook_size": args.codebook_size, "precision": args.precision},
        "parts": {},
    }
    if "channels_last_3d" in models or "all" in models:
        probe = models.get("channels_last_3d", models.get("all"))
        with torch.no_grad():
            results["channels_last_input_share_encoder"] = channels_last_share(probe.encoder, video)
    for part in args.parts:
        fns = {v: part_fn(part, m, video, recon) for v, m in models.items()}
        first = {v: timed(fn, device) for v, fn in fns.items()}  # warm-up (compiles)
        times: dict[str, list[float]] = {v: [] for v in fns}
        for _ in range(args.repeats):
            for v, fn in fns.items():
                times[v].append(timed(fn, device))
        medians = {v: statistics.median(t) for v, t in times.items()}
        results["parts"][part] = {
            v: {
                "median_s": medians[v],
                "times_s": times[v],
                "first_call_s": first[v],
                "speedup_vs_off": medians["off"] / medians[v] if "off" in medians else None,
            }
            for v in fns
        }
        print_part(part, results["parts"][part])
        write_report(results, args.out)  # after each part: a timeout keeps what was measured
    return results


def print_part(part: str, rows: dict) -> None:
    print(f"\n{part}")
    for variant, row in rows.items():
        ratio = row["speedup_vs_off"]
        print(
            f"  {variant:18s} {row['median_s']:8.3f} s  first call {row['first_call_s']:7.1f} s"
            + (f"  x{ratio:.3f} vs off" if ratio is not None else "")
        )
    sys.stdout.flush()


if __name__ == "__main__":
    started = time.perf_counter()
    main(parse_args())
    print(f"\n{time.perf_counter() - started:.0f} s in all")
