"""`onellm bench`: the tiny smoke run end to end, the result schema, the cost models and targets.

The smoke run reuses the session's tiny bundle and checkpoint (fp32 encoder, f32 GGUF),
one timed run, no warm-up: what it checks is that every stage is measured and reported,
with agreement figures that are real (f32 llama.cpp and fp32 onnxruntime must agree with
the torch reference), not how fast anything is. The JSON is validated with the
hand-written checker in `onellm.benchmarks.report` (no jsonschema dependency).
"""

from __future__ import annotations

import copy
import dataclasses
import importlib.util
import json

import pytest

pytest.importorskip("torch")


@pytest.fixture(scope="module")
def bench_run(tiny_bundle, tiny_checkpoint, tiny_tokenizer, tmp_path_factory):
    from click.testing import CliRunner

    from onellm.cli import main

    out = tmp_path_factory.mktemp("bench-out")
    work = tmp_path_factory.mktemp("bench-work")
    args = ["bench", "--preset", "tiny", "--repeats", "1", "--warmup", "0", "--new-tokens", "6",
            "--modalities", "image,imu", "--encoder-precisions", "fp32", "--decoder-quants", "f32",
            "--bundle", str(tiny_bundle), "--checkpoint", str(tiny_checkpoint), "--tokenizer", str(tiny_tokenizer),
            "--work-dir", str(work), "--out", str(out), "--device", "cpu"]
    res = CliRunner().invoke(main, args, catch_exceptions=False)
    assert res.exit_code == 0, res.output
    return out, json.loads((out / "bench.json").read_text()), res.output


def test_tiny_bench_json_validates_and_has_every_row(bench_run):
    from onellm.benchmarks.bench import bf16_supported
    from onellm.benchmarks.report import validate

    out, data, _ = bench_run
    assert validate(data) == []
    assert data["schema"] == "onellm-bench" and data["random_weights"] is True and "RANDOM" in data["notice"]
    enc = {(r["modality"], r["backend"], r["precision"]) for r in data["encoder"]}
    dec = {(r["modality"], r["backend"], r["precision"]) for r in data["decoder"]}
    torch_dtypes = ["fp32"] + (["bf16"] if bf16_supported() else [])
    for m in ("image", "imu"):
        assert {(m, "onnxruntime", "fp32")} | {(m, "torch", d) for d in torch_dtypes} <= enc
        assert {(m, "llama.cpp", "f32")} | {(m, "torch", d) for d in torch_dtypes} <= dec
    for r in data["encoder"]:
        assert set(r["stages_s"]) == {"preprocess", "tokenizer", "clip_trunk", "upm_projection"}
        assert r["encode_s"]["median"] > 0 and r["gflop_s"] > 0
        if r["backend"] == "onnxruntime":
            assert r["cosine_vs_torch_fp32"] > 0.9999, r  # fp32 graphs are exact up to rounding
            assert r["plain_sessions_encode_s"]["median"] > 0
    for r in data["decoder"]:
        assert r["new_tokens"] >= 1 and r["decode_tokens_per_s"] > 0 and r["prefill_tokens_per_s"] > 0
        assert r["bytes_per_token"] > 0 and 0 < r["fraction_of_bandwidth_ceiling"]
        assert r["ttft_s"] >= r["prefill_s"]["median"]
        if r["backend"] == "llama.cpp":
            assert r["top1_agreement"] >= 0.8, r  # f32 GGUF vs torch fp32, teacher-forced
    ceil = data["ceilings"]
    assert ceil["bandwidth"]["gb_s"]["median"] > 0.1 and ceil["gemm"]["numpy_fp32"]["gflop_s"]["median"] > 0.1
    loop = data["overhead"]["decode_loop"]
    assert loop and loop[0]["ours"]["decode_tokens_per_s"] > 0 and loop[0]["llama_cpp_python"]["tokens"] == 6
    chat = data["chat"]
    assert chat["turn2_prefill_positions"] < chat["turn1_prefill_positions"]  # no re-encoding, no re-prefill
    assert data["footprint"] and all("peak_rss_mib" in f for f in data["footprint"])
    names = {t["name"] for t in data["targets"]}
    assert {"ort_fp32_vs_torch_fp32/image", "chat_followup_ttft_ratio", "decode_loop_vs_llama_cpp_python"} <= names


