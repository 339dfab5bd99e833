"""The audio modality: sound (WAV, FLAC, OGG, MP3)."""

from __future__ import annotations

import numpy as np

from .base import ModalityInput, ModalitySpec


def preprocess(source, **options) -> ModalityInput:
    raise NotImplementedError("audio reader: pending")


def dummy_input(rng: np.random.Generator) -> np.ndarray:
    return rng.standard_normal((1, 128, 1024)).astype(np.float32)


SPEC = ModalitySpec(
    name='audio',
    cli_option='--audio',
    description='sound (WAV, FLAC, OGG, MP3)',
    file_types=('.wav', '.flac', '.ogg', '.mp3'),
    input_shape=(1, 128, 1024),
    tokenizer_kind='conv2d',
    n_frames=1,
    n_tokens=1213,
    preprocess=preprocess,
    dummy_input=dummy_input,
    caption_prompt='Provide a one-sentence caption for the provided audio.',
)
