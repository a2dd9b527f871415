"""Channels-last activations for the convolutions (a speed switch, numerically the same model).

cuDNN and oneDNN run a convolution in channels-last ("NDHWC" / "NHWC") order when its input or
its weight is in that memory format, and many of their fast kernels exist only for it. The
switch here hands every `nn.Conv3d` its input as `torch.channels_last_3d` and every `nn.Conv2d`
as `torch.channels_last`, through a forward pre-hook: a no-op where the input already is (the
previous conv's output, and the elementwise ops and norms between that keep the format), one
copy where a reshape made it contiguous again. Parameters are not touched: DeepSpeed's ZeRO
holds them as views of its flat buffers (a new tensor would detach them from the optimizer),
and the conv reorders its (small) weight itself.

State dicts, outputs and gradients are those of the plain model, to float rounding (a
different summation order inside the kernels).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle


def _format_of(module: nn.Module) -> tuple[str, torch.memory_format] | None:
    if isinstance(module, nn.Conv3d):
        return "conv3d", torch.channels_last_3d
    if isinstance(module, nn.Conv2d):
        return "conv2d", torch.channels_last
    return None


def use_channels_last(
    module: nn.Module, *, conv3d: bool = True, conv2d: bool = True
) -> list[RemovableHandle]:
    """Channels-last inputs for the 3-D (`conv3d`) and 2-D (`conv2d`) convolutions inside
    `module`; returns the hooks' handles (`handle.remove()` switches it off again)."""
    wanted = {"conv3d": conv3d, "conv2d": conv2d}
    handles = []
    for sub in module.modules():
        found = _format_of(sub)
        if found is not None and wanted[found[0]]:
            handles.append(sub.register_forward_pre_hook(_hook(found[1])))
    return handles


def _hook(memory_format: torch.memory_format):
    def to_format(_module: nn.Module, args: tuple[Tensor, ...]) -> tuple[Tensor, ...]:
        x, *rest = args
        return (x.contiguous(memory_format=memory_format), *rest)

    return to_format


def channels_last_share(module: nn.Module, *inputs: Tensor) -> dict[str, float]:
    """For a forward of `module` on `inputs`: the share of its Conv3d and Conv2d calls whose
    input arrived already in channels-last order (1.0: the format flows from conv to conv
    without copies). What the switch's tests and benchmarks report."""
    counts = {"conv3d": [0, 0], "conv2d": [0, 0]}

    def count(kind: str, memory_format: torch.memory_format):
        def hook(_module: nn.Module, args: tuple[Tensor, ...]) -> None:
            counts[kind][0] += args[0].is_contiguous(memory_format=memory_format)
            counts[kind][1] += 1

        return hook

    handles = []
    for sub in module.modules():
        found = _format_of(sub)
        if found is not None:
            # prepend: seen before the switch's own hook converts the input
            handles.append(sub.register_forward_pre_hook(count(*found), prepend=True))
    try:
        module(*inputs)
    finally:
        for handle in handles:
            handle.remove()
    return {kind: hits / calls for kind, (hits, calls) in counts.items() if calls}
