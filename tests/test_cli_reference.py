"""`onellm reference params | make-tiny | ask` through click's test runner."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
from click.testing import CliRunner

from onellm.cli import main

torch = pytest.importorskip("torch")


def run(*args: str):
    return CliRunner().invoke(main, ["reference", *args], catch_exceptions=False)


def _one_line_error(result, code: int, *needles: str) -> None:
    assert result.exit_code == code, result.output
    err = result.stderr.strip()
    assert err.startswith("onellm: error: ") and "\n" not in err, err
    for needle in needles:
        assert needle in err, err


# ------------------------------------------------------------------ params


def test_params_matches_count_parameters(tiny_config):
    from onellm.ref.model import count_parameters

    counts = count_parameters(tiny_config)
    result = run("params", "--preset", "tiny", "--json")
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["total"] == counts["total"] and data["decoder"] == counts["decoder"]
    text = run("params", "--preset", "tiny").stdout
    assert f"{counts['total']:,d}" in text and f"{counts['decoder']:,d}" in text


def test_params_7b_total(tmp_path):
    data = json.loads(run("params", "--preset", "7b", "--json").stdout)
    # LLaMA-2-7B (6.74 B) + CLIP ViT-L/14 visual + UPM + tokenizers: spec "~7B + 0.6B"
    assert 6_738_000_000 < data["decoder"] < 6_739_000_000
    assert 7.4e9 < data["total"] < 7.7e9


def test_params_config_file(tiny_config, tmp_path):
    from onellm.ref.model import count_parameters

    cfg = dataclasses.replace(tiny_config, name="two", modalities=("image", "imu"))
    path = tmp_path / "two.json"
    path.write_text(cfg.to_json())
    data = json.loads(run("params", "--config", str(path), "--json").stdout)
    assert data["config"] == "two" and data["total"] == count_parameters(cfg)["total"]
    assert data["total"] < count_parameters(tiny_config)["total"]


def test_params_rejects_preset_and_config(tmp_path):
    _one_line_error(run("params", "--preset", "tiny", "--config", str(tmp_path / "x.json")), 2, "not both")


# ------------------------------------------------------------------ make-tiny


def test_make_tiny_writes_a_loadable_random_model(tmp_path):
    from onellm.ref.checkpoint import load_model
    from onellm.ref.config import ModelConfig
    from onellm.runtime.tokenizer import Tokenizer

    out = tmp_path / "tiny"
    result = run("make-tiny", "--out", str(out), "--seed", "3")
    assert result.exit_code == 0, result.output
    assert "RANDOM" in result.stdout
    cfg = ModelConfig.from_json_file(out / "config.json")
    assert cfg.name == "tiny"
    model, report = load_model(cfg, out / "consolidated.00-of-01.pth")
    assert report.n_params == sum(p.numel() for p in model.parameters())
    assert Tokenizer(out / "tokenizer.model").vocab_size == cfg.decoder.vocab_size

    # the seed decides the weights
    again = run("make-tiny", "--out", str(tmp_path / "again"), "--seed", "3")
    other = run("make-tiny", "--out", str(tmp_path / "other"), "--seed", "4")
    assert again.exit_code == other.exit_code == 0
    w = lambda d: torch.load(d / "consolidated.00-of-01.pth", weights_only=True)["llma.tok_embeddings.weight"]  # noqa: E731
    assert torch.equal(w(out), w(tmp_path / "again")) and not torch.equal(w(out), w(tmp_path / "other"))


def test_make_tiny_refuses_non_empty_dir(tmp_path):
    (tmp_path / "keep.txt").write_text("mine")
    _one_line_error(run("make-tiny", "--out", str(tmp_path)), 2, str(tmp_path), "--force")
    assert not (tmp_path / "consolidated.00-of-01.pth").exists()
    assert run("make-tiny", "--out", str(tmp_path), "--force").exit_code == 0
    assert (tmp_path / "consolidated.00-of-01.pth").exists() and (tmp_path / "keep.txt").exists()


def test_make_tiny_refuses_a_7b_random_model(tmp_path):
    _one_line_error(run("make-tiny", "--out", str(tmp_path / "x"), "--preset", "7b"), 2, "7b", "parameters")
    assert not (tmp_path / "x").exists()


# ------------------------------------------------------------------ ask


def _reference_answer(tiny_model, tiny_tokenizer, question, inputs, max_tokens=8):
    from onellm.ref.generate import generate

    return generate(tiny_model, tiny_tokenizer, question, inputs=inputs, max_new_tokens=max_tokens, greedy=True)


def _ask(tiny_checkpoint, tiny_tokenizer, *args):
    return run("ask", "--checkpoint", str(tiny_checkpoint), "--tokenizer", str(tiny_tokenizer),
               "--preset", "tiny", *args)


def test_ask_input_npy_equals_generate(tiny_model, tiny_checkpoint, tiny_tokenizer, tmp_path):
    from onellm.runtime.modalities import get_modality

    spec = get_modality("imu")
    x = spec.dummy_input(np.random.default_rng(0))
    np.save(tmp_path / "imu.npy", x)
    result = _ask(tiny_checkpoint, tiny_tokenizer, "--input-npy", str(tmp_path / "imu.npy"), "--modality", "imu",
                  "--greedy", "--max-tokens", "8", "--json")
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    expected = _reference_answer(tiny_model, tiny_tokenizer, spec.caption_prompt, ("imu", x))
    assert data["question"] == spec.caption_prompt and data["modality"] == "imu"
    assert data["answer"] == expected.text and data["n_new_tokens"] == len(expected.token_ids)
    assert data["clip_source"] == "checkpoint"


def test_ask_text_only_plain_output(tiny_model, tiny_checkpoint, tiny_tokenizer):
    result = _ask(tiny_checkpoint, tiny_tokenizer, "--greedy", "--max-tokens", "6", "What is this?")
    assert result.exit_code == 0, result.output
    assert result.stdout == _reference_answer(tiny_model, tiny_tokenizer, "What is this?", None, 6).text + "\n"


def test_ask_image_file(tiny_model, tiny_checkpoint, tiny_tokenizer, tmp_path):
    from PIL import Image

    from onellm.runtime.modalities import get_modality

    path = tmp_path / "photo.png"
    Image.fromarray((np.random.default_rng(1).random((240, 320, 3)) * 255).astype(np.uint8)).save(path)
    spec = get_modality("image")
    try:
        x = spec.preprocess(path).array
    except NotImplementedError:
        pytest.skip("image reader not written yet")
    result = _ask(tiny_checkpoint, tiny_tokenizer, "--image", str(path), "--greedy", "--max-tokens", "6", "--json")
    assert result.exit_code == 0, result.output
    expected = _reference_answer(tiny_model, tiny_tokenizer, spec.caption_prompt, ("image", x), 6)
    assert json.loads(result.stdout)["answer"] == expected.text


def test_ask_errors_are_one_line(tiny_checkpoint, tiny_tokenizer, tmp_path):
    bad = tmp_path / "bad.npy"
    np.save(bad, np.zeros((6, 399), np.float32))
    _one_line_error(_ask(tiny_checkpoint, tiny_tokenizer, "--input-npy", str(bad), "--modality", "imu", "q"),
                    2, "bad.npy", "[6, 400]", "[6, 399]")
    _one_line_error(_ask(tiny_checkpoint, tiny_tokenizer, "--input-npy", str(bad), "q"), 2, "--modality")
    _one_line_error(_ask(tiny_checkpoint, tiny_tokenizer, "--input-npy", str(bad), "--modality", "smell", "q"),
                    2, "unknown modality 'smell'")
    _one_line_error(_ask(tiny_checkpoint, tiny_tokenizer, "--imu", "a.csv", "--audio", "b.wav"), 2, "--imu and --audio")
    _one_line_error(_ask(tiny_checkpoint, tiny_tokenizer), 2, "QUESTION")
    _one_line_error(_ask(tmp_path / "nope.pth", tiny_tokenizer, "q"), 1, "nope.pth", "not found")
    _one_line_error(run("ask", "--checkpoint", str(tiny_checkpoint), "--tokenizer", str(tiny_tokenizer),
                        "--preset", "7b", "q"), 2, "512 pieces")


def _imu_csv(path, with_time: bool) -> None:
    rng = np.random.default_rng(5)
    rows = ["time,acc_x,acc_y,acc_z,gyro_x,gyro_y,gyro_z" if with_time else "acc_x,acc_y,acc_z,gyro_x,gyro_y,gyro_z"]
    for i in range(250):  # 2.5 s at 100 Hz
        values = rng.standard_normal(6) * 0.3 + np.array([0, 0, 9.81, 0, 0, 0])
        rows.append(",".join(([f"{i / 100:.2f}"] if with_time else []) + [f"{v:.4f}" for v in values]))
    path.write_text("\n".join(rows) + "\n")


def test_ask_imu_file_and_reader_options(tiny_model, tiny_checkpoint, tiny_tokenizer, tmp_path):
    from onellm.runtime.modalities import get_modality

    spec = get_modality("imu")
    timed, untimed = tmp_path / "timed.csv", tmp_path / "untimed.csv"
    _imu_csv(timed, True)
    _imu_csv(untimed, False)
    try:
        x = spec.preprocess(timed).array
    except NotImplementedError:
        pytest.skip("imu reader not written yet")
    result = _ask(tiny_checkpoint, tiny_tokenizer, "--imu", str(timed), "--greedy", "--max-tokens", "6", "--json")
    assert result.exit_code == 0, result.output
    expected = _reference_answer(tiny_model, tiny_tokenizer, spec.caption_prompt, ("imu", x), 6)
    assert json.loads(result.stdout)["answer"] == expected.text
    # no timestamps: the reader needs the rate, given through --reader-option
    assert _ask(tiny_checkpoint, tiny_tokenizer, "--imu", str(untimed), "q").exit_code == 2
    ok = _ask(tiny_checkpoint, tiny_tokenizer, "--imu", str(untimed), "--reader-option", "rate=100",
              "--greedy", "--max-tokens", "6", "--json")
    assert ok.exit_code == 0, ok.output
    _one_line_error(_ask(tiny_checkpoint, tiny_tokenizer, "--imu", str(untimed), "--reader-option", "bogus=1", "q"),
                    2, "--reader-option", "bogus")
