"""Pixel plumbing shared by the image, video, rgbd and rgbn readers (spec section 7).

- `open_image`: decode with Pillow, apply the EXIF orientation, first frame of an
  animation; every decoder failure becomes an `InputError`.
- `photo_to_rgb`: any Pillow mode to 8-bit RGB (palette, alpha, CMYK, 16-bit, float).
- `wide_to_uint8`: THE rule for samples wider than 8 bits, in photos and normal maps
  alike (files and arrays): the bit depth decides, never the values. 8-bit samples
  are used as they are; 16-bit samples become rint(v / 257), full scale to full scale
  (Pillow's modes I;16*, uint16 arrays, and Pillow's 32-bit mode "I" when it holds at
  most 65535, which is how Pillow opens 16-bit PGM/PPM); wider integers are scaled by
  255 / max (they have no known full scale); floats in [0, 1] are multiplied by 255,
  floats beyond 1 scaled by 255 / max. A dark 16-bit photo thus stays dark instead of
  being read as 8-bit. (16-bit RGB files are reduced to 8 bits by Pillow itself, by
  their high byte, within one level of v / 257.) Depth maps wider than 8 bits are measurements, not brightness:
  they follow their own rule (`_rgbx.depth_to_uint8`), whatever their values.
- `clip_image_tensor`: the evaluation transform of the reference,
  torchvision `Resize(224, BICUBIC)` + `CenterCrop(224)` + `ToTensor` + CLIP `Normalize`,
  re-done with Pillow + numpy. For a PIL input torchvision's resize *is* Pillow's
  `Image.resize(size, BICUBIC)` (no `reducing_gap`; Pillow's filter is always
  antialiased), with the long side `int(224 * long / short)` (truncation), and the
  crop offsets `int(round((size - 224) / 2.0))` (Python rounding, half to even).
- `resize_bilinear_like_torch`: `torch.nn.functional.interpolate(mode="bilinear",
  align_corners=False, antialias=False)` in numpy, the resize the video pipeline used.
"""

from __future__ import annotations

import logging
import math
import warnings
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import InputError
from ._io import describe_content

logger = logging.getLogger(__name__)

CLIP_MEAN = np.array([0.48145466, 0.4578275, 0.40821073], dtype=np.float32)
CLIP_STD = np.array([0.26862954, 0.26130258, 0.27577711], dtype=np.float32)
CLIP_SIZE = 224

# Modes Pillow decodes that carry transparency.
_ALPHA_MODES = ("RGBA", "LA", "PA", "RGBa", "La")
# Modes with more than 8 bits per sample.
_WIDE_MODES = ("I", "I;16", "I;16B", "I;16L", "I;16N", "F")


def _pil():
    from PIL import Image, ImageOps

    return Image, ImageOps


def open_image(path: Path, expected: str) -> tuple[Any, dict[str, Any]]:
    """Decode an image file fully; returns (PIL image in display orientation, meta)."""
    Image, ImageOps = _pil()
    meta: dict[str, Any] = {}
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # EXIF and decompression-bomb chatter
            im = Image.open(path)
            meta["format"] = im.format
            n_frames = getattr(im, "n_frames", 1)
            if n_frames > 1:
                logger.warning("%s: %d frames; the first one is used", path, n_frames)
                meta["frames_in_file"] = int(n_frames)
            im.load()
    except Image.DecompressionBombError as e:
        raise InputError(path, f"{expected} of at most {Image.MAX_IMAGE_PIXELS * 2} pixels",
                         f"a larger image ({e})") from None
    except Exception as e:  # noqa: BLE001 - Pillow raises many types on damaged files
        if isinstance(e, Image.UnidentifiedImageError):
            found = describe_content(path)
            if found.endswith("image"):
                found = f"{found} Pillow cannot decode (damaged or truncated)"
        else:
            found = f"a damaged or truncated image ({type(e).__name__}: {e})"
        raise InputError(path, expected, found) from None
    meta["mode"] = im.mode
    meta["original_size"] = [int(im.width), int(im.height)]
    orientation = 1
    try:
        orientation = int(im.getexif().get(0x0112, 1) or 1)
    except Exception:  # noqa: BLE001 - unreadable EXIF: keep the stored orientation
        logger.warning("%s: unreadable EXIF data; the stored orientation is used", path)
    if orientation != 1:
        try:
            im = ImageOps.exif_transpose(im)
        except Exception as e:  # noqa: BLE001
            logger.warning("%s: EXIF orientation %d could not be applied (%s)", path, orientation, e)
            orientation = 1
    meta["exif_orientation"] = orientation
    if im.width < 1 or im.height < 1:
        raise InputError(path, expected, f"an image of {im.width}x{im.height} pixels")
    return im, meta


def wide_to_uint8(arr: np.ndarray) -> tuple[np.ndarray, str]:
    """Samples wider than 8 bits (photo or normal map) to 8 bits by their bit depth,
    not their values (the rule in the module docstring); uint8 passes unchanged."""
    if arr.dtype == np.uint8:
        return arr, "8-bit, as is"
    if arr.dtype.kind == "f":
        finite = arr[np.isfinite(arr)]
        top = float(finite.max()) if finite.size else 1.0
        scale = 255.0 if top <= 1.0 else 255.0 / top
        out = np.clip(np.nan_to_num(arr, nan=0.0, posinf=top, neginf=0.0) * scale, 0, 255)
        return np.rint(out).astype(np.uint8), f"float scaled by {scale:g}"
    if arr.dtype.kind == "b":
        return arr.astype(np.uint8) * np.uint8(255), "boolean: 0 or 255"
    top = int(arr.max()) if arr.size else 0
    if arr.dtype.itemsize <= 2 or top <= 65535:
        return np.rint(np.clip(arr, 0, 65535) / 257.0).astype(np.uint8), "16-bit scaled by 1/257"
    return np.rint(np.clip(arr, 0, None) * (255.0 / top)).astype(np.uint8), f"scaled by 255/{top}"


