"""Our decoder as shipped vs plain llama-cpp-python on one GGUF, in ABBA-ordered paired rounds.

The bench's decode loop takes 2-3 rounds in a fixed order; on a noisy VM that cannot
decide a 3 % target. This runs more rounds, alternating the order within each round
(ours then plain, then plain then ours) so neither side always runs first, and reports
the median and quartiles of the per-round ratios:

- ours: `Decoder` with the registry's settings for the type (buffer-type policy, KV cache,
  flash attention), or each setting named in --variants (`shipped`, `on`, `off`: extra CPU
  buffer types; `adaptive`: shipped, but with no thread count given, so the thread
  governor decides each decode's threads, as `onellm ask` without --threads does), driven
  like the runtime (`Session.prefill`, greedy `generate_text`);
- plain: `llama_cpp.Llama(path, n_batch=512, n_ubatch=512)` with llama.cpp's defaults
  (extra buffer types on, f16 cache) and flash attention on, greedy `generate`.

Both prefill the bench's first image question as text (no rows) and decode --new-tokens.
Decode rates are llama_decode calls per second of decode time: ours decodes every token it
returns (the last one goes into the cache), plain's span from its first token holds n-1.
Prefill ratio: plain's prefill seconds / ours (above 1: ours faster).

By default both models live in one process, so the one loaded second may get other memory
(pages, placement) than the first: `--plain-first` loads plain llama-cpp-python before ours
(default: ours first), and a run of each order tells a load-order effect from a real
difference. `--processes` gives every model a worker process of its own, as a user's process
holds one model; the parent holds none and only tells the workers, one at a time and in the
same ABBA order, to run (stdlib multiprocessing, spawned, one pipe per worker).

Run: `python -m onellm.benchmarks.decode_pairs --bundle DIR --quant q4_0 [--variants shipped]
[--rounds 8] [--new-tokens 32] [--threads 2] [--n-ctx 1024] [--plain-first] [--processes]
[--reloads 1] [--out decode-pairs.json]`. `--reloads N` repeats the rounds N times with every
model loaded afresh, the load order swapped each time, and pools them: the order-balanced figure.
At 7B a round of one variant takes about 20 s.
"""

from __future__ import annotations

import argparse
import logging
import multiprocessing
import os
import statistics
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from ._pairs import quartile_stat, write_result

log = logging.getLogger(__name__)

SCHEMA = "onellm-decode-pairs"
VERSION = 1
Run = tuple[float, float, int]  # (prefill s, decode s, llama_decode calls in the decode span)


def _ours(path: Path, ids: list[int], extra: bool, quant: str, n_ctx: int, threads: int | None,
          new_tokens: int) -> tuple[Callable[[], Run], Any]:
    from onellm.runtime.decoder import Decoder, Sampling, context_settings_for

    from .bench import session_greedy_run

    dec = Decoder(path, n_ctx=n_ctx, n_threads=threads, use_extra_bufts=extra, **context_settings_for(quant))
    sampling = Sampling.greedy(new_tokens)

    def run() -> Run:
        prefill_s, decode_s, _tokens, decodes = session_greedy_run(dec, ids, sampling)
        return prefill_s, decode_s, decodes

    return run, dec


def _plain(path: Path, ids: list[int], n_ctx: int, threads: int, new_tokens: int) -> tuple[Callable[[], Run], Any]:
    import llama_cpp

    from .bench import _plain_llama_params, plain_greedy_run

    with _plain_llama_params(path) as (_placed, kept):
        llm = llama_cpp.Llama(str(path), n_ctx=n_ctx, n_batch=512, n_ubatch=512, n_threads=threads,
                              n_threads_batch=threads, flash_attn=True, verbose=False, seed=0)
    llm._onellm_keep = kept  # the override list must outlive the model

    def run() -> Run:
        prefill_s, decode_s, _tokens, decodes = plain_greedy_run(llm, ids, new_tokens)
        return prefill_s, decode_s, decodes

    return run, llm

def _worker(conn: Any, kind: str, args: tuple) -> None:
    """A worker process holding one model: answers "run" with (True, Run) and "stop" by closing it."""
    try:
        run, obj = _load(kind, kind, args, processes=False)
    except BaseException as e:  # noqa: BLE001 - reported to the parent, which raises it
        conn.send((False, f"{type(e).__name__}: {e}"))
        return
    conn.send((True, os.getpid()))
    try:
        while conn.recv() == "run":
            try:
                conn.send((True, run()))
            except Exception as e:  # noqa: BLE001 - the parent raises it with the worker's name
                conn.send((False, f"{type(e).__name__}: {e}"))
    finally:
        if hasattr(obj, "close"):
            obj.close()


