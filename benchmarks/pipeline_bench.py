"""`Pipeline` on the engine against the one-request Pipeline it replaced, side by side.

In: a bundle (default: the demo bundle in the cache, which must exist; `onellm ask` builds
it once) and, with --base, a source tree of the onellm to compare with (a directory holding
the package as `onellm/`, e.g. `git archive <commit> | tar -x -C BASE/onellm`).
Out: one JSON object on stdout, and a small table on stderr.

Each variant runs in a child process of its own, and the variants alternate round by round,
so both see the same machine load. Per variant, after one warm-up ask:
  ask          --asks greedy asks about one IMU recording: first_token_s (TTFT, from the
               call) and decode tokens/s, medians (the engine re-uses the encoded block and
               the cached prompt prefix here);
  new input    --asks asks, each about a new in-memory IMU recording: TTFT when everything
               is read, encoded and prefilled afresh;
  sequential   two asks (two recordings) one after the other, wall-clock;
  concurrent   the same two asks from two threads at once, wall-clock (the engine answers
               them in shared decode batches with parallel=2; the old Pipeline's lock
               queued the second behind the first).
The load average before and after is recorded: figures taken on a busy machine are only
comparable within one run.

Run: `python -m onellm.benchmarks.pipeline_bench [--bundle DIR] [--base DIR] [--rounds 3]
[--asks 5] [--max-tokens 64]`.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
INPUTS = [{"imu": str(EXAMPLES / "imu" / "walk.csv")}, {"fmri": str(EXAMPLES / "fmri" / "betas.npy")}]


def _child(bundle: str | None, asks: int, max_tokens: int) -> dict:
    import inspect

    from onellm.runtime.decoder import Sampling
    from onellm.runtime.pipeline import Pipeline

    kw = {"parallel": 2} if "parallel" in inspect.signature(Pipeline.load).parameters else {}
    sampling = Sampling.greedy(max_tokens)
    with Pipeline.load(bundle, device="cpu", **kw) as pipe:
        for inp in INPUTS:  # warm-up: sessions built, blocks read once
            pipe.ask("Warm up.", sampling=Sampling.greedy(2), **inp)
        ttft, tps, toks = [], [], []
        for i in range(asks):
            a = pipe.ask(f"What is the person doing in clip {i}?", sampling=sampling, **INPUTS[0])
            ttft.append(a.timings["first_token_s"])
            tps.append(a.timings["decode_tokens_per_s"])
            toks.append(a.timings["decode_tokens"])

        cold = []
        rng = np.random.default_rng(0)
        for i in range(asks):  # a new recording each time: read, encode and prefill from scratch
            imu = (rng.standard_normal((400, 6)) + [0, 9.81, 0, 0, 0, 0]).astype(np.float32)
            a = pipe.ask(f"What is the person doing in clip {i}?", sampling=sampling, imu=imu,
                         options={"rate": 100.0})
            cold.append(a.timings["first_token_s"])

        def one(j: int, k: int, out: list) -> None:
            out.append(pipe.ask(f"Describe recording {k} in detail.", sampling=sampling, **INPUTS[j]))

        t0 = time.perf_counter()
        seq: list = []
        for j in range(2):
            one(j, 100 + j, seq)
        t_seq = time.perf_counter() - t0
        conc: list = []
        threads = [threading.Thread(target=one, args=(j, 200 + j, conc)) for j in range(2)]
        t0 = time.perf_counter()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        t_conc = time.perf_counter() - t0
        return {"ttft_s": statistics.median(ttft), "ttft_new_input_s": statistics.median(cold), "decode_tokens_per_s": statistics.median(tps),
                "decode_tokens": statistics.median(toks), "two_sequential_s": t_seq, "two_concurrent_s": t_conc,
                "pair_tokens": [len(a.token_ids) for a in seq] + [len(a.token_ids) for a in conc],
                "parallel": kw.get("parallel", 1)}


def _run_child(src: str | None, args) -> dict:
    env = dict(os.environ)
    if src is not None:
        env["PYTHONPATH"] = src + os.pathsep + env.get("PYTHONPATH", "")
    # this file as a script: a base tree need not have it; `onellm` comes from PYTHONPATH
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", "--asks", str(args.asks),
           "--max-tokens", str(args.max_tokens)] + (["--bundle", args.bundle] if args.bundle else [])
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd="/")
    if out.returncode != 0:
        raise SystemExit(f"pipeline_bench child ({src or 'this onellm'}) failed:\n{out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bundle", default=None)
    ap.add_argument("--base", default=None, help="source root holding the onellm to compare with, as onellm/")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--asks", type=int, default=5)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        print(json.dumps(_child(args.bundle, args.asks, args.max_tokens)))
        return 0
    variants: dict[str, str | None] = {"engine": None}  # the onellm this interpreter imports
    if args.base:
        variants = {"base": args.base, **variants}
    load0 = os.getloadavg()
    runs: dict[str, list[dict]] = {k: [] for k in variants}
    for _ in range(args.rounds):
        for name, src in variants.items():
            runs[name].append(_run_child(src, args))
    load1 = os.getloadavg()
    keys = ("ttft_s", "ttft_new_input_s", "decode_tokens_per_s", "two_sequential_s", "two_concurrent_s")
    summary = {name: {k: statistics.median(r[k] for r in rs) for k in keys} | {"parallel": rs[0]["parallel"],
                                                                              "pair_tokens": rs[0]["pair_tokens"]}
               for name, rs in runs.items()}
    for s in summary.values():
        s["concurrent_speedup"] = s["two_sequential_s"] / s["two_concurrent_s"]
    out = {"loadavg_before": load0, "loadavg_after": load1, "rounds": args.rounds, "asks": args.asks,
           "max_tokens": args.max_tokens, "variants": summary, "runs": runs}
    if "base" in summary:
        b, e = summary["base"], summary["engine"]
        out["engine_vs_base"] = {"ttft": e["ttft_s"] / b["ttft_s"],
                                 "ttft_new_input": e["ttft_new_input_s"] / b["ttft_new_input_s"],
                                 "decode_tokens_per_s": e["decode_tokens_per_s"] / b["decode_tokens_per_s"],
                                 "two_concurrent_s": e["two_concurrent_s"] / b["two_concurrent_s"]}
    for name, s in summary.items():
        print(f"{name:7s} ttft {s['ttft_s'] * 1e3:7.1f} ms (new input {s['ttft_new_input_s'] * 1e3:6.1f} ms)  decode {s['decode_tokens_per_s']:7.1f} tok/s  "
              f"two asks: sequential {s['two_sequential_s']:.3f} s, concurrent {s['two_concurrent_s']:.3f} s "
              f"(x{s['concurrent_speedup']:.2f})", file=sys.stderr)
    print(f"load average {load0[0]:.2f} -> {load1[0]:.2f}", file=sys.stderr)
    print(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
