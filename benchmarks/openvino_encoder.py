"""OpenVINO against onnxruntime int8 and torch bf16 on the encoder's two big graphs (trunk + UPM).

    python -m onellm.benchmarks.openvino_encoder                     # bench preset, image and IMU
    python -m onellm.benchmarks.openvino_encoder --modalities image --rounds 5
    python -m onellm.benchmarks.openvino_encoder --layers 4 --rounds 3   # a quick look
    python -m onellm.benchmarks.openvino_encoder --chain      # whole chains: runtime Encoder, int8 vs ov-int8
    python -m onellm.benchmarks.openvino_encoder --candidates ort_int8,ov_int8,ov_int8_nopin --busy

Issue 13 allows OpenVINO as an optional CPU backend "if it wins on the whole chain". This
measures the trunk and the UPM (about 97 % of an encode) of the preset, random weights
(seeded), 2 threads, one process, per modality:

* torch bf16: the reference's own modules cast to bf16 (what `bench` calls torch bf16);
* onnxruntime int8: the export's graph (transformer fusions, dynamic per-channel int8,
  SkipLayerNormalization split), in the runtime's session settings (what `ask` runs);
* OpenVINO, from the plain (unfused) fp32 ONNX export, shapes fixed to the modality's:
  `ov_bf16` (the CPU plugin's bf16 inference precision), `ov_w8` (NNCF int8 weights,
  bf16 compute), `ov_int8` (NNCF static int8, transformer preset, calibrated on the first
  `--calibration` inputs; what is not quantized runs in bf16), `ov_int8_f32` (the same,
  the rest in fp32), `ov_int8_dyn` (the same compiled for dynamic shapes), `ov_int8_nopin`
  (the same with OpenVINO's thread pinning off, as the runtime compiles it), `ov_qdq` (NNCF's
  ONNX backend, same preset: a QDQ `.onnx` file that OpenVINO reads and runs in int8, the
  rest bf16), `ov_qdq_dyn` (that file with its dynamic axes kept) and `ov_qdq_attn` (that
  file with the attention's two activation x activation MatMuls quantized too, which NNCF's
  transformer preset leaves in float: Q, K and V per tensor in int8 from their calibrated
  absolute maximum, the softmax output in u8 on [0, 1]).

`--profile` adds OpenVINO's own per-operator times (PERF_COUNT) of the `ov_int8` graphs,
summed by operator and kernel, to the JSON: how much of the static int8 encoder is its
int8 GEMMs.

Cosines are against the torch fp32 modules on inputs NOT used for calibration. Timing:
`--rounds` rounds, each running every candidate once in a rotating order, with a short
pause between candidates so one runtime's idle threads do not spin into the next; the
per-round ratio to torch bf16 is what the JSON reports (median and quartiles). Prints one
JSON object (load average at start and end included); `--out` writes it too.
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

from onellm.benchmarks.int8_profile import add_encoder_model_args, encoder_model_config
from onellm.benchmarks.int8_profile import cosine as _cosine

log = logging.getLogger(__name__)

CANDIDATES = ("torch_bf16", "ort_int8", "ov_bf16", "ov_w8", "ov_int8", "ov_int8_f32")
MORE = ("ov_int8_dyn", "ov_int8_nopin", "ov_qdq", "ov_qdq_dyn", "ov_qdq_attn")


def _quartiles(xs: list[float]) -> list[float]:
    if len(xs) < 2:
        return [xs[0], xs[0]] if xs else []
    q = statistics.quantiles(xs, n=4, method="inclusive")
    return [q[0], q[2]]


def _speedups(times: dict[str, list[float]], base: str) -> dict[str, dict]:
    """Per candidate, the median and quartiles of its per-round speed-up over `base` (same round)."""
    out = {}
    for c, ts in times.items():
        ratios = [a / b for a, b in zip(times[base], ts)]
        out[c] = {"median": statistics.median(ratios), "quartiles": _quartiles(ratios)}
    return out


def build(cfg, tmp: Path, modality: str, n_inputs: int):
    """(torch modules, raw fp32 paths, ORT int8 paths, feeds per graph, fp32 outputs per graph)."""
    import torch

    from onellm.export import onnx_encoder as oe
    from onellm.export.quantize import optimize_graph, quantize_int8, unfuse_skip_layer_norm_file
    from onellm.ref.model import OneLLM
    from onellm.runtime.modalities import get_modality

    torch.manual_seed(0)
    model = oe.fp32_reference(OneLLM(cfg).init_random_(0).eval())
    jobs = {j.name: j for j in oe.plan_graphs(model, cfg, [modality])}
    raw, int8 = {}, {}
    for name in ("trunk", "upm"):
        job = jobs[name]
        raw[name] = tmp / f"{modality}.{name}.raw.onnx"
        opt, q = tmp / f"{modality}.{name}.opt.onnx", tmp / f"{modality}.{name}.int8.onnx"
        with oe._quiet_loggers():
            oe._torch_export(job, raw[name])
            optimize_graph(raw[name], opt, job.optimizer, job.heads, job.width)
        quantize_int8(opt, q)  # the export's default recipe
        unfuse_skip_layer_norm_file(q, {})
        opt.unlink()
        int8[name] = q
    spec = get_modality(modality)
    tok, pre = jobs[oe.tokenizer_graph_name(modality)].module, jobs[f"pre.{modality}"].module
    mods = {"trunk": jobs["trunk"].module, "upm": jobs["upm"].module}
    routing = model.routing_weights(modality).detach().float().numpy()
    feeds: dict[str, list[dict]] = {"trunk": [], "upm": []}
    refs: dict[str, list[np.ndarray]] = {"trunk": [], "upm": []}
    with torch.no_grad():
        for seed in range(n_inputs):
            x = torch.from_numpy(spec.dummy_input(np.random.default_rng(seed)).astype(np.float32))
            t = tok(x.reshape(-1, *oe.tokenizer_input_shape(modality, cfg)))
            f = mods["trunk"](t)
            u = pre(f)
            feeds["trunk"].append({"tokens": t.numpy()})
            feeds["upm"].append({"upm_input": u.numpy(), "routing": routing})
            refs["trunk"].append(f.numpy())
            refs["upm"].append(mods["upm"](u, torch.from_numpy(routing)).numpy())
    return mods, raw, int8, feeds, refs


def quantize_attention_inputs(qdq, calib: list[dict]):
    """`qdq` (an NNCF QDQ ModelProto) with QuantizeLinear/DequantizeLinear pairs inserted on both
    inputs of every MatMul whose inputs are both activations (the attention's scores and
    weighted sum): per-tensor int8 from the calibration feeds' absolute maximum, the softmax
    output u8 with scale 1/255. Returns (model, number of tensors quantized)."""
    import onnx
    import onnxruntime as ort
    from onnx import helper, numpy_helper

    producer = {o: n for n in qdq.graph.node for o in n.output}
    targets = [(n, k, name) for n in qdq.graph.node if n.op_type == "MatMul"
               and all(i in producer and producer[i].op_type != "DequantizeLinear" for i in n.input)
               for k, name in enumerate(n.input)]
    names = sorted({t[2] for t in targets})
    probe = onnx.ModelProto()
    probe.CopyFrom(qdq)
    probe.graph.output.extend(helper.make_tensor_value_info(nm, onnx.TensorProto.FLOAT, None) for nm in names)
    sess = ort.InferenceSession(probe.SerializeToString(), providers=["CPUExecutionProvider"])
    outputs = [o.name for o in sess.get_outputs()]
    amax = dict.fromkeys(names, 0.0)
    for feed in calib:
        got = dict(zip(outputs, sess.run(None, feed)))
        for nm in names:
            amax[nm] = max(amax[nm], float(np.abs(got[nm]).max()))
    del sess, probe
    after: dict[str, list] = {}
    for nm in names:
        softmax = producer[nm].op_type == "Softmax"
        scale = np.float32(1 / 255) if softmax else np.float32(max(amax[nm], 1e-8) / 127)
        zero = np.uint8(0) if softmax else np.int8(0)
        qdq.graph.initializer.extend([numpy_helper.from_array(np.array(scale), nm + "_attn_scale"),
                                      numpy_helper.from_array(np.array(zero), nm + "_attn_zp")])
        after[nm] = [helper.make_node("QuantizeLinear", [nm, nm + "_attn_scale", nm + "_attn_zp"], [nm + "_attn_q"]),
                     helper.make_node("DequantizeLinear", [nm + "_attn_q", nm + "_attn_scale", nm + "_attn_zp"],
                                      [nm + "_attn_dq"])]
    for n, k, nm in targets:
        n.input[k] = nm + "_attn_dq"
    nodes = []
    for n in qdq.graph.node:  # each pair right after its producer: the graph stays topologically sorted
        nodes.append(n)
        for o in n.output:
            nodes.extend(after.get(o, []))
    del qdq.graph.node[:]
    qdq.graph.node.extend(nodes)
    return qdq, len(names)


def ov_profile(compiled, feed: dict, runs: int = 5) -> dict:
    """OpenVINO's per-operator times of `compiled` (PERF_COUNT on), mean ms per run by operator/kernel."""
    import openvino as ov

    req = compiled.create_infer_request()
    req.infer(feed)
    acc: dict[str, float] = {}
    for _ in range(runs):
        req.infer(feed)
        for p in req.profiling_info:
            if p.status == ov.ProfilingInfo.Status.EXECUTED:
                key = f"{p.node_type} ({p.exec_type})"
                acc[key] = acc.get(key, 0.0) + p.real_time.total_seconds() * 1e3 / runs
    total = sum(acc.values())
    return {"total_ms": total, "ops": {k: {"ms": v, "share": v / total}
                                       for k, v in sorted(acc.items(), key=lambda kv: -kv[1])}}


