"""Session-wide fixtures: a tiny seeded random OneLLM, its checkpoint and tokenizer.

Everything is built once per test session from the `tiny` preset (every input shape
and token count of the release, small widths). The checkpoint is written in the
release's own key format and read back through the real loader, so every test that
uses `tiny_model` also exercises `onellm.ref.checkpoint`. torch is imported inside
the fixtures: collecting the torch-free tests does not need it.
"""

from __future__ import annotations

from pathlib import Path

import pytest

TINY_SEED = 1234  # the seed of the tiny random checkpoint every test shares


@pytest.fixture(scope="session", autouse=True)
def _session_cache_dir(tmp_path_factory):
    """Session fixtures (bundles, pipelines) write their cache files here, never to the user's cache."""
    import os

    before = os.environ.get("ONELLM_CACHE_DIR")
    os.environ["ONELLM_CACHE_DIR"] = str(tmp_path_factory.mktemp("session-cache"))
    yield
    if before is None:
        os.environ.pop("ONELLM_CACHE_DIR", None)
    else:
        os.environ["ONELLM_CACHE_DIR"] = before


@pytest.fixture(autouse=True)
def _own_cache_dir(tmp_path_factory, monkeypatch):
    """Every test gets a cache directory of its own (verified-bundle stamps, TensorRT engines, demo bundle)."""
    monkeypatch.setenv("ONELLM_CACHE_DIR", str(tmp_path_factory.mktemp("cache")))


@pytest.fixture(scope="session")
def tiny_config():
    """The `tiny` preset's ModelConfig."""
    from onellm.ref.config import load_preset

    return load_preset("tiny")


@pytest.fixture(scope="session")
def tiny_tokenizer(tiny_config, tmp_path_factory) -> Path:
    """Path of a SentencePiece model with the tiny decoder's vocabulary size."""
    from onellm.ref.testing import train_tiny_tokenizer

    return train_tiny_tokenizer(tmp_path_factory.mktemp("tokenizer"), vocab_size=tiny_config.decoder.vocab_size)


@pytest.fixture(scope="session")
def tiny_checkpoint(tiny_config, tmp_path_factory) -> Path:
    """Path of `consolidated.00-of-01.pth` holding the seeded random tiny model (fp32, `llma.` keys)."""
    from onellm.ref.testing import save_random_checkpoint

    path = tmp_path_factory.mktemp("tiny_ckpt") / "consolidated.00-of-01.pth"
    save_random_checkpoint(tiny_config, path, seed=TINY_SEED)
    return path


@pytest.fixture(scope="session")
def tiny_model(tiny_config, tiny_checkpoint):
    """The tiny model loaded through `load_model` (fp32, eval mode). Shared: do not modify it."""
    from onellm.ref.checkpoint import load_model

    model, _ = load_model(tiny_config, tiny_checkpoint, dtype="fp32")
    return model


@pytest.fixture(scope="session")
def tiny_encoder_export(tiny_model, tiny_config, tmp_path_factory):
    """The tiny model's encoder graphs, every modality, fp32/fp16/int8, traced once.

    Returns (directory, {precision: entries}) where entries is what
    `onellm.export.onnx_encoder.export_encoder` returns (file paths relative to the directory).
    """
    from onellm.export.onnx_encoder import export_encoders

    out = tmp_path_factory.mktemp("encoder")
    return out, export_encoders(tiny_model, tiny_config, out, precisions=("fp32", "fp16", "int8"))


@pytest.fixture(scope="session")
def tiny_gguf(tiny_config, tiny_checkpoint, tiny_tokenizer, tmp_path_factory):
    """quant -> path of the tiny decoder exported as GGUF (each quant written once per session)."""
    from onellm.export.gguf import export_gguf
    from onellm.ref.checkpoint import open_checkpoint

    out_dir = tmp_path_factory.mktemp("gguf")
    written: dict[str, Path] = {}

    def get(quant: str = "f32") -> Path:
        if quant not in written:
            path = out_dir / f"tiny-{quant}.gguf"
            export_gguf(open_checkpoint(tiny_checkpoint), tiny_config, tiny_tokenizer, path, quant=quant)
            written[quant] = path
        return written[quant]

    return get


@pytest.fixture(scope="session")
def tiny_bundle(tiny_config, tiny_checkpoint, tiny_tokenizer, tmp_path_factory) -> Path:
    """A bundle exported from the tiny checkpoint: fp32 encoder, f32 GGUF (the parity setting)."""
    from onellm.export.bundle import build_bundle

    out = tmp_path_factory.mktemp("bundle") / "tiny"
    build_bundle(out, tiny_config, tiny_checkpoint, tiny_tokenizer, encoder_precision="fp32",
                 decoder_quant="f32", random_weights=True)
    return out


@pytest.fixture(scope="session")
def tiny_pipeline(tiny_bundle):
    """The runtime Pipeline on `tiny_bundle` (CPU), two engine slots (two asks run at once).
    Shared: tests must not close it."""
    from onellm.runtime.pipeline import Pipeline

    pipe = Pipeline.load(tiny_bundle, device="cpu", parallel=2)
    yield pipe
    pipe.close()


@pytest.fixture(scope="session")
def exact_pipe(tiny_bundle):
    """The tiny bundle with an f32 KV cache and no flash attention, set explicitly, and one
    slot: a conversation prefilled in pieces (or re-prefilled after a trim) is then
    bit-identical to a fresh prefill of `pipe.decoder` (same settings), so "equals a fresh
    prefill" holds exactly even at the random model's near-ties (with an f16 cache a merged
    piece and its two halves can swap places)."""
    from onellm.runtime.pipeline import Pipeline

    pipe = Pipeline.load(tiny_bundle, device="cpu", verify=False, parallel=1,
                         context={"kv_type": "f32", "flash_attn": False})
    yield pipe
    pipe.close()
