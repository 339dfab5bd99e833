"""int8 recipes of export/quantize.py on the tiny model, the int8 profile parser and the int8 ceiling.

Every recipe keeps the cosine against the fp32 graph >= 0.99 for each modality's inputs,
measured on inputs that were NOT used for calibration; the static recipes really use
their calibration (their graphs carry constant activation scales, the dynamic ones do not).
"""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest

from onellm.export import onnx_encoder as oe
from onellm.export.quantize import DEFAULT_INT8_RECIPE, INT8_RECIPES, quantize_int8
from onellm.runtime.errors import ConfigError
from onellm.runtime.modalities import get_modality

FLOOR = 0.99
MODALITIES = ("image", "video", "audio", "point", "rgbd", "rgbn", "fmri", "imu")


def _cos(a, b) -> float:
    a, b = np.asarray(a, np.float64).ravel(), np.asarray(b, np.float64).ravel()
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def _session(path):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 3
    so.intra_op_num_threads = 1
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


@pytest.fixture(scope="module")
def stage_inputs(tiny_model, tiny_config):
    """modality -> {"trunk": [feeds], "upm": [feeds]}: the fp32 chain's activations on seeded inputs.

    Seeds 0-1 calibrate, seeds 10-11 test: calibration and test inputs differ.
    """
    import torch

    out = {}
    with torch.no_grad():
        for m in MODALITIES:
            jobs = {j.name: j for j in oe.plan_graphs(tiny_model, tiny_config, [m])}
            tok, trunk, pre = jobs[oe.tokenizer_graph_name(m)].module, jobs["trunk"].module, jobs[f"pre.{m}"].module
            routing = tiny_model.routing_weights(m).detach().float().numpy()
            feeds = {"trunk": [], "upm": []}
            for seed in (0, 1, 10, 11):
                gen = torch.Generator().manual_seed(seed)
                frames = get_modality(m).n_frames
                x = torch.randn((frames, *oe.tokenizer_input_shape(m, tiny_config)), generator=gen)
                t = tok(x)
                feeds["trunk"].append({"tokens": t.numpy()})
                feeds["upm"].append({"upm_input": pre(trunk(t)).numpy(), "routing": routing})
            out[m] = feeds
    return out


@pytest.mark.parametrize("recipe", list(INT8_RECIPES))
def test_recipe_cosine_floor_per_modality(recipe, tiny_encoder_export, stage_inputs, tmp_path):
    root, results = tiny_encoder_export
    for graph in ("trunk", "upm"):
        src = root / results["fp32"]["graphs"][graph]["file"]
        calib = [f for m in MODALITIES for f in stage_inputs[m][graph][:2]]
        dst = tmp_path / f"{graph}.{recipe}.onnx"
        info = quantize_int8(src, dst, recipe=recipe, calibration=calib)
        assert info["recipe"] == recipe
        ops = {n.op_type for n in onnx.load(str(dst)).graph.node}
        if recipe.startswith("static"):
            assert info["calibration_inputs"] == len(calib)
            assert ops & {"QLinearMatMul", "QuantizeLinear"}, ops
        else:
            assert "calibration_inputs" not in info
            assert ops & {"DynamicQuantizeMatMul", "MatMulInteger", "QAttention"}, ops
        fp32, q = _session(src), _session(dst)
        for m in MODALITIES:
            for feed in stage_inputs[m][graph][2:]:  # not used for calibration
                want, got = fp32.run(None, feed)[0], q.run(None, feed)[0]
                assert not np.array_equal(want, got), (graph, m)  # int8 really changed the arithmetic
                cos = _cos(want, got)
                assert cos >= FLOOR, (recipe, graph, m, cos)


def test_per_tensor_recipe_has_scalar_weight_scales(tiny_encoder_export, tmp_path):
    root, results = tiny_encoder_export
    src = root / results["fp32"]["graphs"]["trunk"]["file"]
    shapes = {}
    for recipe in ("dynamic", "dynamic_per_tensor"):
        quantize_int8(src, tmp_path / f"{recipe}.onnx", recipe=recipe)
        model = onnx.load(str(tmp_path / f"{recipe}.onnx"))
        shapes[recipe] = {tuple(i.dims) for i in model.graph.initializer if i.name.endswith("_scale")}
    assert all(s in ((), (1,)) for s in shapes["dynamic_per_tensor"]), shapes["dynamic_per_tensor"]
    assert any(len(s) == 1 and s[0] > 1 for s in shapes["dynamic"]), shapes["dynamic"]