def ov_models(raw: Path, feed: dict, calib: list[dict], threads: int, wanted: list[str]) -> dict:
    """Compiled OpenVINO models of one graph, by candidate name (those of `wanted`)."""
    import nncf
    import onnx
    import openvino as ov

    core = ov.Core()

    def read(path=raw, static=True):
        m = core.read_model(str(path))
        if static:
            m.reshape({name: ov.PartialShape(list(a.shape)) for name, a in feed.items()})
        return m

    def compile_(m, precision: str, pinning: bool = True, perf_count: bool = False):
        return core.compile_model(m, "CPU", {
            "INFERENCE_NUM_THREADS": threads, "NUM_STREAMS": 1, "PERFORMANCE_HINT": "LATENCY",
            "INFERENCE_PRECISION_HINT": precision, "ENABLE_CPU_PINNING": pinning, "PERF_COUNT": perf_count})

    def static_int8(static=True):
        t = time.perf_counter()
        q = nncf.quantize(read(static=static), nncf.Dataset(calib), model_type=nncf.ModelType.TRANSFORMER,
                          subset_size=len(calib))
        log.info("  static int8: %.1fs", time.perf_counter() - t)
        return q

    out = {}
    if "ov_bf16" in wanted:
        out["ov_bf16"] = compile_(read(), "bf16")
    if "ov_w8" in wanted:
        out["ov_w8"] = compile_(nncf.compress_weights(read(), mode=nncf.CompressWeightsMode.INT8_ASYM), "bf16")
    if "ov_int8" in wanted or "ov_int8_f32" in wanted or "ov_int8_nopin" in wanted:
        q = static_int8()
        out["ov_int8"] = compile_(q, "bf16")
        out["ov_int8_f32"] = compile_(q, "f32")
        out["ov_int8_nopin"] = compile_(q, "bf16", pinning=False)
        if "profile" in wanted:
            out["profile"] = compile_(q, "bf16", perf_count=True)
    if "ov_int8_dyn" in wanted:
        out["ov_int8_dyn"] = compile_(static_int8(static=False), "bf16")
    if "ov_qdq" in wanted or "ov_qdq_dyn" in wanted or "ov_qdq_attn" in wanted:
        t = time.perf_counter()
        qdq = nncf.quantize(onnx.load(str(raw)), nncf.Dataset(calib), model_type=nncf.ModelType.TRANSFORMER,
                            subset_size=len(calib))
        path = raw.with_suffix(".qdq.onnx")
        onnx.save(qdq, str(path))
        del qdq
        log.info("  static int8, ONNX QDQ: %.1fs", time.perf_counter() - t)
        out["ov_qdq"] = compile_(read(path), "bf16")
        out["ov_qdq_dyn"] = compile_(read(path, static=False), "bf16")
        if "ov_qdq_attn" in wanted:
            attn, n = quantize_attention_inputs(onnx.load(str(path)), calib)
            log.info("  attention inputs quantized: %d tensors", n)
            attn_path = raw.with_suffix(".qdq_attn.onnx")
            onnx.save(attn, str(attn_path))
            del attn
            out["ov_qdq_attn"] = compile_(read(attn_path), "bf16")
    return {k: v for k, v in out.items() if k in wanted}


