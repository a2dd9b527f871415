"""The program name in the usage lines of the `python -m pipeline.*` commands and their
console scripts (`magvit-train`, `magvit-evaluate`, `magvit-tokenize`)."""

from __future__ import annotations

import sys
from pathlib import Path


def command_name(module: str) -> str:
    """The console script's name (`magvit-train`) when run as one, else `python -m MODULE`
    (run as a module, or under a launcher's `--module`, sys.argv[0] is the module's file)."""
    name = Path(sys.argv[0]).name if sys.argv and sys.argv[0] else ""
    if not name or name.endswith(".py") or name in ("-c", "-m"):
        return f"python -m {module}"
    return name
