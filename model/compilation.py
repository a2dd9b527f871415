"""Regional `torch.compile`: each repeated block compiled on its own (a speed switch).

Compiling the whole tokenizer is slow to start (one large graph per input shape, recompiled on
every graph break) and breaks at the quantizer's data-dependent code; the encoder's and the
decoder's layers, the image discriminator's stages and the 3-D discriminator's blocks are where
the time goes, and blocks of one kind share their compiled code when their shapes match
(torch.compile caches by code object and guards). `nn.Module.compile` compiles in place, so
parameter names, state dicts, DeepSpeed's view of the parameters and activation checkpointing
(which calls the block) are those of the plain model.

AOTAutograd has no double backward: code that differentiates a gradient through a compiled
block runs it inside `eager()` (model.objectives.discriminator_loss does so for the gradient
penalty's critic pass).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn

# No CUDA-graph modes ("reduce-overhead", "max-autotune"): a training step reuses the graphs'
# output buffers while autograd and DeepSpeed's gradient hooks still hold them.
COMPILE_MODES = ("default", "max-autotune-no-cudagraphs")


def repeated_blocks(module: nn.Module) -> list[nn.Module]:
    """The blocks regional compilation compiles inside `module`, in module order."""
    from model.discriminator import Discriminator
    from model.discriminator3d import Discriminator3D
    from model.tokenizer import Tokenizer

    blocks: list[nn.Module] = []
    for sub in module.modules():
        if isinstance(sub, Tokenizer):  # its Encoder and Decoder are attributes, not children
            blocks.extend([*sub.encoder.layers, *sub.decoder.layers])
        elif isinstance(sub, Discriminator):
            blocks.extend(sub.stages)
        elif isinstance(sub, Discriminator3D):
            blocks.extend(sub.blocks)
    return blocks


def compile_blocks(module: nn.Module, mode: str = "default") -> int:
    """Compiles each of `repeated_blocks(module)` in place with torch.compile(mode=`mode`);
    returns how many. Compilation itself happens at each block's first call."""
    if mode not in COMPILE_MODES:
        raise ValueError(f"compile mode must be one of {COMPILE_MODES}, got {mode!r}")
    blocks = repeated_blocks(module)
    # Static shapes: training's are fixed, and inductor fails on the symbolic sizes of the
    # discriminator's strided residual. Blocks of one class share a code object, whose
    # compiled variants (each stage's shape, frozen or trained critic, real+fake batch or not)
    # count against one recompile limit: room for four per block.
    config = torch._dynamo.config
    config.recompile_limit = max(config.recompile_limit, 4 * len(blocks))
    for block in blocks:
        block.compile(mode=mode, dynamic=False)
    return len(blocks)


@contextlib.contextmanager
def eager() -> Iterator[None]:
    """Inside: compiled blocks run their plain eager code (for double backward)."""
    with torch.compiler.set_stance("force_eager"):
        yield
