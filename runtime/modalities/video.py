"""The video modality: video clip (MP4, MOV, WebM, MKV, AVI)."""

from __future__ import annotations

import numpy as np

from .base import ModalityInput, ModalitySpec


def preprocess(source, **options) -> ModalityInput:
    raise NotImplementedError("video reader: pending")


def dummy_input(rng: np.random.Generator) -> np.ndarray:
    return rng.standard_normal((15, 3, 224, 224)).astype(np.float32)


SPEC = ModalitySpec(
    name='video',
    cli_option='--video',
    description='video clip (MP4, MOV, WebM, MKV, AVI)',
    file_types=('.mp4', '.mov', '.webm', '.mkv', '.avi'),
    input_shape=(15, 3, 224, 224),
    tokenizer_kind='clip_patch',
    n_frames=15,
    n_tokens=257,
    preprocess=preprocess,
    dummy_input=dummy_input,
    caption_prompt='Provide a one-sentence caption for the provided video.',
)
