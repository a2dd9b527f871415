"""Tiny configurations shared by the model tests."""

from __future__ import annotations

import pytest
import torch

from model import VideoTokenizer
from model.compilation import compile_blocks
from model.memory_format import use_channels_last

# Every unconditioned layer kind, twice compressed in time (f = 4) and once in space.
ALL_UNCONDITIONED = (
    "residual",
    "compress_space",
    "attend_space",
    "compress_time",
    "linear_attend_space",
    "attend_time",
    "gateloop_time",
    ("consecutive_residual", 2),
    "compress_time",
)
# Every conditioned kind, with unconditioned ones after them (the reference fed cond to those).
ALL_CONDITIONED = (
    "cond_residual",
    "compress_space",
    "cond_attend_space",
    "residual",
    "compress_time",
    "cond_attend_time",
    "cond_linear_attend_space",
    "attend_space",
)


def tiny_kwargs(**overrides) -> dict:
    kwargs = dict(
        image_size=16,
        init_dim=8,
        layers=("residual", "compress_space", "compress_time", "attend_space"),
        codebook_size=64,
        attn_dim_head=8,
        attn_heads=2,
        linear_attn_dim_head=4,
        linear_attn_heads=2,
        input_conv_kernel_size=(3, 3, 3),
        perceptual_loss_weight=0.0,
        use_gan=False,
    )
    kwargs.update(overrides)
    # A small discriminator: the reference default (width = latent dim, up to 512) is slow.
    kwargs.setdefault("discr_kwargs", dict(dim=2, image_size=kwargs["image_size"], max_dim=16))
    return kwargs


def tiny_tokenizer(seed: int = 0, **overrides) -> VideoTokenizer:
    torch.manual_seed(seed)
    return VideoTokenizer(**tiny_kwargs(**overrides))


def randomize_(model: torch.nn.Module, scale: float = 0.1, seed: int = 1) -> None:
    """Perturbs every parameter: zero-initialised gates and gains would otherwise hide bugs."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=generator) * scale)


def video(batch: int = 2, frames: int = 9, size: int = 16, channels: int = 3, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(batch, channels, frames, size, size, generator=generator).clamp(-1, 1)


def repo_env(**extra: str) -> dict[str, str]:
    """os.environ for a subprocess that imports the project: the repository first on PYTHONPATH,
    whatever was there kept (a node installed with `install_offline.sh --target` has its
    packages there)."""
    import os
    from pathlib import Path

    repo = str(Path(__file__).resolve().parents[1])
    path = os.pathsep.join(filter(None, (repo, os.environ.get("PYTHONPATH"))))
    return {**os.environ, "PYTHONPATH": path, **extra}


# A stand-in for StyleGAN-V's TorchScript I3D (pipeline.inference.video_features), for the rFVD
# tests.
class StandInI3D(torch.nn.Module):
    """Random weights with the TorchScript I3D's interface: forward(x, rescale, resize,
    return_features) on (N, 3, T, 224, 224) in [-1, 1] -> (N, 400); fails below 9 frames."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv3d(3, 8, kernel_size=(1, 8, 8), stride=(1, 8, 8))
        self.head = torch.nn.Linear(8 * 4, 400)

    def forward(
        self,
        x: torch.Tensor,
        rescale: bool = False,
        resize: bool = False,
        return_features: bool = False,
    ) -> torch.Tensor:
        if rescale:
            x = x / 127.5 - 1
        if resize:
            x = torch.nn.functional.interpolate(x, size=(x.shape[2], 224, 224), mode="trilinear")
        assert x.shape[2] >= 9 and x.shape[3] == 224, "too short"
        h = torch.relu(self.conv(x))  # (n, 8, t, 28, 28)
        h = torch.nn.functional.adaptive_avg_pool3d(h, (1, 2, 2)).flatten(1)
        logits = self.head(h)
        return logits if return_features else logits.softmax(dim=1)


def save_i3d(path, module: torch.nn.Module | None = None):
    torch.manual_seed(0)
    torch.jit.script((module or StandInI3D()).eval()).save(str(path))
    return str(path)


# The speed switches (pipeline.train.config_sections.SpeedConfig) as the model tests apply them;
# compiling takes seconds per block on CPU, hence `slow`.
SPEED_SWITCHES = (
    "off",
    "channels_last",
    pytest.param("compiled", marks=pytest.mark.slow),
)


def with_switch(model: torch.nn.Module, switch: str) -> torch.nn.Module:
    """`model` with one speed switch on: channels-last 3-D and 2-D convolutions, or compiled
    blocks (in place; returns it)."""
    if switch == "channels_last":
        use_channels_last(model, conv3d=True, conv2d=True)
    elif switch == "compiled":
        assert compile_blocks(model) > 0
    else:
        assert switch == "off", switch
    return model
