"""The ceiling benchmarks: benchmarks/limits.py's cost models agree with the bench's and the
model's own sizes and both its parts run end to end on the tiny preset; openvino_encoder's
attention quantization puts the pairs where it says (the figures come from manual runs)."""

from __future__ import annotations

import dataclasses
import json

import pytest

from onellm.benchmarks import bench, limits
from onellm.ref.config import load_preset


def test_encoder_gemms_are_the_bench_cost_model_without_attention_and_the_trimmed_rows():
    cfg = load_preset("bench")
    c, u = cfg.clip, cfg.upm
    flops = bench.encoder_flops(cfg, "image")
    length = cfg.tokenizers.n_patch_tokens("clip_patch", c) + 1
    gemms = limits.encoder_gemms(cfg, length)
    trunk = sum(2.0 * m * k * n * count for name, m, k, n, count in gemms if name.startswith("trunk"))
    attention = 2.0 * c.layers * 2 * length * length * c.width
    assert trunk == pytest.approx(flops["clip_trunk"] - attention, rel=1e-12)

    rows, w, ffn = length + u.n_resample_tokens, c.width, cfg.upm_ffn_hidden
    full_blocks = 2.0 * u.n_experts * u.depth * (4 * rows * w * w + 3 * rows * w * ffn)
    trimmed = 2.0 * u.n_experts * (rows - u.n_resample_tokens) * (2 * w * w + 3 * w * ffn)  # wq, wo, w1-w3
    upm = sum(2.0 * m * k * n * count for name, m, k, n, count in gemms if name.startswith("upm"))
    assert upm == pytest.approx(full_blocks - trimmed, rel=1e-12)


def test_decoder_flops_per_position_counts_every_layer_weight():
    import torch

    from onellm.ref.model import OneLLM

    cfg = load_preset("tiny")
    model = OneLLM(cfg)
    weights = sum(p.numel() for k, p in model.state_dict().items()
                  if k.startswith("layers.") and p.dim() == 2 and isinstance(p, torch.Tensor))
    assert weights > 0
    positions = 9
    attention = 2.0 * cfg.decoder.n_layers * cfg.decoder.dim * (positions + 1) / 2
    assert limits.decoder_flops_per_position(cfg, positions) == pytest.approx(2.0 * weights + 2.0 * attention)


def test_both_parts_run_on_the_tiny_preset(tmp_path):
    out = tmp_path / "limits.json"
    rc = limits.main(["--preset", "tiny", "--layers", "1", "--quants", "q8_0", "--rounds", "1", "--new-tokens", "2",
                      "--positions", "12", "--modalities", "image=5", "--ceiling-n", "128", "--vocab", "512",
                      "--work", str(tmp_path / "work"), "--out", str(out)])
    assert rc == 0
    got = json.loads(out.read_text())
    gemm = got["gemm"]["image"]
    assert gemm["rows"] == 5 and gemm["sum_ms"]["torch_bf16"] > 0
    assert {"torch_bf16", "onnxruntime_int8"} <= set(gemm["gop_s"])
    rows = got["prefill"]["rows"]
    assert set(rows) == {"q8_0", "torch_bf16"}
    assert all(r["prefill_ms"] > 0 and r["decode_tok_s"] > 0 for r in rows.values())
    assert rows["q8_0"]["file_mib"] > 0 and rows["torch_bf16"]["x_torch_bf16"] == pytest.approx(1.0)
    assert "GEMM-only encoder speed-up" in out.with_suffix(".md").read_text()
    assert not (tmp_path / "work").exists()  # removed without --keep


def test_attention_quantization_puts_int8_pairs_on_both_activation_inputs():
    """openvino_encoder's ov_qdq_attn candidate: QDQ on Q, K (per tensor, from their calibrated
    absolute maximum) and on the softmax output (u8, 1/255), the graph's answer kept."""
    import numpy as np
    import onnx
    import onnxruntime as ort
    from onnx import helper, numpy_helper

    from onellm.benchmarks.openvino_encoder import quantize_attention_inputs

    rng = np.random.default_rng(0)
    wq, wk, wv = (rng.standard_normal((16, 16)).astype(np.float32) * 0.3 for _ in range(3))
    nodes = [helper.make_node("MatMul", ["x", "wq"], ["q"]), helper.make_node("MatMul", ["x", "wk"], ["k"]),
             helper.make_node("MatMul", ["x", "wv"], ["v"]), helper.make_node("Transpose", ["k"], ["kt"]),
             helper.make_node("MatMul", ["q", "kt"], ["scores"]),
             helper.make_node("Softmax", ["scores"], ["probs"], axis=-1),
             helper.make_node("MatMul", ["probs", "v"], ["y"])]
    graph = helper.make_graph(nodes, "attn", [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [8, 16])],
                              [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [8, 16])],
                              initializer=[numpy_helper.from_array(a, n) for a, n in ((wq, "wq"), (wk, "wk"), (wv, "wv"))])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 19)])
    model.ir_version = 10
    calib = [{"x": rng.standard_normal((8, 16)).astype(np.float32)} for _ in range(3)]
    ref = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    q_max = max(float(np.abs(f["x"] @ wq).max()) for f in calib)

    quantized, n = quantize_attention_inputs(model, calib)
    assert n == 4  # q, kt, probs, v
    producer = {o: nd for nd in quantized.graph.node for o in nd.output}
    act_matmuls = [nd for nd in quantized.graph.node if nd.op_type == "MatMul" and nd.input[1] not in ("wq", "wk", "wv")]
    assert len(act_matmuls) == 2
    assert all(producer[i].op_type == "DequantizeLinear" for nd in act_matmuls for i in nd.input)
    inits = {t.name: numpy_helper.to_array(t) for t in quantized.graph.initializer}
    assert float(inits["q_attn_scale"]) == pytest.approx(q_max / 127, rel=1e-6)
    assert float(inits["probs_attn_scale"]) == pytest.approx(1 / 255) and inits["probs_attn_zp"].dtype == np.uint8
    got = ort.InferenceSession(quantized.SerializeToString(), providers=["CPUExecutionProvider"])
    for f in calib:
        a, b = ref.run(None, f)[0].ravel(), got.run(None, f)[0].ravel()
        assert float(a @ b / np.linalg.norm(a) / np.linalg.norm(b)) > 0.99
        assert not np.array_equal(a, b)  # it did quantize
