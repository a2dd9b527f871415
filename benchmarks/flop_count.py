"""FLOPs of a call, counted op by op with torch.utils.flop_counter's formulas (the counter of
the trainer's dry run, pipeline.train.dry_run.FlopCount)."""

from __future__ import annotations

from pipeline.train.dry_run import FlopCount

__all__ = ["FlopCount", "count_flops"]


def count_flops(fn) -> float:
    with FlopCount() as counter:
        fn()
    return float(counter.flops)