class _Remote:
    """One model in a worker process of its own; calling it runs one timed round there."""

    def __init__(self, name: str, kind: str, args: tuple) -> None:
        ctx = multiprocessing.get_context("spawn")  # a fresh interpreter: nothing of the parent's memory
        self.name = name
        self._conn, child = ctx.Pipe()
        self._proc = ctx.Process(target=_worker, args=(child, kind, args), name=f"decode-pairs-{name}", daemon=True)
        self._proc.start()
        child.close()
        self.pid = self._answer()

    def _answer(self) -> Any:
        try:
            ok, value = self._conn.recv()
        except EOFError:
            self._proc.join(5)
            raise RuntimeError(f"the {self.name} worker exited (code {self._proc.exitcode})") from None
        if not ok:
            raise RuntimeError(f"the {self.name} worker failed: {value}")
        return value

    def __call__(self) -> Run:
        self._conn.send("run")
        return tuple(self._answer())

    def close(self) -> None:
        if self._proc.is_alive():
            try:
                self._conn.send("stop")
            except OSError:
                pass
            self._proc.join(60)
        if self._proc.is_alive():
            self._proc.kill()
            self._proc.join()
        self._conn.close()


def _load(name: str, kind: str, args: tuple, processes: bool) -> tuple[Callable[[], Run], Any]:
    if processes:
        remote = _Remote(name, kind, args)
        return remote, remote
    return (_plain if kind == "plain" else _ours)(*args)


def _cycle(path: Path, ids: list[int], quant: str, variants: Sequence[str], shipped: bool, rounds: int,
           new_tokens: int, threads: int, n_ctx: int, plain_first: bool,
           processes: bool) -> tuple[dict[str, list[Run]], dict[str, int] | None]:
    """Load every model (in the given order), warm each up, run the ABBA rounds, close them."""
    runners: dict[str, Callable[[], Run]] = {}
    owned = []
    try:
        plain_args = (path, ids, n_ctx, threads, new_tokens)
        if plain_first:
            plain_run, obj = _load("plain", "plain", plain_args, processes)
            owned.append(obj)
        for v in variants:
            extra = {"shipped": shipped, "adaptive": shipped, "on": True, "off": False}[v]
            ours_args = (path, ids, extra, quant, n_ctx, None if v == "adaptive" else threads, new_tokens)
            runners[f"ours_{v}"], obj = _load(f"ours_{v}", "ours", ours_args, processes)
            owned.append(obj)
        if not plain_first:
            plain_run, obj = _load("plain", "plain", plain_args, processes)
            owned.append(obj)
        runners["plain"] = plain_run  # last in each round's order either way: only the load order changes
        names = list(runners)
        for name in names:  # warm-up: page in the weights, build the graphs
            runners[name]()
        runs: dict[str, list[Run]] = {n: [] for n in names}
        for r in range(rounds):
            for name in names if r % 2 == 0 else names[::-1]:
                runs[name].append(runners[name]())
    finally:
        for obj in owned:
            if hasattr(obj, "close"):
                obj.close()
    return runs, ({n: r.pid for n, r in runners.items()} if processes else None)


def run_pairs(bundle: Path, quant: str, variants: Sequence[str], rounds: int, new_tokens: int, threads: int,
              n_ctx: int, plain_first: bool = False, processes: bool = False, reloads: int = 1) -> dict[str, Any]:
    """`reloads` > 1 repeats the whole measurement with every model loaded afresh, the load order
    swapped each time (`plain_first` says who loads first in the first cycle), and pools the rounds."""
    from onellm.runtime.registry import decoder_quant

    from .bench import machine_info
    from .prefill_sweep import first_question

    if rounds < 1 or new_tokens < 2 or reloads < 1:
        raise ValueError(f"need --rounds >= 1, --new-tokens >= 2 and --reloads >= 1 "
                         f"(got {rounds}, {new_tokens}, {reloads})")
    path = bundle / f"decoder-{quant}.gguf"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: the bundle has no {quant} GGUF")
    ids, _rows, _embd = first_question(bundle)
    shipped = decoder_quant(quant).use_extra_bufts()
    load_start = list(os.getloadavg())
    runs: dict[str, list[Run]] = {}
    cycles = []
    for c in range(reloads):
        first_plain = plain_first != (c % 2 == 1)
        got, pids = _cycle(path, ids, quant, variants, shipped, rounds, new_tokens, threads, n_ctx, first_plain,
                           processes)
        for name, rs in got.items():
            runs.setdefault(name, []).extend(rs)
        cycles.append({"loaded_first": "plain" if first_plain else "ours", "rounds": rounds, "processes": pids})
    names = list(runs)
    out: dict[str, Any] = {
        "schema": SCHEMA, "version": VERSION, "machine": machine_info(), "load_average_start": load_start,
        "load_average_end": list(os.getloadavg()), "gguf": str(path), "quant": quant, "shipped_extra_bufts": shipped,
        "rounds": rounds * reloads, "new_tokens": new_tokens, "prompt_tokens": len(ids), "threads": threads,
        "n_ctx": n_ctx, "loaded_first": cycles[0]["loaded_first"] if reloads == 1 else "alternating",
        "processes": cycles[0]["processes"], "cycles": cycles,
        "runs": {k: [list(r) for r in v] for k, v in runs.items()}, "vs_plain": {}}
    plain = runs["plain"]
    for name in names[:-1]:
        mine = runs[name]
        out["vs_plain"][name] = {
            "decode_ratio": quartile_stat([(a[2] / a[1]) / (b[2] / b[1]) for a, b in zip(mine, plain, strict=True)]),
            "prefill_speed_ratio": quartile_stat([b[0] / a[0] for a, b in zip(mine, plain, strict=True)]),
            "decode_tokens_per_s": statistics.median(a[2] / a[1] for a in mine),
            "prefill_s": statistics.median(a[0] for a in mine)}
    out["plain"] = {"decode_tokens_per_s": statistics.median(b[2] / b[1] for b in plain),
                    "prefill_s": statistics.median(b[0] for b in plain)}
    return out


