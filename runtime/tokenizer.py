"""The LLaMA SentencePiece tokenizer, without torch.

`Tokenizer(path)` loads a `tokenizer.model` (or `Tokenizer.from_bytes` a serialized
one, as a bundle may carry it); `encode(text, bos=True, eos=False)` gives token ids the
way the release does (BOS prepended, no EOS), `decode(ids)` turns ids back into text
(special tokens dropped, byte-fallback pieces merged into UTF-8). A missing or
unreadable model raises `BundleError` naming the file.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable
from pathlib import Path

import sentencepiece as spm

from .errors import BundleError, InputError

log = logging.getLogger(__name__)


class Tokenizer:
    """A loaded SentencePiece model with LLaMA's conventions."""

    def __init__(self, path: str | os.PathLike) -> None:
        path = Path(path)
        if not path.is_file():
            raise BundleError(f"{path}: tokenizer model not found (expected a SentencePiece .model file)")
        self.source = str(path)
        self._sp = self._load(path.read_bytes(), self.source)

    @classmethod
    def from_bytes(cls, data: bytes, source: str = "<tokenizer bytes>") -> Tokenizer:
        """A tokenizer from a serialized SentencePiece model; `source` names it in errors."""
        tok = cls.__new__(cls)
        tok.source = source
        tok._sp = cls._load(data, source)
        return tok

    @staticmethod
    def _load(data: bytes, source: str) -> spm.SentencePieceProcessor:
        try:
            sp = spm.SentencePieceProcessor(model_proto=data)
        except (RuntimeError, OSError, TypeError) as exc:
            detail = str(exc).strip().splitlines()[-1][:160] if str(exc).strip() else type(exc).__name__
            raise BundleError(f"{source}: expected a SentencePiece model, could not parse it ({detail})") from None
        if sp.get_piece_size() <= 0:
            raise BundleError(f"{source}: expected a SentencePiece model, found one with no pieces")
        return sp

    # ---------------------------------------------------------------- special tokens
    @property
    def vocab_size(self) -> int:
        return self._sp.get_piece_size()

    @property
    def bos_id(self) -> int:
        return self._sp.bos_id()

    @property
    def eos_id(self) -> int:
        return self._sp.eos_id()

    @property
    def unk_id(self) -> int:
        return self._sp.unk_id()

    @property
    def pad_id(self) -> int:
        return self._sp.pad_id()  # -1 when the model has none (LLaMA)

    # ---------------------------------------------------------------- text <-> ids
    def encode(self, text: str, bos: bool = True, eos: bool = False) -> list[int]:
        if not isinstance(text, str):
            raise InputError("prompt", "text (str)", type(text).__name__)
        ids = list(self._sp.encode(text, out_type=int))
        if bos and self.bos_id >= 0:
            ids.insert(0, self.bos_id)
        if eos and self.eos_id >= 0:
            ids.append(self.eos_id)
        return ids

    def decode(self, ids: Iterable[int]) -> str:
        ids = [int(i) for i in ids]
        bad = [i for i in ids if not 0 <= i < self.vocab_size]
        if bad:
            raise InputError("token ids", f"ids in [0, {self.vocab_size})", f"{bad[:5]}")
        return self._sp.decode(ids)

    # ---------------------------------------------------------------- pieces
    def id_to_piece(self, token_id: int) -> str:
        return self._sp.id_to_piece(int(token_id))

    def piece_to_id(self, piece: str) -> int:
        return self._sp.piece_to_id(piece)

    def is_control(self, token_id: int) -> bool:
        return self._sp.is_control(int(token_id))

    def is_byte(self, token_id: int) -> bool:
        return self._sp.is_byte(int(token_id))

    def is_unknown(self, token_id: int) -> bool:
        return self._sp.is_unknown(int(token_id))

    def pieces(self) -> list[str]:
        """Every piece, by id."""
        return [self._sp.id_to_piece(i) for i in range(self.vocab_size)]

    def serialized(self) -> bytes:
        """The model file's bytes (for writing into a bundle or a GGUF)."""
        return self._sp.serialized_model_proto()

    def __repr__(self) -> str:
        return f"Tokenizer({self.source!r}, vocab_size={self.vocab_size})"
