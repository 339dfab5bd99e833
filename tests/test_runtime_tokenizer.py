"""The torch-free SentencePiece wrapper (onellm.runtime.tokenizer)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from onellm.runtime.errors import BundleError, InputError
from onellm.runtime.tokenizer import Tokenizer


@pytest.fixture(scope="module")
def tok(tiny_tokenizer):
    return Tokenizer(tiny_tokenizer)


def test_llama_conventions(tok, tiny_config):
    assert tok.vocab_size == tiny_config.decoder.vocab_size
    assert (tok.unk_id, tok.bos_id, tok.eos_id, tok.pad_id) == (0, 1, 2, -1)
    assert tok.id_to_piece(1) == "<s>" and tok.is_control(1) and tok.is_control(2)
    assert tok.piece_to_id(tok.id_to_piece(300)) == 300
    assert len(tok.pieces()) == tok.vocab_size


def test_encode_decode_round_trip(tok):
    text = "A chat between a curious human and an assistant.\n\n###Human: What is this?\n###Assistant:"
    ids = tok.encode(text)
    assert ids[0] == tok.bos_id and tok.eos_id not in ids
    assert tok.encode(text, bos=False) == ids[1:]
    assert tok.encode(text, bos=True, eos=True) == ids + [tok.eos_id]
    assert tok.decode(ids) == text  # BOS dropped


def test_byte_fallback_covers_unseen_characters(tok):
    text = "Zürich ☃ 猫"
    ids = tok.encode(text, bos=False)
    assert any(tok.is_byte(i) for i in ids)
    assert tok.unk_id not in ids
    assert tok.decode(ids) == text


def test_from_bytes_is_the_same_model(tok):
    again = Tokenizer.from_bytes(tok.serialized(), source="bundle/tokenizer.model")
    assert again.vocab_size == tok.vocab_size
    assert again.encode("The quick brown fox.") == tok.encode("The quick brown fox.")
    assert again.source == "bundle/tokenizer.model"


def test_missing_and_garbage_files_raise_bundle_error(tmp_path):
    missing = tmp_path / "nope.model"
    with pytest.raises(BundleError, match=r"nope\.model: tokenizer model not found"):
        Tokenizer(missing)
    garbage = tmp_path / "tokenizer.model"
    garbage.write_bytes(b"this is not a protobuf")
    with pytest.raises(BundleError, match=r"tokenizer\.model: expected a SentencePiece model"):
        Tokenizer(garbage)


def test_bad_ids_and_text_raise_input_error(tok):
    with pytest.raises(InputError, match="token ids"):
        tok.decode([5, tok.vocab_size])
    with pytest.raises(InputError, match="prompt"):
        tok.encode(b"bytes")  # type: ignore[arg-type]


def test_imports_without_torch():
    code = "import sys; sys.modules['torch'] = None; import onellm.runtime.tokenizer"
    subprocess.run([sys.executable, "-c", code], check=True)
