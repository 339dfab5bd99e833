"""benchmarks/decode_pairs.py: the ABBA-paired decode comparison (the real runs are manual benchmarks).

Checks the bookkeeping that decides a 3 % target: the order alternates within rounds, ratios
pair runs of the same round, decode rates count llama_decode calls (ours: every returned
token; plain: n-1 from its first token), and a real run on the tiny bundle reports both sides.
"""

from __future__ import annotations

import json

import pytest

from onellm.benchmarks import decode_pairs as dp


def test_rounds_alternate_and_ratios_pair_the_same_round(tiny_bundle, monkeypatch):
    calls = []
    ours_runs = iter([(0.0, 0.0, 0)] + [(1.0, 2.0, 10), (1.0, 1.0, 10), (2.0, 4.0, 10), (1.0, 2.0, 10)])
    plain_runs = iter([(0.0, 0.0, 0)] + [(2.0, 2.0, 9), (2.0, 2.0, 9), (2.0, 4.0, 9), (2.0, 2.0, 9)])

    def fake(name, it):
        def run():
            calls.append(name)
            return next(it)
        return run

    monkeypatch.setattr(dp, "_ours", lambda *a, **k: (fake("ours", ours_runs), None))
    monkeypatch.setattr(dp, "_plain", lambda *a, **k: (fake("plain", plain_runs), None))
    out = dp.run_pairs(tiny_bundle, "f32", ["shipped"], rounds=4, new_tokens=10, threads=1, n_ctx=256)
    assert calls == ["ours", "plain", "ours", "plain", "plain", "ours", "ours", "plain", "plain", "ours"]
    # per round: (10/2)/(9/2), (10/1)/(9/2), (10/4)/(9/4), (10/2)/(9/2)
    want = sorted([10 / 9, 20 / 9, 10 / 9, 10 / 9])
    d = out["vs_plain"]["ours_shipped"]["decode_ratio"]
    assert d["median"] == pytest.approx(10 / 9) and d["max"] == pytest.approx(want[-1]) and d["n"] == 4
    assert out["vs_plain"]["ours_shipped"]["prefill_speed_ratio"]["median"] == pytest.approx(2.0)
    assert "ours_shipped" in dp.to_markdown(out)


def test_a_real_run_on_the_tiny_bundle(tiny_bundle, tmp_path):
    out_file = tmp_path / "pairs.json"
    assert dp.main(["--bundle", str(tiny_bundle), "--quant", "f32", "--variants", "shipped,off", "--rounds", "2",
                    "--new-tokens", "4", "--threads", "1", "--n-ctx", "256", "--out", str(out_file)]) == 0
    out = json.loads(out_file.read_text())
    assert set(out["runs"]) == {"ours_shipped", "ours_off", "plain"}
    assert all(r[2] == 4 for r in out["runs"]["ours_off"])  # ours: 4 tokens, 4 decodes
    assert all(r[2] == 3 for r in out["runs"]["plain"])  # plain: 3 decodes after its first token
    for v in out["vs_plain"].values():
        assert v["decode_ratio"]["median"] > 0 and v["prefill_s"] > 0
    assert out_file.with_suffix(".md").read_text().startswith("Decode pairs, f32")
    with pytest.raises(SystemExit):
        dp.main(["--bundle", str(tiny_bundle), "--quant", "f32", "--variants", "fast", "--out", str(out_file)])


@pytest.mark.parametrize("plain_first", [False, True])
def test_load_order_changes_only_which_model_is_loaded_first(tiny_bundle, monkeypatch, plain_first):
    loads, calls = [], []

    def loader(name):
        def load(*a, **k):
            loads.append(name)

            def run():
                calls.append(name)
                return (1.0, 1.0, 4)
            return run, None
        return load

    monkeypatch.setattr(dp, "_ours", loader("ours"))
    monkeypatch.setattr(dp, "_plain", loader("plain"))
    out = dp.run_pairs(tiny_bundle, "f32", ["shipped"], rounds=2, new_tokens=4, threads=1, n_ctx=256,
                       plain_first=plain_first)
    assert loads == (["plain", "ours"] if plain_first else ["ours", "plain"])
    assert calls == ["ours", "plain", "ours", "plain", "plain", "ours"]  # rounds alternate as before
    assert out["loaded_first"] == loads[0] and f"{loads[0]} loaded first" in dp.to_markdown(out)


