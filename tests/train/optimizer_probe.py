"""Resumes a run's latest checkpoint in a trainer (under whatever launcher started this script)
and writes, from rank 0, every parameter's fp32 master weights and Adam moments, gathered whole
across ranks with DeepSpeed's safe_get_full_* helpers, plus the engines' step counters:

    python tests/train/optimizer_probe.py OUT.pt --config CONFIG [overrides...]
"""

from __future__ import annotations

import logging
import os
import sys

import torch
from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

from pipeline.distributed.collectives import device_for, teardown
from pipeline.distributed.world import World
from pipeline.train import engines
from pipeline.train.config import load_config
from pipeline.train.trainer import Trainer


def full_states(engine) -> dict[str, dict[str, torch.Tensor]]:
    out = {}
    for name, param in engine.module.named_parameters():
        if not param.requires_grad:
            continue
        out[name] = {
            "fp32": safe_get_full_fp32_param(param).detach().cpu().clone(),
            "exp_avg": safe_get_full_optimizer_state(param, "exp_avg").detach().cpu().clone(),
            "exp_avg_sq": safe_get_full_optimizer_state(param, "exp_avg_sq").detach().cpu().clone(),
        }
    return out


def main(out: str, config_path: str, overrides: list[str]) -> None:
    logging.basicConfig(level=logging.INFO)
    world = World.from_env()
    config = load_config(config_path, overrides)
    device = device_for(world, config.device)
    engines.init_deepspeed_distributed(world, 120, device)
    try:
        trainer = Trainer(config, world, device)
        trainer.maybe_resume()
        states = {"step": trainer.step}
        for tag in ("generator", "discriminator"):
            engine = getattr(trainer.engines, tag)
            if engine is not None:
                states[tag] = full_states(engine)
                states[f"{tag}_global_steps"] = engine.global_steps
        if world.rank == 0:
            torch.save(states, out)
    finally:
        teardown()


if __name__ == "__main__":
    arguments = sys.argv[1:]
    main(arguments[0], arguments[2], arguments[3:])
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)  # as pipeline.train does: gloo's threads can abort interpreter teardown
