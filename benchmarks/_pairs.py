"""What the paired benchmarks (decode_pairs, block_prefill_pairs, quant_pairs) share: the
summary of per-round ratios and writing a result as JSON + Markdown."""

from __future__ import annotations

import json
import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np


def quartile_stat(xs: Sequence[float]) -> dict[str, float]:
    """Median, quartiles, min, max and count of per-round figures."""
    q = statistics.quantiles(xs, n=4) if len(xs) >= 2 else [xs[0]] * 3
    return {"median": statistics.median(xs), "q1": q[0], "q3": q[2], "min": min(xs), "max": max(xs), "n": len(xs)}


def first_question_with_block(bundle: Path) -> tuple[list[int], np.ndarray]:
    """The bench's first image question (token ids, BOS first) and random rows standing in for
    the encoder block (their values do not change the work)."""
    from .prefill_sweep import first_question

    ids, n_rows, n_embd = first_question(bundle)
    rng = np.random.default_rng(0)
    return ids, np.ascontiguousarray(rng.standard_normal((n_rows, n_embd)).astype(np.float32) * 0.02)


def shipped_decoder(path: Path, quant: str, n_ctx: int, threads: int):
    """A `Decoder` of `path` with the registry's settings for `quant`, as the runtime runs it."""
    from onellm.runtime.decoder import Decoder, context_settings_for
    from onellm.runtime.registry import decoder_quant

    return Decoder(path, n_ctx=n_ctx, n_threads=threads, use_extra_bufts=decoder_quant(quant).use_extra_bufts(),
                   **context_settings_for(quant))


def write_result(out: Path, result: dict[str, Any], markdown: str) -> None:
    """`out` (JSON) and its .md twin; the Markdown also goes to stdout."""
    out.write_text(json.dumps(result, indent=2) + "\n")
    out.with_suffix(".md").write_text(markdown)
    print(markdown, end="")
