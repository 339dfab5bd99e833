"""Prefill and decode speed of the GGUF decoder per file type, buffer-type policy and n_batch/n_ubatch.

What decides the time to first token once the encoder is int8: the first question's
prefill. This sweep measures it the way the runtime feeds it (runtime/decoder.py's
Session.prefill): BOS as a token batch, the encoder's rows as one embedding batch, then
the prompt text in chunks of n_batch, llama.cpp splitting each into n_ubatch graphs;
then greedy decode one token at a time. The prompt is the bench's first image question
(the bundle's v1 prompt and caption question, tokenised by its tokenizer: ~104 tokens
plus the rows, ~136 positions); the rows are seeded random unit-variance vectors (the
scale of the real block, clip_proj2's LayerNorm output).

Grid, per GGUF type: llama.cpp's extra CPU buffer types (weight repacking: CPU_REPACK)
off and on, times each n_batch/n_ubatch pair. One model load per (type, buffer types),
one context per pair, all open at once per type. Types the bundle lacks are quantised from its f16 GGUF (or
--f16) into --work with llama.cpp's quantizer: q4_0, q4_k_m, q8_0 through the registry,
bf16 by llama.cpp's raw file type (32), which the registry does not offer.

Figures per cell: prefill seconds and positions/s and decode tokens/s over
--new-tokens, the best of --repeats interleaved rounds after one warm-up (medians
beside them), and the load seconds of the model. All cells of one type are measured
round-robin, so on a shared CPU they see the same load. The
load average before and after is recorded; timings on a shared CPU are noisy, compare
cells of one run. Each context uses the type's registry settings (KV cache type, flash
attention), as the runtime would.

Run: `python -m onellm.benchmarks.prefill_sweep --bundle DIR [--quants q4_0,q4_k_m,q8_0,bf16,f16]
[--batches 512] [--ubatches 32,64,128,256,512] [--bufts off,on] [--threads 2] [--repeats 2]
[--new-tokens 16] [--work DIR] [--out DIR]`. On the bench preset (~1B decoder) a cell
takes a few seconds; at 7B about half a minute. Writes prefill_sweep.json and
prefill_sweep.md into --out (default prefill-sweep-out).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

SCHEMA = "onellm-prefill-sweep"
VERSION = 1
LLAMA_FTYPE_BF16 = 32  # llama.cpp's LLAMA_FTYPE_MOSTLY_BF16 (not a registry quantization)
RAW_TYPES = {"bf16": LLAMA_FTYPE_BF16}


def first_question(bundle: Path) -> tuple[list[int], int, int]:
    """(prompt token ids with BOS, rows inserted after BOS, n_embd) of the bench's first image question."""
    from onellm.runtime.bundle import load_manifest
    from onellm.runtime.modalities import get_modality
    from onellm.runtime.prompt import Conversation
    from onellm.runtime.tokenizer import Tokenizer

    manifest = load_manifest(bundle, verify=False).manifest
    conv = Conversation(manifest.prompt)
    conv.add_question(get_modality("image").caption_prompt)
    ids = Tokenizer(bundle / manifest.tokenizer.file).encode(conv.render(), bos=True, eos=False)
    return ids, manifest.n_inserted, manifest.n_embd


def gguf_for(quant: str, bundle: Path | None, f16: Path | None, work: Path) -> Path:
    """The GGUF of `quant`: the bundle's, else one quantised from the f16 GGUF into `work` (cached)."""
    from onellm.runtime import _llama
    from onellm.runtime.errors import ConfigError

    if bundle is not None and (bundle / f"decoder-{quant}.gguf").is_file():
        return bundle / f"decoder-{quant}.gguf"
    out = work / f"decoder-{quant}.gguf"
    if out.is_file():
        return out
    src = f16 or (bundle / "decoder-f16.gguf" if bundle is not None else None)
    if src is None or not Path(src).is_file():
        raise ConfigError(f"no {quant} GGUF in {bundle} and no f16 GGUF to quantise it from (pass --f16)")
    work.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".partial")
    log.info("quantising %s -> %s", src, out)
    if quant in RAW_TYPES:
        _llama.quantize_ftype(src, tmp, RAW_TYPES[quant], what=quant)
    else:
        _llama.quantize_model(src, tmp, quant)
    os.replace(tmp, out)
    return out


def _context_settings(quant: str) -> dict[str, Any]:
    from onellm.runtime.registry import DECODER_QUANTS

    return DECODER_QUANTS[quant].context_settings() if quant in DECODER_QUANTS else {}


