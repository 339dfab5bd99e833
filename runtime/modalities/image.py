"""The image modality: RGB photo (JPEG, PNG, WebP, BMP).

Reading: Pillow decodes by content (the extension is not trusted); the EXIF
orientation is applied; the first frame of an animated file is used; palette, alpha
(composited on white), CMYK, greyscale and 16-bit/float images become 8-bit RGB
(16-bit by its bit depth, rint(v / 257), never by its values: the rule in `_imaging`).

Preprocessing (spec section 7, the reference's evaluation transform): short side to
224 with Pillow's bicubic filter as torchvision `Resize(224)` does on a PIL image,
centre crop 224, /255, CLIP normalisation -> [3,224,224] float32.

In-memory input: a PIL image, or an array [H,W], [H,W,3] or [H,W,4] of uint8
(uint16 arrays are 16-bit: / 257; float arrays in [0,1] are scaled by 255).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import InputError
from ._imaging import CLIP_MEAN, CLIP_STD, clip_image_tensor, open_image, photo_to_rgb, wide_to_uint8
from ._io import Source, is_array, require_file, require_finite, source_label
from .base import Example, ModalityInput, ModalitySpec

EXPECTED = "an RGB photo (JPEG, PNG, WebP or BMP)"


def array_to_pil(arr: np.ndarray, label: str, expected: str = EXPECTED) -> Any:
    """An in-memory picture [H,W] / [H,W,3] / [H,W,4] to a PIL image (8-bit)."""
    from PIL import Image

    if arr.ndim not in (2, 3) or (arr.ndim == 3 and arr.shape[2] not in (1, 3, 4)):
        raise InputError(label, f"{expected} as an array [H,W], [H,W,3] or [H,W,4]",
                         f"shape {list(arr.shape)}")
    if arr.shape[0] < 1 or arr.shape[1] < 1:
        raise InputError(label, f"{expected} of at least 1x1 pixels", f"shape {list(arr.shape)}")
    if arr.dtype.kind not in "buif":
        raise InputError(label, f"{expected} of uint8 or float values", f"dtype {arr.dtype}")
    require_finite(label, arr, expected, "pixels")
    if arr.dtype == np.uint16:
        arr = wide_to_uint8(arr)[0]
    if arr.dtype != np.uint8:
        top = float(arr.max()) if arr.size else 0.0
        if arr.dtype.kind == "f" and top <= 1.0:
            arr = np.rint(np.clip(arr, 0.0, 1.0) * 255.0)
        elif top > 255 or float(arr.min()) < 0:
            raise InputError(label, f"{expected} with values 0-255 (or floats 0-1)",
                             f"values from {float(arr.min()):g} to {top:g}")
        arr = arr.astype(np.uint8)
    if arr.ndim == 3 and arr.shape[2] == 1:
        arr = arr[:, :, 0]
    mode = "L" if arr.ndim == 2 else ("RGB" if arr.shape[2] == 3 else "RGBA")
    return Image.fromarray(np.ascontiguousarray(arr), mode=mode)


def load_rgb(source: Source, expected: str = EXPECTED) -> tuple[Any, dict[str, Any]]:
    """Any image source -> (8-bit RGB PIL image in display orientation, meta)."""
    from PIL import Image

    label = source_label(source)
    if isinstance(source, Image.Image):
        meta: dict[str, Any] = {"source": "<in-memory PIL image>", "mode": source.mode,
                                "original_size": [source.width, source.height]}
        return photo_to_rgb(source, meta), meta
    if is_array(source):
        meta = {"source": label, "original_size": [int(source.shape[1]), int(source.shape[0])]}
        return photo_to_rgb(array_to_pil(source, label, expected), meta), meta
    path = require_file(source, expected)
    im, meta = open_image(path, expected)
    meta = {"source": str(path), **meta}
    return photo_to_rgb(im, meta), meta


def preprocess(source: Source) -> ModalityInput:
    """A photo -> [3,224,224] float32 (spec section 7, image)."""
    t0 = time.perf_counter()
    rgb, meta = load_rgb(source)
    array = clip_image_tensor(rgb)
    meta["preprocess_s"] = round(time.perf_counter() - t0, 4)
    return ModalityInput("image", array, meta)


def dummy_input(rng: np.random.Generator) -> np.ndarray:
    """A CLIP-normalised picture of smooth random colour blobs."""
    yy, xx = np.mgrid[0:224, 0:224].astype(np.float32) / 224.0
    chans = []
    for _ in range(3):
        fx, fy, ph = rng.uniform(0.5, 3.0), rng.uniform(0.5, 3.0), rng.uniform(0, 2 * np.pi)
        chans.append(0.5 + 0.45 * np.sin(2 * np.pi * (fx * xx + fy * yy) + ph))
    x = np.stack(chans)  # [3,224,224] in [0.05,0.95]
    return ((x - CLIP_MEAN[:, None, None]) / CLIP_STD[:, None, None]).astype(np.float32)



def write_example(path: Path) -> None:
    """A 640x480 stand-in photo of smooth colour bands (where examples/ is missing)."""
    from PIL import Image

    yy, xx = np.mgrid[0:480, 0:640].astype(np.float32) / 480.0
    rgb = np.stack([0.5 + 0.45 * np.sin(2 * np.pi * (f * xx + g * yy) + ph)
                    for f, g, ph in ((1.0, 0.5, 0.0), (0.6, 1.3, 1.0), (1.7, 0.9, 2.0))], axis=-1)
    Image.fromarray(np.rint(rgb * 255).astype(np.uint8)).save(path)


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
    example=Example('image/photo.jpg', synthesize=write_example),
)
