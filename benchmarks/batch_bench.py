"""Jobs/s of `onellm batch` against the loops a user would otherwise write.

In: a bundle (default: the demo bundle in the cache, which must exist; `onellm ask` builds
it once). Out: one JSON object on stdout.

The jobs: N different IMU recordings (the example walk with seeded noise added, so the
engine's block cache and prefix reuse cannot answer a job from an earlier one), one
question each, greedy, --max-tokens new tokens. Timed in one process, side by side,
after each method's own warm-up (bundle loads excluded, reported apart):
  ask_api_only   a loop of single `pipe.ask` calls on one `Pipeline`;
  batch_p1       `run_batch` on `Engine.load(parallel=1)` (the encoder worker reads and
                 encodes the next jobs while the one slot decodes);
  batch_p2, ...  the same with more decode slots (--slots, default 1,2).
and, with --cli-jobs K > 0, as whole processes including their bundle loads:
  batch_cli      one `onellm batch JOBS --out RESULTS` process;
  ask_cli_loop   `onellm ask` processes one after another (K timed, mean scaled to N).
With --ray, `run_batch_ray` on a local Ray (its actors' loads included: Ray's overhead
as a user pays it) and the per-stage figures of docs/scale-out.md (encode ms/job,
decode tokens/s per slot). Ratios are against ask_api_only. The load average is
recorded: figures taken on a busy machine are only comparable within one run.

Run: `python -m onellm.benchmarks.batch_bench [--bundle DIR] [--jobs 16] [--max-tokens 32]
[--slots 1,2] [--cli-jobs 0] [--ray]`.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from onellm.runtime.modalities import example_file

EXAMPLE = example_file("imu")


def _write_inputs(folder: Path, n: int) -> Path:
    """N distinct recordings (walk.csv + seeded noise) and a jobs file asking about each."""
    header = EXAMPLE.read_text().splitlines()[0]
    data = np.loadtxt(EXAMPLE, delimiter=",", skiprows=1)
    rng = np.random.default_rng(0)
    lines = []
    for i in range(n):
        noisy = data.copy()
        noisy[:, 1:] += rng.normal(0.0, 0.05, size=noisy[:, 1:].shape)
        np.savetxt(folder / f"walk{i}.csv", noisy, delimiter=",", fmt="%.5f", header=header, comments="")
        lines.append(json.dumps({"id": f"j{i}", "imu": f"walk{i}.csv", "question": "What is the person doing?"}))
    path = folder / "jobs.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


def _onellm(*args: str) -> list[str]:
    return [sys.executable, "-m", "onellm.cli", *args]


def _timed(cmd: list[str]) -> float:
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - t0


def _ask_loop(bundle_dir: str, jobs, sampling, threads) -> tuple[float, float]:
    """(load seconds, seconds of the pipe.ask loop after a warm-up)."""
    from onellm.runtime.pipeline import Pipeline

    t0 = time.perf_counter()
    pipe = Pipeline.load(bundle_dir, device="cpu", threads=threads)
    load_s = time.perf_counter() - t0
    with pipe:
        pipe.ask("warm-up", imu=jobs[-1].inputs["imu"], sampling=sampling)  # first-use session builds
        t0 = time.perf_counter()
        for job in jobs:
            pipe.ask(job.questions[0], sampling=sampling, **job.inputs)
        return load_s, time.perf_counter() - t0


def _batch_engine(bundle_dir: str, jobs, sampling, threads, slots: int, out: Path) -> tuple[float, float, dict]:
    """(load seconds, seconds of run_batch after a warm-up, engine counters)."""
    from onellm.runtime.batch import ResultsFile, run_batch
    from onellm.runtime.engine import Engine, Media, Request

    t0 = time.perf_counter()
    engine = Engine.load(bundle_dir, parallel=slots, device="cpu", threads=threads)
    load_s = time.perf_counter() - t0
    with engine:
        engine.submit(Request(messages=[("user", "warm-up")], media=Media("imu", jobs[-1].inputs["imu"]),
                              sampling=sampling)).wait()
        t0 = time.perf_counter()
        with ResultsFile(out) as results:
            run_batch(engine, jobs, results, sampling=sampling)
        return load_s, time.perf_counter() - t0, engine.stats()


def _ray(bundle_dir: str, jobs, sampling, threads, slots: int, out: Path) -> dict:
    """`run_batch_ray` on a new local Ray: one encoder actor (half a CPU) and one decoder actor
    with `slots` slots, the same work as one local engine with an encoder thread."""
    import ray

    from onellm.runtime.batch import ResultsFile
    from onellm.runtime.ray_batch import RayPlan, run_batch_ray

    plan = RayPlan(encoders=1, decoders=1, slots=slots, encoder_cpus=0.5, decoder_cpus=1.0)
    t0 = time.perf_counter()
    ray.init(log_to_driver=False, include_dashboard=False)
    init_s = time.perf_counter() - t0
    try:
        with ResultsFile(out) as results:
            t0 = time.perf_counter()
            marks: list[float] = []
            state = run_batch_ray(jobs, results, bundle=bundle_dir, plan=plan, sampling=sampling, threads=threads,
                                  progress=lambda _s: marks.append(time.perf_counter()))
            total = time.perf_counter() - t0
        encode = [json.loads(x)["seconds"].get("encode", 0.0) for x in out.read_text().splitlines()]
    finally:
        ray.shutdown()
    return {"plan": dataclasses.asdict(plan), "ray_init_s": round(init_s, 3), "seconds_run": round(total, 3),
            "seconds_streaming": round(state.seconds, 3),
            "steady_jobs_per_s": round((len(marks) - 1) / (marks[-1] - marks[0]), 3) if len(marks) > 1 else None,
            "encode_ms_per_job": round(1000 * sum(encode) / max(1, len(encode)), 2)}


def _encode_ms(bundle_dir: str, jobs, threads) -> float:
    """Read + encode one job on one encoder (ms, mean over the jobs after a warm-up): the CPU stage."""
    from onellm.runtime.engine import Engine
    from onellm.runtime.pipeline import read_input

    with Engine.load(bundle_dir, parallel=1, device="cpu", threads=threads) as engine:
        enc = engine.encoder
        enc.encode("imu", read_input("imu", jobs[0].inputs["imu"]).array)
        t0 = time.perf_counter()
        for job in jobs:
            enc.encode("imu", read_input("imu", job.inputs["imu"]).array)
        return 1000 * (time.perf_counter() - t0) / len(jobs)


def run(bundle: str | None, n_jobs: int, max_tokens: int, slots: list[int], cli_jobs: int, threads: int | None,
        ray: bool) -> dict:
    from onellm.runtime.batch import read_jobs
    from onellm.runtime.decoder import Sampling
    from onellm.runtime.pipeline import default_bundle_dir

    bundle_dir = str(bundle or default_bundle_dir())
    sampling = Sampling.greedy(max_new_tokens=max_tokens)
    out: dict = {"bundle": bundle_dir, "jobs": n_jobs, "max_tokens": max_tokens, "threads": threads,
                 "load_average_before": os.getloadavg()}
    secs: dict[str, float] = {}
    loads: dict[str, float] = {}
    with tempfile.TemporaryDirectory(prefix="onellm-batch-bench-") as tmp:
        tmp = Path(tmp)
        jobs_file = _write_inputs(tmp, n_jobs)
        jobs = read_jobs(jobs_file)
        loads["pipeline"], secs["ask_api_only"] = _ask_loop(bundle_dir, jobs, sampling, threads)
        answers = {}
        for n in slots:
            loads[f"engine_p{n}"], secs[f"batch_p{n}"], stats = _batch_engine(
                bundle_dir, jobs, sampling, threads, n, tmp / f"p{n}.jsonl")
            out[f"engine_p{n}_counters"] = {k: stats.get(k, 0) for k in ("encodes", "steps", "tokens_generated")}
            answers[n] = [json.loads(x).get("token_ids") for x in (tmp / f"p{n}.jsonl").read_text().splitlines()]
        out["same_tokens_across_slots"] = all(a == answers[slots[0]] for a in answers.values())
        if cli_jobs > 0:
            common = ["--bundle", bundle_dir, "--greedy", "--max-tokens", str(max_tokens), "--device", "cpu"]
            common += ["--threads", str(threads)] if threads else []
            secs["batch_cli"] = _timed(_onellm("batch", str(jobs_file), "--out", str(tmp / "cli.jsonl"), *common))
            per_ask = [_timed(_onellm("ask", *common, "--imu", j.inputs["imu"], j.questions[0]))
                       for j in jobs[:cli_jobs]]
            secs["ask_cli_loop"] = sum(per_ask) / len(per_ask) * n_jobs
        out["stages"] = {"encode_ms_per_job": round(_encode_ms(bundle_dir, jobs, threads), 2)}
        for n in slots:
            toks = out[f"engine_p{n}_counters"]["tokens_generated"]
            out["stages"][f"decode_tokens_per_s_p{n}"] = round(toks / secs[f"batch_p{n}"], 1)
        if ray:
            out["ray"] = _ray(bundle_dir, jobs, sampling, threads, max(slots), tmp / "ray.jsonl")
            local = secs[f"batch_p{max(slots)}"]
            out["ray"]["overhead_vs_local_batch"] = {
                "streaming": round(out["ray"]["seconds_streaming"] / local - 1, 3),
                "run_with_actor_start": round(out["ray"]["seconds_run"] / (local + loads[f"engine_p{max(slots)}"]) - 1, 3)}
            if out["ray"]["steady_jobs_per_s"]:
                out["ray"]["overhead_vs_local_batch"]["steady_state"] = round(
                    (n_jobs / local) / out["ray"]["steady_jobs_per_s"] - 1, 3)
    out["load_s"] = {k: round(v, 3) for k, v in loads.items()}
    out["seconds"] = {k: round(v, 3) for k, v in secs.items()}
    out["jobs_per_s"] = {k: round(n_jobs / v, 3) for k, v in secs.items()}
    out["speedup_vs_ask_api_only"] = {k: round(secs["ask_api_only"] / v, 2) for k, v in secs.items()
                                      if k.startswith("batch_p")}
    if "batch_cli" in secs:
        out["speedup_batch_cli_vs_ask_cli_loop"] = round(secs["ask_cli_loop"] / secs["batch_cli"], 2)
    out["load_average_after"] = os.getloadavg()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bundle", default=None, help="Bundle directory (default: the demo bundle in the cache).")
    ap.add_argument("--jobs", type=int, default=16, help="Jobs per method.")
    ap.add_argument("--max-tokens", type=int, default=32, help="Greedy new tokens per job.")
    ap.add_argument("--slots", default="1,2", help="Comma list of decode-slot counts to time.")
    ap.add_argument("--cli-jobs", type=int, default=0, help="`onellm ask` processes timed (0: skip the CLI rows).")
    ap.add_argument("--threads", type=int, default=None, help="CPU threads (default: physical cores).")
    ap.add_argument("--ray", action="store_true", help="Also time `batch --ray` on a local Ray.")
    args = ap.parse_args()
    slots = [int(x) for x in args.slots.split(",") if x.strip()]
    print(json.dumps(run(args.bundle, args.jobs, args.max_tokens, slots, min(args.cli_jobs, args.jobs), args.threads,
                         args.ray), indent=2))


if __name__ == "__main__":
    main()