def photo_to_rgb(im: Any, meta: dict[str, Any]) -> Any:
    """Any Pillow mode to 8-bit RGB.

    Transparent pixels are composited on white (their stored colour is undefined;
    the training photos had no alpha). 16-bit and float greyscale is scaled by its
    bit depth. Palette, CMYK, YCbCr, LAB, 1-bit: Pillow's own conversion.
    """
    Image, _ = _pil()
    mode = im.mode
    if mode == "RGB":
        return im
    if mode in _WIDE_MODES:
        arr, how = wide_to_uint8(np.asarray(im))
        meta["conversion"] = how
        return Image.fromarray(arr, mode="L").convert("RGB")
    if mode == "P" and "transparency" in im.info:
        im = im.convert("RGBA")
    if im.mode in _ALPHA_MODES:
        rgba = im.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        meta["conversion"] = f"{mode} composited on white"
        return Image.alpha_composite(white, rgba).convert("RGB")
    meta["conversion"] = f"{mode} to RGB"
    return im.convert("RGB")


def resized_size(width: int, height: int, size: int = CLIP_SIZE) -> tuple[int, int]:
    """torchvision `Resize(size)`: short side -> size, long side int(size * long / short)."""
    short, long = (width, height) if width <= height else (height, width)
    new_short, new_long = size, int(size * long / short)
    return (new_short, new_long) if width <= height else (new_long, new_short)


def center_crop_box(width: int, height: int, size: int = CLIP_SIZE) -> tuple[int, int, int, int]:
    """torchvision `CenterCrop(size)` box (left, top, right, bottom) for an image >= size."""
    top = int(round((height - size) / 2.0))
    left = int(round((width - size) / 2.0))
    return left, top, left + size, top + size


def clip_normalize(rgb_uint8: np.ndarray) -> np.ndarray:
    """[H,W,3] uint8 -> [3,H,W] float32: /255, minus CLIP mean, over CLIP std."""
    x = rgb_uint8.astype(np.float32) / np.float32(255.0)
    x = (x - CLIP_MEAN) / CLIP_STD
    return np.ascontiguousarray(x.transpose(2, 0, 1), dtype=np.float32)


def clip_image_tensor(rgb: Any) -> np.ndarray:
    """RGB PIL image -> [3,224,224] float32, the reference's evaluation transform."""
    Image, _ = _pil()
    w, h = rgb.size
    new_w, new_h = resized_size(w, h)
    if (new_w, new_h) != (w, h):
        rgb = rgb.resize((new_w, new_h), Image.BICUBIC)
    box = center_crop_box(new_w, new_h)
    crop = np.asarray(rgb, dtype=np.uint8)[box[1]:box[3], box[0]:box[2]]
    assert crop.shape == (CLIP_SIZE, CLIP_SIZE, 3), crop.shape
    return clip_normalize(crop)


def _linear_taps(n_in: int, n_out: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Source indices and weights of torch's linear interpolation (align_corners=False)."""
    scale = np.float32(n_in / n_out)  # float32, as torch's opmath for float tensors
    # scale * (dst + 0.5) - 0.5 rounded once to float32: torch's CPU kernel compiles it
    # to a fused multiply-add (the float64 product of two float32 values is exact).
    src = (np.float64(scale) * (np.arange(n_out, dtype=np.float64) + 0.5) - 0.5).astype(np.float32)
    src = np.maximum(src, np.float32(0.0))
    i0 = src.astype(np.int64)  # floor, src >= 0
    i1 = np.minimum(i0 + 1, n_in - 1)
    l1 = np.clip(src - i0.astype(np.float32), 0.0, 1.0).astype(np.float32)
    l0 = (np.float32(1.0) - l1).astype(np.float32)
    return i0, i1, l0, l1


def resize_bilinear_like_torch(frame: np.ndarray, out_h: int, out_w: int) -> np.ndarray:
    """[H,W,C] uint8 or float -> [out_h,out_w,C] float32 in the input's scale (uint8 -> /255).

    Matches `F.interpolate(x / 255, size=(out_h, out_w), mode="bilinear",
    align_corners=False)` (no antialiasing) to float32 rounding.
    """
    h, w = frame.shape[:2]
    r0, r1, h0, h1 = _linear_taps(h, out_h)
    c0, c1, w0, w1 = _linear_taps(w, out_w)

    def rows(idx: np.ndarray) -> np.ndarray:
        sel = frame[idx]
        if sel.dtype == np.uint8:
            sel = sel.astype(np.float32) / np.float32(255.0)
        sel = sel.astype(np.float32, copy=False)
        return w0[None, :, None] * sel[:, c0] + w1[None, :, None] * sel[:, c1]

    top, bottom = rows(r0), rows(r1)
    return (h0[:, None, None] * top + h1[:, None, None] * bottom).astype(np.float32)


def short_side_size(height: int, width: int, size: int = CLIP_SIZE) -> tuple[int, int]:
    """pytorchvideo `ShortSideScale(size)` output (h, w): long side floor(long / short * size)."""
    if width < height:
        return int(math.floor(float(height) / width * size)), size
    return size, int(math.floor(float(width) / height * size))


def uniform_crop_offsets(length: int, size: int = CLIP_SIZE) -> tuple[int, int, int]:
    """The three crops of the video pipeline along a side: 0, ceil((L-size)/2), L-size."""
    return 0, int(math.ceil((length - size) / 2)), length - size
