"""A world of one that takes every multi-rank code path: for the GPU tests, which have one GPU.

    python tests/gpu/forced_collectives.py --report R.json train --config C.yaml [key=value ...]
    python tests/gpu/forced_collectives.py --report R.json selftest

NCCL refuses two ranks on one GPU, so a single GPU can only form a one-rank group. Collectives
of pipeline.distributed.collectives run in any process group, but what is decided by the number of
ranks (`is_distributed()`: the LFQ batch-distribution reducer) would still take its one-rank path.
This driver makes `is_distributed()` true whenever a process group exists, counts every
collective by the module that issued it and the devices of its tensors (a CPU tensor handed to
NCCL is the crash to catch), and writes that to the report (on every exit).

`train` runs `pipeline.train.cli.main`; `selftest` checks pipeline.distributed.collectives's
collectives, the codebook statistics and the code histogram on CPU and CUDA tensors. Run with RANK=0
WORLD_SIZE=1 LOCAL_RANK=0 MASTER_ADDR MASTER_PORT set (gpurun.one_rank_env).
"""

from __future__ import annotations

import argparse
import functools
import importlib
import inspect
import json
import os
import sys
import traceback
from collections import defaultdict
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

# Every module that imports `is_distributed` by name, imported before it is replaced.
_PIPELINE_MODULES = (
    "pipeline.distributed.collectives",
    "pipeline.train.metrics",
    "pipeline.inference.quality",
    "pipeline.train.checkpointing",
    "pipeline.inference.evaluate",
    "pipeline.train.trainer",
    "pipeline.train.cli",
)
_COLLECTIVES = (
    "all_reduce",
    "all_gather",
    "all_gather_object",
    "all_gather_into_tensor",
    "reduce_scatter_tensor",
    "broadcast",
    "broadcast_object_list",
    "barrier",
)

calls: dict[str, set[str]] = defaultdict(set)
"""'caller module:collective' -> device types of its tensor arguments ('none' without any)."""
state: dict[str, object] = {"backend": None, "patched": []}


def _counted(name: str, inner):
    @functools.wraps(inner)
    def collective(*args, **kwargs):
        caller = sys._getframe(1).f_globals.get("__name__", "?")
        tensors = [a for a in (*args, *kwargs.values()) if torch.is_tensor(a)]
        calls[f"{caller}:{name}"].update({t.device.type for t in tensors} or {"none"})
        if state["backend"] is None and dist.is_initialized():
            state["backend"] = str(dist.get_backend())
        return inner(*args, **kwargs)

    return collective


def force_collectives() -> None:
    """`is_distributed()` true whenever a process group exists; every collective counted."""
    for name in _PIPELINE_MODULES:
        importlib.import_module(name)
    original = sys.modules["pipeline.distributed.collectives"].is_distributed

    def forced() -> bool:
        return dist.is_available() and dist.is_initialized()

    for name, module in list(sys.modules.items()):
        if name.startswith("pipeline") and getattr(module, "is_distributed", None) is original:
            module.is_distributed = forced
            state["patched"].append(name)
    for name in _COLLECTIVES:
        if hasattr(dist, name):
            setattr(dist, name, _counted(name, getattr(dist, name)))


def selftest(failures: list[str]) -> None:
    """Each check on its own, so that one report lists every failure."""
    from pipeline.distributed import collectives as distributed
    from pipeline.distributed.world import World
    from pipeline.inference.quality import CodeHistogram
    from pipeline.train.metrics import CodebookStats

    device = distributed.device_for(World.from_env())
    dist.init_process_group(distributed.default_backend(), rank=0, world_size=1)

    def check(what: str, fn) -> None:
        try:
            fn()
        except Exception:  # collected, reported, and the test fails on it
            failures.append(f"{what}:\n{traceback.format_exc(limit=6)}")

    def same_back(op_name: str, tensor: torch.Tensor) -> None:
        op = getattr(distributed, op_name)
        expected = tensor.clone()
        out = op(tensor)
        out = tensor if out is None else out
        assert out.device == tensor.device, f"{op_name} moved the result to {out.device}"
        assert out.dtype == tensor.dtype, f"{op_name} changed the dtype to {out.dtype}"
        assert torch.equal(out, expected), f"{op_name} of one rank changed the values"

    def on_the_gpu() -> None:
        where = distributed.communication_device()
        _expect(where.type == "cuda", f"communication_device() is {where} under NCCL")

    check("communication_device() is the GPU under NCCL", on_the_gpu)
    for op in ("all_reduce_sum", "all_reduce_max", "all_reduce_mean"):
        for where in ("cpu", device):
            for dtype in (torch.float64, torch.float32, torch.int64):
                if op == "all_reduce_mean" and not dtype.is_floating_point:
                    continue
                values = torch.arange(5, dtype=dtype, device=where)
                check(f"{op}({dtype} on {where})", functools.partial(same_back, op, values))
    check("barrier()", distributed.barrier)
    check(
        "all_gather_objects()",
        lambda: _expect(distributed.all_gather_objects({"rank": 0}) == [{"rank": 0}]),
    )
    codes = torch.randint(0, 64, (2, 3, 4, 4), device=device)

    def codebook_stats() -> None:
        # The histogram may live on a device the caller names (the training device).
        takes_device = "device" in inspect.signature(CodebookStats).parameters
        stats = CodebookStats(64, 1, device=device) if takes_device else CodebookStats(64, 1)
        stats.add(codes)
        values = stats.read_and_reset()
        used = codes.unique().numel() / 64
        _expect(abs(values["codebook/usage"] - used) < 1e-9, f"usage {values}, expected {used}")

    def code_histogram() -> None:
        histogram = CodeHistogram(64, 1, device)
        histogram.add(codes)
        distributed.all_reduce_sum(histogram.counts)
        _expect(int(histogram.counts.sum()) == codes.numel(), "histogram lost counts")

    check("CodebookStats on CUDA codes", codebook_stats)
    check("CodeHistogram on the GPU", code_histogram)
    dist.destroy_process_group()


def _expect(condition: bool, message: str = "unexpected result") -> None:
    if not condition:
        raise AssertionError(message)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--report", type=Path, required=True)
    parser.add_argument("command", choices=("train", "selftest"))
    args, rest = parser.parse_known_args()
    failures: list[str] = []
    code = 1
    try:
        force_collectives()
        if args.command == "train":
            from pipeline.train.cli import main as train_main
            from pipeline.train.cli import parse_args

            code = train_main(parse_args(rest))
        else:
            selftest(failures)
            code = 1 if failures else 0
    except BaseException:  # the report is written whatever happened
        failures.append(traceback.format_exc())
        print(failures[-1], file=sys.stderr)
    report = {
        "command": args.command,
        "exit_code": code,
        "backend": state["backend"],
        "patched_modules": state["patched"],
        "calls": {k: sorted(v) for k, v in sorted(calls.items())},
        "failures": failures,
    }
    args.report.write_text(json.dumps(report, indent=2))
    return code


if __name__ == "__main__":
    exit_code = main()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(exit_code)  # as pipeline.train does: no interpreter teardown after the work is saved
