"""Encoder measurements behind the choices in export/onnx_encoder.py (results: benchmarks/RESULTS.md).

    python -m onellm.benchmarks.encoder grouping           # FPS+kNN: numpy vs inside an ONNX graph
    python -m onellm.benchmarks.encoder chain --preset tiny  # torch eager vs ORT fp32/int8, fusions,
                                                           # batched experts, thread spinning
    python -m onellm.benchmarks.encoder chain --config big.json --modalities image --repeats 2
    python -m onellm.benchmarks.encoder chain --preset bench --modalities image,imu \
        --variants int8,int8@dynamic_per_tensor    # torch fp32/bf16 vs int8 recipes, encoder+UPM

Prints one JSON object. Random weights (seeded); timings are medians of `--repeats` runs
after one warm-up, single input, on this machine's CPU.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper

from onellm.runtime.point_grouping import group_points, preference_order

log = logging.getLogger(__name__)


def _median_seconds(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


# ---------------------------------------------------------------------------- grouping in a graph


def build_grouping_graph(n_points: int, groups: int, k: int, tie_break: str = "cuda") -> onnx.ModelProto:
    """x [N, C] -> grouped [groups, k, C]: FPS as an ONNX Loop, kNN as TopK (for comparison only).

    FPS reproduces the reference (fp32, ties via the kernel's preference order). The kNN
    distances are sqrt(dx²+dy²+dz²) without torch's fused multiply-adds, so exact ties at
    the k-th place may resolve differently from the reference.
    """
    order = preference_order(n_points) if tie_break == "cuda" else np.arange(n_points)
    start = int(np.flatnonzero(order == 0)[0])
    f32 = TensorProto.FLOAT
    i64 = TensorProto.INT64

    def const(name, value, dtype=np.int64):
        return helper.make_node("Constant", [], [name], value=onnx.numpy_helper.from_array(np.asarray(value, dtype), name))

    # loop body: (iter, cond, temp, cur) -> (cond, temp', cur', scan: cur)
    body_nodes = [
        helper.make_node("Identity", ["cond_in"], ["cond_out"]),
        helper.make_node("Unsqueeze", ["cur_in", "ax0"], ["cur_1"]),
    ]
    for c in "xyz":
        body_nodes += [
            helper.make_node("Gather", [f"p{c}", "cur_1"], [f"{c}0"]),
            helper.make_node("Sub", [f"p{c}", f"{c}0"], [f"d{c}"]),
            helper.make_node("Mul", [f"d{c}", f"d{c}"], [f"s{c}"]),
        ]
    body_nodes += [
        helper.make_node("Add", ["sx", "sy"], ["sxy"]),
        helper.make_node("Add", ["sxy", "sz"], ["d"]),
        helper.make_node("Min", ["temp_in", "d"], ["temp_out"]),
        helper.make_node("ArgMax", ["temp_out"], ["cur_out"], axis=0, keepdims=0),
        helper.make_node("Identity", ["cur_in"], ["picked"]),
    ]
    body = helper.make_graph(
        [const("ax0", [0])] + body_nodes,
        "fps_step",
        [helper.make_tensor_value_info("i", i64, []), helper.make_tensor_value_info("cond_in", TensorProto.BOOL, []),
         helper.make_tensor_value_info("temp_in", f32, [n_points]), helper.make_tensor_value_info("cur_in", i64, [])],
        [helper.make_tensor_value_info("cond_out", TensorProto.BOOL, []),
         helper.make_tensor_value_info("temp_out", f32, [n_points]),
         helper.make_tensor_value_info("cur_out", i64, []), helper.make_tensor_value_info("picked", i64, [])],
    )
    nodes = [
        const("order", order),
        const("start", start),
        const("trips", groups),
        const("cond", True, np.bool_),
        const("fill", np.full(n_points, 1e10, np.float32), np.float32),
        const("last3", [-3]), const("end", [2**62]), const("ax1", [1]),
        const("kk", [k]),
        helper.make_node("Slice", ["x", "last3", "end", "ax1"], ["p"]),
        helper.make_node("Gather", ["p", "order"], ["pp"], axis=0),
    ]
    for i, c in enumerate("xyz"):
        nodes += [const(f"i{c}", [i]), helper.make_node("Gather", ["pp", f"i{c}"], [f"p{c}2"], axis=1),
                  helper.make_node("Squeeze", [f"p{c}2", "ax1"], [f"p{c}"])]
    nodes += [
        helper.make_node("Loop", ["trips", "cond", "fill", "start"], ["temp_f", "cur_f", "picked_perm"], body=body),
        helper.make_node("Gather", ["order", "picked_perm"], ["centre_idx"]),
        helper.make_node("Gather", ["p", "centre_idx"], ["centres"], axis=0),  # [M, 3]
        const("ax_m", [1]),
        helper.make_node("Unsqueeze", ["centres", "ax_m"], ["c3"]),  # [M, 1, 3]
        helper.make_node("Sub", ["c3", "p"], ["diff"]),  # [M, N, 3]
        helper.make_node("Mul", ["diff", "diff"], ["sq"]),
        const("last", [2]),
        helper.make_node("ReduceSum", ["sq", "last"], ["d2"], keepdims=0),
        helper.make_node("Sqrt", ["d2"], ["dist"]),
        helper.make_node("TopK", ["dist", "kk"], ["vals", "nbr"], axis=1, largest=0, sorted=1),
        helper.make_node("Gather", ["x", "nbr"], ["grouped"], axis=0),  # [M, k, C]
    ]
    graph = helper.make_graph(nodes, "point_grouping", [helper.make_tensor_value_info("x", f32, [n_points, None])],
                              [helper.make_tensor_value_info("grouped", f32, [groups, k, None])])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])


def bench_grouping(repeats: int) -> dict:
    import onnxruntime as ort

    rng = np.random.default_rng(0)
    x = rng.random((8192, 6), dtype=np.float32)
    x[:, 3:] = rng.integers(0, 256, (8192, 3)) / np.float32(255)  # RGB-like: exact ties happen
    so = ort.SessionOptions()
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    so.log_severity_level = 3
    sess = ort.InferenceSession(build_grouping_graph(8192, 1024, 32).SerializeToString(), so,
                                providers=["CPUExecutionProvider"])
    out = np.empty((1024, 32, 6), np.float32)
    t_numpy = _median_seconds(lambda: group_points(x, 1024, 32, out=out), repeats)
    t_graph = _median_seconds(lambda: sess.run(None, {"x": x}), repeats)
    graph_out = sess.run(None, {"x": x})[0]
    a = np.sort(group_points(x, 1024, 32).max(axis=1), axis=0)
    b = np.sort(graph_out.max(axis=1), axis=0)
    return {"numpy_s": t_numpy, "graph_s": t_graph, "graph_over_numpy": t_graph / t_numpy,
            "same_tokens_input": bool(np.array_equal(a, b))}


# ---------------------------------------------------------------------------- chains


def _cosine(a: np.ndarray, b: np.ndarray) -> float:
    a, b = np.asarray(a, np.float64).ravel(), np.asarray(b, np.float64).ravel()
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def bench_chain(cfg, modalities: list[str], repeats: int, variants: list[str], bf16: bool = True) -> dict:
    """Export each variant, then time every (variant, precision, modality) chain interleaved.

    Interleaving (round-robin over the candidates, `repeats` rounds, median per candidate)
    keeps a shared machine's load drift out of the ratios.
    """
    import onnxruntime as ort
    import torch

    from onellm.export.onnx_encoder import export_encoder_variants
    from onellm.ref.model import OneLLM
    from onellm.runtime.encoder import Encoder
    from onellm.runtime.modalities import get_modality

    torch.manual_seed(0)
    model = OneLLM(cfg).init_random_(0).eval()
    rng = np.random.default_rng(0)
    inputs = {m: get_modality(m).dummy_input(rng).astype(np.float32) for m in modalities}
    out: dict = {"torch_threads": torch.get_num_threads(), "ort": ort.__version__, "times_s": {},
                 "load_average_start": list(os.getloadavg())}
    # torch first, on its own: its OpenMP threads and onnxruntime's must not alternate
    for m in modalities:
        x = torch.from_numpy(inputs[m])[None]

        def run_torch(m=m, x=x):
            with torch.no_grad():
                model.encode(m, x)

        out["times_s"][f"torch_eager/{m}"] = _median_seconds(run_torch, repeats)
    if bf16:
        import copy

        model16 = copy.deepcopy(model).to(torch.bfloat16)
        if "point" in model16.conv1:
            model16.conv1["point"].float()  # the point tokenizer runs in fp32 (spec section 4), as in bench
        for m in modalities:
            x = torch.from_numpy(inputs[m])[None]
            with torch.inference_mode():
                ref = model.encode(m, x).float().numpy()

                def run_bf16(m=m, x=x):
                    with torch.inference_mode():
                        return model16.encode(m, x)

                out["times_s"][f"torch_bf16/{m}"] = _median_seconds(run_bf16, repeats)
                out.setdefault("parity", {})[f"torch_bf16/{m}"] = {"cosine": _cosine(ref, run_bf16().float().numpy())}
        del model16
    runners = {}
    encoders = []
    stage_times: dict[str, list[float]] = {}  # "<key>/<graph>" -> seconds, from each encode's stage hook
    with tempfile.TemporaryDirectory() as tmp:
        for variant in variants:
            opts = {"optimize": "nofuse" not in variant, "batched_experts": "batched" in variant}
            if "@" in variant:  # e.g. int8@dynamic_per_tensor: an export.quantize.INT8_RECIPES name
                opts["int8_recipe"] = variant.split("@", 1)[1]
            precs = [p for p in ("fp32", "fp16", "int8") if p in variant] or ["fp32"]
            t0 = time.perf_counter()
            res = export_encoder_variants(model, cfg, Path(tmp) / variant, modalities, precs, **opts)
            out.setdefault("export_s", {})[variant] = time.perf_counter() - t0
            for p, variant_entry in res.items():
                out.setdefault("bytes", {})[f"{variant}/{p}"] = {g: e.bytes for g, e in variant_entry.graphs.items()}
                for spin in ((False, True) if "spin" in variant else (False,)):
                    enc = Encoder(variant_entry, Path(tmp) / variant, spin=spin)
                    encoders.append(enc)
                    for m in modalities:
                        key = f"ort_{variant}{'_spin' if spin else ''}/{p}/{m}"

                        def hook(_m, graph, seconds, key=key):
                            stage_times.setdefault(f"{key}/{graph}", []).append(seconds)

                        runners[key] = lambda enc=enc, m=m, hook=hook: enc.encode(m, inputs[m], stage_hook=hook)
                        out.setdefault("parity", {})[key] = variant_entry.modalities[m].parity
        times: dict[str, list[float]] = {k: [] for k in runners}
        for fn in runners.values():
            fn()  # warm-up
        stage_times.clear()
        for _ in range(repeats):
            for key, fn in runners.items():
                t = time.perf_counter()
                fn()
                times[key].append(time.perf_counter() - t)
        for key, ts in times.items():
            out["times_s"][key] = statistics.median(ts)
        out["stages_s"] = {key: statistics.median(ts) for key, ts in stage_times.items()}
        for enc in encoders:
            enc.close()
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("what", choices=("grouping", "chain"))
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--config")
    ap.add_argument("--modalities", default="image,audio,point")
    ap.add_argument("--variants", default="fp32+int8,nofuse_fp32,batched_fp32+int8,spin_fp32")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--no-bf16", action="store_true", help="skip the torch bf16 chain (on by default)")
    args = ap.parse_args(argv)
    if args.what == "grouping":
        result = bench_grouping(args.repeats)
    else:
        from onellm.ref.config import resolve_config

        cfg = resolve_config(None if args.config else args.preset, args.config)
        result = bench_chain(cfg, args.modalities.split(","), args.repeats, args.variants.split(","),
                             bf16=not args.no_bf16)
        result["load_average_end"] = list(os.getloadavg())
    print(json.dumps(result, indent=1, sort_keys=True))


if __name__ == "__main__":
    main()
