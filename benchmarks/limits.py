"""How far this CPU lets the encoder and the first question's prefill go: both engines at
the model's own shapes, side by side in one run, against the machine's GEMM ceilings.

Two of issue 13's targets compare our runtime with torch bf16 on the same weights: the
CPU encoder (>= 2.5x) and the time to first token (>= 2x, which at 7B is mostly prefill).
Whole-chain figures (`onellm bench`, `openvino_encoder --chain`) say where we stand; this
says where the hardware and the engines allow us to stand.

1. **GEMMs at the encoder's shapes.** Every Linear of the CLIP trunk (257 rows for an image,
   392 for IMU) and of a UPM expert block (30 more rows; FFN 2816) timed as torch bf16
   (`F.linear`, oneDNN), as OpenVINO's static int8 FullyConnected (f32 activations ->
   QuantizeLinear -> DequantizeLinear -> MatMul with per-channel int8 weights, the form
   NNCF's graphs take, run with the CPU plugin's bf16 hint like the `ov-int8` precision; the
   activation's quantize step is in its time) and as onnxruntime's
   MatMulInteger (u8 x s8, the `int8` precision's kernel), each a one-node graph called
   from Python (a call's own overhead, tens of microseconds, is in its time). Summed over
   the encoder's layer counts, the ratio torch bf16 / int8 is the encoder's speed-up if
   nothing but its GEMMs took time in either engine.
2. **Prefill at the decoder's width.** A seeded random LLaMA-2-7B-wide decoder cut to
   --layers layers (vocabulary --vocab; the per-layer work is the 7B's) is written as an f16
   GGUF and quantized with llama.cpp to each --quants type; each file prefills the first
   question's --positions positions through llama-cpp-python (its defaults: extra buffer
   types on, so q4_0 is repacked; n_batch = n_ubatch = 512, one graph) and decodes a few
   tokens, interleaved with torch bf16 prefilling the same positions on the same weights
   (the reference decoder cast to bf16). Reported: positions/s, GFLOP/s (2 x the weights'
   multiply-adds per position plus attention) and the ratio to torch.
3. **Ceilings**: the bench's 2048^3 GEMMs (torch bf16, onnxruntime int8) in the same run.

Run: `python -m onellm.benchmarks.limits [--layers 4] [--positions 136]
[--quants q4_0,q4_k_m,q8_0,bf16,f16] [--rounds 5] [--threads 2] [--work DIR] [--out limits.json]`
(about 5 minutes at 4 layers on 2 cores; the work directory holds ~6 GB of GGUFs and is
removed unless --keep). Parts can be skipped with --no-gemm / --no-prefill.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

from onellm.benchmarks.encoder import _median_seconds

log = logging.getLogger(__name__)

SCHEMA = "onellm-limits"
VERSION = 1

LLAMA_FTYPES = {"q4_0": 2, "q8_0": 7, "q4_k_m": 15, "f16": 1, "bf16": 32}  # llama.cpp's llama_ftype values


def encoder_gemms(cfg, rows: int) -> list[tuple[str, int, int, int, int]]:
    """(name, M, K, N, count) of every Linear in the trunk on `rows` tokens and the UPM on rows + 30.

    The UPM's last block computes only its 30 read rows (as the export does); its K/V
    projections still see every row."""
    w, ffn, up = cfg.clip.width, cfg.clip.mlp_dim, cfg.upm_ffn_hidden
    layers, blocks, experts = cfg.clip.layers, cfg.upm.depth, cfg.upm.n_experts
    nq = cfg.upm.n_resample_tokens
    m = rows + nq
    out = [
        ("trunk q/k/v/out", rows, w, w, 4 * layers),
        ("trunk fc1", rows, w, ffn, layers),
        ("trunk fc2", rows, ffn, w, layers),
        ("upm wq/wk/wv/wo", m, w, w, 4 * (blocks - 1) * experts),
        ("upm w1/w3", m, w, up, 2 * (blocks - 1) * experts),
        ("upm w2", m, up, w, (blocks - 1) * experts),
        ("upm last wk/wv", m, w, w, 2 * experts),
        ("upm last wq/wo, w1/w3, w2", nq, w, w, 2 * experts),
        ("upm last w1/w3", nq, w, up, 2 * experts),
        ("upm last w2", nq, up, w, experts),
    ]
    return out


def _torch_linear(m: int, k: int, n: int) -> Callable[[], Any]:
    import torch

    g = torch.Generator().manual_seed(0)
    x = torch.randn(m, k, generator=g).bfloat16()
    wt = (torch.randn(n, k, generator=g) * 0.02).bfloat16()

    def run():
        with torch.inference_mode():
            return torch.nn.functional.linear(x, wt)

    return run


def _qdq_fc_model(m: int, k: int, n: int):
    """f32 activations -> QuantizeLinear/DequantizeLinear (u8, per tensor) -> MatMul with per-channel
    int8 weights: the form of NNCF's graphs, which OpenVINO runs as an int8 FullyConnected (fed
    u8 activations directly, the CPU plugin dequantizes them and runs the MatMul in bf16)."""
    import onnx
    from onnx import helper, numpy_helper

    rng = np.random.default_rng(0)
    w = rng.integers(-127, 128, (k, n), dtype=np.int8)
    w_scale = (rng.random(n, dtype=np.float32) * 1e-3 + 1e-4).astype(np.float32)
    inits = [numpy_helper.from_array(w, "w"), numpy_helper.from_array(w_scale, "w_scale"),
             numpy_helper.from_array(np.zeros(n, np.int8), "w_zp"),
             numpy_helper.from_array(np.array(0.03, np.float32), "x_scale"),
             numpy_helper.from_array(np.array(128, np.uint8), "x_zp")]
    nodes = [helper.make_node("QuantizeLinear", ["x", "x_scale", "x_zp"], ["xq"]),
             helper.make_node("DequantizeLinear", ["xq", "x_scale", "x_zp"], ["xd"]),
             helper.make_node("DequantizeLinear", ["w", "w_scale", "w_zp"], ["wd"], axis=1),
             helper.make_node("MatMul", ["xd", "wd"], ["y"])]
    graph = helper.make_graph(nodes, "fc", [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [m, k])],
                              [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [m, n])], initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 19)])
    model.ir_version = min(model.ir_version, 10)
    return model


def _ov_int8_fc(m: int, k: int, n: int, threads: int, core) -> Callable[[], Any]:
    import onnx
    import openvino as ov

    with tempfile.TemporaryDirectory(prefix="onellm-limits-") as tmp:
        path = Path(tmp) / "fc.onnx"
        onnx.save(_qdq_fc_model(m, k, n), str(path))
        compiled = core.compile_model(core.read_model(str(path)), "CPU", {
            "INFERENCE_NUM_THREADS": threads, "NUM_STREAMS": 1, "PERFORMANCE_HINT": "LATENCY",
            "INFERENCE_PRECISION_HINT": "bf16", "ENABLE_CPU_PINNING": False})
    req = compiled.create_infer_request()
    x = np.random.default_rng(1).standard_normal((m, k), dtype=np.float32)
    req.set_input_tensor(ov.Tensor(x))
    return req.infer


def _ort_int8_gemm(m: int, k: int, n: int, threads: int) -> Callable[[], Any]:
    """onnxruntime's MatMulInteger at m x k x n (7-bit values: exact on every MLAS kernel)."""
    from onellm.benchmarks.bench import _ort_gemm

    rng = np.random.default_rng(1)
    return _ort_gemm("MatMulInteger", rng.integers(0, 128, (m, k), dtype=np.uint8),
                     rng.integers(-64, 64, (k, n), dtype=np.int8), threads)


