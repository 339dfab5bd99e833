"""`onellm ask / encode / export / inspect` as a user runs them, and the torch-free runtime."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from onellm.cli import main

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
IMU = str(EXAMPLES / "imu" / "walk.csv")


def _run(*args: str, **kw):
    return CliRunner().invoke(main, list(args), catch_exceptions=False, **kw)


def test_ask_streams_an_answer_and_says_weights_are_random(tiny_bundle):
    res = _run("ask", "--bundle", str(tiny_bundle), "--imu", IMU, "--greedy", "--max-tokens", "12",
               "What is the person doing?")
    assert res.exit_code == 0, res.output
    assert "RANDOM weights" in res.stderr
    assert res.stdout.strip(), "no answer printed"


def test_ask_json_has_answer_ids_and_timings(tiny_bundle):
    res = _run("ask", "--bundle", str(tiny_bundle), "--imu", IMU, "--greedy", "--max-tokens", "8", "--json",
               "What is the person doing?")
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout)
    assert out["modality"] == "imu" and out["random_weights"] is True
    assert 0 < len(out["token_ids"]) <= 8
    for key in ("bundle_load_s", "preprocess_s", "encode_s", "prefill_s", "first_token_s", "decode_tokens_per_s",
                "peak_rss_mib"):
        assert out["timings"][key] >= 0, key
    assert out["input"]["window_s"] == [0.0, 2.0] and out["input"]["source_rate_hz"] == 100.0


def test_encode_then_ask_embeddings_gives_the_same_answer(tiny_bundle, tmp_path):
    emb = tmp_path / "emb.npy"
    res = _run("encode", "--bundle", str(tiny_bundle), "--imu", IMU, "--out", str(emb))
    assert res.exit_code == 0, res.output
    block = np.load(emb)
    assert block.shape == (32, 128) and block.dtype == np.float32
    again = _run("encode", "--bundle", str(tiny_bundle), "--imu", IMU, "--out", str(emb))
    assert again.exit_code == 2 and "--force" in again.stderr  # nothing overwritten without asking
    a = _run("ask", "--bundle", str(tiny_bundle), "--imu", IMU, "--greedy", "--max-tokens", "10", "--json", "Q?")
    b = _run("ask", "--bundle", str(tiny_bundle), "--embeddings", str(emb), "--modality", "imu", "--greedy",
             "--max-tokens", "10", "--json", "Q?")
    assert json.loads(a.stdout)["token_ids"] == json.loads(b.stdout)["token_ids"]


@pytest.mark.parametrize(
    "args, expect",
    [
        (["--imu", str(EXAMPLES / "fmri" / "betas.npy")], "betas.npy"),
        (["--depth", str(EXAMPLES / "depth" / "depth.png")], "--image"),
        (["--imu", "/nonexistent/walk.csv"], "walk.csv"),
    ],
)
def test_bad_input_is_one_line_without_traceback(tiny_bundle, args, expect):
    res = _run("ask", "--bundle", str(tiny_bundle), *args, "Q?")
    assert res.exit_code == 2, res.output
    errors = [line for line in res.stderr.splitlines() if line.startswith("onellm: error:")]
    assert len(errors) == 1 and expect in errors[0], res.stderr
    assert "Traceback" not in res.stderr


def test_missing_bundle_is_a_clear_error(tmp_path):
    res = _run("ask", "--bundle", str(tmp_path / "nope"), "--imu", IMU, "Q?")
    assert res.exit_code == 1 and "no such directory" in res.stderr


def test_export_refuses_a_non_empty_directory(tmp_path):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    res = _run("export", "--demo", "--out", str(out))
    assert res.exit_code == 2 and "--force" in res.stderr
    assert (out / "notes.txt").read_text() == "keep me"


def test_inspect_prints_parity_and_random_notice(tiny_bundle):
    res = _run("inspect", str(tiny_bundle))
    assert res.exit_code == 0, res.output
    assert "RANDOM" in res.stdout and "cosine" in res.stdout and "imu" in res.stdout
    raw = json.loads(_run("inspect", str(tiny_bundle), "--json").stdout)
    assert raw["schema"] == "onellm-bundle"


def test_verify_rechecks_parity(tiny_bundle, tiny_checkpoint):
    res = _run("verify", str(tiny_bundle), "--checkpoint", str(tiny_checkpoint))
    assert res.exit_code == 0, res.output
    assert "checks passed" in res.stdout and "FAIL" not in res.stdout


BLOCK_TORCH = (
    "import sys, importlib.abc\n"
    "class _NoTorch(importlib.abc.MetaPathFinder):\n"
    "    def find_spec(self, name, path=None, target=None):\n"
    "        if name == 'torch' or name.startswith('torch.'):\n"
    "            raise ImportError('torch is blocked in this test')\n"
    "sys.meta_path.insert(0, _NoTorch())\n"
)


def test_runtime_works_with_torch_unimportable(tiny_bundle, tmp_path):
    """`onellm ask` and the Python API run with torch blocked (a user who never installed it)."""
    script = BLOCK_TORCH + (
        "from onellm.runtime.pipeline import Pipeline\n"
        "from onellm.runtime.decoder import Sampling\n"
        f"p = Pipeline.load({str(tiny_bundle)!r}, device='cpu')\n"
        f"chunks = list(p.ask('Q?', imu={IMU!r}, stream=True, sampling=Sampling.greedy(6)))\n"
        "assert 'torch' not in sys.modules\n"
        "from onellm.cli import main\n"
        f"sys.argv = ['onellm', 'ask', '--bundle', {str(tiny_bundle)!r}, '--imu', {IMU!r}, '--greedy',"
        " '--max-tokens', '6', 'Q?']\n"
        "main()\n"
    )
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                          cwd=tmp_path, env={**os.environ, "ONELLM_CACHE_DIR": str(tmp_path / "cache")})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "torch is blocked" not in proc.stderr
    assert proc.stdout.strip()


def test_no_bundle_without_torch_says_how_to_get_one(tmp_path):
    script = BLOCK_TORCH + (
        "from onellm.cli import main\n"
        f"sys.argv = ['onellm', 'ask', '--imu', {IMU!r}, 'Q?']\n"
        "main()\n"
    )
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                          cwd=tmp_path, env={**os.environ, "ONELLM_CACHE_DIR": str(tmp_path / "cache")})
    assert proc.returncode == 1
    assert "onellm export --demo" in proc.stderr and "Traceback" not in proc.stderr


def test_logprobs_are_the_reference_log_softmax(tiny_bundle, tiny_model, tiny_tokenizer):
    """--logprobs K: the K best ids per step with log-probabilities close to torch's log-softmax."""
    import torch

    from onellm.ref.generate import generate

    res = _run("ask", "--bundle", str(tiny_bundle), "--fmri", str(EXAMPLES / "fmri" / "betas.npy"), "--greedy",
               "--max-tokens", "6", "--json", "--logprobs", "3", "Q?")
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout)
    steps = out["logprobs"]
    assert len(steps) == len(out["token_ids"])
    from onellm.runtime.modalities import get_modality

    x = get_modality("fmri").preprocess(str(EXAMPLES / "fmri" / "betas.npy")).array
    ref = generate(tiny_model, str(tiny_tokenizer), "Q?", ("fmri", torch.from_numpy(x)), greedy=True,
                   max_new_tokens=6, return_logits=True, stop_strings=())
    ref_lp = torch.log_softmax(ref.step_logits.double(), dim=-1).numpy()
    for i, step in enumerate(steps[: len(ref.token_ids)]):
        assert len(step) == 3
        assert step[0]["id"] == out["token_ids"][i]  # greedy picks the most likely
        assert [s["logprob"] for s in step] == sorted((s["logprob"] for s in step), reverse=True)
        for s in step:
            assert abs(s["logprob"] - ref_lp[i, s["id"]]) < 1e-3, (i, s)


