"""What the paired benchmarks (decode_pairs, block_prefill_pairs, quant_pairs) share: the
summary of per-round ratios and writing a result as JSON + Markdown."""

from __future__ import annotations

import json
import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import Any


def quartile_stat(xs: Sequence[float]) -> dict[str, float]:
    """Median, quartiles, min, max and count of per-round figures."""
    q = statistics.quantiles(xs, n=4) if len(xs) >= 2 else [xs[0]] * 3
    return {"median": statistics.median(xs), "q1": q[0], "q3": q[2], "min": min(xs), "max": max(xs), "n": len(xs)}


def write_result(out: Path, result: dict[str, Any], markdown: str) -> None:
    """`out` (JSON) and its .md twin; the Markdown also goes to stdout."""
    out.write_text(json.dumps(result, indent=2) + "\n")
    out.with_suffix(".md").write_text(markdown)
    print(markdown, end="")