def gemm_part(cfg, modalities: dict[str, int], rounds: int, threads: int) -> dict[str, Any]:
    """Per modality: each encoder GEMM shape in each engine, and the summed encoder GEMM time."""
    try:
        import openvino as ov

        core = ov.Core()
    except ImportError:
        core = None
        log.warning("openvino not installed: the OpenVINO int8 column is skipped")
    out: dict[str, Any] = {}
    cache: dict[tuple[int, int, int], dict[str, float]] = {}
    for modality, rows in modalities.items():
        shapes, totals = [], {"torch_bf16": 0.0, "openvino_int8": 0.0, "onnxruntime_int8": 0.0}
        flops_total = 0.0
        for name, m, k, n, count in encoder_gemms(cfg, rows):
            key = (m, k, n)
            if key not in cache:
                engines = {"torch_bf16": _torch_linear(m, k, n), "onnxruntime_int8": _ort_int8_gemm(m, k, n, threads)}
                if core is not None:
                    engines["openvino_int8"] = _ov_int8_fc(m, k, n, threads, core)
                times: dict[str, list[float]] = {e: [] for e in engines}
                for r in range(rounds):  # engines interleaved, order rotating
                    order = list(engines)[r % len(engines):] + list(engines)[:r % len(engines)]
                    for e in order:
                        times[e].append(_median_seconds(engines[e], 5))
                cache[key] = {e: statistics.median(ts) for e, ts in times.items()}
            t = cache[key]
            flops = 2.0 * m * k * n
            flops_total += flops * count
            shapes.append({"name": name, "m": m, "k": k, "n": n, "count": count,
                           "ms": {e: v * 1e3 for e, v in t.items()},
                           "gop_s": {e: flops / v / 1e9 for e, v in t.items()}})
            for e, v in t.items():
                totals[e] += v * count
        totals = {e: v for e, v in totals.items() if v > 0}
        out[modality] = {
            "rows": rows, "shapes": shapes, "gflop": flops_total / 1e9,
            "sum_ms": {e: v * 1e3 for e, v in totals.items()},
            "gop_s": {e: flops_total / v / 1e9 for e, v in totals.items()},
            "torch_bf16_over": {e: totals["torch_bf16"] / v for e, v in totals.items() if e != "torch_bf16"},
        }
    return out


