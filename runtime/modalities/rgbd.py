"""The rgbd modality: depth map paired with its RGB photo (--image).

`preprocess(depth_source, image=photo_source)`. An 8-bit depth map (grey or
colour-mapped PNG/JPEG/PGM) is used with its raw values, as in training; a 16-bit
PNG/TIFF or a float `.npy` (metres; 0/NaN = no depth) is converted to an 8-bit map
first, near bright (2nd-98th percentile, see `_rgbx`), whatever its values (the bit
depth decides). A 16-bit PGM is refused with guidance: it is the format of raw
Kinect disparity, where larger values are nearer. Output [2,3,224,224] float32 =
[photo, depth map] through the image pipeline (spec section 7, rgbd).

In-memory input: the map as an array [H,W] (uint8 raw, uint16 or float converted)
or [H,W,3] uint8; the photo as for the image modality.
"""

from __future__ import annotations

import numpy as np

from ._io import Source
from ._rgbx import dummy_pair, preprocess_pair
from .base import Example, ModalityInput, ModalitySpec

EXPECTED = "a depth map (8-bit or 16-bit PNG, JPEG, or float .npy in metres)"


def preprocess(source: Source, *, image: Source | None = None) -> ModalityInput:
    """Depth map + its photo -> [2,3,224,224] float32 (spec section 7, rgbd)."""
    return preprocess_pair("rgbd", "depth", source, image, EXPECTED)


def dummy_input(rng: np.random.Generator) -> np.ndarray:
    return dummy_pair(rng)


SPEC = ModalitySpec(
    name='rgbd',
    cli_option='--depth',
    description='depth map paired with its RGB photo (--image)',
    file_types=('.png', '.jpg', '.jpeg', '.npy'),
    input_shape=(2, 3, 224, 224),
    tokenizer_kind='clip_patch',
    n_frames=2,
    n_tokens=257,
    preprocess=preprocess,
    dummy_input=dummy_input,
    caption_prompt='Provide a one-sentence caption for the provided image.',
    example=Example('depth/depth.png'),
    requires_image=True,
)
