"""`python -m pipeline.train --config launch/configs/NAME.yaml [key.sub=value ...]` and the
console script `magvit-train` (see pipeline.train.cli)."""

import os
import sys

from pipeline.train.cli import main, parse_args


def run() -> None:
    """Train, then exit with main's code without interpreter teardown."""
    code = main(parse_args())
    sys.stdout.flush()
    sys.stderr.flush()
    # Skip interpreter teardown: gloo's threads have aborted the process there ("terminate
    # called without an active exception") after all work was done and saved.
    os._exit(code)


if __name__ == "__main__":
    run()
