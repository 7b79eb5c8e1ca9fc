"""The tail every benchmark shares: print the result as JSON and write it to the results file.

    from _results import write_results   # benchmarks/ is the script's directory, first on sys.path
    write_results(result, args.out)

The file is written beside its final name and renamed into place, so a benchmark killed while writing
leaves the previous results whole instead of a truncated JSON file."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Optional


def write_results(result: dict, out: Optional[str | os.PathLike]) -> None:
    """Print `result` as indented JSON; also write it to `out` (parents created) unless `out` is None."""
    text = json.dumps(result, indent=2) + "\n"
    print(text, end="", flush=True)
    if out is None:
        return
    path = Path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    partial.write_text(text)
    partial.replace(path)
