"""The UPM's attention core in onnxruntime: the exported op chain against a fused
`com.microsoft.MultiHeadAttention`, at the UPM's shapes, interleaved.

The int8 profile (RESULTS.md) puts ~90 ms of an image's UPM in its attention core, which
dynamic quantization leaves in fp32: per block, Q/K/V reshaped to heads and transposed, Q.K^T,
the scale, softmax, .V, transposed and reshaped back. This measures whether onnxruntime's
fused CPU kernel for that pattern is faster, on random inputs of the UPM's sizes: 21 full
blocks (3 experts x 7) with 30 + L query rows and 3 last blocks with 30 (the export computes
only the rows that are read). Outputs are checked to agree (max |diff|).

Run: `python -m onellm.benchmarks.upm_attention [--tokens 257] [--width 1024] [--heads 16]
[--rounds 7] [--threads 2] [--out upm-attention.json]`.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path
from typing import Any

import numpy as np

SCHEMA = "onellm-upm-attention"
VERSION = 1
N_OUT = 30  # resample tokens: the rows the UPM's last block computes


def _graph(kind: str, sq: int, s: int, width: int, heads: int):
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    hd = width // heads

    def const(name, value, dtype):
        return helper.make_node("Constant", [], [name], value=numpy_helper.from_array(np.array(value, dtype=dtype), name))

    if kind == "fused":
        nodes = [helper.make_node("MultiHeadAttention", ["q", "k", "v"], ["o"], domain="com.microsoft", num_heads=heads)]
    else:  # the exported pattern
        nodes = [
            const("shq", [-1, sq, heads, hd], np.int64), const("shk", [-1, s, heads, hd], np.int64),
            const("sho", [-1, sq, width], np.int64), const("scale", hd**-0.5, np.float32),
            helper.make_node("Reshape", ["q", "shq"], ["q4"]),
            helper.make_node("Transpose", ["q4"], ["qt"], perm=[0, 2, 1, 3]),
            helper.make_node("Reshape", ["k", "shk"], ["k4"]),
            helper.make_node("Transpose", ["k4"], ["kt"], perm=[0, 2, 3, 1]),
            helper.make_node("Reshape", ["v", "shk"], ["v4"]),
            helper.make_node("Transpose", ["v4"], ["vt"], perm=[0, 2, 1, 3]),
            helper.make_node("MatMul", ["qt", "kt"], ["scores"]),
            helper.make_node("Mul", ["scores", "scale"], ["scaled"]),
            helper.make_node("Softmax", ["scaled"], ["probs"], axis=-1),
            helper.make_node("MatMul", ["probs", "vt"], ["o4"]),
            helper.make_node("Transpose", ["o4"], ["ot"], perm=[0, 2, 1, 3]),
            helper.make_node("Reshape", ["ot", "sho"], ["o"]),
        ]
    f = TensorProto.FLOAT
    graph = helper.make_graph(
        nodes, f"attention_{kind}",
        [helper.make_tensor_value_info("q", f, [1, sq, width]), helper.make_tensor_value_info("k", f, [1, s, width]),
         helper.make_tensor_value_info("v", f, [1, s, width])],
        [helper.make_tensor_value_info("o", f, [1, sq, width])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)])
    onnx.checker.check_model(model)
    return model.SerializeToString()


def run(tokens: int, width: int, heads: int, rounds: int, threads: int) -> dict[str, Any]:
    import onnxruntime as ort

    from .bench import machine_info

    if width % heads or rounds < 1:
        raise ValueError(f"need width divisible by heads and rounds >= 1 (got {width}, {heads}, {rounds})")
    s = N_OUT + tokens
    opts = ort.SessionOptions()
    opts.intra_op_num_threads, opts.inter_op_num_threads = threads, 1
    rng = np.random.default_rng(0)
    kv = {"k": rng.standard_normal((1, s, width), dtype=np.float32), "v": rng.standard_normal((1, s, width), dtype=np.float32)}
    cases = []  # (query rows, how many such attentions per UPM run)
    for sq, count in ((s, 21), (N_OUT, 3)):
        feeds = {"q": rng.standard_normal((1, sq, width), dtype=np.float32), **kv}
        sess = {kind: ort.InferenceSession(_graph(kind, sq, s, width, heads), opts, providers=["CPUExecutionProvider"])
                for kind in ("chain", "fused")}
        outs = {kind: sess[kind].run(None, feeds)[0] for kind in sess}
        cases.append((sq, count, feeds, sess, float(np.abs(outs["chain"] - outs["fused"]).max())))
    load_start = list(os.getloadavg())
    times: dict[str, list[float]] = {"chain": [], "fused": []}
    for r in range(rounds):
        for kind in (("chain", "fused") if r % 2 == 0 else ("fused", "chain")):
            t0 = time.perf_counter()
            for _sq, count, feeds, sess, _d in cases:
                for _ in range(count):
                    sess[kind].run(None, feeds)
            times[kind].append((time.perf_counter() - t0) * 1e3)
    ratios = [c / f for c, f in zip(times["chain"], times["fused"], strict=True)]
    return {
        "schema": SCHEMA, "version": VERSION, "machine": machine_info(), "threads": threads, "rounds": rounds,
        "rows": s, "width": width, "heads": heads, "load_average_start": load_start,
        "max_abs_diff": max(c[4] for c in cases), "ms": times,
        "chain_ms": statistics.median(times["chain"]), "fused_ms": statistics.median(times["fused"]),
        "chain_over_fused": statistics.median(ratios),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m onellm.benchmarks.upm_attention", description=__doc__.split("\n")[0])
    ap.add_argument("--tokens", type=int, default=257, help="Trunk tokens after the 30 resample rows (image: 257).")
    ap.add_argument("--width", type=int, default=1024)
    ap.add_argument("--heads", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--threads", type=int, default=None, help="Default: physical cores.")
    ap.add_argument("--out", type=Path, default=Path("upm-attention.json"))
    args = ap.parse_args(argv)
    from onellm.runtime.encoder import physical_cores

    res = run(args.tokens, args.width, args.heads, args.rounds, args.threads or physical_cores())
    args.out.write_text(json.dumps(res, indent=2) + "\n")
    print(f"UPM attention core, {res['rows']} rows x {res['width']} ({res['heads']} heads), 24 per run, "
          f"{res['threads']} threads, {res['rounds']} interleaved rounds: op chain {res['chain_ms']:.1f} ms, "
          f"MultiHeadAttention {res['fused_ms']:.1f} ms (chain/fused per round, median {res['chain_over_fused']:.3f}); "
          f"max |diff| {res['max_abs_diff']:.1e}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
