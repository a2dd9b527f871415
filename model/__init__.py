"""MAGVIT-v2 video tokenizer in plain PyTorch."""

from model.config import DiscriminatorConfig, LayerSpec, TokenizerConfig, parse_layers
from model.objectives import DiscrLossBreakdown, LossBreakdown
from model.quantizers import FSQ, LFQ, QuantizerLossBreakdown, QuantizerOutput
from model.tokenizer import TokenizerOutput, VideoTokenizer

__all__ = [
    "FSQ",
    "LFQ",
    "DiscrLossBreakdown",
    "DiscriminatorConfig",
    "LayerSpec",
    "LossBreakdown",
    "QuantizerLossBreakdown",
    "QuantizerOutput",
    "TokenizerConfig",
    "TokenizerOutput",
    "VideoTokenizer",
    "parse_layers",
]