def test_embedding_example_program_runs(tiny_bundle):
    """examples/embed_pipeline.py (the desktop-app example) works against a bundle."""
    example = EXAMPLES / "embed_pipeline.py"
    proc = subprocess.run([sys.executable, str(example), str(tiny_bundle)], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "turn 2:" in proc.stdout and "cancelled answer" in proc.stdout


def test_trt_without_tensorrt_keeps_a_working_onnx_bundle(tiny_checkpoint, tiny_tokenizer, tmp_path, caplog):
    """--trt on a machine without TensorRT/GPU: a clear notice, and the bundle still answers."""
    import importlib.util

    if importlib.util.find_spec("tensorrt") is not None:
        pytest.skip("TensorRT is installed here; covered by the trt-marked GPU test")
    from onellm.export.bundle import build_bundle
    from onellm.runtime.pipeline import Pipeline

    out = tmp_path / "b"
    with caplog.at_level("WARNING"):
        manifest = build_bundle(out, _tiny_cfg(), tiny_checkpoint, tiny_tokenizer, modalities="imu",
                                encoder_precision="fp32", decoder_quant="f32", trt=True)
    assert manifest.tensorrt is None
    assert any("TensorRT is not installed" in r.getMessage() for r in caplog.records)
    with Pipeline.load(out, device="auto") as pipe:
        assert pipe.ask("Q?", imu=IMU).text is not None


@pytest.mark.trt
@pytest.mark.gpu
def test_tensorrt_engines_match_onnx(tiny_checkpoint, tiny_tokenizer, tmp_path):
    """On a GPU machine with TensorRT: engines are built, fingerprinted, and agree with the ONNX fp32 chain."""
    pytest.importorskip("tensorrt")
    import onnxruntime as ort

    if "TensorrtExecutionProvider" not in ort.get_available_providers():
        pytest.skip("onnxruntime has no TensorrtExecutionProvider")
    from onellm.export.bundle import build_bundle
    from onellm.runtime.encoder import Encoder
    from onellm.runtime.pipeline import Pipeline

    out = tmp_path / "b"
    manifest = build_bundle(out, _tiny_cfg(), tiny_checkpoint, tiny_tokenizer, encoder_precision="fp32,fp16",
                            decoder_quant="f32", trt=True)
    assert manifest.tensorrt.fingerprint["gpu"]
    with Pipeline.load(out, device="tensorrt") as trt_pipe, Encoder(
            manifest.encoder.precisions["fp32"], out, device="cpu", verify=False) as cpu:
        for m in manifest.modalities:
            from onellm.runtime.modalities import get_modality

            x = get_modality(m).dummy_input(np.random.default_rng(3)).astype(np.float32)
            a = np.array(cpu.encode(m, x), copy=True)
            b = np.array(trt_pipe.encoder.encode(m, x), copy=True)
            cos = float((a * b).sum() / np.linalg.norm(a) / np.linalg.norm(b))
            assert cos > 0.999, (m, cos)


def _tiny_cfg():
    from onellm.ref.config import load_preset

    return load_preset("tiny")


# ------------------------------------------------------------------ embeddings files, stdin, terminal, verify


def test_encode_npz_records_its_model_and_ask_checks_it(tiny_bundle, tmp_path):
    """An .npz block carries modality, width and bundle identity; ask uses and checks them."""
    from onellm.runtime.bundle import load_manifest
    from onellm.runtime.embeddings import load_embeddings

    emb = tmp_path / "emb.npz"
    res = _run("encode", "--bundle", str(tiny_bundle), "--imu", IMU, "--out", str(emb))
    assert res.exit_code == 0, res.output
    block, meta = load_embeddings(emb)
    manifest = load_manifest(tiny_bundle, verify=False).manifest
    assert block.shape == (32, 128) and meta["modality"] == "imu" and meta["n_embd"] == 128
    assert meta["bundle"]["source_sha256"] == manifest.source.sha256
    assert meta["input"]["source"] == IMU
    a = _run("ask", "--bundle", str(tiny_bundle), "--imu", IMU, "--greedy", "--max-tokens", "6", "--json", "Q?")
    b = _run("ask", "--bundle", str(tiny_bundle), "--embeddings", str(emb), "--greedy", "--max-tokens", "6",
             "--json", "Q?")  # no --modality: the file says imu
    assert b.exit_code == 0, b.output
    assert json.loads(b.stdout)["modality"] == "imu"
    assert json.loads(a.stdout)["token_ids"] == json.loads(b.stdout)["token_ids"]
    wrong = _run("ask", "--bundle", str(tiny_bundle), "--embeddings", str(emb), "--modality", "audio", "Q?")
    assert wrong.exit_code == 2 and "expected --modality imu" in wrong.stderr


def test_ask_refuses_a_block_from_another_model(tiny_bundle, tmp_path):
    emb = tmp_path / "emb.npy"
    assert _run("encode", "--bundle", str(tiny_bundle), "--imu", IMU, "--out", str(emb)).exit_code == 0
    side = Path(f"{emb}.json")
    meta = json.loads(side.read_text())
    meta["bundle"]["source_sha256"] = "0" * 64
    side.write_text(json.dumps(meta))
    res = _run("ask", "--bundle", str(tiny_bundle), "--embeddings", str(emb), "Q?")
    assert res.exit_code == 2 and "one from another model" in res.stderr and "Traceback" not in res.stderr
    side.unlink()  # a bare .npy: taken with --modality, refused without
    bare = _run("ask", "--bundle", str(tiny_bundle), "--embeddings", str(emb), "--modality", "imu", "--greedy",
                "--max-tokens", "3", "Q?")
    assert bare.exit_code == 0, bare.output
    res = _run("ask", "--bundle", str(tiny_bundle), "--embeddings", str(emb), "Q?")
    assert res.exit_code == 2 and "a bare .npy has no metadata" in res.stderr


@pytest.mark.parametrize("modality, path, fmt", [
    ("imu", EXAMPLES / "imu" / "walk.csv", "text"),
    ("fmri", EXAMPLES / "fmri" / "betas.npy", "npy"),
])
def test_stdin_input_equals_the_file(tiny_bundle, modality, path, fmt):
    common = ["ask", "--bundle", str(tiny_bundle), "--greedy", "--max-tokens", "6", "--json", "Q?"]
    a = _run(*common, f"--{modality}", str(path))
    b = _run(*common, f"--{modality}", "-", input=path.read_bytes())
    assert b.exit_code == 0, b.output
    got = json.loads(b.stdout)
    assert got["token_ids"] == json.loads(a.stdout)["token_ids"]
    assert got["input"]["source"] == "<stdin>"
    assert got["input"]["stdin"] == {"source": "<stdin>", "format": fmt, "bytes": path.stat().st_size}


class _FakeTTY(io.StringIO):
    """A text stream that says it is a terminal."""

    def isatty(self):
        return True


NASTY = "ok\x08\x08\x1b[2J\x1b]0;pwned\x07 tab\there\r\x7fnew\nline\x9b"


def test_terminal_output_escapes_control_characters(monkeypatch):
    import onellm.cli as cli

    tty = _FakeTTY()
    monkeypatch.setattr(sys, "stdout", tty)
    assert cli._stdout_is_tty()
    cli._write_chunk(NASTY, cli._stdout_is_tty())
    out = tty.getvalue()
    assert not any(ord(c) < 32 and c not in "\n\t" or 0x7F <= ord(c) < 0xA0 for c in out), repr(out)
    assert out == "ok\u2408\u2408\u241b[2J\u241b]0;pwned\u2407 tab\there\u240d\u2421new\nline\ufffd"
    assert cli.terminal_safe("plain text, ünïcode\n") == "plain text, ünïcode\n"


def test_ask_escapes_on_a_terminal_and_json_stays_raw(monkeypatch):
    """The same answer: made visible on a terminal, raw in --json and through a pipe."""
    import onellm.cli as cli

    class Stream:
        answer = None

        def __init__(self):
            self._it = iter([NASTY[:6], NASTY[6:]])

        def __iter__(self):
            return self

        def __next__(self):
            return next(self._it)

        def close(self):
            pass

    class Answer:
        def to_json(self, tok):
            return {"answer": NASTY}

    class Pipe:
        tokenizer = bundle_dir = precision = quant = None
        random_weights = False
        n_ctx, kv_type = 512, "f16"
        manifest = {}

        def __enter__(self):
            return self

        def __exit__(self, *a):
            pass

        def ask(self, *a, **k):
            s = Stream()
            s.answer = Answer()
            return s

    monkeypatch.setattr(cli, "_open_pipeline", lambda *a, **k: Pipe())
    raw = _run("ask", "--imu", IMU, "Q?")
    assert raw.stdout == NASTY + "\n"  # not a terminal: the model's text as it is
    assert json.loads(_run("ask", "--imu", IMU, "--json", "Q?").stdout)["answer"] == NASTY
    monkeypatch.setattr(cli, "_stdout_is_tty", lambda: True)
    shown = _run("ask", "--imu", IMU, "Q?").stdout
    assert shown == cli.terminal_safe(NASTY) + "\n" and "\x1b" not in shown and "\x08" not in shown


def test_ctx_option_sets_the_context(tiny_bundle):
    from onellm.runtime.pipeline import Pipeline

    res = _run("ask", "--bundle", str(tiny_bundle), "--imu", IMU, "--ctx", "160", "--greedy", "--max-tokens", "4",
               "Q?")
    assert res.exit_code == 0, res.output
    short = _run("ask", "--bundle", str(tiny_bundle), "--imu", IMU, "--ctx", "20", "Q?")
    assert short.exit_code != 0 and short.stderr.count("onellm: error:") == 1 and "Traceback" not in short.stderr
    with Pipeline.load(tiny_bundle, device="cpu", n_ctx=160) as pipe:
        assert pipe.n_ctx == pipe.engine.n_ctx_slot == 160


def test_verify_checksums_only_needs_no_torch(tiny_bundle, tmp_path, monkeypatch):
    import shutil

    monkeypatch.setitem(sys.modules, "torch", None)
    res = _run("verify", str(tiny_bundle), "--checksums-only")
    assert res.exit_code == 0, res.output
    assert "ok   checksums of" in res.stdout and "checks passed" in res.stdout
    copy = tmp_path / "b"
    shutil.copytree(tiny_bundle, copy)
    gguf = next(copy.glob("*.gguf"))
    with open(gguf, "r+b") as f:
        f.seek(-1, 2)
        last = f.read(1)
        f.seek(-1, 2)
        f.write(bytes([last[0] ^ 1]))
    res = _run("verify", str(copy), "--checksums-only")
    assert res.exit_code == 1 and f"FAIL checksum {gguf.name}" in res.stdout and "Traceback" not in res.stderr


def test_verify_stops_at_a_different_checkpoint(tiny_bundle, tiny_checkpoint, tmp_path, monkeypatch):
    """A checkpoint other than the exported one: FAIL, and no model load or parity run."""
    import shutil

    import onellm.ref.checkpoint as ckpt

    other = tmp_path / "consolidated.00-of-01.pth"
    shutil.copyfile(tiny_checkpoint, other)
    with open(other, "ab") as f:
        f.write(b"\0")
    loads = []
    monkeypatch.setattr(ckpt, "load_model", lambda *a, **k: loads.append(a) or (_ for _ in ()).throw(AssertionError))
    res = _run("verify", str(tiny_bundle), "--checkpoint", str(other))
    assert res.exit_code == 1, res.output
    assert "FAIL checkpoint sha256" in res.stdout and "parity checks skipped" in res.stdout
    assert loads == []
    res = _run("verify", str(tiny_bundle))  # this bundle records no seed: the checkpoint is needed
    assert res.exit_code != 0 and "--checkpoint is needed" in res.stderr


def test_verify_rebuilds_a_seeded_random_checkpoint(tiny_config, tiny_checkpoint, tiny_tokenizer, tmp_path):
    """A bundle that records its random seed (as the demo bundle does) verifies with no --checkpoint."""
    from conftest import TINY_SEED

    from onellm.export.bundle import DEMO_SEED, build_bundle

    out = tmp_path / "b"
    manifest = build_bundle(out, tiny_config, tiny_checkpoint, tiny_tokenizer, modalities="imu",
                            encoder_precision="fp32", decoder_quant="f32", random_weights=True, random_seed=TINY_SEED)
    assert manifest.source.random_seed == TINY_SEED == DEMO_SEED
    res = _run("verify", str(out))
    assert res.exit_code == 0, res.output
    assert f"rebuilt the random checkpoint from seed {TINY_SEED}" in res.stdout
    assert "checkpoint is the one the bundle was exported from" in res.stdout and "FAIL" not in res.stdout


def test_pipeline_api_takes_an_embeddings_file_and_refuses_mixed_inputs(tiny_bundle, tmp_path):
    """The Python API shares the CLI's rules: a file path is checked against its metadata;
    a block plus an input file, or an image next to an IMU file, is refused."""
    from onellm.runtime.decoder import Sampling
    from onellm.runtime.errors import InputError
    from onellm.runtime.pipeline import Pipeline

    emb = tmp_path / "emb.npz"
    assert _run("encode", "--bundle", str(tiny_bundle), "--imu", IMU, "--out", str(emb)).exit_code == 0
    with Pipeline.load(tiny_bundle, device="cpu") as pipe:
        a = pipe.ask("Q?", imu=IMU, sampling=Sampling.greedy(5))
        b = pipe.ask("Q?", embeddings=str(emb), sampling=Sampling.greedy(5))
        assert b.modality == "imu" and b.token_ids == a.token_ids
        with pytest.raises(InputError, match="expected --modality imu"):
            pipe.ask("Q?", embeddings=emb, modality="audio")
        with pytest.raises(InputError, match="no input file alongside"):
            pipe.ask("Q?", embeddings=str(emb), imu=IMU)
        with pytest.raises(InputError, match="does not take an --image"):
            pipe.ask("Q?", imu=IMU, image=str(EXAMPLES / "image" / "photo.jpg"))


def test_chat_survives_a_question_longer_than_the_context(tiny_bundle):
    """One turn that cannot fit gets a one-line error; the chat goes on and answers the next."""
    long_question = " ".join(["word"] * 400)
    res = _run("chat", "--bundle", str(tiny_bundle), "--imu", IMU, "--greedy", "--max-tokens", "4", "--ctx", "256",
               input=f"{long_question}\nWhat is the person doing?\n")
    assert res.exit_code == 0, res.output
    errors = [line for line in res.stderr.splitlines() if line.startswith("onellm: ") and "n_ctx" in line]
    assert len(errors) == 1, res.stderr
    assert "Traceback" not in res.output
    assert res.stdout.count("onellm> ") == 2  # both turns were taken, the second one answered


def test_reader_flags_come_from_the_modality_specs():
    """Each spec's flags are options of ask/chat/encode/preview, and each sets a keyword its reader takes."""
    import inspect

    from onellm.runtime.modalities import all_modalities

    flags = [(spec, flag) for spec in all_modalities().values() for flag in spec.flags]
    assert {f.option for _, f in flags} >= {"--imu-rate", "--imu-start", "--accel-units", "--gyro-units",
                                           "--audio-start"}
    for spec, flag in flags:
        assert flag.key in inspect.signature(spec.preprocess).parameters, (spec.name, flag.key)
    for command in ("ask", "chat", "encode", "preview"):
        res = _run(command, "--help")
        assert res.exit_code == 0, res.output
        for _, flag in flags:
            assert flag.option in res.output, (command, flag.option)


def test_ask_sizes_its_context_to_the_question(tiny_bundle):
    """`ask` without --ctx holds a cache for BOS, the input's 32 rows, the prompt and --max-tokens,
    in steps of 256 cells, at most the model's 512; --ctx wins; the answer does not depend on it."""
    from onellm.runtime.bundle import load_manifest
    from onellm.runtime.prompt import Conversation
    from onellm.runtime.tokenizer import Tokenizer

    man = load_manifest(tiny_bundle, verify=False)
    conv = Conversation(man.manifest.prompt)
    conv.add_question("What is the person doing?")
    n_prompt = len(Tokenizer(man.path(man.manifest.tokenizer.file)).encode(conv.render(), bos=True, eos=False))
    assert n_prompt + 32 + 8 <= 256 < n_prompt + 32 + 250  # so the three cases below differ

    def ask(*extra):
        res = _run("ask", "--bundle", str(tiny_bundle), "--imu", IMU, "--greedy", "--json", *extra,
                   "What is the person doing?")
        assert res.exit_code == 0, res.output
        return json.loads(res.stdout)

    small, large, given = ask("--max-tokens", "8"), ask("--max-tokens", "250"), ask("--max-tokens", "8", "--ctx", "512")
    assert small["context"]["n_ctx"] == 256
    assert large["context"]["n_ctx"] == 512  # 256 < need <= 512, the model's context
    assert given["context"]["n_ctx"] == 512
    assert small["token_ids"] == given["token_ids"] == large["token_ids"][:len(small["token_ids"])]
    from onellm.runtime.registry import decoder_quant

    default_kv = decoder_quant(small["decoder_quant"]).context_settings().get("kv_type", "f16")
    assert small["context"]["kv_type"] == given["context"]["kv_type"] == default_kv
    halved = ask("--max-tokens", "8", "--kv-cache", "q8_0")  # the memory knob, for long chats and servers
    assert halved["context"] == {"n_ctx": 256, "kv_type": "q8_0"} and halved["token_ids"]
    from onellm.runtime.pipeline import context_for_question

    q = "What is the person doing?"
    for with_input, rows in ((True, 32), (False, 0)):  # the boundary: exactly 256 positions fit in 256 cells
        assert context_for_question(tiny_bundle, q, max_new_tokens=256 - n_prompt - rows, with_input=with_input) == 256
        assert context_for_question(tiny_bundle, q, max_new_tokens=257 - n_prompt - rows, with_input=with_input) == 512
    assert context_for_question(tiny_bundle, q, max_new_tokens=10_000) == 512
