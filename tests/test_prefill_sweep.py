"""Smoke test of benchmarks/prefill_sweep.py on the tiny bundle (the real sweep is a manual benchmark).

Checks what the sweep computes, not how fast: its prefill feeds llama.cpp what the
runtime's Session.prefill feeds (same last-position logits), derived GGUF types are
quantised once from the f16 file and cached, n_ubatch reaches the context, and every
cell of the grid is reported.
"""

from __future__ import annotations

import numpy as np
import pytest

from onellm.benchmarks import prefill_sweep as ps


def test_sweep_prefill_matches_the_runtime_session(tiny_bundle, tiny_gguf):
    from onellm.runtime import _llama
    from onellm.runtime.decoder import Decoder

    ids, n_rows, n_embd = ps.first_question(tiny_bundle)
    assert ids[0] == 1 and len(ids) > 20 and n_rows == 32
    block = np.random.default_rng(0).standard_normal((n_rows, n_embd)).astype(np.float32)
    path = tiny_gguf("f32")
    with Decoder(path, n_ctx=256, n_threads=1, kv_type="f32", flash_attn=False) as dec:
        want = dec.session().prefill(ids, block)[0]
    model = _llama.LlamaModel(path, n_gpu_layers=0)
    try:
        ctx = _llama.LlamaContext(model, n_ctx=256, n_batch=40, n_ubatch=8, n_threads=1, kv_type="f32",
                                  flash_attn=False)
        assert (ctx.n_batch, ctx.n_ubatch) == (40, 8)  # the text goes in chunks of 40, graphs of 8
        batch = _llama.LlamaBatch(max(ctx.n_batch, n_rows))
        seconds = ps.prefill_once(ctx, batch, ids, block)
        got = ctx.logits_ith(-1)
        assert seconds > 0
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * float(np.abs(want).max()))
        # a second prefill starts from an empty cache again: the same logits
        ps.prefill_once(ctx, batch, ids, block)
        np.testing.assert_allclose(ctx.logits_ith(-1), got, rtol=1e-5, atol=1e-5)
        assert ps.decode_rate(ctx, batch, len(ids) + n_rows, 3) > 0
        batch.close()
        ctx.close()
    finally:
        model.close()


def test_sweep_grid_and_derived_types(tiny_bundle, tiny_gguf, tmp_path, monkeypatch):
    from onellm.runtime import _llama

    calls = []
    real = _llama.quantize_ftype
    monkeypatch.setattr(_llama, "quantize_ftype", lambda *a, **k: (calls.append(a[2]), real(*a, **k))[1])
    pairs = ps.parse_pairs("64", "32,64,128")
    assert pairs == [(64, 32), (64, 64)]
    work = tmp_path / "derived"
    result = ps.run_sweep(bundle=tiny_bundle, quants=["f32", "q4_0", "bf16"], pairs=pairs, bufts=[False, True],
                          threads=1, repeats=1, new_tokens=2, work=work, f16=tiny_gguf("f16"))
    rows = result["rows"]
    assert len(rows) == 3 * 2 * 2
    assert {(r["quant"], r["extra_bufts"], r["n_ubatch"]) for r in rows} == {
        (q, b, u) for q in ("f32", "q4_0", "bf16") for b in (False, True) for u in (32, 64)}
    assert all(r["prefill_s"] > 0 and r["decode_tok_s"] > 0 and r["positions"] == result["settings"]["prompt_tokens"] + 32
               for r in rows)
    assert (work / "decoder-q4_0.gguf").is_file() and (work / "decoder-bf16.gguf").is_file()
    assert ps.LLAMA_FTYPE_BF16 in calls
    from onellm.export.gguf import read_gguf_metadata

    assert read_gguf_metadata(work / "decoder-q4_0.gguf")["kv"]["general.file_type"] == 2
    assert read_gguf_metadata(work / "decoder-bf16.gguf")["kv"]["general.file_type"] == ps.LLAMA_FTYPE_BF16
    # cached: asking again quantises nothing
    n = len(calls)
    assert ps.gguf_for("bf16", tiny_bundle, tiny_gguf("f16"), work) == work / "decoder-bf16.gguf"
    assert len(calls) == n
    assert set(result["best"]) == {"f32", "q4_0", "bf16"}
    md = ps.to_markdown(result)
    assert md.count("| q4_0 |") == 4 and "load average" in md


def test_missing_source_is_a_one_line_error(tiny_bundle, tmp_path):
    from onellm.runtime.errors import ConfigError

    with pytest.raises(ConfigError, match="no q4_0 GGUF"):
        ps.gguf_for("q4_0", tiny_bundle, None, tmp_path)
