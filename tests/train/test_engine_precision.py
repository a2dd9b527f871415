"""bf16 training reduces gradients across ranks and accumulates micro-batches in fp32.

DeepSpeed does both in the model dtype unless told otherwise; bf16's 8-bit mantissa then drops
the small terms of a sum over 32 ranks or many micro-batches, silently.
"""

from __future__ import annotations

import json
import subprocess
import sys

from trainrun import CONFIG, REPO, free_port

from pipeline.train import engines
from pipeline.train.config import load_config

from helpers import repo_env

# Two micro-batches whose weight gradients are 256 and 1; the engine scales each by 1/2, so the
# accumulated gradient is 128 + 0.5: exact in fp32, 128 in bf16 (spacing 1 at 128).
PROBE = """
import json, sys, torch, deepspeed
from deepspeed.utils import safe_get_full_grad
from pipeline.train import engines
from pipeline.train.config import load_config
from pipeline.distributed.world import World

engines.init_deepspeed_distributed(World(), 60)
results = {}
for stage in (1, 2):
    for fp32_reduction in (True, False):
        config = load_config(sys.argv[1], [
            "precision=bf16", "micro_batch_size=1", "gradient_accumulation_steps=2",
            f"fp32_gradient_reduction={fp32_reduction}", "generator_optim.gradient_clipping=0",
        ])
        module = torch.nn.Linear(1, 1, bias=False)
        torch.nn.init.zeros_(module.weight)
        optimizer = torch.optim.AdamW(module.parameters(), lr=1e-3)
        ds = engines.engine_config(config, config.generator_optim, stage, 1)
        engine, *_ = deepspeed.initialize(
            model=module, optimizer=optimizer, config=ds, dist_init_required=False
        )
        grad = None
        for x in (256.0, 1.0):
            engine.backward(engine(torch.full((1, 1), x, dtype=torch.bfloat16)).float().sum())
            if engine.is_gradient_accumulation_boundary():
                grad = float(safe_get_full_grad(engine.module.weight).float().sum())
            engine.step()
        results[f"{stage}/{fp32_reduction}"] = {
            "communication": str(engine.communication_data_type),
            "accumulation": str(engine.get_data_types()[1]),
            "grad": grad,
        }
print("RESULT " + json.dumps(results))
"""


def test_bf16_engine_configs_reduce_and_accumulate_in_fp32():
    config = load_config(CONFIG, ["precision=bf16"])
    for stage in (1, 2):
        ds = engines.engine_config(config, config.generator_optim, stage, world_size=32)
        assert ds["bf16"]["enabled"]
        assert ds["communication_data_type"] == "fp32"
        assert ds["data_types"] == {"grad_accum_dtype": "fp32"}
    fp32 = engines.engine_config(
        load_config(CONFIG, ["precision=fp32"]), config.generator_optim, 2, 2
    )
    assert "communication_data_type" not in fp32 and "bf16" not in fp32


def test_deepspeed_accumulates_bf16_gradients_in_fp32_with_these_configs():
    env = repo_env(
        RANK="0",
        WORLD_SIZE="1",
        LOCAL_RANK="0",
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(free_port()),
        CUDA_VISIBLE_DEVICES="",
        OMP_NUM_THREADS="1",
    )
    result = subprocess.run(
        [sys.executable, "-c", PROBE, str(CONFIG)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    lines = [line for line in result.stdout.splitlines() if line.startswith("RESULT ")]
    assert lines, result.stderr[-4000:]
    results = json.loads(lines[-1].removeprefix("RESULT "))
    for stage in (1, 2):
        ours = results[f"{stage}/True"]
        assert ours == {
            "communication": "torch.float32",
            "accumulation": "torch.float32",
            "grad": 128.5,
        }, (stage, ours)
        # DeepSpeed's own default, for contrast: the 0.5 is lost.
        assert results[f"{stage}/False"]["grad"] == 128.0, results
