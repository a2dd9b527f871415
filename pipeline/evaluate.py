"""`python -m pipeline.evaluate --checkpoint EXPORT --shards DIR --out DIR` (the console script
`magvit-evaluate`): evaluation on held-out shards (pipeline.inference.evaluate does the work;
`--help` lists the options)."""

import sys

from pipeline.inference.evaluate import main, parse_args


def run() -> int:
    """The console script `magvit-evaluate`."""
    return main(parse_args())


if __name__ == "__main__":
    sys.exit(run())
