"""Every registry entry is consistent, and its users derive from it (no second list)."""

from __future__ import annotations

import pytest

from onellm.runtime import registry
from onellm.runtime.errors import BackendError, ConfigError
from onellm.runtime.registry import DECODER_QUANTS, ENCODER_PRECISIONS, EXECUTION_PROVIDERS


@pytest.mark.parametrize("name", list(DECODER_QUANTS))
def test_each_quant_names_a_real_gguf_file_type(name):
    gguf = pytest.importorskip("gguf")
    q = DECODER_QUANTS[name]
    assert q.name == name
    assert int(gguf.LlamaFileType[q.gguf_ftype]) == q.llama_ftype  # gguf-py's constant is llama.cpp's value
    assert set(q.tolerance) == {"rel", "cos", "top1"}
    assert 0 < q.tolerance["cos"] <= 1 and 0 < q.tolerance["top1"] <= 1 and q.tolerance["rel"] > 0
    assert q.help


def test_quant_tolerances_loosen_with_fewer_bits():
    order = [DECODER_QUANTS[q].tolerance for q in ("f32", "f16", "q8_0", "q4_k_m", "q4_0")]
    for finer, coarser in zip(order, order[1:]):
        assert coarser["cos"] <= finer["cos"] and coarser["rel"] >= finer["rel"]


@pytest.mark.parametrize("offered", [["CPU_REPACK"], ["AMX", "CPU_REPACK"], ["AMX"], []])
@pytest.mark.parametrize("name", list(DECODER_QUANTS))
def test_each_quant_buffer_policy_runs(name, offered, monkeypatch):
    from onellm.runtime import _llama

    monkeypatch.delenv("ONELLM_LLAMA_EXTRA_BUFTS", raising=False)
    monkeypatch.setattr(_llama, "cpu_extra_buffer_types", lambda: list(offered))
    # the quantized types take the extra types wherever CPU_REPACK exists; AMX neither enables
    # nor blocks it (the loader routes around AMX, tests/test_llama_bufts.py)
    assert DECODER_QUANTS[name].use_extra_bufts() is (name in ("q8_0", "q4_k_m", "q4_0") and "CPU_REPACK" in offered)
    monkeypatch.setenv("ONELLM_LLAMA_EXTRA_BUFTS", "0")
    assert DECODER_QUANTS[name].use_extra_bufts() is False  # the environment wins


def test_quantize_model_rejects_an_unknown_quant(tmp_path):
    from onellm.runtime._llama import quantize_model

    with pytest.raises(ConfigError, match="q3_xs.*f32, f16, q8_0, q4_k_m"):
        quantize_model(tmp_path / "a.gguf", tmp_path / "b.gguf", "q3_xs")


@pytest.mark.parametrize("name", list(ENCODER_PRECISIONS))
def test_each_precision_has_a_parity_floor(name):
    p = ENCODER_PRECISIONS[name]
    assert p.name == name and 0.9 < p.min_cosine <= 1 and p.help


def test_export_reads_the_registries():
    pytest.importorskip("torch")
    pytest.importorskip("gguf")
    from onellm.export import gguf as gguf_export
    from onellm.export import onnx_encoder

    assert onnx_encoder.PARITY_MIN_COSINE == {n: p.min_cosine for n, p in ENCODER_PRECISIONS.items()}
    assert gguf_export.QUANTS == tuple(DECODER_QUANTS)
    assert gguf_export.TOLERANCES == {n: dict(q.tolerance) for n, q in DECODER_QUANTS.items()}


@pytest.mark.parametrize("name", list(EXECUTION_PROVIDERS))
def test_each_provider_is_consistent_and_its_check_runs(name):
    import onnxruntime as ort

    ep = EXECUTION_PROVIDERS[name]
    assert ep.device == name and ep.device_type in ("cpu", "cuda")
    assert all(f in EXECUTION_PROVIDERS for f in ep.fallbacks)
    assert all(p in ENCODER_PRECISIONS for p in ep.precisions)
    available = ep.is_available()
    assert available is (ep.ort_provider in ort.get_available_providers())
    providers = ep.session_providers(device_id=1, extra={"x": 1})
    names = [p if isinstance(p, str) else p[0] for p in providers]
    assert names[0] == ep.ort_provider and names[-1] == "CPUExecutionProvider"
    if ep.device_type != "cpu":
        assert providers[0][1]["device_id"] == 1 and providers[0][1]["x"] == 1
    if all(EXECUTION_PROVIDERS[d].is_available() for d in (name, *ep.fallbacks)):
        assert registry.resolve_device(name)[0] is ep
    else:
        with pytest.raises(BackendError, match="needs onnxruntime's"):
            registry.resolve_device(name)


def test_pick_precision_prefers_the_providers_then_the_bundle_default():
    cpu, cuda = EXECUTION_PROVIDERS["cpu"], EXECUTION_PROVIDERS["cuda"]
    assert cpu.pick_precision(("fp32", "int8"), "fp32") == "int8"
    assert cpu.pick_precision(("fp16",), "fp16") == "fp16"
    assert cuda.pick_precision(("fp32", "fp16"), "fp32") == "fp16"
    assert cuda.pick_precision(("fp32", "int8"), "int8") == "int8"


def test_unknown_device_lists_the_registry():
    with pytest.raises(BackendError, match="cpu, cuda, tensorrt, auto"):
        registry.resolve_device("tpu")


def test_cli_choices_come_from_the_registries():
    from onellm.cli import main

    ask = main.commands["ask"]
    choices = {p.name: list(getattr(p.type, "choices", []) or []) for p in ask.params}
    assert choices["quant"] == list(DECODER_QUANTS)
    assert choices["precision"] == list(ENCODER_PRECISIONS)
    assert choices["device"] == ["auto", *EXECUTION_PROVIDERS]
