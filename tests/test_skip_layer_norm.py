"""The int8 graphs carry Add + LayerNormalization where the optimizer fused SkipLayerNormalization.

onnxruntime's CPU SkipLayerNormalization kernel is slower than the two ops it replaces
(export/quantize.py: unfuse_skip_layer_norm has the figures), so the export splits it back
in the int8 graphs (a CPU precision) and CPU sessions keep onnxruntime from fusing it again.
Here: the split computes what the fused kernel computes, CPU sessions really keep it split
(a session without the setting fuses it: the control), and the exported tiny int8 trunk has
the split form with its attention still fused while fp32 and fp16 keep the fused node.
"""

from __future__ import annotations

import collections

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from onellm.export.quantize import unfuse_skip_layer_norm
from onellm.runtime.encoder import CPU_DISABLED_OPTIMIZERS, session_kwargs

S, D = 7, 16


def _ops(model: onnx.ModelProto) -> collections.Counter:
    return collections.Counter(n.op_type for n in model.graph.node)


def _fused_model() -> onnx.ModelProto:
    """Two SkipLayerNormalization nodes: the first with a bias and its sum output feeding the
    second (the residual stream), the second with beta and no bias."""
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.standard_normal(D).astype(np.float32), n)
             for n in ("gamma1", "beta1", "bias1", "gamma2", "beta2")]
    nodes = [
        helper.make_node("SkipLayerNormalization", ["x", "skip", "gamma1", "beta1", "bias1"],
                         ["y1", "", "", "sum1"], domain="com.microsoft", epsilon=1e-5, name="sln1"),
        helper.make_node("SkipLayerNormalization", ["sum1", "y1", "gamma2", "beta2"], ["y2"],
                         domain="com.microsoft", epsilon=1e-6, name="sln2"),
    ]
    graph = helper.make_graph(
        nodes, "g",
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, [1, S, D]) for n in ("x", "skip")],
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, [1, S, D]) for n in ("y2", "sum1")],
        inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18), helper.make_opsetid("com.microsoft", 1)])
    model.ir_version = 10
    return model


def _session(model: onnx.ModelProto, optimized_path=None, **kwargs):
    so = ort.SessionOptions()
    so.log_severity_level = 3
    so.intra_op_num_threads = 1
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if optimized_path:
        so.optimized_model_filepath = str(optimized_path)
    return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"], **kwargs)


def test_split_computes_what_the_fused_kernel_computes():
    fused = _fused_model()
    split = _fused_model()
    assert unfuse_skip_layer_norm(split) == 2
    assert _ops(split) == {"Add": 3, "LayerNormalization": 2}
    onnx.checker.check_model(split)
    rng = np.random.default_rng(1)
    feeds = {n: rng.standard_normal((1, S, D)).astype(np.float32) for n in ("x", "skip")}
    want = _session(fused).run(None, feeds)
    got = _session(split, **session_kwargs("cpu")).run(None, feeds)
    for w, g in zip(want, got):
        np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-5)
    # the sum output is the residual stream: exactly x + skip + bias
    np.testing.assert_allclose(got[1], feeds["x"] + feeds["skip"] + numpy_helper.to_array(fused.graph.initializer[2]),
                               rtol=1e-6, atol=1e-6)


def test_nodes_that_expose_mean_or_inv_std_stay_fused():
    model = _fused_model()
    model.graph.node[1].output[:] = ["y2", "mean2"]
    assert unfuse_skip_layer_norm(model) == 1
    assert _ops(model) == {"Add": 2, "LayerNormalization": 1, "SkipLayerNormalization": 1}


def test_cpu_sessions_keep_the_norms_split(tmp_path):
    """The runtime's CPU session settings keep Add + LayerNormalization; without them
    onnxruntime fuses the pair back into SkipLayerNormalization (the control)."""
    assert session_kwargs("cpu") == {"disabled_optimizers": list(CPU_DISABLED_OPTIMIZERS)}
    assert session_kwargs("cuda") == {}
    model = _fused_model()
    unfuse_skip_layer_norm(model)
    model.graph.output.pop()  # sum1 consumed inside only, the shape onnxruntime's fusion matches
    ours, control = tmp_path / "ours.onnx", tmp_path / "control.onnx"
    _session(model, ours, **session_kwargs("cpu"))
    _session(model, control)
    assert _ops(onnx.load(str(control)))["SkipLayerNormalization"] >= 1
    assert _ops(onnx.load(str(ours)))["SkipLayerNormalization"] == 0


def test_exported_int8_trunk_is_split_and_its_attention_fused(tiny_encoder_export, tiny_config):
    """The int8 trunk (CPUs only) carries the split norms with its attention still fused; the
    fp32 and fp16 trunks, which GPU providers run too, keep the fused node."""
    out, results = tiny_encoder_export
    layers = tiny_config.clip.layers
    int8 = results["int8"]["graphs"]["trunk"]
    ops = _ops(onnx.load(str(out / int8["file"])))
    assert ops["SkipLayerNormalization"] == 0
    # ln_1 and ln_2 of every block, plus ln_pre and ln_post
    assert ops["LayerNormalization"] == 2 * layers + 2
    assert ops["QAttention"] == layers
    # every norm after a residual Add was fused by the optimizer, then split: ln_2 of each block,
    # ln_1 of each block but the first (after ln_pre), and ln_post
    assert int8["fused_ops"]["SkipLayerNormalization_unfused"] == 2 * layers
    assert "SkipLayerNormalization" not in int8["fused_ops"]
    for precision in ("fp32", "fp16"):
        entry = results[precision]["graphs"]["trunk"]
        assert _ops(onnx.load(str(out / entry["file"])))["SkipLayerNormalization"] == 2 * layers
        assert entry["fused_ops"]["SkipLayerNormalization"] == 2 * layers
        assert "SkipLayerNormalization_unfused" not in entry["fused_ops"]