def decoder_flops_per_position(cfg, positions: int) -> float:
    """2 x multiply-adds of one position through the layers (weights + attention, causal mean)."""
    d = cfg.decoder
    weights = 4 * d.dim * d.dim + 3 * d.dim * d.ffn_hidden
    attention = 2 * d.dim * (positions + 1) / 2  # scores + weighted values, mean causal length
    return 2.0 * d.n_layers * (weights + attention)


def prefill_part(cfg, work: Path, quants: list[str], positions: int, rounds: int, threads: int,
                 new_tokens: int) -> dict[str, Any]:
    import torch

    from onellm.benchmarks.bench import _torch_generate
    from onellm.export.gguf import decoder_keys, write_gguf
    from onellm.ref.model import OneLLM
    from onellm.ref.testing import train_tiny_tokenizer
    from onellm.runtime import _llama

    torch.manual_seed(0)
    model = OneLLM(cfg).init_random_(0).eval()
    sd = model.state_dict()
    tok = train_tiny_tokenizer(work / "tokenizer", cfg.decoder.vocab_size)
    f16 = work / "decoder-f16.gguf"
    write_gguf({k: sd[k].half() for k in decoder_keys(cfg)}, cfg, tok, f16, dtype="f16")
    files = {}
    for q in quants:
        if q == "f16":
            files[q] = f16
            continue
        files[q] = work / f"decoder-{q}.gguf"
        _llama.quantize_ftype(f16, files[q], LLAMA_FTYPES[q], n_threads=threads, what=q)
    model = model.to(torch.bfloat16)
    del sd

    import llama_cpp

    llms = {q: llama_cpp.Llama(str(p), n_threads=threads, n_threads_batch=threads, n_ctx=512, n_batch=512,
                               n_ubatch=512, verbose=False) for q, p in files.items()}
    rng = np.random.default_rng(0)
    ids = [1] + [int(x) for x in rng.integers(3, cfg.decoder.vocab_size, positions - 1)]
    later = [int(x) for x in rng.integers(3, cfg.decoder.vocab_size, new_tokens)]

    def llama_run(q):
        llm = llms[q]
        llm.reset()
        t0 = time.perf_counter()
        llm.eval(ids)
        t1 = time.perf_counter()
        for t in later:
            llm.eval([t])
        return t1 - t0, new_tokens / (time.perf_counter() - t1)

    def torch_run():
        torch.set_num_threads(threads)
        with torch.inference_mode():
            pf, dec, _ = _torch_generate(model, ids, None, new_tokens + 1)
        return pf, new_tokens / dec

    runners = {**{q: (lambda q=q: llama_run(q)) for q in quants}, "torch_bf16": torch_run}
    for fn in runners.values():  # warm-up
        fn()
    got: dict[str, list[tuple[float, float]]] = {k: [] for k in runners}
    names = list(runners)
    for r in range(rounds):
        order = names[r % len(names):] + names[:r % len(names)]
        for k in order:
            got[k].append(runners[k]())
        log.info("round %d: %s", r + 1, ", ".join(f"{k} {got[k][-1][0] * 1e3:.0f} ms" for k in names))
    flops = decoder_flops_per_position(cfg, positions) * positions
    rows = {}
    for k, runs in got.items():
        pf = statistics.median(r[0] for r in runs)
        ratios = [t[0] / r[0] for t, r in zip(got["torch_bf16"], runs)]
        rows[k] = {"prefill_ms": pf * 1e3, "positions_per_s": positions / pf, "gflop_s": flops / pf / 1e9,
                   "x_torch_bf16": statistics.median(ratios), "x_torch_bf16_min": min(ratios),
                   "x_torch_bf16_max": max(ratios),
                   "decode_tok_s": statistics.median(r[1] for r in runs),
                   "file_mib": (files[k].stat().st_size / 2**20) if k in files else None}
    for llm in llms.values():
        llm.close()
    return {"layers": cfg.decoder.n_layers, "dim": cfg.decoder.dim, "ffn_hidden": cfg.decoder.ffn_hidden,
            "vocab": cfg.decoder.vocab_size, "positions": positions, "new_tokens": new_tokens,
            "gflop_per_prefill": flops / 1e9, "rows": rows,
            "per_layer_7b_note": "prefill time scales with the layer count; x 32 / layers for LLaMA-2-7B"}