def prefill_once(ctx, batch, ids: Sequence[int], block: np.ndarray) -> float:
    """One first-question prefill from an empty cache (the runtime's call sequence); seconds."""
    if block.shape[0] > ctx.n_batch:  # llama.cpp aborts the process on a batch above n_batch
        raise ValueError(f"n_batch {ctx.n_batch} is below the {block.shape[0]} rows of the block")
    ctx.memory_clear()
    t0 = time.perf_counter()
    ctx.decode(batch.tokens(ids[:1], 0, "none"))
    ctx.decode(batch.embd_view(block, 1, "none"))
    pos, text, step = 1 + block.shape[0], list(ids[1:]), ctx.n_batch
    for s in range(0, len(text), step):
        chunk = text[s:s + step]
        ctx.decode(batch.tokens(chunk, pos, "last" if s + step >= len(text) else "none"))
        pos += len(chunk)
    ctx.logits_ith(-1)
    return time.perf_counter() - t0


def decode_rate(ctx, batch, start: int, new_tokens: int) -> float:
    """Greedy tokens/s of `new_tokens` single-token decodes after a prefill of `start` positions."""
    tok = int(np.argmax(ctx.logits_ith(-1)))
    t0 = time.perf_counter()
    for i in range(new_tokens):
        ctx.decode(batch.tokens([tok], start + i, "last"))
        tok = int(np.argmax(ctx.logits_ith(-1)))
    return new_tokens / (time.perf_counter() - t0)


def sweep_quant(path: Path, quant: str, bufts: Sequence[bool], pairs: Sequence[tuple[int, int]],
                ids: Sequence[int], block: np.ndarray, threads: int, repeats: int,
                new_tokens: int) -> list[dict[str, Any]]:
    """Every (buffer types, n_batch, n_ubatch) cell of one GGUF, measured in interleaved rounds.

    Both loads (repacked or not) and every context stay open together, and each round
    visits every cell once (one prefill, one decode run), so the cells of a type share the
    same minutes of a shared CPU's load. Per cell: the fastest prefill and decode over the
    rounds (contention only ever slows a run, so the best run is the least disturbed one)
    and the median.
    """
    from onellm.runtime import _llama

    n_pos = len(ids) + block.shape[0]
    models, cells = [], []
    try:
        for extra in bufts:
            t0 = time.perf_counter()
            with _llama.capture_native_log() as lines:
                model = _llama.LlamaModel(path, n_gpu_layers=0, use_extra_bufts=extra)
            models.append(model)
            load_s = time.perf_counter() - t0
            buffers = sorted({w for line in lines for w in ("CPU_REPACK", "AMX") if w in line and "buffer size" in line})
            for n_batch, n_ubatch in pairs:
                ctx = _llama.LlamaContext(model, n_ctx=max(256, n_pos + new_tokens + 8), n_batch=n_batch,
                                          n_ubatch=n_ubatch, n_threads=threads, **_context_settings(quant))
                batch = _llama.LlamaBatch(max(ctx.n_batch, block.shape[0]))
                cells.append({"ctx": ctx, "batch": batch, "prefill": [], "decode": [],
                              # llama.cpp clamps n_batch and n_ubatch to n_ctx: the row records what the context got
                              "row": {"quant": quant, "extra_bufts": extra, "weight_buffers": buffers,
                                      "n_batch": ctx.n_batch, "n_ubatch": ctx.n_ubatch, "positions": n_pos,
                                      "load_s": load_s, "bytes": path.stat().st_size}})
        for cell in cells:  # warm-up: page faults, repacking, thread start
            prefill_once(cell["ctx"], cell["batch"], ids, block)
        for _ in range(repeats):
            for cell in cells:
                cell["prefill"].append(prefill_once(cell["ctx"], cell["batch"], ids, block))
                cell["decode"].append(decode_rate(cell["ctx"], cell["batch"], n_pos, new_tokens))
    finally:
        for cell in cells:
            cell["batch"].close()
            cell["ctx"].close()
        for model in models:
            model.close()
    rows = []
    for cell in cells:
        row, best = cell["row"], min(cell["prefill"])
        row.update(prefill_s=best, prefill_s_median=statistics.median(cell["prefill"]), prefill_tok_s=n_pos / best,
                   decode_tok_s=max(cell["decode"]), decode_tok_s_median=statistics.median(cell["decode"]))
        log.info("%s bufts=%s batch=%d ubatch=%d: prefill %.3fs (%.0f pos/s), decode %.2f tok/s", quant,
                 row["extra_bufts"], row["n_batch"], row["n_ubatch"], best, n_pos / best, row["decode_tok_s"])
        rows.append(row)
    return rows


