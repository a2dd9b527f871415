"""The layers of the reference card's usage example (../shared/reference/videotokenizer-card.txt):
the configuration the model, encode and training benchmarks all time."""

CARD_LAYERS = (
    "residual",
    "compress_space",
    "residual",
    "compress_time",
    "attend_space",
    "residual",
)