def test_the_adaptive_variant_leaves_threads_to_the_governor(tiny_bundle, monkeypatch):
    from onellm.runtime import _llama

    made = {}
    real = dp._ours

    def spy(path, ids, extra, quant, n_ctx, threads, new_tokens):
        run, dec = real(path, ids, extra, quant, n_ctx, threads, new_tokens)
        made[threads] = dec._ctx.governor  # before run_pairs closes the decoder
        return run, dec

    monkeypatch.setattr(dp, "_ours", spy)
    monkeypatch.delenv(_llama.ADAPTIVE_ENV, raising=False)
    out = dp.run_pairs(tiny_bundle, "f32", ["shipped", "adaptive"], rounds=1, new_tokens=3, threads=1, n_ctx=256)
    assert set(out["vs_plain"]) == {"ours_shipped", "ours_adaptive"}
    # shipped: the fixed count given; adaptive: none given, so the governor picks per decode
    assert made[1] is None
    assert made[None] is not None


def test_processes_give_every_model_a_worker_of_its_own(tiny_bundle, tmp_path):
    import os

    out_file = tmp_path / "pairs.json"
    assert dp.main(["--bundle", str(tiny_bundle), "--quant", "f32", "--variants", "shipped", "--rounds", "2",
                    "--new-tokens", "4", "--threads", "1", "--n-ctx", "256", "--processes",
                    "--out", str(out_file)]) == 0
    out = json.loads(out_file.read_text())
    pids = out["processes"]
    assert set(pids) == {"ours_shipped", "plain"}
    assert len(set(pids.values())) == 2 and os.getpid() not in pids.values()
    assert all(r[2] == 4 for r in out["runs"]["ours_shipped"]) and all(r[2] == 3 for r in out["runs"]["plain"])
    assert len(out["runs"]["plain"]) == 2 and out["vs_plain"]["ours_shipped"]["decode_ratio"]["n"] == 2
    assert "each model in its own process" in out_file.with_suffix(".md").read_text()


def test_a_worker_that_cannot_load_its_model_fails_the_run_by_name(tiny_bundle, tmp_path):
    bad = tmp_path / "decoder-f32.gguf"
    bad.write_bytes(b"not a gguf")
    for f in tiny_bundle.iterdir():  # the bundle's other files, so only the GGUF is broken
        if f.name != bad.name and not (tmp_path / f.name).exists():
            (tmp_path / f.name).symlink_to(f)
    with pytest.raises(RuntimeError, match="ours_shipped worker"):
        dp.run_pairs(tmp_path, "f32", ["shipped"], rounds=1, new_tokens=3, threads=1, n_ctx=256, processes=True)


def test_reloads_swap_the_load_order_and_pool_the_rounds(tiny_bundle, monkeypatch):
    loads, calls = [], []
    rates = {"ours": iter([4.0, 2.0, 2.0, 4.0, 4.0, 2.0]), "plain": iter([4.0, 4.0, 4.0, 4.0, 4.0, 4.0])}

    def loader(name):
        def load(*a, **k):
            loads.append(name)

            def run():
                calls.append(name)
                return (1.0, 4.0 / next(rates[name]), 4)  # decode s for that rate of 4 decodes
            return run, None
        return load

    monkeypatch.setattr(dp, "_ours", loader("ours"))
    monkeypatch.setattr(dp, "_plain", loader("plain"))
    out = dp.run_pairs(tiny_bundle, "f32", ["shipped"], rounds=2, new_tokens=4, threads=1, n_ctx=256, reloads=2)
    # cycle 1: ours loaded first; cycle 2: plain first; each cycle warms both up, then ABBA
    assert loads == ["ours", "plain", "plain", "ours"]
    assert calls == ["ours", "plain", "ours", "plain", "plain", "ours"] * 2
    assert [c["loaded_first"] for c in out["cycles"]] == ["ours", "plain"]
    assert out["loaded_first"] == "alternating" and out["rounds"] == 4 and len(out["runs"]["plain"]) == 4
    # timed ours rates (warm-ups dropped): 2, 2 | 4, 2 against plain's 4s -> ratios 0.5, 0.5, 1.0, 0.5
    d = out["vs_plain"]["ours_shipped"]["decode_ratio"]
    assert d["n"] == 4 and d["median"] == pytest.approx(0.5) and d["max"] == pytest.approx(1.0)
    assert "load order swapped over 2 reloads" in dp.to_markdown(out)
