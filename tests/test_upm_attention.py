"""benchmarks/upm_attention.py: the UPM attention chain vs MultiHeadAttention (small shapes here)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from onellm.benchmarks import upm_attention as ua


def test_both_graphs_compute_the_same_attention_and_the_run_reports_it(tmp_path):
    out = tmp_path / "ua.json"
    assert ua.main(["--tokens", "10", "--width", "64", "--heads", "4", "--rounds", "2", "--threads", "1",
                    "--out", str(out)]) == 0
    res = json.loads(out.read_text())
    assert res["rows"] == 40 and len(res["ms"]["chain"]) == len(res["ms"]["fused"]) == 2
    assert res["max_abs_diff"] < 1e-4 and res["chain_ms"] > 0 and res["fused_ms"] > 0


def test_the_chain_is_softmax_attention():
    """An oracle in numpy: the exported chain is scaled dot-product attention per head."""
    import onnxruntime as ort

    sq, s, width, heads = 5, 7, 16, 2
    rng = np.random.default_rng(1)
    q, k, v = (rng.standard_normal((1, n, width), dtype=np.float32) for n in (sq, s, s))
    sess = ort.InferenceSession(ua._graph("chain", sq, s, width, heads), providers=["CPUExecutionProvider"])
    got = sess.run(None, {"q": q, "k": k, "v": v})[0]
    hd = width // heads
    split = lambda x: x[0].reshape(x.shape[1], heads, hd).transpose(1, 0, 2)  # noqa: E731
    sc = split(q) @ split(k).transpose(0, 2, 1) / np.sqrt(hd)
    p = np.exp(sc - sc.max(-1, keepdims=True))
    want = ((p / p.sum(-1, keepdims=True)) @ split(v)).transpose(1, 0, 2).reshape(1, sq, width)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="divisible"):
        ua.run(10, 30, 4, 1, 1)
