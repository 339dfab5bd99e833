"""`onellm ask` on an idle CPU and beside busy processes, with the old and the new thread settings.

In: one or more bundles (default: the demo bundle in the cache, built by the first
`onellm ask`). Out: a table on stdout, `busy_cpu.json` and `busy_cpu.md` (one Markdown
row per bundle and setting) in --out.

Each run is a fresh `python -m onellm.cli ask --json` subprocess on the IMU example, so
library start-up (where the OpenMP wait policy is read) is part of every run. For each
repetition, each competitor count (0 = idle; N = N processes spinning in `yes > /dev/null`
started before the run and killed after it) and each setting, in that nesting, so
slow drifts of the machine's load hit every cell alike. Settings (environment variables
read by runtime/_llama.py; the children's own OMP_WAIT_POLICY and GOMP_SPINCOUNT are
removed): `old` = a fixed thread count and libgomp's spin-then-sleep waiting (the
behaviour before the fix, ONELLM_ADAPTIVE_THREADS=0); `new` = the runtime's defaults
(llama.cpp's thread count follows the free cores); `passive` = a fixed thread count with
OMP_WAIT_POLICY=PASSIVE (the alternative that was measured and rejected).

Figures per cell are medians over the repetitions: TTFT (`first_token_s`: input
reading, encoding and prefill up to the first token), its parts (preprocess: the reader,
pure Python and numpy/scipy; encode: onnxruntime; prefill: llama.cpp; lib TTFT =
encode + prefill, the native-library part the thread settings govern), decode tokens/s, the
subprocess's wall time and its CPU seconds (user + system, from RUSAGE_CHILDREN). Ratios:
busy/idle TTFT, lib TTFT and idle/busy decode per setting (the targets: <= 2), and
each setting's idle figures against old's (the target: new within 5 %).

Run: `python -m onellm.benchmarks.busy_cpu [--bundle DIR ...] [--mid] [--reps 3]
[--competitors 0,1] [--policies old,new] [--max-tokens 64] [--threads N] [--out busy-cpu-out]`.
--mid adds a mid-size bundle (decoder dim 768, 8 layers, q8_0), exported into the cache
the first time (needs the export extra; a few minutes).
About 1 to 2 minutes per bundle at the defaults on the demo bundle (an `old` run beside a
busy process can take a minute by itself). The machine should otherwise be quiet: the
load average before and after is recorded.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

SCHEMA = "onellm-busy-cpu"
VERSION = 1
# setting -> the environment that selects it (runtime/_llama.py)
SETTINGS = {
    "old": {"ONELLM_ADAPTIVE_THREADS": "0", "ONELLM_WAIT_POLICY": "native"},  # before the fix
    "new": {},  # the runtime's defaults: threads follow the free cores, libgomp's own spin policy
    "passive": {"ONELLM_ADAPTIVE_THREADS": "0", "ONELLM_WAIT_POLICY": "passive"},  # fixed threads, never spin
}
POLICIES = tuple(SETTINGS)
_METRICS = ("ttft_s", "preprocess_s", "encode_s", "prefill_s", "lib_ttft_s", "decode_tok_s", "wall_s", "cpu_s")


# The mid-size bundle (--mid): the tiny preset's encoder with a wider decoder, where
# llama.cpp's compute per op is large enough for threading to pay off on an idle machine.
MID_DECODER = {"dim": 768, "n_layers": 8, "n_heads": 12, "multiple_of": 256}  # 58 MiB as q8_0


def mid_bundle(progress=print) -> Path:
    """The mid-size IMU bundle in the cache, built once (needs the export extra: torch)."""
    from onellm.ref.config import PRESET_DIR
    from onellm.runtime.bundle import cache_dir

    root = cache_dir() / "busy-cpu-mid"
    bundle = root / "bundle"
    if (bundle / "manifest.json").is_file():
        return bundle
    root.mkdir(parents=True, exist_ok=True)
    config = json.loads((PRESET_DIR / "tiny.json").read_text())
    config["name"] = "busy-cpu-mid"
    config["decoder"].update(MID_DECODER)
    (root / "mid.json").write_text(json.dumps(config, indent=1))
    cli = [sys.executable, "-m", "onellm.cli"]
    progress(f"building the mid-size bundle in {bundle} (once; a few minutes)")
    subprocess.run([*cli, "reference", "make-tiny", "--out", str(root / "ckpt"), "--config", str(root / "mid.json"),
                    "--force"], check=True)
    subprocess.run([*cli, "export", "--checkpoint", str(root / "ckpt"), "--tokenizer",
                    str(root / "ckpt" / "tokenizer.model"), "--config", str(root / "mid.json"), "--modalities", "imu",
                    "--encoder-precision", "fp32", "--decoder-quant", "q8_0", "--out", str(bundle), "--force"],
                   check=True)
    return bundle


def _load() -> list[float]:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:  # pragma: no cover - non-Unix
        return []


def _start_competitors(n: int) -> list[subprocess.Popen]:
    """n processes that keep one core each busy (`yes > /dev/null`, or a Python loop without `yes`)."""
    cmd = ["yes"] if shutil.which("yes") else [sys.executable, "-c", "while True: pass"]
    procs = [subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL) for _ in range(n)]
    time.sleep(0.2 if n else 0)  # let them reach the run queue
    return procs


def _stop(procs: list[subprocess.Popen]) -> None:
    for p in procs:
        p.send_signal(signal.SIGKILL)
    for p in procs:
        p.wait()


def child_env(policy: str, base: dict[str, str] | None = None) -> dict[str, str]:
    """The environment of one `ask` run: the setting under test and no user OpenMP/onellm thread settings."""
    if policy not in SETTINGS:
        raise ValueError(f"policy must be one of {', '.join(SETTINGS)}, not {policy!r}")
    env = dict(os.environ if base is None else base)
    for var in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "ONELLM_WAIT_POLICY", "ONELLM_ADAPTIVE_THREADS"):
        env.pop(var, None)
    env.update(SETTINGS[policy])
    return env


def ask_command(bundle: str | None, max_tokens: int, threads: int | None) -> list[str]:
    from onellm.runtime.modalities import example_file

    cmd = [sys.executable, "-m", "onellm.cli", "ask", "--imu", str(example_file("imu")), "--json", "--greedy",
           "--max-tokens", str(max_tokens)]
    if bundle:
        cmd += ["--bundle", bundle]
    if threads:
        cmd += ["--threads", str(threads)]
    return cmd + ["What is the person doing?"]


def run_once(cmd: list[str], env: dict[str, str], timeout: float) -> dict[str, float]:
    """One `ask --json` subprocess: its timings and wall time."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        raise RuntimeError(f"`{' '.join(cmd)}` ran longer than {timeout:.0f} s") from None
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"`{' '.join(cmd)}` exited {proc.returncode}: {err.decode(errors='replace')[-500:]}")
    t = json.loads(out)["timings"]
    return {"ttft_s": t["first_token_s"], "preprocess_s": t["preprocess_s"], "encode_s": t["encode_s"],
            "prefill_s": t["prefill_s"], "lib_ttft_s": t["encode_s"] + t["prefill_s"],
            "decode_tok_s": t["decode_tokens_per_s"], "wall_s": wall}


