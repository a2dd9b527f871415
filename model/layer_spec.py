"""The `layers` spec: magvit2-pytorch's layer entries (`"residual"`, `("consecutive_residual", 2)`,
`("compress_time", 128)`, ...) parsed once into typed, validated `LayerSpec`s."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

LayerKind = Literal[
    "residual",
    "consecutive_residual",
    "cond_residual",
    "compress_space",
    "compress_time",
    "attend_space",
    "attend_time",
    "linear_attend_space",
    "gateloop_time",
    "cond_attend_space",
    "cond_attend_time",
    "cond_linear_attend_space",
]

LAYER_KINDS: tuple[str, ...] = LayerKind.__args__  # type: ignore[attr-defined]

# Kinds that take an argument in the reference spec, and what it means.
_LAYER_ARGUMENTS = {
    "consecutive_residual": "number of residual units (int >= 1, required)",
    "compress_space": "output dim (int >= 1, optional; default twice the input dim)",
    "compress_time": "output dim (int >= 1, optional; default twice the input dim)",
}


@dataclass(frozen=True)
class LayerSpec:
    """One entry of the `layers` spec, validated."""

    kind: str
    num_units: int = 1
    """Residual units in a `consecutive_residual` layer."""
    out_dim: int | None = None
    """Output dim of a `compress_space` / `compress_time` layer (None: twice the input dim)."""

    @property
    def is_conditioned(self) -> bool:
        return self.kind.startswith("cond_")

    @property
    def compresses_space(self) -> bool:
        return self.kind == "compress_space"

    @property
    def compresses_time(self) -> bool:
        return self.kind == "compress_time"

    def to_reference(self) -> str | tuple[str, int]:
        """The entry as magvit2-pytorch writes it."""
        if self.kind == "consecutive_residual":
            return (self.kind, self.num_units)
        if self.out_dim is not None:
            return (self.kind, self.out_dim)
        return self.kind


def parse_layer(entry: Any) -> LayerSpec:
    """Parses `"residual"`, `("consecutive_residual", 2)`, `["compress_time", 128]`, ..."""
    if isinstance(entry, LayerSpec):
        return entry
    if isinstance(entry, str):
        kind, args = entry, ()
    elif isinstance(entry, Sequence) and len(entry) >= 1 and isinstance(entry[0], str):
        kind, args = entry[0], tuple(entry[1:])
    else:
        raise ValueError(
            f"layers: each entry must be a layer name or a (name, int) tuple, got {entry!r}; "
            f"valid names: {', '.join(LAYER_KINDS)}"
        )
    if kind not in LAYER_KINDS:
        raise ValueError(
            f"layers: unknown layer type {kind!r}; valid names: {', '.join(LAYER_KINDS)}"
        )
    allowed = _LAYER_ARGUMENTS.get(kind)
    if allowed is None and args:
        raise ValueError(f"layers: {kind!r} takes no argument, got {entry!r}")
    if len(args) > 1 or any(not isinstance(a, int) or isinstance(a, bool) or a < 1 for a in args):
        raise ValueError(f"layers: {kind!r} takes one argument, the {allowed}; got {entry!r}")
    if kind == "consecutive_residual":
        if not args:
            raise ValueError(f"layers: {kind!r} needs the {allowed}; got {entry!r}")
        return LayerSpec(kind, num_units=args[0])
    return LayerSpec(kind, out_dim=args[0] if args else None)


def parse_layers(layers: Sequence[Any]) -> tuple[LayerSpec, ...]:
    if isinstance(layers, str) or not isinstance(layers, Sequence):
        raise ValueError(f"layers must be a sequence of layer entries, got {layers!r}")
    return tuple(parse_layer(entry) for entry in layers)
