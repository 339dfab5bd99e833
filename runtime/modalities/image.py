"""The image modality: RGB photo (JPEG, PNG, WebP, BMP)."""

from __future__ import annotations

import numpy as np

from .base import ModalityInput, ModalitySpec


def preprocess(source, **options) -> ModalityInput:
    raise NotImplementedError("image reader: pending")


def dummy_input(rng: np.random.Generator) -> np.ndarray:
    return rng.standard_normal((3, 224, 224)).astype(np.float32)


SPEC = ModalitySpec(
    name='image',
    cli_option='--image',
    description='RGB photo (JPEG, PNG, WebP, BMP)',
    file_types=('.jpg', '.jpeg', '.png', '.webp', '.bmp'),
    input_shape=(3, 224, 224),
    tokenizer_kind='clip_patch',
    n_frames=1,
    n_tokens=257,
    preprocess=preprocess,
    dummy_input=dummy_input,
    caption_prompt='Provide a one-sentence caption for the provided image.',
)
