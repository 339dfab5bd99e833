"""The f32 decoder setting: a bundle's f32 GGUF runs with an f32 KV cache and exact attention.

`Pipeline.load` takes the llama.cpp context settings from the quant registry
(`DecoderQuant.context_settings`, also `decoder.context_settings_for`), keyed by the bundle's
quant name: f32 -> kv_type f32, flash attention off; q8_0 and the 4-bit types -> an f16 cache
with flash attention on; f16 -> llama.cpp's defaults (f16 cache, flash attention auto).

Measured on the tiny f32 bundle (BOS + the bundle's own 32 imu rows + 40 text tokens,
logit std ~0.22), max|logit diff| / logit std against the torch reference:
2.4e-6 with the pipeline's settings (max|diff| 5.4e-7), 8.7e-4 with llama.cpp's defaults
(5.5e-3 when BOS, rows and text went to llama.cpp as three batches, not one).
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

pytest.importorskip("torch")

from onellm.runtime.decoder import Decoder, context_settings_for  # noqa: E402
from onellm.runtime.registry import decoder_quant  # noqa: E402
from onellm.runtime.modalities import get_modality  # noqa: E402

EXACT_REL = 1e-4  # max|diff| / std: float32 summation order only
DEFAULTS_REL = 0.02  # f16 cache and flash attention (tests/test_gguf.py's bound for f32)


@pytest.fixture(scope="module")
def parity(tiny_pipeline, tiny_model, tiny_config):
    """(block, text ids, torch reference logits) for the bundle's own imu encoder output."""
    from onellm.export.gguf import reference_logits

    rng = np.random.default_rng(5)
    x = get_modality("imu").dummy_input(rng).astype(np.float32)
    block = np.array(tiny_pipeline.encoder.encode("imu", x), copy=True)
    text = rng.integers(3, tiny_config.decoder.vocab_size, size=40).tolist()
    ref = reference_logits(tiny_model, tiny_config, tiny_pipeline.decoder.bos_id, block, text)
    return block, text, ref


def test_settings_table_is_keyed_by_quant():
    assert context_settings_for("f32") == {"kv_type": "f32", "flash_attn": False}
    for quant in ("f16", "a-future-type"):
        assert context_settings_for(quant) == {}
    for quant in ("q8_0", "q4_k_m", "q4_0"):  # f16 cache: a Q8_0 one decoded 9 % slower on Zen 4
        assert context_settings_for(quant) == {"flash_attn": True}
    context_settings_for("f32")["kv_type"] = "f16"  # callers get a copy
    assert decoder_quant("f32").context_settings()["kv_type"] == "f32"


def test_pipeline_runs_the_f32_bundle_exactly(tiny_pipeline, parity):
    from onellm.export.gguf import compare_logits

    block, text, ref = parity
    dec = tiny_pipeline.decoder
    assert tiny_pipeline.quant == "f32"
    assert (dec.kv_type, dec.flash_attn) == ("f32", False)
    got = dec.logits_for(block, text)
    assert got.shape == ref.shape == (1 + 32 + len(text), ref.shape[1])
    fig = compare_logits(ref, got)
    print(f"f32 bundle, pipeline settings: max|diff|/std {fig['rel']:.3g}, max|diff| {fig['max_abs']:.3g}")
    assert fig["rel"] <= EXACT_REL, fig
    assert fig["top1"] == 1.0


def test_llama_cpp_defaults_miss_that_tolerance(tiny_pipeline, parity):
    """Negative control: the same GGUF with the default context is over 5x outside that tolerance."""
    from onellm.export.gguf import compare_logits

    block, text, ref = parity
    with Decoder(tiny_pipeline.decoder.path, n_ctx=128) as dec:
        assert (dec.kv_type, dec.flash_attn) == ("f16", None)
        fig = compare_logits(ref, dec.logits_for(block, text))
    print(f"f32 bundle, llama.cpp defaults: max|diff|/std {fig['rel']:.3g}, max|diff| {fig['max_abs']:.3g}")
    assert 5 * EXACT_REL < fig["rel"] <= DEFAULTS_REL


@pytest.mark.parametrize("quant,settings", [("f16", ("f16", None)), ("q8_0", ("f16", True)),
                                            ("q4_k_m", ("f16", True))])
def test_other_quants_keep_their_settings(quant, settings, tiny_bundle, monkeypatch):
    """The choice follows the bundle's quant name: the f32 file listed as another type runs with that type's."""
    from onellm.runtime import pipeline

    real = pipeline.load_manifest

    def with_alias(path, verify=True):
        bundle = real(path, verify=verify)
        quants = bundle.manifest.decoder.quants
        quants[quant] = dataclasses.replace(quants["f32"], quant=quant)
        return bundle

    monkeypatch.setattr(pipeline, "load_manifest", with_alias)
    with pipeline.Pipeline.load(tiny_bundle, device="cpu", quant=quant, n_ctx=64) as pipe:
        assert pipe.quant == quant
        assert (pipe.decoder.kv_type, pipe.decoder.flash_attn) == settings


def test_q8_0_cache_reaches_llama_cpp_and_needs_flash_attention(tiny_gguf):
    """The cache setting (`context={"kv_type": ...}`) is what llama.cpp allocates (its own log
    line): a Q8_0 cache takes half the bytes of the quantized types' default f16 one; a Q8_0
    cache without flash attention is refused up front."""
    from onellm.runtime.decoder import capture_native_log

    sizes = {}
    for kv in ("f16", "q8_0"):
        with capture_native_log() as lines, Decoder(tiny_gguf("q8_0"), n_ctx=256, **{
                **context_settings_for("q8_0"), "kv_type": kv}) as dec:
            assert dec.kv_type == kv
        line = next(s for s in lines if "llama_kv_cache: size =" in s)
        assert f"K ({kv})" in line and f"V ({kv})" in line, line
        sizes[kv] = float(line.split("size =")[1].split("MiB")[0])
    # Q8_0: 34 bytes per 32 values (the log prints two decimals of MiB)
    assert sizes["q8_0"] == pytest.approx(sizes["f16"] * 34 / 64, rel=0.05)
    with pytest.raises(ValueError, match="needs flash attention"):
        Decoder(tiny_gguf("q8_0"), n_ctx=256, kv_type="q8_0", flash_attn=False)
