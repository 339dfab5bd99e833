"""Precision and fusion passes over exported fp32 encoder graphs, with onnxruntime's own tools.

In: an fp32 `.onnx` file written by `export/onnx_encoder.py`. Out: a new `.onnx` file.

* `optimize_graph`: onnxruntime's transformer optimizer
  (`onnxruntime.transformers.optimizer.optimize_model`, Python fusions only, opt_level 0,
  so the file stays portable between CPU and GPU). On the CLIP trunk (`model_type="clip"`)
  it fuses LayerNorm + residual into SkipLayerNormalization, x*sigmoid(1.702x) into
  QuickGelu and the attention into one `Attention` node; on the LLaMA-block experts
  (`model_type="bert"`) it fuses RMSNorm (+ residual) into (Skip)SimplifiedLayerNormalization.
* `unfuse_skip_layer_norm`: on the int8 graphs (a CPU precision), each SkipLayerNormalization
  is split back into Add (+ bias Add) and LayerNormalization. The optimizer needs the fused
  node as an anchor to find the attention, but onnxruntime's CPU kernel for it is slow.
  Measured (AMD EPYC Zen 4, 2 threads, a chain of 48 norms of 257 x 1024): 0.78 ms per fused
  norm against 0.21 ms for Add + LayerNormalization; the bench preset's int8 trunk ran
  293 -> 274 ms (median of 11 interleaved rounds). The fp32 and fp16 graphs, which GPU
  providers run too, keep the fused node (the split was not measured on a GPU).
* `convert_fp16`: `onnxruntime.transformers.float16.convert_float_to_float16` with fp32
  inputs/outputs kept (`keep_io_types`), so stages of mixed precision chain without casts
  in the runtime; ops on the converter's default block list stay fp32.
* `quantize_int8`: int8 weights for MatMul (and fused Attention) nodes, for CPUs, by one of
  the `INT8_RECIPES` (measured side by side by `benchmarks/int8_profile.py`):
  - `dynamic` (the default): `quantize_dynamic`, activations quantised per call
    (DynamicQuantizeMatMul / QAttention kernels), per-channel weight scales;
  - `dynamic_per_tensor`: the same with one scale per weight matrix;
  - `static_qoperator` / `static_qdq`: `quantize_static` with activation scales calibrated
    once at export (MinMax over `calibration`, a list of feed dicts), QLinearMatMul kernels
    or QuantizeLinear/DequantizeLinear pairs. onnxruntime has no static kernel for the
    fused Attention node, so its QKV projection stays fp32 there.
* `quantize_static_qdq` (encoder precision ov-int8): NNCF's post-training quantization of
  the plain (unfused) trunk and UPM, calibrated at export on every exported modality's
  inputs, written as a QDQ `.onnx` file that OpenVINO runs with int8 kernels and
  (on AVX512-BF16 CPUs) bf16 for the rest.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from onellm.runtime.errors import ConfigError

log = logging.getLogger(__name__)

# Ops quantize_dynamic may turn into integer kernels. Conv stays fp32 (the tokenizers'
# convolutions are small, and ConvInteger is slow on CPU).
INT8_OP_TYPES = ("MatMul", "Attention")


def optimize_graph(src: Path, dst: Path, model_type: str, num_heads: int, hidden_size: int) -> dict[str, int]:
    """Run the transformer optimizer's fusions on src, write dst; returns the fused-op counts."""
    from onnxruntime.transformers.optimizer import optimize_model

    quiet = logging.getLogger("onnxruntime.transformers")
    level = quiet.level
    quiet.setLevel(logging.WARNING)
    try:
        opt = optimize_model(
            str(src), model_type=model_type, num_heads=num_heads, hidden_size=hidden_size,
            opt_level=0, use_gpu=False,
        )
        counts = {k: int(v) for k, v in opt.get_fused_operator_statistics().items() if v}
        opt.save_model_to_file(str(dst))
    finally:
        quiet.setLevel(level)
    log.debug("optimized %s (%s): %s", src.name, model_type, counts)
    return counts


