"""Torch eager bf16 rows at 7B: encode, prefill and decode of the bench's image and IMU questions.

`onellm bench` times torch in fp32 first (its reference block) and then bf16; a 7B model
in fp32 (27 GB) does not fit a 24 GiB machine, so at 7B the bench runs with --no-torch
and this script gives the torch bf16 rows the targets compare with (best TTFT >= 2x and
decode >= 2.5x torch bf16). It loads the bench's cached 7B checkpoint as bf16 (one cast
copy, ~14.7 GB with the encoder; the fp16 file's pages are dropped as they are cast),
then per modality: the bf16 encoder on the example file, the first question's prefill
(prompt + rows) and greedy decode, the same prompts as the bench. Refuses to start
when MemAvailable is below --min-free-gib (default 18): never two 7B models at once.

Run: `python -m onellm.benchmarks.torch_7b [--work DIR] [--repeats 2] [--warmup 1]
[--new-tokens 16] [--threads 2] [--out torch7b.json]` after `onellm bench --preset 7b
--synthesize` has built the cache.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import time
from pathlib import Path
from typing import Any

import numpy as np


log = logging.getLogger(__name__)


def mem_available_gib() -> float:
    with open("/proc/meminfo") as fh:
        return next(int(line.split()[1]) for line in fh if line.startswith("MemAvailable:")) / 2**20


def torch_row(modality: str, encode_s: list[float], gen_runs: list[tuple], new_tokens: int, n_prefill: int,
              source: Any) -> dict[str, Any]:
    """One modality's row (what targets_7b reads) from the encode times and the
    (prefill s, decode s, ...) runs of `bench._torch_generate`."""
    from onellm.benchmarks import bench

    enc = bench.summarize(encode_s)
    prefill = bench.summarize([r[0] for r in gen_runs])
    decode = bench.summarize([(new_tokens - 1) / r[1] for r in gen_runs])
    return {"modality": modality, "backend": "torch", "dtype": "bf16", "encode_s": dataclasses.asdict(enc),
            "prefill_s": dataclasses.asdict(prefill), "prefill_positions": n_prefill,
            "prefill_tok_s": n_prefill / prefill.median, "decode_tok_s": dataclasses.asdict(decode),
            "ttft_s": enc.median + prefill.median, "preprocess_source": source}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m onellm.benchmarks.torch_7b", description=__doc__.split("\n")[0])
    ap.add_argument("--work", type=Path, default=None, help="The 7b bench cache (default: the bench's).")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--new-tokens", type=int, default=16)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--min-free-gib", type=float, default=18.0)
    ap.add_argument("--out", type=Path, default=Path("torch7b.json"))
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")

    import torch

    from onellm.benchmarks import bench
    from onellm.ref.checkpoint import load_model
    from onellm.runtime.encoder import physical_cores
    from onellm.runtime.modalities import get_modality
    from onellm.runtime.prompt import V1_PROMPT, Conversation
    from onellm.runtime.tokenizer import Tokenizer

    free = mem_available_gib()
    if free < args.min_free_gib:
        log.error("only %.1f GiB available (< %.0f): not loading a 7B bf16 model", free, args.min_free_gib)
        return 2
    torch.set_num_threads(args.threads or physical_cores())
    cfg = bench.bench_config(bench.BenchOptions(preset="7b"))
    work = args.work or bench.default_work_dir(cfg)
    # the bench's inputs and first questions, without needing the exported bundle
    tokenizer = Tokenizer(work / "tokenizer" / "tokenizer.model")
    sources = bench.modality_sources(cfg.modalities, work)
    inputs, prompt = {}, {}
    rng = np.random.default_rng(0)
    for m in cfg.modalities:
        spec = get_modality(m)
        arr = bench.read_source(m, sources[m]).array if m in sources else spec.dummy_input(rng)
        inputs[m] = np.ascontiguousarray(arr, dtype=np.float32)
        conv = Conversation(V1_PROMPT)
        conv.add_question(spec.caption_prompt)
        prompt[m] = tokenizer.encode(conv.render(), bos=True, eos=False)
    result = {"machine": bench.machine_info(), "load_average_start": list(os.getloadavg()),
              "mem_available_gib_start": free, "threads": torch.get_num_threads(), "rows": []}
    t0 = time.perf_counter()
    model, _ = load_model(cfg, work / "checkpoint" / "consolidated.00-of-01.pth", dtype="bf16")
    result["load_s"] = time.perf_counter() - t0
    result["rss_mib_after_load"] = bench.rss_mib()
    with torch.inference_mode():
        for m, arr in inputs.items():
            x = torch.from_numpy(arr)[None]

            def encode(m=m, x=x):
                t = time.perf_counter()
                out = model.encode(m, x)
                return time.perf_counter() - t, out

            enc_runs, (_, block) = bench.repeat(encode, args.repeats, args.warmup)
            block = block.float()
            gen_runs, _ = bench.repeat(
                lambda: bench._torch_generate(model, prompt[m], block, args.new_tokens), args.repeats, args.warmup)
            row = torch_row(m, [r[0] for r in enc_runs], gen_runs, args.new_tokens,
                            len(prompt[m]) + cfg.n_inserted, sources.get(m, "dummy_input"))
            log.info("%s: encode %.2fs, prefill %.2fs (%.1f pos/s), decode %.2f tok/s", m, row["encode_s"]["median"],
                     row["prefill_s"]["median"], row["prefill_tok_s"], row["decode_tok_s"]["median"])
            result["rows"].append(row)
    result["peak_rss_mib"] = bench.peak_rss_mib()
    result["load_average_end"] = list(os.getloadavg())
    args.out.write_text(json.dumps(result, indent=2, default=str) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
