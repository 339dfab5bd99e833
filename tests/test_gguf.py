"""The GGUF decoder export: metadata llama.cpp needs standalone, tensor names, logits parity.

Parity is measured on BOS + the tiny model's own 32-row encoder output (imu) + 40 random
text tokens, at every one of the 73 positions. Tolerances (measured on this tiny model,
logit std ~0.22):
- f32 with an f32 KV cache and no flash attention: max|diff| / std <= 1e-4 (measured 2e-6:
  float32 summation order only, which proves the unpermuted Meta layout is right).
- f32 / f16 with llama.cpp's defaults (f16 KV cache, flash attention auto = on for CPU):
  <= 0.02 (measured 0.005 / 0.006). K and V are rounded to f16 (relative step 2^-11 ~ 5e-4
  per element) and CPU flash attention takes Q in f16 too; each contributes ~1.5e-3 of the
  logit std after two layers.
- q8_0: <= 0.2, cosine >= 0.999, top-1 agreement >= 0.95 (measured 0.064 / 0.9998 / 1.0).
- q4_k_m: <= 1.0, cosine >= 0.98, top-1 >= 0.85 (measured 0.33 / 0.9945 / 0.96). On the tiny
  preset (width 128) llama.cpp falls back to q5_0/q8_0 for every tensor whose rows are not a
  multiple of 256, so a second check runs a width-256 decoder where Q4_K/Q6_K are really used:
  <= 1.5, cosine >= 0.95, top-1 >= 0.75 (measured 0.67 / 0.979 / 0.88).
Random tiny models have flat logits; these figures say nothing about the 7B's quality.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

gguf = pytest.importorskip("gguf")
torch = pytest.importorskip("torch")

from onellm.export.gguf import (  # noqa: E402
    chat_template,
    compare_logits,
    decoder_keys,
    export_gguf,
    gguf_tensor_names,
    read_gguf_metadata,
    reference_logits,
    validate_gguf,
)
from onellm.runtime.errors import BackendError, CheckpointError, ConfigError, ParityError  # noqa: E402

PARITY = {  # quant -> (max|diff|/std, min cosine, min top-1 agreement)
    "f32": (0.02, 0.9999, 1.0),
    "f16": (0.02, 0.9999, 1.0),
    "q8_0": (0.2, 0.999, 0.95),
    "q4_k_m": (1.0, 0.98, 0.85),
}


@pytest.fixture(scope="module")
def parity_inputs(tiny_model, tiny_config):
    """(block, text ids, reference logits): the imu encoder output of a fixed input."""
    rng = np.random.default_rng(0)
    x = torch.from_numpy(rng.standard_normal((1, 6, 400)).astype(np.float32))
    with torch.no_grad():
        block = tiny_model.encode("imu", x)[0].numpy()
    text = rng.integers(3, tiny_config.decoder.vocab_size, size=40).tolist()
    return block, text, reference_logits(tiny_model, tiny_config, 1, block, text)


def test_gguf_metadata_is_complete_for_standalone_llama_cpp(tiny_gguf, tiny_config, tiny_tokenizer):
    import sentencepiece as spm

    path = tiny_gguf("f32")
    meta = read_gguf_metadata(path)
    kv, d = meta["kv"], tiny_config.decoder
    assert kv["general.architecture"] == "llama"
    assert kv["llama.context_length"] == d.max_seq_len
    assert kv["llama.embedding_length"] == d.dim
    assert kv["llama.block_count"] == d.n_layers
    assert kv["llama.feed_forward_length"] == d.ffn_hidden
    assert kv["llama.attention.head_count"] == kv["llama.attention.head_count_kv"] == d.n_heads
    assert kv["llama.rope.dimension_count"] == d.head_dim
    assert kv["llama.rope.freq_base"] == pytest.approx(d.rope_theta)
    assert kv["llama.attention.layer_norm_rms_epsilon"] == pytest.approx(d.norm_eps)
    assert kv["llama.vocab_size"] == d.vocab_size
    assert kv["general.file_type"] == 0
    sp = spm.SentencePieceProcessor(model_file=str(tiny_tokenizer))
    assert kv["tokenizer.ggml.model"] == "llama"
    assert kv["tokenizer.ggml.tokens"] == [sp.IdToPiece(i) for i in range(sp.vocab_size())]
    assert kv["tokenizer.ggml.scores"] == pytest.approx([sp.GetScore(i) for i in range(sp.vocab_size())])
    types = kv["tokenizer.ggml.token_type"]
    assert types.count(int(gguf.TokenType.BYTE)) == 256  # byte fallback pieces <0x00>..<0xFF>
    assert types[sp.unk_id()] == gguf.TokenType.UNKNOWN and types[sp.bos_id()] == gguf.TokenType.CONTROL
    assert (kv["tokenizer.ggml.bos_token_id"], kv["tokenizer.ggml.eos_token_id"],
            kv["tokenizer.ggml.unknown_token_id"]) == (sp.bos_id(), sp.eos_id(), sp.unk_id())
    assert kv["tokenizer.ggml.add_bos_token"] is True and kv["tokenizer.ggml.add_eos_token"] is False
    assert kv["tokenizer.chat_template"] == chat_template()
    # tensor names come from gguf-py's table, every one of them is written, all f32
    expected = {gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.TOKEN_EMBD] + ".weight",
                gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.OUTPUT] + ".weight",
                gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.ATTN_Q].format(bid=d.n_layers - 1) + ".weight"}
    assert expected <= set(meta["tensors"])
    assert set(meta["tensors"]) == set(gguf_tensor_names(tiny_config).values())
    assert {t for t, _ in meta["tensors"].values()} == {"F32"}

    # llama.cpp loads it on its own and agrees on vocabulary, specials and tokenization
    from onellm.runtime.decoder import Decoder
    from onellm.runtime.prompt import render_prompt

    with Decoder(path) as dec:
        assert (dec.n_vocab, dec.n_embd, dec.n_ctx) == (d.vocab_size, d.dim, d.max_seq_len)
        assert (dec.bos_id, dec.eos_id) == (sp.bos_id(), sp.eos_id())
        assert dec.meta("tokenizer.chat_template") == chat_template()
        for text in (render_prompt("Describe the scene."), "naïve café – 日本語 ✓ 1024 tokens"):
            assert dec.tokenize(text, add_bos=True) == [sp.bos_id(), *sp.encode(text)]
            assert dec.detokenize(sp.encode(text)) == sp.decode(sp.encode(text))


def test_chat_template_renders_the_v1_conversation():
    jinja2 = pytest.importorskip("jinja2")
    from onellm.runtime.prompt import render_prompt

    tpl = jinja2.Environment().from_string(chat_template())
    msgs = [{"role": "user", "content": "What is this?"}]
    assert tpl.render(messages=msgs, add_generation_prompt=True) == render_prompt("What is this?")
    msgs = [{"role": "user", "content": "q1"}, {"role": "assistant", "content": "a1"}, {"role": "user", "content": "q2"}]
    assert tpl.render(messages=msgs, add_generation_prompt=True) == render_prompt("q2", history=[("q1", "a1")])


def test_file_types_and_tensor_types(tiny_gguf):
    f16 = read_gguf_metadata(tiny_gguf("f16"))
    assert f16["kv"]["general.file_type"] == 1
    for name, (ttype, shape) in f16["tensors"].items():
        assert ttype == ("F32" if len(shape) == 1 else "F16"), name  # norms stay f32
    q8 = read_gguf_metadata(tiny_gguf("q8_0"))
    assert q8["kv"]["general.file_type"] == 7
    assert {t for t, s in q8["tensors"].values() if len(s) == 2} == {"Q8_0"}
    q4 = read_gguf_metadata(tiny_gguf("q4_k_m"))
    assert q4["kv"]["general.file_type"] == 15


def _wide_config(cfg):
    """A decoder whose rows are multiples of 256, so llama.cpp really uses Q4_K/Q6_K."""
    dec = dataclasses.replace(cfg.decoder, dim=256, n_heads=4, multiple_of=256, max_seq_len=256)
    return dataclasses.replace(cfg, name="wide", decoder=dec)


def test_q4_k_m_on_a_256_aligned_decoder_uses_k_quants_and_keeps_parity(tiny_config, tiny_tokenizer, tmp_path):
    from onellm.ref.model import OneLLM

    cfg = _wide_config(tiny_config)
    model = OneLLM(cfg).init_random_(seed=3).eval()
    sd = {k: v for k, v in model.state_dict().items() if k in set(decoder_keys(cfg))}
    info = export_gguf(sd, cfg, tiny_tokenizer, tmp_path / "wide-q4.gguf", quant="q4_k_m")
    assert info["intermediate"] == "f32" and info["file_type"] == 15
    types = {t for t, s in read_gguf_metadata(info["path"])["tensors"].values() if len(s) == 2}
    assert {"Q4_K", "Q6_K"} <= types
    figures = validate_gguf(model, cfg, info["path"], "q4_k_m", n_text=24)
    # real 4-bit k-quants on Gaussian random weights (no outliers, flat logits): measured
    # rel 0.67, min cosine 0.979, top-1 0.88 over 57 positions
    assert figures["rel"] <= 1.5 and figures["cos_min"] >= 0.95 and figures["top1"] >= 0.75, figures


@pytest.mark.parametrize("quant", list(PARITY))
def test_logits_parity_at_every_position(quant, tiny_gguf, parity_inputs):
    from onellm.runtime.decoder import Decoder

    block, text, ref = parity_inputs
    with Decoder(tiny_gguf(quant), n_ctx=128) as dec:
        got = dec.logits_for(block, text)
    assert got.shape == ref.shape == (1 + 32 + len(text), 512)
    fig = compare_logits(ref, got)
    rel, cos, top1 = PARITY[quant]
    assert fig["rel"] <= rel and fig["cos_min"] >= cos and fig["top1"] >= top1, fig


def test_f32_is_exact_with_an_f32_kv_cache(tiny_gguf, parity_inputs):
    """Without f16 rounding (KV cache, flash attention) llama.cpp equals torch to float32 noise."""
    from onellm.runtime.decoder import Decoder

    block, text, ref = parity_inputs
    with Decoder(tiny_gguf("f32"), n_ctx=128, kv_type="f32", flash_attn=False) as dec:
        got = dec.logits_for(block, text)
    assert compare_logits(ref, got)["rel"] <= 1e-4


def test_permuted_qk_layout_fails_parity(tiny_checkpoint, tiny_config, tiny_tokenizer, tiny_model, tmp_path):
    """Negative control: the Hugging Face style wq/wk permutation would be wrong here."""
    from onellm.ref.checkpoint import open_checkpoint

    d = tiny_config.decoder

    def hf_permute(w):
        return w.view(d.n_heads, d.head_dim // 2, 2, d.dim).transpose(1, 2).reshape(d.dim, d.dim)

    sd = dict(open_checkpoint(tiny_checkpoint))
    for i in range(d.n_layers):
        for w in ("wq", "wk"):
            key = f"layers.{i}.attention.{w}.weight"
            sd[key] = hf_permute(sd[key])
    path = export_gguf(sd, tiny_config, tiny_tokenizer, tmp_path / "permuted.gguf", quant="f32")["path"]
    with pytest.raises(ParityError, match="differ from the reference"):
        validate_gguf(tiny_model, tiny_config, path, "f32", tolerances={"rel": 0.02})
    good = validate_gguf(tiny_model, tiny_config, export_gguf(
        open_checkpoint(tiny_checkpoint), tiny_config, tiny_tokenizer, tmp_path / "ok.gguf", quant="f32")["path"], "f32")
    assert good["rel"] <= 0.02


def test_export_streams_one_tensor_at_a_time(tiny_checkpoint, tiny_config, tiny_tokenizer, tmp_path):
    """At most one converted tensor is alive while writing (peak memory = one tensor)."""
    import weakref

    from onellm.ref.checkpoint import open_checkpoint

    src = open_checkpoint(tiny_checkpoint)
    alive: set[int] = set()
    peak = [0]

    class Lazy(dict):  # hands out fresh copies and counts how many are alive at once
        def __getitem__(self, key):
            t = src[key].clone()
            alive.add(id(t))
            weakref.finalize(t, alive.discard, id(t))
            peak[0] = max(peak[0], len(alive))
            return t

    lazy = Lazy.fromkeys(src)
    calls = []
    info = export_gguf(lazy, tiny_config, tiny_tokenizer, tmp_path / "lazy.gguf", quant="f16",
                       progress=lambda done, total, name: calls.append((done, total, name)))
    assert peak[0] <= 2, peak  # the shape pass holds none; the write pass one (plus the next)
    n = len(decoder_keys(tiny_config))
    assert [c[0] for c in calls] == list(range(1, n + 1)) and {c[1] for c in calls} == {n}
    assert info["n_params"] == sum(src[k].numel() for k in decoder_keys(tiny_config))
    assert len(info["sha256"]) == 64 and info["bytes"] == (tmp_path / "lazy.gguf").stat().st_size


def test_export_errors_are_one_line(tiny_checkpoint, tiny_config, tiny_tokenizer, tmp_path):
    from onellm.ref.checkpoint import open_checkpoint
    from onellm.runtime._llama import quantize_model

    sd = dict(open_checkpoint(tiny_checkpoint))
    with pytest.raises(ConfigError, match="unknown GGUF quantization"):
        export_gguf(sd, tiny_config, tiny_tokenizer, tmp_path / "x.gguf", quant="q3")
    broken = dict(sd)
    del broken["layers.1.feed_forward.w2.weight"]
    with pytest.raises(CheckpointError, match="1 decoder tensors missing"):
        export_gguf(broken, tiny_config, tiny_tokenizer, tmp_path / "x.gguf")
    small = dataclasses.replace(tiny_config, decoder=dataclasses.replace(tiny_config.decoder, vocab_size=300))
    with pytest.raises((ConfigError, CheckpointError)):
        export_gguf(sd, small, tiny_tokenizer, tmp_path / "x.gguf")
    with pytest.raises(ConfigError, match="tokenizer file not found"):
        export_gguf(sd, tiny_config, tmp_path / "none.model", tmp_path / "x.gguf")
    assert not list(tmp_path.glob("*.gguf*"))  # nothing half-written left behind
    (tmp_path / "junk.gguf").write_bytes(b"not a model")
    with pytest.raises(BackendError, match="llama_model_quantize to q8_0 failed with code"):
        quantize_model(tmp_path / "junk.gguf", tmp_path / "out.gguf", "q8_0")
