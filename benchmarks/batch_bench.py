"""Jobs/s of `onellm batch` against the two loops a user would otherwise write.

In: a bundle (default: the demo bundle in the cache, which must exist; `onellm ask` builds
it once). Out: one JSON object on stdout.

Three ways to answer the same N jobs (one IMU recording, N different questions, greedy,
--max-tokens new tokens each), all wall-clock, all including their own bundle loads:
  batch_cli     one `onellm batch JOBS --out RESULTS` process (loads the bundle once);
  ask_cli_loop  N `onellm ask` processes one after another, as a shell loop would;
  ask_api_loop  one process: `Pipeline.load`, then N `pipe.ask` calls.
and, inside that one process after the load, side by side:
  batch_api     `run_batch` (reader + encoder on a worker thread, decode on this one);
  ask_api_only  the `pipe.ask` loop without the load.
Ratios are against ask_api_loop / ask_api_only. The load average is recorded: figures
taken on a busy machine are only comparable within one run.

Run: `python -m onellm.benchmarks.batch_bench [--bundle DIR] [--jobs 16] [--max-tokens 32]
[--cli-jobs 4]` (--cli-jobs: how many `onellm ask` processes to time; their mean is scaled
to N, since each costs a whole bundle load).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path



def _questions(n: int) -> list[str]:
    return [f"What is the person doing in clip {i}?" for i in range(n)]


def _write_jobs(folder: Path, n: int) -> Path:
    from onellm.runtime.modalities import example_file

    shutil.copy(example_file("imu"), folder / "walk.csv")
    path = folder / "jobs.jsonl"
    path.write_text("".join(json.dumps({"id": f"j{i}", "imu": "walk.csv", "question": q}) + "\n"
                            for i, q in enumerate(_questions(n))))
    return path


def _onellm(*args: str) -> list[str]:
    return [sys.executable, "-m", "onellm.cli", *args]


def _timed(cmd: list[str]) -> float:
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - t0


def run(bundle: str | None, n_jobs: int, max_tokens: int, cli_jobs: int, threads: int | None) -> dict:
    from onellm.runtime.batch import ResultsFile, read_jobs, run_batch
    from onellm.runtime.decoder import Sampling
    from onellm.runtime.pipeline import Pipeline, default_bundle_dir

    bundle_dir = str(bundle or default_bundle_dir())
    common = ["--bundle", bundle_dir, "--greedy", "--max-tokens", str(max_tokens), "--device", "cpu"]
    if threads:
        common += ["--threads", str(threads)]
    out: dict = {"bundle": bundle_dir, "jobs": n_jobs, "max_tokens": max_tokens,
                 "load_average_before": os.getloadavg()}
    with tempfile.TemporaryDirectory(prefix="onellm-batch-bench-") as tmp:
        tmp = Path(tmp)
        jobs_file = _write_jobs(tmp, n_jobs)
        secs = {}
        secs["batch_cli"] = _timed(_onellm("batch", str(jobs_file), "--out", str(tmp / "cli.jsonl"), *common))
        per_ask = [_timed(_onellm("ask", "--imu", str(tmp / "walk.csv"), *common, q))
                   for q in _questions(n_jobs)[:cli_jobs]]
        secs["ask_cli_loop"] = sum(per_ask) / len(per_ask) * n_jobs
        out["ask_cli_timed"] = len(per_ask)

        sampling = Sampling.greedy(max_new_tokens=max_tokens)
        t0 = time.perf_counter()
        pipe = Pipeline.load(bundle_dir, device="cpu", threads=threads)
        load_s = time.perf_counter() - t0
        with pipe:
            pipe.ask("warm-up", imu=str(tmp / "walk.csv"), sampling=sampling)  # first-use session builds
            t0 = time.perf_counter()
            for q in _questions(n_jobs):
                pipe.ask(q, imu=str(tmp / "walk.csv"), sampling=sampling)
            secs["ask_api_only"] = time.perf_counter() - t0
            secs["ask_api_loop"] = secs["ask_api_only"] + load_s
            t0 = time.perf_counter()
            with ResultsFile(tmp / "api.jsonl") as results:
                run_batch(pipe, read_jobs(jobs_file), results, sampling=sampling)
            secs["batch_api"] = time.perf_counter() - t0
    out["bundle_load_s"] = round(load_s, 3)
    out["seconds"] = {k: round(v, 3) for k, v in secs.items()}
    out["jobs_per_s"] = {k: round(n_jobs / v, 3) for k, v in secs.items()}
    out["speedup"] = {
        "batch_cli_vs_ask_cli_loop": round(secs["ask_cli_loop"] / secs["batch_cli"], 2),
        "batch_cli_vs_ask_api_loop": round(secs["ask_api_loop"] / secs["batch_cli"], 2),
        "batch_api_vs_ask_api_only": round(secs["ask_api_only"] / secs["batch_api"], 2),
    }
    out["load_average_after"] = os.getloadavg()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bundle", default=None, help="Bundle directory (default: the demo bundle in the cache).")
    ap.add_argument("--jobs", type=int, default=16, help="Jobs per method.")
    ap.add_argument("--max-tokens", type=int, default=32, help="Greedy new tokens per job.")
    ap.add_argument("--cli-jobs", type=int, default=4, help="`onellm ask` processes timed (scaled to --jobs).")
    ap.add_argument("--threads", type=int, default=None, help="CPU threads (default: physical cores).")
    args = ap.parse_args()
    print(json.dumps(run(args.bundle, args.jobs, args.max_tokens, max(1, min(args.cli_jobs, args.jobs)), args.threads),
                     indent=2))


if __name__ == "__main__":
    main()