def test_static_recipe_without_calibration_is_a_config_error(tiny_encoder_export, tmp_path):
    root, results = tiny_encoder_export
    src = root / results["fp32"]["graphs"]["trunk"]["file"]
    with pytest.raises(ConfigError, match=r"static_qdq.*needs calibration inputs for trunk\.fp32\.onnx"):
        quantize_int8(src, tmp_path / "x.onnx", recipe="static_qdq")
    with pytest.raises(ConfigError, match="unknown int8 recipe 'int4'; known: dynamic"):
        quantize_int8(src, tmp_path / "x.onnx", recipe="int4")


def test_export_records_the_int8_recipe(tiny_model, tiny_config, tmp_path):
    res = oe.export_encoders(tiny_model, tiny_config, tmp_path, ["image", "imu"], ("int8",),
                             int8_recipe="dynamic_per_tensor")["int8"]
    for m in ("image", "imu"):
        assert res["modalities"][m]["parity"]["cosine"] >= FLOOR
    assert res["graphs"]["trunk"]["quantization"] == {"recipe": "dynamic_per_tensor", "per_channel": False}
    assert all(g["quantization"]["recipe"] == "dynamic_per_tensor" for g in res["graphs"].values())


def test_default_export_records_default_recipe(tiny_encoder_export):
    _, results = tiny_encoder_export
    q = results["int8"]["graphs"]["trunk"]["quantization"]
    assert q["recipe"] == DEFAULT_INT8_RECIPE
    assert q["per_channel"] == INT8_RECIPES[DEFAULT_INT8_RECIPE][1]
    assert results["fp32"]["graphs"]["trunk"]["quantization"] is None


# ----------------------------------------------------------------------------- profiling


