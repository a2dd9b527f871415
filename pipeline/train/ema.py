"""Exponential moving average of the generator's weights, used for evaluation and export.

Kept in fp32 on every rank (the weights are replicated under ZeRO 0-2, so every rank computes
the same average and no communication is needed). Under bf16 the average is taken of the bf16
weights the engine trains: each update adds (1 - decay) x the rounding error, which averages out.
"""

from __future__ import annotations

import torch
from torch import nn


class EMA:
    def __init__(self, module: nn.Module, decay: float, start_step: int = 0) -> None:
        self.decay = decay
        self.start_step = start_step
        self.shadow = {
            name: tensor.detach().float().clone()
            for name, tensor in module.state_dict().items()
            if tensor.is_floating_point()
        }

    @torch.no_grad()
    def update(self, module: nn.Module, step: int) -> None:
        """Before start_step the average follows the weights exactly."""
        decay = self.decay if step >= self.start_step else 0.0
        for name, tensor in module.state_dict().items():
            if name in self.shadow:
                self.shadow[name].lerp_(tensor.detach().float(), 1.0 - decay)

    def state_dict_for(self, module: nn.Module) -> dict[str, torch.Tensor]:
        """The module's state dict with the averaged floating-point tensors, in fp32."""
        return {
            name: self.shadow[name] if name in self.shadow else tensor.detach()
            for name, tensor in module.state_dict().items()
        }

    def state_dict(self) -> dict[str, torch.Tensor]:
        return dict(self.shadow)

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        missing = sorted(set(self.shadow) - set(state))
        if missing:
            raise ValueError(f"EMA state lacks {missing[:5]}")
        for name in self.shadow:
            self.shadow[name].copy_(state[name])