def unfuse_skip_layer_norm(model: onnx.ModelProto) -> int:
    """Split each SkipLayerNormalization node into Add (+ bias Add) + LayerNormalization, in place.

    SkipLayerNormalization(x, skip, gamma, beta?, bias?) -> (out, mean?, inv_std?, sum?):
    sum = x + skip (+ bias); out = LayerNormalization(sum, gamma, beta) over the last axis with
    the node's epsilon. Nodes that expose mean or inv_std (nothing the optimizer writes does)
    are left fused. Returns how many were split.
    """
    graph = model.graph
    taken = {o for n in graph.node for o in n.output} | {i.name for i in graph.input}
    nodes, n_split = [], 0
    for node in graph.node:
        outs = list(node.output) + [""] * (4 - len(node.output))
        if node.op_type != "SkipLayerNormalization" or node.domain != "com.microsoft" or outs[1] or outs[2]:
            nodes.append(node)
            continue
        ins = list(node.input) + [""] * (5 - len(node.input))
        x, skip, gamma, beta, bias = ins[:5]
        eps = next((a.f for a in node.attribute if a.name == "epsilon"), 1e-12)  # the contrib op's default
        base = node.name or outs[0]
        total = outs[3] or _fresh(f"{base}_sum", taken)
        if bias:
            partial = _fresh(f"{base}_sum_no_bias", taken)
            nodes.append(onnx.helper.make_node("Add", [x, skip], [partial], name=f"{base}_add"))
            nodes.append(onnx.helper.make_node("Add", [partial, bias], [total], name=f"{base}_add_bias"))
        else:
            nodes.append(onnx.helper.make_node("Add", [x, skip], [total], name=f"{base}_add"))
        nodes.append(onnx.helper.make_node("LayerNormalization", [total, gamma] + ([beta] if beta else []),
                                           [outs[0]], name=f"{base}_norm", axis=-1, epsilon=eps))
        n_split += 1
    if n_split:
        if not any(o.domain in ("", "ai.onnx") and o.version >= 17 for o in model.opset_import):
            raise ConfigError("unfuse_skip_layer_norm: LayerNormalization needs opset >= 17 in the graph")
        del graph.node[:]
        graph.node.extend(nodes)
    return n_split


def unfuse_skip_layer_norm_file(path: Path, fused_ops: dict[str, int]) -> dict[str, int]:
    """`unfuse_skip_layer_norm` on the graph file at `path`, rewritten in place when anything was
    split; returns `fused_ops` (the optimizer's fusion counts) as they now hold for that file."""
    model = onnx.load(str(path))
    split = unfuse_skip_layer_norm(model)
    if not split:
        return dict(fused_ops)
    onnx.save(model, str(path))
    counts = dict(fused_ops)
    counts["SkipLayerNormalization"] = counts.get("SkipLayerNormalization", 0) - split
    counts = {k: v for k, v in counts.items() if v}
    counts["SkipLayerNormalization_unfused"] = split
    return counts


def _fresh(name: str, taken: set[str]) -> str:
    out, i = name, 0
    while out in taken:
        i += 1
        out = f"{name}_{i}"
    taken.add(out)
    return out


def convert_fp16(src: Path, dst: Path, keep_fp32_nodes: tuple[str, ...] = ()) -> None:
    """fp16 weights and compute, fp32 inputs and outputs."""
    from onnxruntime.transformers.float16 import convert_float_to_float16

    model = onnx.load(str(src))
    model16 = convert_float_to_float16(model, keep_io_types=True, node_block_list=list(keep_fp32_nodes) or None)
    onnx.save(model16, str(dst))


# name -> (kind, per-channel weights, quant format); see the module docstring
INT8_RECIPES = {
    "dynamic": ("dynamic", True, None),
    "dynamic_per_tensor": ("dynamic", False, None),
    "static_qoperator": ("static", True, "QOperator"),
    "static_qdq": ("static", True, "QDQ"),
}
DEFAULT_INT8_RECIPE = "dynamic"