def _one_matmul(path, k=64, n=96):
    from onnx import TensorProto, helper, numpy_helper

    w = np.random.default_rng(0).standard_normal((k, n)).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"]), helper.make_node("LayerNormalization", ["y", "g"], ["z"],
                                                                          axis=-1)],
        "mm", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, "t", k])],
        [helper.make_tensor_value_info("z", TensorProto.FLOAT, [1, "t", n])],
        initializer=[numpy_helper.from_array(w, "w"), numpy_helper.from_array(np.ones(n, np.float32), "g")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 10
    onnx.save(model, str(path))


def test_profile_groups_kernels_and_counts_int8_ops(tmp_path):
    import onnxruntime as ort

    from onellm.benchmarks.int8_profile import int8_gemm_ops, op_class, parse_profile

    _one_matmul(tmp_path / "fp32.onnx")
    quantize_int8(tmp_path / "fp32.onnx", tmp_path / "int8.onnx")
    feed = {"x": np.ones((1, 10, 64), np.float32)}
    assert int8_gemm_ops(tmp_path / "int8.onnx", feed) == 2.0 * 10 * 64 * 96
    assert int8_gemm_ops(tmp_path / "fp32.onnx", feed) == 0.0
    so = ort.SessionOptions()
    so.enable_profiling = True
    so.profile_file_prefix = str(tmp_path / "prof")
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    sess = ort.InferenceSession(str(tmp_path / "int8.onnx"), so, providers=["CPUExecutionProvider"])
    for _ in range(3):
        sess.run(None, feed)
    prof = parse_profile(sess.end_profiling(), skip_runs=1)
    assert prof["runs"] == 2
    assert set(prof["per_class_us"]) <= {"int8_gemm", "quantize", "layernorm", "other"}
    assert "int8_gemm" in prof["per_class_us"] and "layernorm" in prof["per_class_us"]
    assert abs(sum(prof["share"].values()) - 1.0) < 1e-9
    assert op_class("QAttention") == "int8_attention" and op_class("DynamicQuantizeLinear") == "quantize"
    assert op_class("SkipLayerNormalization") == "layernorm" and op_class("Reshape") == "other"


def test_parse_profile_skips_warmup_runs(tmp_path):
    from onellm.benchmarks.int8_profile import parse_profile

    def node(ts, dur, op):
        return {"cat": "Node", "name": f"n_{op}_kernel_time", "ts": ts, "dur": dur, "args": {"op_name": op}}

    events = [{"cat": "Session", "name": "model_run", "ts": 0, "dur": 100},
              node(10, 90, "MatMulInteger"),
              {"cat": "Session", "name": "model_run", "ts": 200, "dur": 100},
              node(210, 30, "MatMulInteger"), node(250, 10, "Softmax"),
              {"cat": "Node", "name": "n_fence_before", "ts": 260, "dur": 5, "args": {"op_name": "Softmax"}}]
    path = tmp_path / "p.json"
    path.write_text(json.dumps(events))
    prof = parse_profile(path, skip_runs=1)
    assert prof["per_op_us"] == {"MatMulInteger": 30.0, "Softmax": 10.0}
    assert prof["share"] == {"int8_gemm": 0.75, "softmax": 0.25}


# ----------------------------------------------------------------------------- bench hunks


def test_int8_gemm_ceiling_is_measured():
    from onellm.benchmarks.bench import measure_gemm

    out = measure_gemm(128, 1, 1)
    assert out.onnxruntime_int8.gflop_s.median > 0
    assert "MatMulInteger" in out.onnxruntime_int8.library


def test_int8_ceiling_matches_numpy(monkeypatch):
    """The ceiling's graph computes a real integer product (checked against numpy)."""
    import onnxruntime as ort

    from onellm.benchmarks import bench

    captured = {}
    real = ort.InferenceSession

    class Spy(real):
        def run(self, names, feeds, *a, **k):
            out = super().run(names, feeds, *a, **k)
            captured["a"], captured["c"] = feeds["a"], out[0]
            return out

    monkeypatch.setattr(ort, "InferenceSession", Spy)
    fn = bench._ort_matmul_int8(32, 1)
    fn()
    b = np.random.default_rng(1)
    b.integers(0, 128, (32, 32), dtype=np.uint8)
    w = b.integers(-64, 64, (32, 32), dtype=np.int8)
    np.testing.assert_array_equal(captured["c"], captured["a"].astype(np.int32) @ w.astype(np.int32))


@pytest.mark.parametrize("load, warned", [([0.3, 1.0, 1.0], False), ([0.51, 0.1, 0.1], True), ([], False)])
def test_load_warning(load, warned):
    from onellm.benchmarks.bench import LOAD_WARN, load_warning

    machine = {"load_average": load}
    msg = load_warning(machine)
    assert machine["load_average_start"] == (load[0] if load else None)
    assert bool(msg) is warned
    if warned:
        assert f"load average {load[0]:.2f}" in msg and str(LOAD_WARN) in msg


def test_int8_profile_runs_end_to_end_on_tiny():
    """The whole profiler (export, recipes, cosines, timing rounds, ceilings, profiles) on the tiny preset."""
    from onellm.benchmarks.int8_profile import run
    from onellm.ref.config import resolve_config

    out = run(resolve_config("tiny"), "image", ["fp32", "dynamic"], repeats=1, threads=1, n_calib=2, gemm_n=64)
    assert set(out["ms"]) == {"trunk", "upm", "trunk+upm"}
    assert out["ms"]["trunk+upm"]["dynamic"] == out["ms"]["trunk"]["dynamic"] + out["ms"]["upm"]["dynamic"]
    for g in ("trunk", "upm"):
        assert out["cosine_vs_fp32"][g]["fp32"] > 0.99999
        assert 0.9 < out["cosine_vs_fp32"][g]["dynamic"] < 1.0
        prof = out["profile"][g]["dynamic"]
        assert prof["per_class_us"].get("int8_gemm", 0) > 0
        assert 0 < prof["int8_gemm_fraction_of_ceiling"]
    assert "onnxruntime_int8_before_profiles" in out["ceilings_gflop_s"]
    assert out["int8_ceiling_used_gop_s"] >= out["ceilings_gflop_s"]["onnxruntime_int8"]["max"]