def test_tiny_bench_writes_markdown_and_chart(bench_run):
    out, data, output = bench_run
    md = (out / "bench.md").read_text()
    assert "## Encoder" in md and "## Decoder" in md and "## Targets" in md and "RANDOM" in md
    assert md.count("| image | onnxruntime | fp32 |") == 1
    assert "## Targets" in output  # the table is printed too
    has_mpl = importlib.util.find_spec("matplotlib") is not None
    png = out / "bench.png"
    assert png.is_file() == has_mpl
    if has_mpl:
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_validate_names_what_is_wrong(bench_run):
    from onellm.benchmarks.report import validate

    _, data, _ = bench_run
    broken = copy.deepcopy(data)
    del broken["decoder"][0]["decode_tokens_per_s"]
    broken["encoder"][0]["encode_s"]["median"] = float("nan")
    broken["settings"]["repeats"] = "1"
    broken["chat"] = []
    problems = validate(broken)
    assert any("$.decoder[0].decode_tokens_per_s: missing" in p for p in problems)
    assert any("$.encoder[0].encode_s.median: not a finite number" in p for p in problems)
    assert any("$.settings.repeats: expected int" in p for p in problems)
    assert any("$.chat: expected" in p for p in problems)
    assert len(problems) == 4


def test_encoder_flops_match_the_spec_budget():
    """Spec section 10: CLIP ViT-L/14 on 257 tokens ~81 GMAC, the UPM on 287 rows ~92 GMAC."""
    from onellm.benchmarks.bench import encoder_flops
    from onellm.ref.config import load_preset

    cfg = load_preset("bench")
    f = encoder_flops(cfg, "image")
    assert f["clip_trunk"] / 2 / 1e9 == pytest.approx(81, rel=0.02)
    assert f["upm_projection"] / 2 / 1e9 == pytest.approx(92, rel=0.03)
    # audio: 1213 tokens vs 257; the linear layers scale with the tokens, attention faster
    audio = encoder_flops(cfg, "audio")["total"] / f["total"]
    assert 1213 / 257 < audio < 1.25 * 1213 / 257


def test_bench_preset_is_the_release_encoder_with_a_1b_decoder():
    from onellm.ref.config import load_preset
    from onellm.ref.model import count_parameters

    bench, release = load_preset("bench"), load_preset("7b")
    for part in ("clip", "upm", "tokenizers"):
        assert getattr(bench, part) == getattr(release, part)
    n = count_parameters(dataclasses.replace(bench, modalities=("image", "imu")))
    assert 0.9e9 < n["decoder"] < 1.2e9
    assert n["total"] * 4 < 7 * 2**30  # fp32 reference fits beside the runtime in 24 GiB


def test_targets_are_ratios_of_the_rows():
    from onellm.benchmarks.report import evaluate_targets

    def stat(x):
        return {"median": x, "min": x, "max": x, "n": 1}

    enc = [
        {"modality": "image", "backend": "torch", "precision": "fp32", "device": "cpu", "encode_s": stat(3.0),
         "cosine_vs_torch_fp32": 1.0},
        {"modality": "image", "backend": "torch", "precision": "bf16", "device": "cpu", "encode_s": stat(1.0),
         "cosine_vs_torch_fp32": 0.999},
        {"modality": "image", "backend": "onnxruntime", "precision": "fp32", "device": "cpu", "encode_s": stat(1.5),
         "cosine_vs_torch_fp32": 1.0},
        {"modality": "image", "backend": "onnxruntime", "precision": "int8", "device": "cpu", "encode_s": stat(0.5),
         "cosine_vs_torch_fp32": 0.95},  # fast but wrong: must not count as the best
    ]
    dec = [
        {"modality": "image", "backend": "torch", "precision": "fp32", "decode_tokens_per_s": 2.0},
        {"modality": "image", "backend": "llama.cpp", "precision": "q8_0", "decode_tokens_per_s": 7.0,
         "fraction_of_bandwidth_ceiling": 0.5},
    ]
    result = {"settings": {"modalities": ["image"]}, "encoder": enc, "decoder": dec,
              "overhead": {"decode_loop": [{"quant": "q8_0", "ratio": 0.97}]}, "chat": {"ratio": 0.2}}
    t = {x["name"]: x for x in evaluate_targets(result)}
    assert t["encoder_best_vs_torch_best/image"]["measured"] == pytest.approx(1.0 / 1.5)
    assert t["encoder_best_vs_torch_best/image"]["met"] is False
    assert t["ort_fp32_vs_torch_fp32/image"]["measured"] == pytest.approx(2.0) and t["ort_fp32_vs_torch_fp32/image"]["met"]
    assert t["q8_0_decode_vs_torch_fp32"]["measured"] == pytest.approx(3.5)
    assert t["q8_0_decode_fraction_of_bandwidth"]["met"] is False
    assert t["decode_loop_vs_llama_cpp_python"]["met"] and t["chat_followup_ttft_ratio"]["met"]


def test_mismatched_bundle_is_refused_before_any_work(tiny_bundle, tmp_path):
    from click.testing import CliRunner

    from onellm.cli import main

    res = CliRunner().invoke(main, ["bench", "--preset", "bench", "--bundle", str(tiny_bundle),
                                    "--work-dir", str(tmp_path), "--out", str(tmp_path / "o")])
    assert res.exit_code != 0
    assert "cannot reuse this bundle" in res.output and "config differs" in res.output
    assert not (tmp_path / "checkpoint").exists()
