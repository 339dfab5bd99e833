"""benchmarks/quant_pairs.py: GGUF types of one bundle side by side in rotating rounds."""

from __future__ import annotations

import json
import shutil

import pytest

from onellm.benchmarks import quant_pairs as qp


@pytest.fixture(scope="module")
def two_type_bundle(tiny_bundle, tmp_path_factory):
    from onellm.runtime._llama import quantize_model

    out = tmp_path_factory.mktemp("qp") / "b"
    shutil.copytree(tiny_bundle, out)
    quantize_model(out / "decoder-f32.gguf", out / "decoder-q8_0.gguf", "q8_0")
    return out


def test_rounds_rotate_and_ratios_pair_the_same_round(two_type_bundle, monkeypatch, tmp_path):
    order = []
    fake = iter([(1.0, 1.0, 8), (2.0, 1.0, 8)]  # warm-up: f32, q8_0
                + [(1.0, 2.0, 8), (2.0, 1.0, 8),  # round 0: f32 then q8_0
                   (3.0, 1.0, 8), (1.0, 1.0, 8),  # round 1: q8_0 then f32
                   (2.0, 2.0, 8), (1.0, 4.0, 8)])  # round 2: f32 then q8_0

    def run(dec, ids, sampling, block):
        order.append(dec.path.name)
        assert block.shape == (32, dec.n_embd) and ids[0] == dec.bos_id
        prefill, decode, n = next(fake)
        return prefill, decode, [0] * n, n

    monkeypatch.setattr("onellm.benchmarks.bench.session_greedy_run", run)
    res = qp.run_pairs(two_type_bundle, ["f32", "q8_0"], rounds=3, new_tokens=8, threads=1, n_ctx=256)
    names = ["decoder-f32.gguf", "decoder-q8_0.gguf"]
    assert order == names + names + names[::-1] + names
    q8 = res["types"]["q8_0"]
    # per round: prefill 2/1, 3/1, 1/2; decode (8/1)/(8/2), (8/1)/(8/1), (8/4)/(8/2)
    assert q8["prefill_over_first"]["median"] == pytest.approx(2.0)
    assert q8["decode_over_first"]["median"] == pytest.approx(1.0) and q8["decode_over_first"]["max"] == pytest.approx(2.0)
    assert res["types"]["f32"]["prefill_over_first"]["median"] == 1.0
    assert "| q8_0 |" in qp.to_markdown(res)


def test_a_real_run_and_bad_arguments(two_type_bundle, tmp_path):
    out = tmp_path / "qp.json"
    assert qp.main(["--bundle", str(two_type_bundle), "--quants", "f32,q8_0", "--rounds", "2", "--new-tokens", "4",
                    "--threads", "1", "--n-ctx", "256", "--out", str(out)]) == 0
    res = json.loads(out.read_text())
    assert all(len(v) == 2 and all(r[2] == 4 for r in v) for v in res["runs"].values())
    with pytest.raises(FileNotFoundError, match="decoder-q4_0.gguf"):
        qp.run_pairs(two_type_bundle, ["f32", "q4_0"], 1, 4, 1, 256)
    with pytest.raises(ValueError, match="two or more"):
        qp.run_pairs(two_type_bundle, ["f32"], 1, 4, 1, 256)