def quantize_int8(src: Path, dst: Path, per_channel: bool | None = None, *, recipe: str = DEFAULT_INT8_RECIPE,
                  calibration: Sequence[dict[str, np.ndarray]] | None = None) -> dict[str, Any]:
    """int8 weights for src's MatMul (and Attention) nodes by `recipe`; returns what was done.

    `per_channel` overrides the recipe's choice. Per-channel scales need every MatMul weight
    to be a 2-D matrix; onnxruntime's MatMulIntegerToFloat rejects per-channel zero points of
    stacked [E, in, out] weights (the batched-experts UPM), which then gets per-tensor scales.
    The static recipes need `calibration`: feed dicts of src's inputs (fp32 activations of
    the real chain), at least one.
    """
    if recipe not in INT8_RECIPES:
        raise ConfigError(f"unknown int8 recipe {recipe!r}; known: {', '.join(INT8_RECIPES)}")
    kind, recipe_pc, fmt = INT8_RECIPES[recipe]
    per_channel = recipe_pc if per_channel is None else per_channel
    if per_channel and _has_stacked_matmul_weights(src):
        per_channel = False
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_dynamic, quantize_static

    info: dict[str, Any] = {"recipe": recipe, "per_channel": per_channel}
    # onnxruntime.quantization logs its advice through the root logger; keep it quiet here.
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        if kind == "dynamic":
            quantize_dynamic(
                str(src), str(dst), op_types_to_quantize=list(INT8_OP_TYPES), per_channel=per_channel,
                weight_type=QuantType.QInt8,
                extra_options={"MatMulConstBOnly": True},
            )
        else:
            feeds = list(calibration or ())
            if not feeds:
                raise ConfigError(f"int8 recipe {recipe!r} needs calibration inputs for {Path(src).name}; got none")
            qoperator = fmt == "QOperator"
            quantize_static(
                str(src), str(dst), _FeedReader(feeds),
                quant_format=QuantFormat.QOperator if qoperator else QuantFormat.QDQ,
                op_types_to_quantize=["MatMul"], per_channel=per_channel,
                # QLinearMatMul's fast CPU path is u8 activations x s8 weights
                activation_type=QuantType.QUInt8 if qoperator else QuantType.QInt8,
                weight_type=QuantType.QInt8,
                extra_options={"MatMulConstBOnly": True},
            )
            info["calibration_inputs"] = len(feeds)
    finally:
        root.setLevel(level)
    return info


class _FeedReader:
    """onnxruntime's CalibrationDataReader protocol over a list of feed dicts."""

    def __init__(self, feeds: Sequence[dict[str, np.ndarray]]) -> None:
        self._it = iter(feeds)

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self._it, None)

    def rewind(self) -> None:  # pragma: no cover - not called by MinMax calibration
        raise NotImplementedError


def _has_stacked_matmul_weights(path: Path) -> bool:
    model = onnx.load(str(path), load_external_data=False)
    dims = {i.name: len(i.dims) for i in model.graph.initializer}
    return any(n.op_type == "MatMul" and dims.get(n.input[1], 2) > 2 for n in model.graph.node)


# ---------------------------------------------------------------------------- static int8 for OpenVINO

# Precisions whose trunk and UPM are statically quantised by NNCF into QDQ graphs that OpenVINO
# runs in int8 (the other graphs of the chain stay fp32). benchmarks/openvino_encoder.py measured
# this 1.23x (image) / 1.39x (IMU) faster than onnxruntime's dynamic int8 on trunk + UPM, same run.
STATIC_OV_PRECISIONS = ("ov-int8",)


def quantize_static_qdq(src: Path, dst: Path, calibration: Sequence[dict[str, np.ndarray]]) -> dict[str, Any]:
    """NNCF post-training static int8 (transformer preset: SmoothQuant, int8 MatMul weights per
    channel and activations per tensor) of the plain fp32 graph `src` -> a QDQ graph `dst`.

    `calibration`: the graph's feeds on calibration inputs (every exported modality's).
    Needs nncf (the `openvino` extra). Returns what was done, for the manifest.
    """
    if not calibration:
        raise ConfigError(f"{src.name}: static int8 needs calibration inputs")
    try:
        import nncf
    except ImportError:
        raise ConfigError("encoder precision ov-int8 needs NNCF at export: install the `openvino` extra "
                          "(pip install 'onellm[openvino]')") from None
    import contextlib
    import io

    nncf.set_log_level(logging.ERROR)
    model = onnx.load(str(src))
    # NNCF prints progress bars on stdout; the export reports its own progress
    with contextlib.redirect_stdout(io.StringIO()):
        quantized = nncf.quantize(model, nncf.Dataset(list(calibration)), model_type=nncf.ModelType.TRANSFORMER,
                                  subset_size=len(calibration))
    del model
    onnx.save(quantized, str(dst))
    counts: dict[str, int] = {}
    for node in quantized.graph.node:
        if node.op_type in ("QuantizeLinear", "DequantizeLinear"):
            counts[node.op_type] = counts.get(node.op_type, 0) + 1
    return {"recipe": "nncf_static_transformer", "format": "QDQ", "runtime": "openvino",
            "calibration_inputs": len(calibration), "nncf": nncf.__version__, "nodes": counts}
