"""Exponential moving average of the generator's weights, used for evaluation and export.

Kept in fp32 on every rank (the weights are replicated under ZeRO 0-2, so every rank computes
the same average and no communication is needed). Under bf16 the average is taken of the bf16
weights the engine trains: each update adds (1 - decay) x the rounding error, which averages out.

Warm-up (on by default): the t-th averaging update (t = 0, 1, ...) uses
`min(decay, (1 + t) / (10 + t))`, the rule of TensorFlow's ExponentialMovingAverage
(`num_updates`) and of latent diffusion's LitEma. Early on the average forgets the random
initial weights quickly (the product of the decays over the first 150 updates is
9! / (151 * 152 * ... * 159) = 7.0e-15, against 0.999**150 = 0.86 without warm-up); the full
`decay` is reached after `warmup_updates(decay)` updates (8,990 for 0.999, 890 for 0.99).
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.optim.swa_utils import get_ema_multi_avg_fn

COUNTER_KEY = "__ema_num_updates__"
"""The update counter's key in `EMA.state_dict()` (no module parameter is named like it)."""


def warmup_updates(decay: float) -> int:
    """The first update index t at which the warm-up rule gives the full `decay` (float
    rounding may make it one later)."""
    return max(0, math.ceil((10 * decay - 1) / (1 - decay)))


class EMA:
    def __init__(
        self, module: nn.Module, decay: float, start_step: int = 0, warmup: bool = True
    ) -> None:
        self.decay = decay
        self.start_step = start_step
        self.warmup = warmup
        self.num_updates = 0
        """Averaging updates so far (those at steps >= start_step); drives the warm-up."""
        self.shadow = {
            name: tensor.detach().float().clone()
            for name, tensor in module.state_dict().items()
            if tensor.is_floating_point()
        }

    def current_decay(self) -> float:
        """The decay the next averaging update uses."""
        if not self.warmup:
            return self.decay
        t = self.num_updates
        return min(self.decay, (1 + t) / (10 + t))

    @torch.no_grad()
    def update(self, module: nn.Module, step: int) -> None:
        """Before start_step the average follows the weights exactly (and the warm-up waits)."""
        decay = 0.0
        if step >= self.start_step:
            decay = self.current_decay()
            self.num_updates += 1
        # One foreach lerp over every tensor (a few kernels in all) instead of a lerp and a
        # cast per tensor: on GPUs the per-tensor launches, not the arithmetic, cost the time.
        state = module.state_dict()
        names = [name for name in state if name in self.shadow]
        shadows = [self.shadow[name] for name in names]
        # .float() is the tensor itself for fp32 weights; bf16 / fp16 weights are upcast.
        current = [state[name].detach().float() for name in names]
        if shadows:
            get_ema_multi_avg_fn(decay)(shadows, current, None)

    def state_dict_for(self, module: nn.Module) -> dict[str, torch.Tensor]:
        """The module's state dict with the averaged floating-point tensors, in fp32."""
        return {
            name: self.shadow[name] if name in self.shadow else tensor.detach()
            for name, tensor in module.state_dict().items()
        }

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The averaged tensors by name, and the update counter under COUNTER_KEY."""
        return {**self.shadow, COUNTER_KEY: torch.tensor(self.num_updates, dtype=torch.int64)}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """A state without the counter (written before the warm-up existed) counts as warmed
        up: that run averaged at the full decay, and goes on doing so."""
        missing = sorted(set(self.shadow) - set(state))
        if missing:
            raise ValueError(f"EMA state lacks {missing[:5]}")
        for name in self.shadow:
            self.shadow[name].copy_(state[name])
        counter = state.get(COUNTER_KEY)
        self.num_updates = int(counter) if counter is not None else warmup_updates(self.decay)
