"""MAGVIT-v2 video tokenizer in plain PyTorch."""

from model.config import DiscriminatorConfig, LayerSpec, TokenizerConfig, parse_layers
from model.objectives import DiscrLossBreakdown, LossBreakdown
from model.quantizers import FSQ, LFQ, QuantizerLossBreakdown, QuantizerOutput
from model.reference_api import VideoTokenizer
from model.tokenizer import Tokenizer, TokenizerOutput

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
    "Tokenizer",
    "TokenizerOutput",
    "VideoTokenizer",
    "parse_layers",
]
