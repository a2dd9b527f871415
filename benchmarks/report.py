"""Writing a benchmark's results as JSON (the file quoted in benchmarks/measured/)."""

from __future__ import annotations

import json
from pathlib import Path


def write_report(results: dict, out: Path | None) -> None:
    """Writes ``results`` to ``out`` (its folder made as needed); nothing when ``out`` is None."""
    if out is None:
        return
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2))
    print(f"wrote {out}")