def _timed(cmd: list[str], env: dict[str, str], timeout: float) -> dict[str, float]:
    """run_once plus the child's CPU seconds (the growth of RUSAGE_CHILDREN; runs are sequential)."""
    import resource

    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    row = run_once(cmd, env, timeout)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    row["cpu_s"] = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return row


def summarise(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Median of every metric per (bundle, policy, competitors) cell."""
    cells: dict[tuple, list[dict[str, Any]]] = {}
    for r in runs:
        cells.setdefault((r["bundle"], r["policy"], r["competitors"]), []).append(r)
    out = []
    for (bundle, policy, comp), rows in cells.items():
        cell = {"bundle": bundle, "policy": policy, "competitors": comp, "runs": len(rows)}
        for m in _METRICS:
            cell[m] = statistics.median(r[m] for r in rows)
        out.append(cell)
    return out


def ratios(cells: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per bundle and setting: busy/idle TTFT, idle/busy decode, and idle change against `old`."""
    by = {(c["bundle"], c["policy"], c["competitors"]): c for c in cells}
    out = []
    for (bundle, policy, comp), c in sorted(by.items(), key=lambda kv: (kv[0][0], kv[0][1], kv[0][2])):
        idle = by.get((bundle, policy, 0))
        if comp == 0 or idle is None:
            continue
        old_idle = by.get((bundle, "old", 0))
        row = {
            "bundle": bundle, "policy": policy, "competitors": comp,
            "ttft_busy_over_idle": c["ttft_s"] / idle["ttft_s"],
            "lib_ttft_busy_over_idle": c["lib_ttft_s"] / idle["lib_ttft_s"],
            "decode_idle_over_busy": idle["decode_tok_s"] / c["decode_tok_s"] if c["decode_tok_s"] else float("inf"),
        }
        if old_idle is not None:
            row["idle_ttft_vs_old"] = idle["ttft_s"] / old_idle["ttft_s"]
            row["idle_lib_ttft_vs_old"] = idle["lib_ttft_s"] / old_idle["lib_ttft_s"]
            row["idle_decode_vs_old"] = idle["decode_tok_s"] / old_idle["decode_tok_s"]
        out.append(row)
    return out


def markdown(result: dict[str, Any]) -> str:
    nan = float("nan")
    cells = {(c["bundle"], c["policy"], c["competitors"]): c for c in result["cells"]}
    lines = [
        f"Load average before {result['load_before']}, after {result['load_after']}; "
        f"{result['reps']} repetitions, medians; {result['max_tokens']} greedy tokens; threads "
        f"{result['threads'] or 'default'}.",
        "",
        "| bundle | setting | busy procs | TTFT idle s | TTFT busy s | TTFT busy/idle | lib TTFT idle s "
        "| lib TTFT busy s | lib TTFT busy/idle | decode idle tok/s | decode busy tok/s | decode idle/busy "
        "| idle TTFT vs old | idle lib TTFT vs old | idle decode vs old |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in result["ratios"]:
        idle = cells[(r["bundle"], r["policy"], 0)]
        busy = cells[(r["bundle"], r["policy"], r["competitors"])]
        lines.append(
            f"| {Path(r['bundle']).name or r['bundle']} | {r['policy']} | {r['competitors']} "
            f"| {idle['ttft_s']:.3f} | {busy['ttft_s']:.3f} | {r['ttft_busy_over_idle']:.2f} "
            f"| {idle['lib_ttft_s']:.3f} | {busy['lib_ttft_s']:.3f} | {r['lib_ttft_busy_over_idle']:.2f} "
            f"| {idle['decode_tok_s']:.1f} | {busy['decode_tok_s']:.1f} | {r['decode_idle_over_busy']:.2f} "
            f"| {r.get('idle_ttft_vs_old', nan):.3f} | {r.get('idle_lib_ttft_vs_old', nan):.3f} "
            f"| {r.get('idle_decode_vs_old', nan):.3f} |"
        )
    return "\n".join(lines) + "\n"


def table(cells: list[dict[str, Any]]) -> str:
    head = f"{'bundle':<14} {'policy':<8} {'busy':>4} " + " ".join(f"{m:>13}" for m in _METRICS)
    rows = [head]
    for c in sorted(cells, key=lambda c: (c["bundle"], c["competitors"], c["policy"])):
        rows.append(f"{(Path(c['bundle']).name or c['bundle'])[:14]:<14} {c['policy']:<8} {c['competitors']:>4} "
                    + " ".join(f"{c[m]:>13.3f}" for m in _METRICS))
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m onellm.benchmarks.busy_cpu", description=__doc__.split("\n")[0])
    ap.add_argument("--bundle", action="append", default=None,
                    help="Bundle directory (repeatable; default: the demo bundle in the cache).")
    ap.add_argument("--mid", action="store_true",
                    help="Also run a mid-size bundle (decoder dim 768, 8 layers), built into the cache on first use.")
    ap.add_argument("--reps", type=int, default=3, help="Repetitions per cell (medians are reported).")
    ap.add_argument("--competitors", default="0,1", help="Comma-separated counts of busy processes (0 = idle).")
    ap.add_argument("--policies", default="old,new", help=f"Comma-separated settings: {', '.join(SETTINGS)}.")
    ap.add_argument("--max-tokens", type=int, default=64, help="Greedy tokens per answer.")
    ap.add_argument("--threads", type=int, default=None, help="--threads for ask (default: the runtime's).")
    ap.add_argument("--timeout", type=float, default=300.0, help="Seconds before one run counts as failed.")
    ap.add_argument("--out", default="busy-cpu-out", help="Directory for busy_cpu.json and busy_cpu.md.")
    args = ap.parse_args(argv)

    policies = [p.strip() for p in args.policies.split(",") if p.strip()]
    for p in policies:
        if p not in POLICIES:
            ap.error(f"--policies: expected names from {', '.join(POLICIES)}, found {p!r}")
    try:
        competitors = [int(x) for x in args.competitors.split(",") if x.strip()]
    except ValueError:
        ap.error(f"--competitors: expected comma-separated integers, found {args.competitors!r}")
    if args.reps < 1 or any(n < 0 for n in competitors):
        ap.error("--reps must be >= 1 and --competitors counts >= 0")
    bundles = args.bundle or [None]
    if args.mid:
        bundles.append(str(mid_bundle(lambda msg: print(msg, file=sys.stderr))))
    out_dir = Path(args.out)
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        ap.error(f"--out {out_dir}: cannot create the directory ({exc.strerror})")

    load_before = _load()
    runs: list[dict[str, Any]] = []
    for bundle in bundles:
        cmd = ask_command(bundle, args.max_tokens, args.threads)
        label = bundle or "demo"
        for rep in range(args.reps):
            for comp in competitors:
                for policy in policies:
                    procs = _start_competitors(comp)
                    try:
                        row = _timed(cmd, child_env(policy), args.timeout)
                    finally:
                        _stop(procs)
                    row.update(bundle=label, policy=policy, competitors=comp, rep=rep)
                    runs.append(row)
                    print(f"{label} rep {rep} busy {comp} {policy}: TTFT {row['ttft_s']:.3f} s, "
                          f"decode {row['decode_tok_s']:.1f} tok/s, wall {row['wall_s']:.2f} s, "
                          f"cpu {row['cpu_s']:.2f} s", file=sys.stderr)
    cells = summarise(runs)
    result = {
        "schema": SCHEMA, "version": VERSION, "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": {"cpus": os.cpu_count(), "affinity": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
                    else None, "platform": platform.platform(), "python": platform.python_version()},
        "load_before": load_before, "load_after": _load(), "reps": args.reps, "max_tokens": args.max_tokens,
        "threads": args.threads, "policies": policies, "competitors": competitors,
        "runs": runs, "cells": cells, "ratios": ratios(cells),
    }
    (out_dir / "busy_cpu.json").write_text(json.dumps(result, indent=2) + "\n")
    md = markdown(result)
    (out_dir / "busy_cpu.md").write_text(md)
    print(table(cells))
    print()
    print(md)
    print(f"wrote {out_dir / 'busy_cpu.json'} and {out_dir / 'busy_cpu.md'}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
