"""`python -m pipeline.tokenize ...` (the console script `magvit-tokenize`): token export of
clip shards, and `encode-file` / `decode-file` for single files (pipeline.inference.tokenize
does the work; `--help` lists the options)."""

import sys

from pipeline.inference.tokenize import main, parse_args


def run() -> int:
    """The console script `magvit-tokenize`."""
    return main(parse_args())


if __name__ == "__main__":
    sys.exit(run())
