"""The rgbn modality: surface-normal map paired with its RGB photo (--image).

`preprocess(normal_source, image=photo_source)`. An 8-bit normal map (RGB PNG, the
usual (n + 1) / 2 encoding) is used with its raw values, as in training; a float
`.npy` [H,W,3] or [3,H,W] of unit normals in [-1,1] is encoded to 8 bits first
(see `_rgbx`); a 16-bit map (PNG/TIFF, uint16 array) is reduced by its bit depth,
rint(v / 257), as photos are. Output [2,3,224,224] float32 = [photo, normal map] through the image
pipeline (spec section 7, rgbn).

In-memory input: the map as an array [H,W,3] (uint8 raw, uint16 / 257, float
encoded); the photo
as for the image modality.
"""

from __future__ import annotations

import numpy as np

from ._io import Source
from ._rgbx import dummy_pair, preprocess_pair
from .base import Example, ModalityInput, ModalitySpec

EXPECTED = "a surface-normal map (8-bit RGB PNG/JPEG, or float .npy [H,W,3] in [-1,1])"


def preprocess(source: Source, *, image: Source | None = None) -> ModalityInput:
    """Normal map + its photo -> [2,3,224,224] float32 (spec section 7, rgbn)."""
    return preprocess_pair("rgbn", "normal", source, image, EXPECTED)


def dummy_input(rng: np.random.Generator) -> np.ndarray:
    return dummy_pair(rng)


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
    example=Example('normal/normal.png'),
    requires_image=True,
)
