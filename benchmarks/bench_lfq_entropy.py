"""LFQ's batch entropy at a large codebook: time, peak memory and operator launches of the
entropy term (forward + backward) per probability block size.

At 2**18 codes and 10 240 rows (about a base_128 micro-step's latents) the (rows x codes)
probability matrix is 2.7e9 elements, so it is built one block of rows at a time. The block was
fixed at 2**22 elements (16 rows); it is now `probability_block_elements(device)`: 2**24 on CPU
(chosen from this benchmark), up to 2**28 elements (1024 rows) from the free memory on a GPU.
Each setting runs in a fresh process (peak RSS on CPU, max_memory_allocated on CUDA);
operators are counted with the profiler (each is one kernel launch on a GPU).

    python benchmarks/bench_lfq_entropy.py --out benchmarks/measured/lfq_entropy_cpu.json
    python benchmarks/bench_lfq_entropy.py --device cuda
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from devices import (  # noqa: E402
    add_device_arguments,
    machine_info,
    peak_rss_bytes,
    resolve_device,
    rss_bytes,
    synchronize,
)
from report import write_report  # noqa: E402

from model.quantizers import LFQ, probability_block_elements  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=10240)
    parser.add_argument("--bits", type=int, default=18)
    parser.add_argument("--blocks", type=int, nargs="+", default=[1 << 22, 1 << 24, 1 << 26])
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--out", type=Path, default=None)
    add_device_arguments(parser)
    parser.add_argument("--worker-block", type=int, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def entropy_term(quantizer: LFQ, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The batch entropy (the term with the blocked computation) and its input gradient."""
    x = x.detach().requires_grad_()
    breakdown = quantizer(x).breakdown
    breakdown.batch_entropy.backward()
    return breakdown.batch_entropy.detach(), x.grad


def worker(args: argparse.Namespace) -> dict:
    device = resolve_device(args.device)
    torch.manual_seed(0)
    quantizer = LFQ(dim=args.bits, codebook_size=2**args.bits).train().to(device)
    quantizer.probability_block_elements = args.worker_block
    x = torch.randn(1, args.bits, args.rows, device=device)  # (b, d, n): rows latent vectors
    entropy_term(quantizer, x[:, :, :64])  # warm-up at a small size
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    else:
        peak_rss_bytes(reset=True)  # the peak RSS := the current RSS
    before = _memory(device)
    synchronize(device)
    start = time.perf_counter()
    value, grad = entropy_term(quantizer, x)
    synchronize(device)
    seconds = time.perf_counter() - start
    peak = _peak(device) - before
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        entropy_term(quantizer, x)
    ops = sum(1 for e in prof.events() if e.name.startswith("aten::"))
    return {
        "block_elements": args.worker_block,
        "block_rows": max(1, args.worker_block // 2**args.bits),
        "seconds": seconds,
        "peak_bytes_above_start": peak,
        "aten_ops": ops,
        "value": value.item(),
        "grad_sum_abs": grad.abs().sum().item(),
        "grad": grad.cpu().flatten()[:4096].tolist(),
    }


def _memory(device: torch.device) -> int:
    return torch.cuda.memory_allocated(device) if device.type == "cuda" else rss_bytes()


def _peak(device: torch.device) -> int:
    return torch.cuda.max_memory_allocated(device) if device.type == "cuda" else peak_rss_bytes()


def main(args: argparse.Namespace) -> dict:
    torch.set_num_threads(args.threads)
    if args.worker_block:
        print(json.dumps(worker(args)))
        return {}
    device = resolve_device(args.device)
    chosen = probability_block_elements(device)
    rows = []
    for block in sorted(set(args.blocks) | {1 << 22, chosen}):
        command = [sys.executable, __file__, "--worker-block", str(block), "--rows", str(args.rows)]
        command += ["--bits", str(args.bits), "--threads", str(args.threads)]
        command += ["--device", args.device]
        env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="131072")  # RSS tracks live memory
        done = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
        if done.returncode:
            sys.exit(f"block {block} failed:\n{done.stderr[-3000:]}")
        row = json.loads(done.stdout.strip().splitlines()[-1])
        row["before"] = block == 1 << 22
        row["chosen_for_device"] = block == chosen
        rows.append(row)
    base = next(r for r in rows if r["before"])
    grads = [torch.tensor(row["grad"]) for row in rows]  # the first 4096 gradient values
    base_grad = grads[rows.index(base)]
    for row, grad in zip(rows, grads, strict=True):
        row["seconds_vs_before"] = row["seconds"] / base["seconds"]
        row["value_diff_vs_before"] = abs(row["value"] - base["value"])
        row["grad_max_diff_vs_before"] = (grad - base_grad).abs().max().item()
        row["grad_max_relative_diff_vs_before"] = (
            row["grad_max_diff_vs_before"] / base_grad.abs().max().item()
        )
    for row in rows:
        del row["grad"]
    results = {
        "config": {"rows": args.rows, "codes": 2**args.bits, "threads": args.threads},
        "machine": machine_info(device),
        "chosen_block_elements": chosen,
        "rows": rows,
    }
    print(f"LFQ batch entropy, {args.rows} rows x 2**{args.bits} codes, fwd + bwd on {device}")
    for r in rows:
        print(
            f"  block 2**{r['block_elements'].bit_length() - 1:<3} ({r['block_rows']:5d} rows)"
            f" {r['seconds']:7.2f} s ({r['seconds_vs_before']:.2f}x)"
            f"  peak {r['peak_bytes_above_start'] / 2**20:8.1f} MiB  {r['aten_ops']:6d} ops"
            f"  |dgrad| {r['grad_max_diff_vs_before']:.1e}"
            f" ({r['grad_max_relative_diff_vs_before']:.1e} of max |grad|)"
            + ("  <- before" if r["before"] else "")
            + ("  <- chosen" if r["chosen_for_device"] else "")
        )
    write_report(results, args.out)
    return results


if __name__ == "__main__":
    main(parse_args())
