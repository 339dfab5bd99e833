"""The rgbn modality: surface-normal map paired with its RGB photo (--image)."""

from __future__ import annotations

import numpy as np

from .base import ModalityInput, ModalitySpec


def preprocess(source, **options) -> ModalityInput:
    raise NotImplementedError("rgbn reader: pending")


def dummy_input(rng: np.random.Generator) -> np.ndarray:
    return rng.standard_normal((2, 3, 224, 224)).astype(np.float32)


SPEC = ModalitySpec(
    name='rgbn',
    cli_option='--normal',
    description='surface-normal map paired with its RGB photo (--image)',
    file_types=('.png', '.jpg', '.jpeg', '.npy'),
    input_shape=(2, 3, 224, 224),
    tokenizer_kind='clip_patch',
    n_frames=2,
    n_tokens=257,
    preprocess=preprocess,
    dummy_input=dummy_input,
    caption_prompt='Provide a one-sentence caption for the provided image.',
    requires_image=True,
)
