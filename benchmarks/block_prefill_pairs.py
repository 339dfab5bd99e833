"""The first question's prefill with an input block: the whole prompt as one embedding batch
(as shipped) against BOS, block and text as three batches (before), in ABBA-ordered paired rounds.

A `llama_batch` holds tokens or embeddings. Before, a first question with an input cost three
llama_decode calls: BOS alone, the block's rows, the text. Each graph is a pass over the
weights, and ggml's kernels handle rows in groups (4 with repacked 4-bit weights), so the
rows left over in each graph cost extra. The runtime now reads BOS's and the text's embedding
rows from the GGUF (`LlamaModel.embedding_rows`) and sends one batch.

Both sides use one `Decoder` (one model in memory, the registry's settings for the type) and
prefill from an empty cache: the bench's first image question, with random rows standing in
for the encoder block (their values do not change the work). Each round runs both sides, the
order alternating; the report gives the median and quartiles of split seconds / merged
seconds per round, and the median seconds saved.

Run: `python -m onellm.benchmarks.block_prefill_pairs --bundle DIR --quant q4_0 [--rounds 8]
[--threads 2] [--n-ctx 512] [--out block-prefill-pairs.json]`.
"""

from __future__ import annotations

import argparse
import logging
import os
import time
from pathlib import Path
from typing import Any

import numpy as np

from ._pairs import first_question_with_block, quartile_stat, shipped_decoder, write_result

log = logging.getLogger(__name__)

SCHEMA = "onellm-block-prefill-pairs"
VERSION = 1
SIDES = ("merged", "split")


def _prefill(dec, ids: list[int], block: np.ndarray, split: bool) -> tuple[float, int]:
    """(seconds, llama_decode calls) of one first-question prefill from an empty cache."""
    model = dec._model
    if split:  # the path before: no embedding rows, so BOS and the text go as tokens
        model.embedding_rows = lambda: None
    try:
        s = dec.session()
        t0 = time.perf_counter()
        s.prefill(ids, block)
        dt = time.perf_counter() - t0
    finally:
        if split:
            del model.embedding_rows  # back to the class's method
    return dt, s.decode_calls



def run_pairs(bundle: Path, quant: str, rounds: int, threads: int, n_ctx: int) -> dict[str, Any]:
    from .bench import machine_info

    if rounds < 1:
        raise ValueError(f"need --rounds >= 1 (got {rounds})")
    path = bundle / f"decoder-{quant}.gguf"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: the bundle has no {quant} GGUF")
    ids, block = first_question_with_block(bundle)
    n_rows = block.shape[0]
    runs: dict[str, list[tuple[float, int]]] = {side: [] for side in SIDES}
    with shipped_decoder(path, quant, n_ctx, threads) as dec:
        if dec._model.embedding_rows() is None:
            raise RuntimeError(f"{path}: no token embedding rows (its type has no ggml converter)")
        load_start = list(os.getloadavg())
        for side in SIDES:  # warm-up: page in the weights, build the graphs
            _prefill(dec, ids, block, side == "split")
        for r in range(rounds):
            for side in SIDES if r % 2 == 0 else SIDES[::-1]:
                runs[side].append(_prefill(dec, ids, block, side == "split"))
                log.info("round %d %s: %.3f s, %d decodes", r, side, *runs[side][-1])
    merged, split = runs["merged"], runs["split"]
    return {
        "schema": SCHEMA, "version": VERSION, "machine": machine_info(), "gguf": str(path), "quant": quant,
        "rounds": rounds, "threads": threads, "n_ctx": n_ctx, "prompt_tokens": len(ids), "rows": n_rows,
        "positions": len(ids) + n_rows, "load_average_start": load_start, "load_average_end": list(os.getloadavg()),
        "runs": {side: [list(x) for x in v] for side, v in runs.items()},
        "decode_calls": {side: runs[side][0][1] for side in SIDES},
        "merged_s": quartile_stat([m[0] for m in merged]), "split_s": quartile_stat([s[0] for s in split]),
        "split_over_merged": quartile_stat([s[0] / m[0] for m, s in zip(merged, split, strict=True)]),
        "saved_s": quartile_stat([s[0] - m[0] for m, s in zip(merged, split, strict=True)]),
    }


def to_markdown(result: dict[str, Any]) -> str:
    r, m, s, saved = result["split_over_merged"], result["merged_s"], result["split_s"], result["saved_s"]
    return (
        f"First-question prefill, {result['quant']} ({Path(result['gguf']).name}): {result['positions']} positions "
        f"(BOS, {result['rows']} rows, {result['prompt_tokens'] - 1} text tokens), {result['rounds']} ABBA rounds, "
        f"{result['threads']} threads, load average {result['load_average_start'][0]:.2f} -> "
        f"{result['load_average_end'][0]:.2f}\n\n"
        "| prompt | llama_decode calls | prefill s, median (min-max) |\n|---|---|---|\n"
        f"| one embedding batch (shipped) | {result['decode_calls']['merged']} | {m['median']:.3f} ({m['min']:.3f}-{m['max']:.3f}) |\n"
        f"| BOS, block, text apart (before) | {result['decode_calls']['split']} | {s['median']:.3f} ({s['min']:.3f}-{s['max']:.3f}) |\n\n"
        f"Per round, split / merged: median {r['median']:.3f} (quartiles {r['q1']:.3f}-{r['q3']:.3f}); "
        f"saved {saved['median'] * 1e3:.0f} ms (quartiles {saved['q1'] * 1e3:.0f}-{saved['q3'] * 1e3:.0f}).\n"
    )


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m onellm.benchmarks.block_prefill_pairs",
                                 description=__doc__.split("\n")[0])
    ap.add_argument("--bundle", type=Path, required=True, help="An exported bundle with the GGUF to measure.")
    ap.add_argument("--quant", required=True, help="Which of its GGUFs (decoder-QUANT.gguf).")
    ap.add_argument("--rounds", type=int, default=8)
    ap.add_argument("--threads", type=int, default=None, help="Default: physical cores.")
    ap.add_argument("--n-ctx", type=int, default=512, help="Default: what `ask` sizes for a first question.")
    ap.add_argument("--out", type=Path, default=Path("block-prefill-pairs.json"))
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    from onellm.runtime.encoder import physical_cores

    result = run_pairs(args.bundle, args.quant, args.rounds, args.threads or physical_cores(), args.n_ctx)
    write_result(args.out, result, to_markdown(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
