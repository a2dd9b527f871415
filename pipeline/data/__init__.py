"""Training and evaluation data: shard loading (loader), per-sample stages (stages), frame
decoding (decode) and tar reading (tar_stream)."""