def run(cfg, modalities: list[str], rounds: int, threads: int, n_calib: int, n_test: int,
        candidates: list[str], busy: bool = False, profile: bool = False) -> dict:
    import onnxruntime as ort
    import torch

    from onellm.runtime.encoder import session_kwargs

    torch.set_num_threads(threads)
    result: dict = {"preset": cfg.name, "trunk_layers": cfg.clip.layers, "width": cfg.clip.width,
                    "threads": threads, "rounds": rounds, "calibration_inputs": n_calib, "test_inputs": n_test,
                    "versions": {"onnxruntime": ort.__version__, "torch": torch.__version__},
                    "load_average_start": list(os.getloadavg()), "modalities": {}}
    try:
        import nncf
        import openvino as ov

        result["versions"].update(openvino=ov.__version__, nncf=nncf.__version__)
    except ImportError:
        candidates = [c for c in candidates if not c.startswith("ov_")]
        log.warning("openvino/nncf not installed: OpenVINO candidates skipped")
    for modality in modalities:
        log.info("%s: exporting", modality)
        with tempfile.TemporaryDirectory(prefix="onellm-ovenc-") as tmpdir:
            mods, raw, int8, feeds, refs = build(cfg, Path(tmpdir), modality, n_calib + n_test)
            runners: dict[str, dict] = {c: {} for c in candidates}
            for g in ("trunk", "upm"):
                calib, test = feeds[g][:n_calib], feeds[g][n_calib:]
                if "torch_bf16" in candidates:
                    m16 = mods[g].to(torch.bfloat16)

                    def torch_run(feed, m16=m16):
                        with torch.inference_mode():
                            args = [torch.from_numpy(a).to(torch.bfloat16) for a in feed.values()]
                            return m16(*args).float().numpy()

                    runners["torch_bf16"][g] = torch_run
                if "ort_int8" in candidates:
                    so = ort.SessionOptions()
                    so.intra_op_num_threads = threads
                    so.log_severity_level = 3
                    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
                    sess = ort.InferenceSession(str(int8[g]), so, providers=["CPUExecutionProvider"],
                                                **session_kwargs("cpu"))
                    runners["ort_int8"][g] = lambda feed, s=sess: s.run(None, feed)[0]
                if any(c.startswith("ov_") for c in candidates):
                    log.info("%s %s: OpenVINO", modality, g)
                    wanted = candidates + (["profile"] if profile and "ov_int8" in candidates else [])
                    for name, cm in ov_models(raw[g], test[0], calib, threads, wanted).items():
                        if name == "profile":
                            prof = result["modalities"].setdefault(modality, {}).setdefault("ov_int8_profile", {})
                            prof[g] = ov_profile(cm, test[0])
                            del cm
                        elif name in candidates:
                            req = cm.create_infer_request()

                            def ov_run(feed, req=req):
                                req.infer(feed)
                                return req.get_output_tensor(0).data.copy()

                            runners[name][g] = ov_run
                info = result["modalities"].setdefault(modality, {})
                info.setdefault("cosine_vs_fp32", {})
                info.setdefault("ms", {})
                for c in candidates:
                    outs = [runners[c][g](f) for f in test]
                    info["cosine_vs_fp32"].setdefault(c, {})[g] = min(map(_cosine, refs[g][n_calib:], outs))
            feed = {g: feeds[g][-1] for g in ("trunk", "upm")}
            for c in candidates:  # warm-up
                for g in ("trunk", "upm"):
                    runners[c][g](feed[g])
            times: dict[str, list[float]] = {c: [] for c in candidates}
            hog = _busy_process() if busy else None
            for r in range(rounds):
                order = candidates[r % len(candidates):] + candidates[:r % len(candidates)]
                for c in order:
                    time.sleep(0.2)  # let the previous runtime's workers go idle
                    t = time.perf_counter()
                    for g in ("trunk", "upm"):
                        runners[c][g](feed[g])
                    times[c].append(time.perf_counter() - t)
                log.info("%s round %d: %s", modality, r + 1,
                         ", ".join(f"{c} {times[c][-1] * 1e3:.0f}" for c in candidates))
            if hog is not None:
                hog.kill()
                hog.wait()
                info["busy_process"] = "one process spinning on the CPU during the timed rounds"
            info["ms"] = {c: {"median": statistics.median(ts) * 1e3, "min": min(ts) * 1e3, "max": max(ts) * 1e3}
                          for c, ts in times.items()}
            for base in ("torch_bf16", "ort_int8"):
                if base in times:
                    info[f"speedup_vs_{base}"] = _speedups(times, base)
            del runners, mods
    result["load_average_end"] = list(os.getloadavg())
    return result


