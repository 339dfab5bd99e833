"""`onellm bench`: the tiny smoke run end to end, the result schema, the cost models and targets.

The smoke run reuses the session's tiny bundle and checkpoint (fp32 encoder, f32 GGUF),
one timed run, no warm-up: what it checks is that every stage is measured and reported,
with agreement figures that are real (f32 llama.cpp and fp32 onnxruntime must agree with
the torch reference), not how fast anything is. The rows are typed
(`onellm.benchmarks.result`): the JSON is read back with `BenchResult.from_dict`, which
rejects unknown, missing and mistyped keys, and a row built without a field fails where
it is built.
"""

from __future__ import annotations

import copy
import dataclasses
import importlib.util
import json
import re
from pathlib import Path

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
    from onellm.benchmarks.result import BenchResult

    out, data, _ = bench_run
    assert BenchResult.from_dict(data).to_dict() == data  # every key known, none missing, every type right
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
    # issue 13's: the footprint rows carry the file sizes their budget is measured against
    assert any(n.startswith("peak_rss_over_files/") for n in names) and "ttft_vs_torch_best/image" in names
    assert all(f["gguf_mib"] > 0 and f["encoder_mib"] > 0 for f in data["footprint"])
    # the footprint probe sizes its context as `onellm ask` does: prompt + 32 rows + 256 answer tokens
    # need more than 256 cells, and the tiny model has 512
    assert all(f["n_ctx"] == 512 and f["kv_type"] for f in data["footprint"])
    # the round-by-round decode ratio: one ratio per timed round, between its extremes
    for o in loop:
        p = o["ratio_paired"]
        assert p["n"] == data["settings"]["repeats"] and p["min"] <= p["median"] <= p["max"] and p["median"] > 0


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


@pytest.mark.parametrize("edit, message", [
    (lambda d: d["decoder"][0].pop("decode_tokens_per_s"), "expected the key 'decoder[0].decode_tokens_per_s', found none"),
    (lambda d: d["encoder"][0]["encode_s"].update(median=float("nan")),
     "key 'encoder[0].encode_s.median' expected a finite number, found nan"),
    (lambda d: d["settings"].update(repeats="1"), "key 'settings.repeats' expected an integer, found '1'"),
    (lambda d: d.update(chat=[]), "key 'chat' expected an object, found list"),
    (lambda d: d["footprint"][0].update(colour=1), "key 'footprint[0].colour' is unknown"),
    (lambda d: d.update(schema_version=2), "expected schema version 1, found 2"),
])
def test_from_dict_names_what_is_wrong(bench_run, edit, message):
    from onellm.benchmarks.result import BenchResult
    from onellm.runtime.errors import ResultFileError

    _, data, _ = bench_run
    broken = copy.deepcopy(data)
    edit(broken)
    with pytest.raises(ResultFileError, match=re.escape(f"bench.json: {message}")):
        BenchResult.from_dict(broken)


@pytest.mark.parametrize("cls_name", ["EncoderRow", "DecoderRow", "ChatRow", "FootprintRow", "DecodeLoopRow",
                                      "Settings", "BenchResult"])