def to_markdown(result: dict[str, Any]) -> str:
    la = result["load_average_start"][0]
    first = result.get("loaded_first", "ours")
    first = (f"load order swapped over {len(result['cycles'])} reloads" if first == "alternating"
             else f"{first} loaded first")
    where = f"each model in its own process, {first}" if result.get("processes") else f"one process, {first}"
    lines = [f"Decode pairs, {result['quant']} ({Path(result['gguf']).name}): {result['rounds']} ABBA rounds of "
             f"{result['prompt_tokens']} prompt tokens + {result['new_tokens']} greedy tokens, {result['threads']} "
             f"threads, n_ctx {result['n_ctx']}, {where}, load average "
             f"{la:.2f} -> {result['load_average_end'][0]:.2f}", "",
             "| ours | decode tok/s | plain tok/s | decode ours/plain, median (quartiles) | prefill s | plain s "
             "| prefill speed ours/plain |", "|---|---|---|---|---|---|---|"]
    p = result["plain"]
    for name, v in result["vs_plain"].items():
        d, f = v["decode_ratio"], v["prefill_speed_ratio"]
        lines.append(f"| {name} | {v['decode_tokens_per_s']:.2f} | {p['decode_tokens_per_s']:.2f} | "
                     f"{d['median']:.3f} ({d['q1']:.3f}-{d['q3']:.3f}) | {v['prefill_s']:.2f} | {p['prefill_s']:.2f} | "
                     f"{f['median']:.3f} ({f['q1']:.3f}-{f['q3']:.3f}) |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m onellm.benchmarks.decode_pairs", description=__doc__.split("\n")[0])
    ap.add_argument("--bundle", type=Path, required=True, help="An exported bundle with the GGUF to measure.")
    ap.add_argument("--quant", required=True, help="Which of its GGUFs (decoder-QUANT.gguf).")
    ap.add_argument("--variants", default="shipped",
                    help="Our settings, comma-separated: shipped (the registry's), adaptive (shipped, threads left "
                         "to the governor as ask does without --threads), on, off (extra buffer types).")
    ap.add_argument("--rounds", type=int, default=8)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--threads", type=int, default=None, help="Default: physical cores.")
    ap.add_argument("--n-ctx", type=int, default=1024)
    ap.add_argument("--plain-first", action="store_true",
                    help="Load plain llama-cpp-python's model before ours (default: ours first).")
    ap.add_argument("--reloads", type=int, default=1,
                    help="Repeat the rounds with every model loaded afresh this many times, swapping which loads "
                         "first each time, and pool them (load order balanced; with --processes: new processes).")
    ap.add_argument("--processes", action="store_true",
                    help="Give every model a worker process of its own (as a user's process holds one model) "
                         "instead of loading them all into this one.")
    ap.add_argument("--out", type=Path, default=Path("decode-pairs.json"))
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    from onellm.runtime.encoder import physical_cores

    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    bad = [v for v in variants if v not in ("shipped", "adaptive", "on", "off")]
    if bad or not variants:
        ap.error(f"--variants takes shipped, adaptive, on, off (got {args.variants!r})")
    if args.rounds < 1 or args.new_tokens < 2 or args.reloads < 1:
        ap.error("need --rounds >= 1, --new-tokens >= 2 and --reloads >= 1")
    result = run_pairs(args.bundle, args.quant, variants, args.rounds, args.new_tokens,
                       args.threads or physical_cores(), args.n_ctx, plain_first=args.plain_first,
                       processes=args.processes, reloads=args.reloads)
    write_result(args.out, result, to_markdown(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