def run_sweep(*, bundle: Path | None, quants: Sequence[str], pairs: Sequence[tuple[int, int]],
              bufts: Sequence[bool], threads: int, repeats: int, new_tokens: int, work: Path,
              f16: Path | None = None, prompt: Sequence[int] | None = None, seed: int = 0) -> dict[str, Any]:
    """The whole grid; returns the result dict (schema onellm-prefill-sweep v1)."""
    from onellm.benchmarks.bench import machine_info

    if prompt is None:
        ids, n_rows, n_embd = first_question(bundle)
    else:
        from onellm.runtime.bundle import load_manifest

        m = load_manifest(bundle, verify=False).manifest
        ids, n_rows, n_embd = list(prompt), m.n_inserted, m.n_embd
    block = np.random.default_rng(seed).standard_normal((n_rows, n_embd)).astype(np.float32)
    result: dict[str, Any] = {"schema": SCHEMA, "schema_version": VERSION, "bundle": str(bundle),
                              "machine": machine_info(), "load_average_start": list(os.getloadavg()),
                              "settings": {"threads": threads, "repeats": repeats, "new_tokens": new_tokens,
                                           "prompt_tokens": len(ids), "rows": n_rows, "pairs": [list(p) for p in pairs]},
                              "rows": []}
    for quant in quants:
        path = gguf_for(quant, bundle, f16, work)
        result["rows"] += sweep_quant(path, quant, bufts, pairs, ids, block, threads, repeats, new_tokens)
    result["load_average_end"] = list(os.getloadavg())
    result["best"] = best_settings(result["rows"])
    return result


def best_settings(rows: Sequence[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per quant, the cell with the shortest prefill, and the buffer-type setting with the fastest decode."""
    out: dict[str, dict[str, Any]] = {}
    for quant in dict.fromkeys(r["quant"] for r in rows):
        mine = [r for r in rows if r["quant"] == quant]
        fastest = min(mine, key=lambda r: r["prefill_s"])
        decode = {str(b): statistics.median(r["decode_tok_s"] for r in mine if r["extra_bufts"] == b)
                  for b in dict.fromkeys(r["extra_bufts"] for r in mine)}
        out[quant] = {"prefill": {k: fastest[k] for k in ("extra_bufts", "n_batch", "n_ubatch", "prefill_s",
                                                          "prefill_tok_s")},
                      "decode_tok_s_by_extra_bufts": decode}
    return out


def to_markdown(result: dict[str, Any]) -> str:
    m = result["machine"]
    lines = [f"Prefill sweep: {result['settings']['prompt_tokens']} prompt tokens + {result['settings']['rows']} rows, "
             f"{result['settings']['threads']} threads, CPU {m.get('cpu_model', '?')}, load average "
             f"{result['load_average_start'][0]:.2f} -> {result['load_average_end'][0]:.2f}", "",
             "| type | extra bufts | n_batch | n_ubatch | prefill s | prefill pos/s | decode tok/s | load s |",
             "|---|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        bufts = ("on (" + ",".join(r["weight_buffers"]) + ")" if r["weight_buffers"] else "on (none used)") \
            if r["extra_bufts"] else "off"
        lines.append(f"| {r['quant']} | {bufts} | {r['n_batch']} | {r['n_ubatch']} | {r['prefill_s']:.3f} | "
                     f"{r['prefill_tok_s']:.0f} | {r['decode_tok_s']:.2f} | {r['load_s']:.1f} |")
    return "\n".join(lines) + "\n"


def parse_pairs(batches: str, ubatches: str) -> list[tuple[int, int]]:
    """(n_batch, n_ubatch) pairs: each n_ubatch under each n_batch, skipping n_ubatch > n_batch."""
    out = []
    for b in (int(x) for x in batches.split(",") if x.strip()):
        for u in (int(x) for x in ubatches.split(",") if x.strip()):
            if u <= b:
                out.append((b, u))
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m onellm.benchmarks.prefill_sweep", description=__doc__.split("\n")[0])
    ap.add_argument("--bundle", type=Path, required=True, help="An exported bundle (its tokenizer, prompt and GGUFs).")
    ap.add_argument("--quants", default="q4_0,q4_k_m,q8_0,bf16,f16")
    ap.add_argument("--f16", type=Path, default=None, help="f16 GGUF to quantise missing types from (default the bundle's).")
    ap.add_argument("--batches", default="512")
    ap.add_argument("--ubatches", default="32,64,128,256,512")
    ap.add_argument("--bufts", default="off,on", choices=("off", "on", "off,on", "on,off", "both"),
                    help="Extra buffer types (weight repacking): off, on, or both (= off,on).")
    ap.add_argument("--threads", type=int, default=None, help="Default: physical cores.")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--new-tokens", type=int, default=16)
    ap.add_argument("--work", type=Path, default=None, help="Where derived GGUFs go (default <bundle>/../sweep-ggufs).")
    ap.add_argument("--out", type=Path, default=Path("prefill-sweep-out"))
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    from onellm.runtime.encoder import physical_cores

    result = run_sweep(
        bundle=args.bundle, quants=[q.strip() for q in args.quants.split(",") if q.strip()],
        pairs=parse_pairs(args.batches, args.ubatches),
        bufts=[{"off": False, "on": True}[b] for b in ("off,on" if args.bufts == "both" else args.bufts).split(",")],
        threads=args.threads or physical_cores(), repeats=args.repeats, new_tokens=args.new_tokens,
        work=args.work or args.bundle.parent / "sweep-ggufs", f16=args.f16)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "prefill_sweep.json").write_text(json.dumps(result, indent=2) + "\n")
    md = to_markdown(result)
    (args.out / "prefill_sweep.md").write_text(md)
    print(md, end="")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
