"""Benchmark of `onellm serve` (not a test): concurrency scaling and prefix reuse over loopback HTTP.

    python -m onellm.benchmarks.serve_bench [--bundle DIR] [--levels 1,2,4,8] [--tokens 64] [--json out.json]

In-process: the engine and uvicorn on a free loopback port, and bounded client loops
(httpx, streamed requests) in threads. Without --bundle it runs the demo bundle (build
it once with `onellm export --demo`); for the issue's target pass the bench preset's
bundle (`onellm bench --preset bench` caches it under $ONELLM_CACHE_DIR/bench/).

Measures:
- per level of N concurrent streams (each doing `--rounds` requests of `--tokens` greedy
  tokens about an IMU recording): aggregate decode tokens/s (sum over the streams of
  completion tokens after the first / time from first to last token), relative to 1
  stream; the wall-clock throughput; p50/p95 time to first token;
- the same scaling for llama.cpp alone (k sequences' next tokens in one `llama_decode` per
  step, random tokens, no engine, no HTTP): the ceiling the engine is held to;
- prefix reuse: time to first token of a first question about new media (read + encode +
  full prefill) vs a second question about the same media (block and KV prefix reused).
Random weights time like real ones; the answers are meaningless. Prints a Markdown table.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import statistics
import sys
import threading
import time
from pathlib import Path
from typing import Any



def _pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    if not xs:
        return float("nan")
    k = min(len(xs) - 1, max(0, int(round(q * (len(xs) - 1)))))
    return xs[k]


def _imu_csv(start_shift: float) -> str:
    """The example IMU recording with its timestamps shifted (new content: a cache miss)."""
    from onellm.runtime.modalities import example_file

    lines = example_file("imu").read_text().splitlines()
    head, rows = lines[0], lines[1:]
    out = [head]
    for row in rows:
        cells = row.split(",")
        try:
            cells[0] = repr(float(cells[0]) + start_shift)
        except ValueError:
            pass
        out.append(",".join(cells))
    return "\n".join(out) + "\n"


def _part(csv_text: str) -> dict[str, Any]:
    data = base64.b64encode(csv_text.encode()).decode()
    return {"type": "input_imu", "input_imu": {"data": data, "format": "csv"}}


def stream_once(http, question: str, part: dict[str, Any], tokens: int) -> dict[str, float]:
    """One streamed greedy request; client-side timings."""
    body = {"messages": [{"role": "user", "content": [{"type": "text", "text": question}, part]}],
            "max_tokens": tokens, "temperature": 0, "stream": True, "stream_options": {"include_usage": True}}
    t0 = time.perf_counter()
    first = last = None
    usage = server_ttft = None
    with http.stream("POST", "/v1/chat/completions", json=body) as resp:
        if resp.status_code != 200:
            raise RuntimeError(f"HTTP {resp.status_code}: {resp.read()[:300]!r}")
        for line in resp.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            ev = json.loads(line[6:])
            now = time.perf_counter()
            if ev.get("choices") and ev["choices"][0]["delta"].get("content"):
                first = first or now
                last = now
            if ev.get("usage"):
                usage = ev["usage"]
                server_ttft = ev.get("onellm", {}).get("ttft_s")
    end = time.perf_counter()
    n = usage["completion_tokens"] if usage else 0
    first = first or end
    # time to first token: the server's (submit -> first sampled token); the client's first text
    # can come later when the first tokens are whitespace the text stream holds back
    ttft = server_ttft if server_ttft is not None else first - t0
    # decoding spans from the first sampled token to the end of the stream: timed from the
    # server's TTFT, not from the first text chunk (a random-weight model's tokens are often
    # pieces the text stream holds back or that render as nothing, so text arrives in bursts)
    t_first = t0 + ttft
    return {"ttft": ttft, "client_ttft": first - t0, "tokens": n, "decode_s": max(end - t_first, 1e-9), "t0": t0,
            "t_first": t_first, "t_end": end, "cached": (usage or {}).get("prompt_tokens_details", {}).get("cached_tokens", 0)}


def run_level(url: str, n: int, rounds: int, tokens: int, key: str | None) -> dict[str, Any]:
    import httpx

    part = _part(_imu_csv(0.0))
    results: list[dict[str, float]] = []
    errors: list[BaseException] = []
    barrier = threading.Barrier(n)

    def client(i: int) -> None:
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        with httpx.Client(base_url=url, timeout=600, headers=headers) as http:
            barrier.wait()
            for r in range(rounds):
                try:
                    results.append(stream_once(http, f"Stream {i}, round {r}: what is the person doing?", part, tokens))
                except Exception as exc:  # noqa: BLE001 - reported by the caller
                    errors.append(exc)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(n)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    if errors:
        raise RuntimeError(f"{len(errors)} requests failed: {errors[0]}")
    # aggregate decode rate: tokens after each first token over the span in which streams were decoding
    dec_tokens = sum(max(0, r["tokens"] - 1) for r in results)
    span = max(r["t_end"] for r in results) - min(r["t_first"] for r in results)
    return {"streams": n, "requests": len(results), "completion_tokens": sum(r["tokens"] for r in results),
            "wall_s": wall, "throughput_tok_s": sum(r["tokens"] for r in results) / wall,
            "decode_tok_s": dec_tokens / span if span > 0 else 0.0,
            "per_stream_decode_tok_s": statistics.median(max(0, r["tokens"] - 1) / r["decode_s"] for r in results),
            "ttft_p50_s": _pct([r["ttft"] for r in results], 0.5), "ttft_p95_s": _pct([r["ttft"] for r in results], 0.95)}


def run_prefix(url: str, repeats: int, tokens: int, key: str | None) -> dict[str, Any]:
    import httpx

    firsts, seconds, cached = [], [], []
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    with httpx.Client(base_url=url, timeout=600, headers=headers) as http:
        for i in range(repeats):
            part = _part(_imu_csv(1000.0 * (i + 1)))  # new media each time: read + encode + full prefill
            firsts.append(stream_once(http, "What is the person doing?", part, tokens)["ttft"])
            r = stream_once(http, "Is the person walking fast or slowly?", part, tokens)
            seconds.append(r["ttft"])
            cached.append(r["cached"])
    f, s = statistics.median(firsts), statistics.median(seconds)
    return {"first_ttft_s": f, "second_ttft_s": s, "ratio": s / f if f > 0 else float("nan"),
            "second_cached_tokens": statistics.median(cached), "repeats": repeats}


def raw_decode_rates(gguf: str, quant: str, levels: list[int], threads: int | None, steps: int = 32,
                     prompt: int = 130) -> dict[int, float]:
    """llama.cpp alone, no engine and no HTTP: tokens/s of k sequences decoding in one llama_decode
    batch per step, in a unified cache like the engine's (the ceiling the engine's scaling is held to)."""
    import numpy as np

    from onellm.runtime import decoder as _llama  # its public LlamaModel/LlamaContext/LlamaBatch
    from onellm.runtime.registry import decoder_quant

    q = decoder_quant(quant)
    rates: dict[int, float] = {}
    with _llama.LlamaModel(gguf, use_extra_bufts=q.use_extra_bufts()) as model:
        for k in levels:
            ctx = _llama.LlamaContext(model, n_ctx=max(levels) * (prompt + steps + 8), n_batch=512, n_threads=threads,
                                      n_seq_max=max(levels), kv_unified=True, **q.context_settings())
            batch = _llama.LlamaBatch(512)
            try:
                rng = np.random.default_rng(k)
                for seq in range(k):
                    ctx.decode(batch.tokens(rng.integers(100, 500, prompt).tolist(), 0, "last", seq_id=seq))
                t0 = time.perf_counter()
                for step in range(steps):
                    ctx.decode(batch.mixed(rng.integers(100, 500, k).tolist(), [prompt + step] * k, list(range(k)),
                                           [True] * k))
                    for i in range(k):
                        ctx.logits_ith(i)
                rates[k] = k * steps / (time.perf_counter() - t0)
            finally:
                batch.close()
                ctx.close()
    return rates


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--bundle", default=None, help="bundle directory (default: the demo bundle in the cache)")
    ap.add_argument("--levels", default="1,2,4,8", help="concurrent streams per level")
    ap.add_argument("--tokens", type=int, default=64, help="greedy tokens per request")
    ap.add_argument("--rounds", type=int, default=2, help="requests per stream per level")
    ap.add_argument("--prefix-repeats", type=int, default=3, help="first/second question pairs")
    ap.add_argument("--parallel", type=int, default=None, help="engine slots (default: the largest level)")
    ap.add_argument("--threads", type=int, default=None, help="CPU threads (default: physical cores)")
    ap.add_argument("--quant", default=None, help="which exported GGUF (default: the bundle's)")
    ap.add_argument("--json", dest="json_out", default=None, help="also write the results here")
    ap.add_argument("--no-ceiling", action="store_true", help="skip the llama.cpp-alone rows (k sequences per batch)")
    args = ap.parse_args(argv)

    from onellm.runtime.engine import Engine
    from onellm.runtime.pipeline import default_bundle_dir
    from onellm.runtime.server import ServerThread, create_app

    levels = [int(x) for x in args.levels.split(",")]
    bundle = Path(args.bundle) if args.bundle else default_bundle_dir()
    engine = Engine.load(bundle, parallel=args.parallel or max(levels), threads=args.threads, quant=args.quant)
    load = os.getloadavg()
    out: dict[str, Any] = {"bundle": str(bundle), "random_weights": engine.random_weights, "slots": engine.parallel,
                           "tokens": args.tokens, "rounds": args.rounds, "loadavg_before": load, "levels": []}
    try:
        with ServerThread(create_app(engine)) as srv:
            stream_once(__import__("httpx").Client(base_url=srv.url, timeout=600), "warm up", _part(_imu_csv(0.0)), 4)
            for n in levels:
                row = run_level(srv.url, n, args.rounds, args.tokens, None)
                out["levels"].append(row)
                print(f"serve_bench: {n} streams: {row['decode_tok_s']:.1f} decode tok/s", file=sys.stderr)
            out["prefix"] = run_prefix(srv.url, args.prefix_repeats, min(args.tokens, 8), None)
    finally:
        out["loadavg_after"] = os.getloadavg()
        out["engine"] = engine.stats()
        gguf = str(bundle / engine.manifest.decoder.quants[engine.quant].file)
        quant, threads = engine.quant, engine.ctx.n_threads
        engine.close()
    if not args.no_ceiling:
        out["raw_decode_tok_s"] = raw_decode_rates(gguf, quant, levels, threads)
    base = out["levels"][0]["decode_tok_s"] or 1.0
    lines = [f"onellm serve bench: {bundle} ({'RANDOM weights, ' if out['random_weights'] else ''}{quant}, {engine.parallel} slots, "
             f"{args.tokens} tokens x {args.rounds} rounds per stream; load {load[0]:.1f} -> {out['loadavg_after'][0]:.1f})",
             "", "| streams | decode tok/s | vs 1 | wall tok/s | per-stream tok/s | TTFT p50 | TTFT p95 "
             "| llama.cpp alone tok/s | vs 1 |",
             "|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    raw = out.get("raw_decode_tok_s") or {}
    for r in out["levels"]:
        r["decode_vs_1"] = r["decode_tok_s"] / base
        k = r["streams"]
        ceiling = (f"{raw[k]:.1f} | {raw[k] / raw[levels[0]]:.2f}x" if k in raw else "- | -")
        lines.append(f"| {k} | {r['decode_tok_s']:.1f} | {r['decode_vs_1']:.2f}x | {r['throughput_tok_s']:.1f} | "
                     f"{r['per_stream_decode_tok_s']:.1f} | {r['ttft_p50_s'] * 1e3:.0f} ms | {r['ttft_p95_s'] * 1e3:.0f} ms "
                     f"| {ceiling} |")
    p = out["prefix"]
    lines += ["", f"second question about the same media: TTFT {p['second_ttft_s'] * 1e3:.0f} ms vs first "
              f"{p['first_ttft_s'] * 1e3:.0f} ms = {p['ratio'] * 100:.0f} % ({p['second_cached_tokens']:.0f} positions reused)"]
    print("\n".join(lines))
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
