"""benchmarks/block_prefill_pairs.py: BOS with the block vs BOS alone, paired on one decoder."""

from __future__ import annotations

import json

import pytest

from onellm.benchmarks import block_prefill_pairs as bp


def test_a_real_run_pairs_both_paths_in_abba_order(tiny_bundle, tmp_path, monkeypatch):
    order = []
    real = bp._prefill

    def spy(dec, ids, block, split):
        order.append("split" if split else "merged")
        return real(dec, ids, block, split)

    monkeypatch.setattr(bp, "_prefill", spy)
    out = tmp_path / "pairs.json"
    assert bp.main(["--bundle", str(tiny_bundle), "--quant", "f32", "--rounds", "3", "--threads", "1",
                    "--out", str(out)]) == 0
    res = json.loads(out.read_text())
    # warm-up, then rounds alternating which side goes first
    assert order == ["merged", "split", "merged", "split", "split", "merged", "merged", "split"]
    assert res["decode_calls"] == {"merged": 1, "split": 3}  # one batch / BOS, rows, text
    assert all(r[1] == 1 for r in res["runs"]["merged"]) and all(r[1] == 3 for r in res["runs"]["split"])
    assert res["split_over_merged"]["n"] == 3 and res["positions"] == res["prompt_tokens"] + res["rows"]
    ratios = sorted(s[0] / m[0] for m, s in zip(res["runs"]["merged"], res["runs"]["split"]))
    assert res["split_over_merged"]["median"] == pytest.approx(ratios[1])
    assert "split / merged" in out.with_suffix(".md").read_text()
    # after a split run the model's own row lookup is back
    from onellm.runtime.decoder import Decoder

    with Decoder(tiny_bundle / "decoder-f32.gguf", n_ctx=256) as dec:
        bp._prefill(dec, [1, 5, 6], __import__("numpy").zeros((32, dec.n_embd), "float32"), True)
        assert dec._model.embedding_rows() is not None


def test_a_missing_gguf_is_named(tiny_bundle):
    with pytest.raises(FileNotFoundError, match="no q4_0 GGUF"):
        bp.run_pairs(tiny_bundle, "q4_0", rounds=1, threads=1, n_ctx=256)
