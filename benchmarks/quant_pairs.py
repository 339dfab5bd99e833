"""Which GGUF type of a bundle answers a first question fastest: the types side by side in
ABBA-ordered rounds, as the runtime ships them.

`onellm export` writes one decoder type as the bundle's default. Comparing types across bench
runs is unsafe on a noisy machine (identical prefills moved by 20 % between runs here), so
this loads every type named in --quants in one process and, in each round, runs each once:
the bench's first image question from an empty cache (BOS, random rows standing in for the
encoder block, the text: one embedding batch, as shipped) and --new-tokens greedy tokens,
with the registry's settings for the type. The order of the types rotates from round to
round. Reported per type: median prefill seconds and decode tokens/s, and the per-round
ratios against the first type (prefill: its seconds / the first's; decode: its rate / the
first's), median and quartiles.

Run: `python -m onellm.benchmarks.quant_pairs --bundle DIR [--quants q4_0,q4_k_m] [--rounds 8]
[--new-tokens 32] [--threads 2] [--n-ctx 512] [--out quant-pairs.json]`.
"""

from __future__ import annotations

import argparse
import logging
import os
import statistics
from pathlib import Path
from typing import Any

from ._pairs import first_question_with_block, quartile_stat, shipped_decoder, write_result

log = logging.getLogger(__name__)

SCHEMA = "onellm-quant-pairs"
VERSION = 1



def run_pairs(bundle: Path, quants: list[str], rounds: int, new_tokens: int, threads: int, n_ctx: int) -> dict[str, Any]:
    from onellm.runtime.decoder import Sampling

    from .bench import machine_info, session_greedy_run

    if len(quants) < 2 or len(set(quants)) != len(quants) or rounds < 1 or new_tokens < 2:
        raise ValueError(f"need two or more distinct types, --rounds >= 1, --new-tokens >= 2 (got {quants}, "
                         f"{rounds}, {new_tokens})")
    paths = {q: bundle / f"decoder-{q}.gguf" for q in quants}
    missing = [str(p) for p in paths.values() if not p.is_file()]
    if missing:
        raise FileNotFoundError(f"{', '.join(missing)}: not in the bundle")
    ids, block = first_question_with_block(bundle)
    n_rows = block.shape[0]
    sampling = Sampling.greedy(new_tokens)
    decoders: dict[str, Any] = {}
    runs: dict[str, list[tuple[float, float, int]]] = {q: [] for q in quants}
    try:
        for q in quants:
            decoders[q] = shipped_decoder(paths[q], q, n_ctx, threads)
        load_start = list(os.getloadavg())
        for q in quants:  # warm-up: page in the weights, build the graphs
            session_greedy_run(decoders[q], ids, sampling, block)
        for r in range(rounds):
            k = r % len(quants)
            for q in quants[k:] + quants[:k]:
                prefill_s, decode_s, _tokens, decodes = session_greedy_run(decoders[q], ids, sampling, block)
                runs[q].append((prefill_s, decode_s, decodes))
                log.info("round %d %s: prefill %.3f s, decode %.2f tok/s", r, q, prefill_s, decodes / decode_s)
    finally:
        for d in decoders.values():
            d.close()
    base = quants[0]
    out: dict[str, Any] = {
        "schema": SCHEMA, "version": VERSION, "machine": machine_info(), "bundle": str(bundle), "quants": quants,
        "rounds": rounds, "new_tokens": new_tokens, "threads": threads, "n_ctx": n_ctx,
        "positions": len(ids) + n_rows, "load_average_start": load_start, "load_average_end": list(os.getloadavg()),
        "runs": {q: [list(x) for x in v] for q, v in runs.items()}, "types": {}}
    for q in quants:
        mine, first = runs[q], runs[base]
        out["types"][q] = {
            "prefill_s": statistics.median(x[0] for x in mine),
            "decode_tokens_per_s": statistics.median(x[2] / x[1] for x in mine),
            "prefill_over_first": quartile_stat([a[0] / b[0] for a, b in zip(mine, first, strict=True)]),
            "decode_over_first": quartile_stat([(a[2] / a[1]) / (b[2] / b[1]) for a, b in zip(mine, first, strict=True)]),
        }
    return out


def to_markdown(result: dict[str, Any]) -> str:
    base = result["quants"][0]
    lines = [f"First question by GGUF type ({result['positions']} positions, {result['new_tokens']} greedy tokens), "
             f"{result['rounds']} rotating rounds, {result['threads']} threads, load average "
             f"{result['load_average_start'][0]:.2f} -> {result['load_average_end'][0]:.2f}", "",
             f"| type | prefill s | decode tok/s | prefill time / {base}'s, per round | decode rate / {base}'s, per round |",
             "|---|---|---|---|---|"]
    for q, v in result["types"].items():
        p, d = v["prefill_over_first"], v["decode_over_first"]
        lines.append(f"| {q} | {v['prefill_s']:.2f} | {v['decode_tokens_per_s']:.2f} | {p['median']:.3f} "
                     f"({p['q1']:.3f}-{p['q3']:.3f}) | {d['median']:.3f} ({d['q1']:.3f}-{d['q3']:.3f}) |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m onellm.benchmarks.quant_pairs", description=__doc__.split("\n")[0])
    ap.add_argument("--bundle", type=Path, required=True, help="An exported bundle with the GGUFs to compare.")
    ap.add_argument("--quants", default="q4_0,q4_k_m", help="Comma-separated types; ratios are against the first.")
    ap.add_argument("--rounds", type=int, default=8)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--threads", type=int, default=None, help="Default: physical cores.")
    ap.add_argument("--n-ctx", type=int, default=512, help="Default: what `ask` sizes for a first question.")
    ap.add_argument("--out", type=Path, default=Path("quant-pairs.json"))
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    from onellm.runtime.encoder import physical_cores

    quants = [q.strip() for q in args.quants.split(",") if q.strip()]
    result = run_pairs(args.bundle, quants, args.rounds, args.new_tokens, args.threads or physical_cores(), args.n_ctx)
    write_result(args.out, result, to_markdown(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