def markdown(result: dict[str, Any]) -> str:
    lines = [f"Limits: {result['machine'].get('cpu_model', '?')}, {result['threads']} threads, "
             f"load average {result['load_average_start'][0]:.2f} -> {result['load_average_end'][0]:.2f}", ""]
    c = result.get("ceilings", {})
    if c:
        lines.append(f"Ceilings ({result['ceiling_n']}^3): " + ", ".join(f"{k} {v:.0f} GOP/s" for k, v in c.items()))
        lines.append("")
    for modality, g in result.get("gemm", {}).items():
        lines += [f"Encoder GEMMs, {modality} ({g['rows']} trunk rows, {g['gflop']:.0f} GOP):", "",
                  "| shape | M x K x N | count | torch bf16 GOP/s | OpenVINO int8 GOP/s | onnxruntime int8 GOP/s |",
                  "|---|---|---|---|---|---|"]
        for s in g["shapes"]:
            gs = s["gop_s"]
            lines.append(f"| {s['name']} | {s['m']} x {s['k']} x {s['n']} | {s['count']} | {gs['torch_bf16']:.0f} | "
                         f"{gs.get('openvino_int8', float('nan')):.0f} | {gs['onnxruntime_int8']:.0f} |")
        lines.append(f"| **all** | | | {g['gop_s']['torch_bf16']:.0f} ({g['sum_ms']['torch_bf16']:.0f} ms) | "
                     f"{g['gop_s'].get('openvino_int8', float('nan')):.0f} "
                     f"({g['sum_ms'].get('openvino_int8', float('nan')):.0f} ms) | "
                     f"{g['gop_s']['onnxruntime_int8']:.0f} ({g['sum_ms']['onnxruntime_int8']:.0f} ms) |")
        lines += ["", "GEMM-only encoder speed-up over torch bf16: " + ", ".join(
            f"{k} {v:.2f}x" for k, v in g["torch_bf16_over"].items()), ""]
    p = result.get("prefill")
    if p:
        lines += [f"Prefill of {p['positions']} positions, {p['layers']} layers of width {p['dim']} "
                  f"(FFN {p['ffn_hidden']}), {p['gflop_per_prefill']:.0f} GFLOP:", "",
                  "| engine | prefill ms | positions/s | GFLOP/s | x torch bf16 (min-max) | decode tok/s | file MiB |",
                  "|---|---|---|---|---|---|---|"]
        for k, r in p["rows"].items():
            fm = f"{r['file_mib']:.0f}" if r["file_mib"] else "-"
            lines.append(f"| {k} | {r['prefill_ms']:.0f} | {r['positions_per_s']:.0f} | {r['gflop_s']:.0f} | "
                         f"{r['x_torch_bf16']:.2f} ({r['x_torch_bf16_min']:.2f}-{r['x_torch_bf16_max']:.2f}) | "
                         f"{r['decode_tok_s']:.1f} | {fm} |")
        lines.append("")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    from onellm.benchmarks._pairs import write_result
    from onellm.benchmarks.bench import machine_info, measure_gemm
    from onellm.ref.config import load_preset

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="7b", help="whose encoder and decoder widths (default 7b)")
    ap.add_argument("--layers", type=int, default=4, help="decoder layers for the prefill part")
    ap.add_argument("--vocab", type=int, default=512, help="decoder vocabulary (its output layer is one row)")
    ap.add_argument("--positions", type=int, default=136, help="prefill positions (the first question's)")
    ap.add_argument("--quants", default="q4_0,q4_k_m,q8_0,bf16,f16")
    ap.add_argument("--modalities", default="image=257,imu=392", help="modality=trunk rows, comma separated")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--new-tokens", type=int, default=8)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--work", help="where the GGUFs go (default: a temporary directory)")
    ap.add_argument("--keep", action="store_true", help="keep --work's files")
    ap.add_argument("--no-gemm", action="store_true")
    ap.add_argument("--no-prefill", action="store_true")
    ap.add_argument("--ceiling-n", type=int, default=2048, help="side of the square ceiling GEMMs")
    ap.add_argument("--out", default="limits.json")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    import torch

    torch.set_num_threads(args.threads)
    cfg = load_preset(args.preset)
    result: dict[str, Any] = {"schema": SCHEMA, "version": VERSION, "preset": cfg.name, "threads": args.threads,
                              "machine": machine_info(), "load_average_start": list(os.getloadavg())}
    gemm = measure_gemm(args.ceiling_n, 3, args.threads)
    result["ceiling_n"] = args.ceiling_n
    result["ceilings"] = {k: v.gflop_s.median for k, v in gemm.rates().items()}
    if not args.no_gemm:
        mods = dict((m.split("=")[0], int(m.split("=")[1])) for m in args.modalities.split(","))
        result["gemm"] = gemm_part(cfg, mods, args.rounds, args.threads)
    if not args.no_prefill:
        dcfg = dataclasses.replace(
            cfg, clip=dataclasses.replace(cfg.clip, layers=1),
            decoder=dataclasses.replace(cfg.decoder, n_layers=args.layers, vocab_size=args.vocab))
        work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="onellm-limits-"))
        work.mkdir(parents=True, exist_ok=True)
        try:
            result["prefill"] = prefill_part(dcfg, work, [q for q in args.quants.split(",") if q], args.positions,
                                             args.rounds, args.threads, args.new_tokens)
        finally:
            if not args.keep:
                shutil.rmtree(work, ignore_errors=True)
    result["load_average_end"] = list(os.getloadavg())
    write_result(Path(args.out), result, markdown(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