def test_a_row_missing_a_field_fails_where_it_is_built(bench_run, cls_name):
    """Every required field of every row: leaving it out is a TypeError naming it, at construction."""
    from onellm.benchmarks import result as R

    cls = getattr(R, cls_name)
    _, data, _ = bench_run
    sample = {"EncoderRow": data["encoder"][0], "DecoderRow": data["decoder"][0], "ChatRow": data["chat"],
              "FootprintRow": data["footprint"][0], "DecodeLoopRow": data["overhead"]["decode_loop"][0],
              "Settings": data["settings"], "BenchResult": data}[cls_name]
    built = cls.from_dict(sample)
    kwargs = {f.name: getattr(built, f.name) for f in dataclasses.fields(cls)}
    required = [f.name for f in dataclasses.fields(cls)
                if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
    assert required
    for name in required:
        with pytest.raises(TypeError, match=re.escape(f"'{name}'")):
            cls(**{k: v for k, v in kwargs.items() if k != name})
    assert cls(**kwargs) == built


def test_committed_results_load_and_render():
    """results/bench-preset.json (an older v1 run: its decode-loop rows have llama-cpp-python's
    defaults beside ours) reads back exactly and renders, without a torch or a bundle."""
    from onellm.benchmarks.report import to_markdown
    from onellm.benchmarks.result import load_result

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "results" / "bench-preset.json"
    result = load_result(path)
    assert result.to_dict() == json.loads(path.read_text())
    assert result.overhead.decode_loop[0].llama_cpp_python_defaults is not None
    md = to_markdown(result)
    assert "| image | onnxruntime | int8 | cpu |" in md and "## Targets" in md


def test_committed_amx_results_record_the_plain_placement():
    """results/bench-preset-xeon-amx.json (a run on an AMX CPU, where llama-cpp-python's
    defaults crash) says per decode-loop row how the plain baseline's weights were placed."""
    from onellm.benchmarks.report import to_markdown
    from onellm.benchmarks.result import load_result

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "results" / "bench-preset-xeon-amx.json"
    result = load_result(path)
    assert result.to_dict() == json.loads(path.read_text())
    placed = {o.quant: o.llama_cpp_python.buffers for o in result.overhead.decode_loop}
    assert set(placed) == {"f16", "q8_0", "q4_k_m", "q4_0"}
    assert placed["q4_0"].startswith("112 tensors on CPU_REPACK") and placed["q8_0"].startswith("0 tensors")
    assert "crash on this CPU" in to_markdown(result)


def test_committed_7b_zen4_results_record_asks_context_and_paired_ratios():
    """results/bench-7b-zen4.json (third session): the footprint rows were taken at the context
    `ask` sizes for its question, with the cache type, and the decode loop carries its
    round-by-round ratios, which the decode target reads."""
    from onellm.benchmarks.report import evaluate_targets
    from onellm.benchmarks.result import load_result

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "results" / "bench-7b-zen4.json"
    result = load_result(path)
    assert result.to_dict() == json.loads(path.read_text())
    assert {(f.quant, f.n_ctx, f.kv_type) for f in result.footprint} == {
        ("q8_0", 512, "f16"), ("q4_k_m", 512, "f16"), ("q4_0", 512, "f16")}
    assert all(f.peak_rss_mib - f.gguf_mib - f.encoder_mib <= 600 for f in result.footprint)
    t = {x.name: x for x in evaluate_targets(result.settings.modalities, result.encoder, result.decoder,
                                             result.overhead.decode_loop, result.chat, result.overhead.encoder_chain,
                                             result.footprint)}
    for o in result.overhead.decode_loop:
        assert o.ratio_paired is not None and o.ratio_paired.n == result.settings.repeats
        assert t[f"decode_loop_shipped_vs_plain/{o.quant}"].measured == pytest.approx(o.ratio_paired.median)


def test_decoder_heading_names_whose_encoder_block_the_rows_got():
    """With the torch rows the decoders get torch fp32's block; a --no-torch run (the committed
    7B one, int8 encoder only) gives them the runtime encoder's, and the heading must say so."""
    from onellm.benchmarks.report import to_markdown
    from onellm.benchmarks.result import load_result

    results = Path(__file__).resolve().parents[1] / "benchmarks" / "results"
    with_torch, no_torch = load_result(results / "bench-preset-zen3.json"), load_result(results / "bench-7b-zen3.json")
    assert not any(r.backend == "torch" for r in no_torch.encoder)
    assert "## Decoder (same encoder block for every row: torch fp32's)" in to_markdown(with_torch)
    md = to_markdown(no_torch)
    assert "torch fp32's" not in md
    precision = "fp32" if "fp32" in no_torch.settings.encoder_precisions else no_torch.settings.encoder_precisions[0]
    assert f"## Decoder (same encoder block for every row: the runtime's {precision} encoder's)" in md


def test_report_rerenders_a_bench_json(bench_run, tmp_path):
    from onellm.benchmarks.report import main

    out, data, _ = bench_run
    main([str(out / "bench.json"), "--out", str(tmp_path)])
    assert (tmp_path / "bench.md").read_text() == (out / "bench.md").read_text()


def test_load_result_names_the_file(tmp_path):
    from onellm.benchmarks.result import load_result
    from onellm.runtime.errors import ResultFileError

    bad = tmp_path / "bench.json"
    bad.write_text('{"schema": "onellm-bundle"}')
    with pytest.raises(ResultFileError, match=re.escape(f"{bad}: expected schema 'onellm-bench', found 'onellm-bundle'")):
        load_result(bad)
    bad.write_text("{")
    with pytest.raises(ResultFileError, match=re.escape(f"{bad}: cannot read a bench result")):
        load_result(bad)


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
    from onellm.benchmarks.result import ChatRow, DecodeLoopRow, DecoderRow, EncoderRow, LoopRun, Stat

    def stat(x):
        return Stat(median=x, min=x, max=x, n=1)

    def enc(backend, precision, seconds, cos):
        return EncoderRow(modality="image", backend=backend, precision=precision, device="cpu", stages_s={},
                          encode_s=stat(seconds), flops=1.0, gflop_s=1.0, cosine_vs_torch_fp32=cos, load_s=0.0,
                          resident_mib=0.0)

    def dec(backend, precision, rate, fraction=None):
        return DecoderRow(modality="image", backend=backend, precision=precision, device="cpu", prefill_positions=1,
                          new_tokens=2, prefill_s=stat(1.0), prefill_tokens_per_s=1.0, decode_s=stat(1.0),
                          decode_tokens_per_s=rate, greedy_prefix_match=1.0, top1_agreement=None, load_s=0.0,
                          bytes_per_token=1, resident_mib=0.0, fraction_of_bandwidth_ceiling=fraction)

    run = LoopRun(prefill_s=stat(1.0), decode_s=stat(1.0), decode_tokens_per_s=1.0, tokens=2)
    encoder = [enc("torch", "fp32", 3.0, 1.0), enc("torch", "bf16", 1.0, 0.999), enc("onnxruntime", "fp32", 1.5, 1.0),
               enc("onnxruntime", "int8", 0.5, 0.95)]  # the last: fast but wrong, must not count as the best
    decoder = [dec("torch", "fp32", 2.0), dec("llama.cpp", "q8_0", 7.0, 0.5)]
    loop = DecodeLoopRow(quant="q8_0", prompt_tokens=1, new_tokens=2, flash_attn=False, ours_extra_bufts=False,
                         ours=run, llama_cpp_python=run, ratio=0.97)
    chat = ChatRow(modality="image", precision="fp32", quant="q8_0", definition="", turn1_ttft_s=stat(1.0),
                   turn2_ttft_s=stat(0.2), turn1_prefill_positions=9, turn2_prefill_positions=3,
                   turn1_first_chunk_s=stat(1.0), turn2_first_chunk_s=stat(0.2), ratio=0.2)
    t = {x.name: x for x in evaluate_targets(["image"], encoder, decoder, [loop], chat)}
    assert t["encoder_best_vs_torch_best/image"].measured == pytest.approx(1.0 / 1.5)
    assert t["encoder_best_vs_torch_best/image"].met is False
    assert t["ort_fp32_vs_torch_fp32/image"].measured == pytest.approx(2.0) and t["ort_fp32_vs_torch_fp32/image"].met
    assert t["q8_0_decode_vs_torch_fp32"].measured == pytest.approx(3.5)
    assert t["q8_0_decode_fraction_of_bandwidth"].met is False
    assert t["decode_loop_vs_llama_cpp_python"].met and t["chat_followup_ttft_ratio"].met
    assert not any(k.startswith(("ttft_vs_torch", "peak_rss_over_files")) for k in t)  # rows not given


def test_issue_13_targets_are_ratios_of_the_rows():
    """Runtime vs torch's fastest precision (encoder, time to first token, decode), our share of
    that time to first token, the shipped decode loop vs plain per quantization, peak RSS over
    the files."""
    import dataclasses

    from onellm.benchmarks.report import evaluate_targets
    from onellm.benchmarks.result import (
        DecodeLoopRow, DecoderRow, EncoderChainRow, EncoderRow, FootprintRow, LoopRun, Stat,
    )

    def stat(x):
        return Stat(median=x, min=x, max=x, n=1)

    def enc(backend, precision, seconds, cos, pre=0.01):
        return EncoderRow(modality="imu", backend=backend, precision=precision, device="cpu",
                          stages_s={"preprocess": stat(pre)}, encode_s=stat(seconds), flops=1.0, gflop_s=1.0,
                          cosine_vs_torch_fp32=cos, load_s=0.0, resident_mib=0.0)

    def dec(backend, precision, rate, ttft):
        return DecoderRow(modality="imu", backend=backend, precision=precision, device="cpu", prefill_positions=1,
                          new_tokens=2, prefill_s=stat(1.0), prefill_tokens_per_s=1.0, decode_s=stat(1.0),
                          decode_tokens_per_s=rate, greedy_prefix_match=1.0, top1_agreement=None, load_s=0.0,
                          bytes_per_token=1, resident_mib=0.0, ttft_s=ttft, encoder_used="onnxruntime int8")

    encoder = [enc("torch", "fp32", 2.0, 1.0), enc("torch", "bf16", 1.0, 0.999), enc("onnxruntime", "int8", 0.5, 0.999),
               enc("onnxruntime", "fp16", 0.1, 0.9)]  # fast but wrong: not the best
    decoder = [dec("torch", "fp32", 0.5, 6.0), dec("torch", "bf16", 1.0, 3.0), dec("llama.cpp", "q8_0", 4.0, 2.0),
               dec("llama.cpp", "q4_0", 9.0, 1.0)]
    run = LoopRun(prefill_s=stat(1.0), decode_s=stat(1.0), decode_tokens_per_s=1.0, tokens=2)
    loops = [DecodeLoopRow(quant="q8_0", prompt_tokens=1, new_tokens=2, flash_attn=False, ours_extra_bufts=False,
                           ours=run, llama_cpp_python=run, ratio=0.99),
             DecodeLoopRow(quant="q4_0", prompt_tokens=1, new_tokens=2, flash_attn=False, ours_extra_bufts=True,
                           ours=run, ours_shipped=run, llama_cpp_python=run, ratio=1.0, ratio_shipped=0.9)]
    chain = [EncoderChainRow(modality="imu", precision="int8", device="cpu", ours_s=0.52, plain_sessions_s=0.5,
                             ratio=0.96)]
    foot = [FootprintRow(precision="int8", quant="q4_0", modality="imu", peak_rss_mib=5000.0, gguf_mib=3600.0,
                         encoder_mib=600.0),
            FootprintRow(precision="int8", quant="q8_0", error=("killed",))]  # a failed probe: no target
    t = {x.name: x for x in evaluate_targets(["imu"], encoder, decoder, loops, None, chain, foot)}
    # against torch's fastest row (bf16 here), not its fp32 one
    assert t["encoder_vs_torch_best_x2.5/imu"].measured == pytest.approx(2.0)
    assert t["encoder_vs_torch_best_x2.5/imu"].met is False and "torch bf16" in t["encoder_vs_torch_best_x2.5/imu"].description
    assert t["ttft_vs_torch_best/imu"].measured == pytest.approx(3.0) and t["ttft_vs_torch_best/imu"].met
    assert "q4_0" in t["ttft_vs_torch_best/imu"].description  # the best time to first token's row
    assert t["decode_vs_torch_best/imu"].measured == pytest.approx(9.0)
    # reader 10 ms + chain 20 ms over plain = 30 ms of a 1 s time to first token
    assert t["our_share_of_ttft/imu"].measured == pytest.approx(0.03) and t["our_share_of_ttft/imu"].met is False
    assert t["decode_loop_shipped_vs_plain/q8_0"].measured == pytest.approx(0.99)
    assert t["decode_loop_shipped_vs_plain/q4_0"].measured == pytest.approx(0.9)  # shipped, not like-for-like
    assert t["decode_loop_shipped_vs_plain/q4_0"].met is False
    # where the round-by-round ratios were recorded, their median decides (not the ratio of medians)
    paired = [dataclasses.replace(loops[0], ratio_paired=Stat(median=0.975, min=0.9, max=1.1, n=5)),
              dataclasses.replace(loops[1], ratio_paired=stat(1.0), ratio_shipped_paired=stat(0.98))]
    tp = {x.name: x for x in evaluate_targets(["imu"], encoder, decoder, paired, None, chain, foot)}
    assert tp["decode_loop_shipped_vs_plain/q8_0"].measured == pytest.approx(0.975)
    assert tp["decode_loop_shipped_vs_plain/q4_0"].measured == pytest.approx(0.98)
    q4 = tp["decode_loop_shipped_vs_plain/q4_0"]
    assert q4.met and "per-round" in q4.description
    assert t["peak_rss_over_files/int8+q4_0"].measured == pytest.approx(800.0)
    assert t["peak_rss_over_files/int8+q4_0"].met is False
    assert not any(k.endswith("q8_0") and k.startswith("peak_rss") for k in t)
    fits = dataclasses.replace(foot[0], peak_rss_mib=4700.0)
    t = {x.name: x for x in evaluate_targets(["imu"], encoder, decoder, loops, None, chain, [fits])}
    assert t["peak_rss_over_files/int8+q4_0"].met


def test_mismatched_bundle_is_refused_before_any_work(tiny_bundle, tmp_path):
    from click.testing import CliRunner

    from onellm.cli import main

    res = CliRunner().invoke(main, ["bench", "--preset", "bench", "--bundle", str(tiny_bundle),
                                    "--work-dir", str(tmp_path), "--out", str(tmp_path / "o")])
    assert res.exit_code != 0
    assert "cannot reuse this bundle" in res.output and "config differs" in res.output
    assert not (tmp_path / "checkpoint").exists()


def test_targets_7b_judges_decode_on_the_per_round_median(tmp_path):
    """The 7B target table reads the round-by-round ratio where the run recorded it and the
    ratio of the medians for runs before it."""
    from onellm.benchmarks.targets_7b import evaluate

    def loop(quant, ours, plain, **paired):
        return {"quant": quant, "ours": {"decode_tokens_per_s": ours}, "llama_cpp_python": {"decode_tokens_per_s": plain},
                **paired}

    bench = {"artifacts": {"bundle": str(tmp_path)}, "overhead": {"decode_loop": [
        loop("q4_0", 9.0, 10.0, ratio_paired={"median": 0.98, "min": 0.9, "max": 1.0, "n": 3}),
        loop("q8_0", 9.0, 10.0)]}}
    rows = {r["target"].split(":")[0]: r for r in evaluate(bench, None)}
    assert rows["decode q4_0"]["value"] == pytest.approx(0.98) and rows["decode q4_0"]["met"]
    assert "per-round" in rows["decode q4_0"]["target"]
    assert rows["decode q8_0"]["value"] == pytest.approx(0.9) and not rows["decode q8_0"]["met"]


def test_torch_7b_rows_are_what_targets_7b_reads(tmp_path):
    """The torch bf16 7B row is plain JSON with the medians the 7B targets divide by."""
    import json

    from onellm.benchmarks.targets_7b import evaluate
    from onellm.benchmarks.torch_7b import torch_row

    row = torch_row("image", [1.0, 3.0, 2.0], [(4.0, 31.0), (6.0, 15.5)], 32, 136, "examples/image")
    row = json.loads(json.dumps(row))
    assert row["encode_s"]["median"] == 2.0 and row["prefill_s"]["median"] == 5.0
    assert row["ttft_s"] == 7.0 and row["prefill_tok_s"] == pytest.approx(136 / 5.0)
    assert row["decode_tok_s"] == {"median": 1.5, "min": 1.0, "max": 2.0, "n": 2}
    mine = {"modality": "image", "backend": "llama.cpp", "precision": "q4_0", "ttft_s": 3.5, "decode_tokens_per_s": 6.0}
    rows = {r["target"].split(":")[0]: r for r in evaluate({"artifacts": {"bundle": str(tmp_path)}, "decoder": [mine]},
                                                           {"rows": [row]})}
    assert rows["TTFT image"]["value"] == pytest.approx(2.0) and rows["TTFT image"]["met"]
    assert rows["decode image"]["value"] == pytest.approx(4.0)
