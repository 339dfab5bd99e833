"""Precision and fusion passes over exported fp32 encoder graphs, with onnxruntime's own tools.

In: an fp32 `.onnx` file written by `export/onnx_encoder.py`. Out: a new `.onnx` file.

* `optimize_graph`: onnxruntime's transformer optimizer
  (`onnxruntime.transformers.optimizer.optimize_model`, Python fusions only, opt_level 0,
  so the file stays portable between CPU and GPU). On the CLIP trunk (`model_type="clip"`)
  it fuses LayerNorm + residual into SkipLayerNormalization, x*sigmoid(1.702x) into
  QuickGelu and the attention into one `Attention` node; on the LLaMA-block experts
  (`model_type="bert"`) it fuses RMSNorm (+ residual) into (Skip)SimplifiedLayerNormalization.
* `convert_fp16`: `onnxruntime.transformers.float16.convert_float_to_float16` with fp32
  inputs/outputs kept (`keep_io_types`), so stages of mixed precision chain without casts
  in the runtime; ops on the converter's default block list stay fp32.
* `quantize_int8`: `onnxruntime.quantization.quantize_dynamic`, int8 weights for MatMul
  (and fused Attention) nodes, activations quantised per call; for CPUs.
"""

from __future__ import annotations

import logging
from pathlib import Path

import onnx

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


def convert_fp16(src: Path, dst: Path, keep_fp32_nodes: tuple[str, ...] = ()) -> None:
    """fp16 weights and compute, fp32 inputs and outputs."""
    from onnxruntime.transformers.float16 import convert_float_to_float16

    model = onnx.load(str(src))
    model16 = convert_float_to_float16(model, keep_io_types=True, node_block_list=list(keep_fp32_nodes) or None)
    onnx.save(model16, str(dst))


def quantize_int8(src: Path, dst: Path, per_channel: bool = True) -> None:
    """Dynamic int8 quantisation of the MatMul weights (activations quantised at run time).

    Per-channel scales when every MatMul weight is a 2-D matrix; onnxruntime's
    MatMulIntegerToFloat rejects per-channel zero points of stacked [E, in, out] weights
    (the batched-experts UPM), which then gets per-tensor scales.
    """
    from onnxruntime.quantization import QuantType, quantize_dynamic

    if per_channel and _has_stacked_matmul_weights(src):
        per_channel = False

    # onnxruntime.quantization logs its advice through the root logger; keep it quiet here.
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        quantize_dynamic(
            str(src), str(dst), op_types_to_quantize=list(INT8_OP_TYPES), per_channel=per_channel,
            weight_type=QuantType.QInt8,
            extra_options={"MatMulConstBOnly": True},
        )
    finally:
        root.setLevel(level)


def _has_stacked_matmul_weights(path: Path) -> bool:
    model = onnx.load(str(path), load_external_data=False)
    dims = {i.name: len(i.dims) for i in model.graph.initializer}
    return any(n.op_type == "MatMul" and dims.get(n.input[1], 2) > 2 for n in model.graph.node)