def _busy_process():
    """Another process keeping one core busy (a desktop user's other work), until killed."""
    import subprocess
    import sys

    return subprocess.Popen([sys.executable, "-c", "while True: pass"])


def run_chain(cfg, modalities: list[str], rounds: int, threads: int) -> dict:
    """Whole chains as `ask` runs them: the runtime `Encoder` on an int8 and an ov-int8 export
    (tokenizer -> trunk -> pre -> UPM -> post, one input) against torch bf16's `OneLLM.encode`,
    interleaved like `run`; cosines against torch fp32 on the timed input."""
    import copy

    import torch

    from onellm.export.onnx_encoder import export_encoder_variants
    from onellm.ref.model import OneLLM
    from onellm.runtime.encoder import Encoder
    from onellm.runtime.modalities import get_modality

    torch.set_num_threads(threads)
    result: dict = {"preset": cfg.name, "threads": threads, "rounds": rounds, "what": "whole encoder chain",
                    "load_average_start": list(os.getloadavg()), "modalities": {}}
    torch.manual_seed(0)
    model = OneLLM(cfg).init_random_(0).eval()
    rng = np.random.default_rng(123)
    inputs = {m: get_modality(m).dummy_input(rng).astype(np.float32) for m in modalities}
    with torch.inference_mode():
        refs = {m: model.encode(m, torch.from_numpy(x)[None]).float().numpy()[0] for m, x in inputs.items()}
    with tempfile.TemporaryDirectory(prefix="onellm-ovchain-") as tmp:
        t = time.perf_counter()
        variants = export_encoder_variants(model, cfg, Path(tmp), modalities, ["int8", "ov-int8"])
        result["export_s"] = time.perf_counter() - t
        model16 = copy.deepcopy(model).to(torch.bfloat16)
        del model
        encoders = {p: Encoder(v, Path(tmp), threads=threads, verify=False) for p, v in variants.items()}
        for m in modalities:
            x = inputs[m]

            def torch_run(m=m, x=x):
                with torch.inference_mode():
                    return model16.encode(m, torch.from_numpy(x)[None]).float().numpy()[0]

            runners = {"torch_bf16": torch_run}
            runners.update({p: (lambda e=e, m=m, x=x: e.encode(m, x).copy()) for p, e in encoders.items()})
            info = result["modalities"].setdefault(m, {})
            info["cosine_vs_fp32"] = {c: _cosine(refs[m], fn()) for c, fn in runners.items()}
            names = list(runners)
            times: dict[str, list[float]] = {c: [] for c in names}
            for r in range(rounds):
                for c in names[r % len(names):] + names[:r % len(names)]:
                    time.sleep(0.2)
                    t = time.perf_counter()
                    runners[c]()
                    times[c].append(time.perf_counter() - t)
                log.info("%s chain round %d: %s", m, r + 1, ", ".join(f"{c} {times[c][-1] * 1e3:.0f}" for c in names))
            info["ms"] = {c: {"median": statistics.median(ts) * 1e3, "min": min(ts) * 1e3, "max": max(ts) * 1e3}
                          for c, ts in times.items()}
            for base in ("torch_bf16", "int8"):
                info[f"speedup_vs_{base}"] = _speedups(times, base)
        for e in encoders.values():
            e.close()
    result["load_average_end"] = list(os.getloadavg())
    return result


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_encoder_model_args(ap)
    ap.add_argument("--modalities", default="image,imu")
    ap.add_argument("--candidates", default=",".join(CANDIDATES),
                    help=f"comma list of {', '.join(CANDIDATES + MORE)}")
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--calibration", type=int, default=4, help="inputs that calibrate the static int8 graphs")
    ap.add_argument("--test", type=int, default=2, help="further inputs the cosines are taken on")
    ap.add_argument("--busy", action="store_true", help="time the rounds beside a process spinning on one core")
    ap.add_argument("--profile", action="store_true",
                    help="add OpenVINO's per-operator times of the ov_int8 graphs (needs ov_int8 among the candidates)")
    ap.add_argument("--chain", action="store_true",
                    help="time whole chains through the runtime Encoder (int8 vs ov-int8 exports) instead")
    ap.add_argument("--out", type=Path, help="also write the JSON here")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    cfg = encoder_model_config(args)
    if args.chain:
        result = run_chain(cfg, args.modalities.split(","), args.rounds, args.threads)
    else:
        result = run(cfg, args.modalities.split(","), args.rounds, args.threads, args.calibration, args.test,
                     args.candidates.split(","), busy=args.busy, profile=args.profile)
    text = json.dumps(result, indent=1)
    if args.out:
        args.out.write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
