"""From a parsed `layers` spec to encoder and decoder modules.

Each spec entry gives a matched pair: the encoder layer and the decoder layer that undoes it (the
decoder runs the pairs in reverse order). Conditioned kinds build their norms and convs with the
expanded conditioning width, the output of the tokenizer's conditioning MLP.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from torch import Tensor, nn

from model.attention import LinearSpaceAttention, SpaceAttention, TimeAttention
from model.blocks import CondResidualUnit, FeedForward, GateLoopTime, ResidualStack, token_shift
from model.config import LayerSpec, TokenizerConfig
from model.sampling import SpatialDownsample2x, SpatialUpsample2x, TimeDownsample2x, TimeUpsample2x


class SpaceMixingBlock(nn.Module):
    """x + attn(x), then x + ff(x): `attend_space`, `linear_attend_space` and their cond kinds."""

    def __init__(self, attn: nn.Module, ff: FeedForward) -> None:
        super().__init__()
        self.attn = attn
        self.ff = ff

    def forward(self, x: Tensor, cond: Tensor | None = None) -> Tensor:
        x = x + self.attn(x, cond)
        return x + self.ff(x, cond)


class TimeMixingBlock(SpaceMixingBlock):
    """Causal time attention and feed-forward, each on token-shifted input (`attend_time`)."""

    def forward(self, x: Tensor, cond: Tensor | None = None) -> Tensor:
        x = x + self.attn(token_shift(x), cond)
        return x + self.ff(token_shift(x), cond)


@dataclass(frozen=True)
class LayerPair:
    encoder: nn.Module
    decoder: nn.Module
    takes_cond: bool
    """Whether both layers are called as layer(x, cond) rather than layer(x)."""


def _mixing_block(spec: LayerSpec, dim: int, config: TokenizerConfig) -> nn.Module:
    dim_cond = config.expanded_dim_cond if spec.is_conditioned else None
    kind = spec.kind.removeprefix("cond_")
    if kind == "linear_attend_space":
        attn: nn.Module = LinearSpaceAttention(
            dim,
            dim_cond=dim_cond,
            dim_head=config.linear_attn_dim_head,
            heads=config.linear_attn_heads,
        )
        return SpaceMixingBlock(attn, FeedForward(dim, dim_cond=dim_cond))
    attn_kwargs = dict(
        dim_cond=dim_cond,
        dim_head=config.attn_dim_head,
        heads=config.attn_heads,
        dropout=config.attn_dropout,
    )
    if kind == "attend_time":
        return TimeMixingBlock(
            TimeAttention(dim, **attn_kwargs), FeedForward(dim, dim_cond=dim_cond)
        )
    return SpaceMixingBlock(SpaceAttention(dim, **attn_kwargs), FeedForward(dim, dim_cond=dim_cond))


def _residual(spec: LayerSpec, dim: int, config: TokenizerConfig) -> nn.Module:
    return ResidualStack(dim, config.residual_conv_kernel_size, spec.num_units)


def _cond_residual(spec: LayerSpec, dim: int, config: TokenizerConfig) -> nn.Module:
    return CondResidualUnit(
        dim, config.residual_conv_kernel_size, dim_cond=config.expanded_dim_cond
    )


def _gateloop(spec: LayerSpec, dim: int, config: TokenizerConfig) -> nn.Module:
    return GateLoopTime(dim)


# Kinds that keep the width: one builder makes each of the two (independent) layers.
_SAME_WIDTH_BUILDERS: dict[str, Callable[[LayerSpec, int, TokenizerConfig], nn.Module]] = {
    "residual": _residual,
    "consecutive_residual": _residual,
    "cond_residual": _cond_residual,
    "gateloop_time": _gateloop,
    "attend_space": _mixing_block,
    "attend_time": _mixing_block,
    "linear_attend_space": _mixing_block,
    "cond_attend_space": _mixing_block,
    "cond_attend_time": _mixing_block,
    "cond_linear_attend_space": _mixing_block,
}


def build_layer_pair(
    spec: LayerSpec, in_dim: int, out_dim: int, config: TokenizerConfig
) -> LayerPair:
    if spec.compresses_space:
        return LayerPair(
            SpatialDownsample2x(in_dim, out_dim), SpatialUpsample2x(out_dim, in_dim), False
        )
    if spec.compresses_time:
        return LayerPair(
            TimeDownsample2x(in_dim, out_dim, reference_padding=config.reference_quirks),
            TimeUpsample2x(out_dim, in_dim),
            False,
        )
    build = _SAME_WIDTH_BUILDERS[spec.kind]
    takes_cond = spec.is_conditioned
    return LayerPair(build(spec, in_dim, config), build(spec, in_dim, config), takes_cond)
