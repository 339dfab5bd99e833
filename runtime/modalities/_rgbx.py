"""Photo + map pairs for the rgbd (depth) and rgbn (surface normal) modalities.

Preprocessing (spec section 7, rgbd/rgbn; the reference's `load_rgbx` with the
deterministic evaluation crop): the photo as in the image modality; the map converted
to RGB *with its raw values* (a 1-channel map becomes 3 equal channels, not
rescaled), resized to the photo's size with Pillow's bicubic filter (Pillow's
`resize` default the reference relied on), then both through the image pipeline
(short side 224 bicubic, centre crop 224, /255, CLIP normalisation) and stacked
[photo, map] -> [2,3,224,224] float32.

Maps that are not 8-bit images need a conversion to the 8-bit maps of training. The
bit depth decides, never the values (an 8-bit map is used raw; anything wider is
converted by its kind):

- depth, 16-bit PNG (millimetres, or any unit) or float `.npy` (metres): pixels that
  are 0, negative, NaN or infinite carry no depth and become 0; valid depths are
  mapped linearly from the 2nd percentile (-> 255, near is bright) to the 98th
  percentile (-> 0, far is dark) and clipped. The scale is relative, so the unit does
  not matter. (The released depth maps were made by a monocular estimator, so only
  relative depth was ever seen.) This holds whatever the values: a 16-bit depth PNG
  whose values happen to stay below 256 is still millimetres, not an 8-bit map.
- depth as a 16-bit PGM is refused with guidance: raw Kinect captures (NYU Depth v2's
  `d-*.pgm`) hold disparity (larger is NEARER, 11 bits, often stored byte-swapped),
  which cannot be told from depth by its values; read as depth it would be inverted.
  Convert it to depth first and pass a float `.npy` in metres or a 16-bit PNG.
- normals, float `.npy` [H,W,3] or [3,H,W]: unit vectors in [-1,1] become
  rint((n + 1) / 2 * 255) (the encoding of the training maps); values already in
  [0,1] are multiplied by 255; 16-bit normal maps (PNG/TIFF or uint16 arrays) follow
  the photos' rule (`_imaging.wide_to_uint8`): rint(v / 257).

Orientation: each file's own EXIF orientation is applied. When the photo is rotated
by 90 degrees by its EXIF tag, the map has no tag, and the map's aspect ratio matches
the photo's stored (unrotated) pixels, the map gets the photo's rotation too (a map
computed from the stored pixels), with a notice.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import numpy as np

from ..errors import InputError
from ._imaging import clip_image_tensor, open_image, wide_to_uint8
from ._io import Source, ext_of, is_array, load_npy, require_file, source_label
from .base import ModalityInput

logger = logging.getLogger(__name__)

DEPTH_PERCENTILES = (2.0, 98.0)


def depth_to_uint8(depth: np.ndarray) -> tuple[np.ndarray, dict[str, Any]]:
    """Metric or 16-bit depth [H,W] -> 8-bit map, near bright (see the module docstring)."""
    d = depth.astype(np.float64)
    valid = np.isfinite(d) & (d > 0)
    if not valid.any():
        return np.zeros(d.shape, np.uint8), {"depth_conversion": "no valid depth pixel", "valid_fraction": 0.0}
    lo, hi = (float(v) for v in np.percentile(d[valid], DEPTH_PERCENTILES))
    if hi <= lo:
        hi = lo + max(abs(lo) * 1e-6, 1e-12)
    v = (hi - np.clip(d, lo, hi)) / (hi - lo) * 255.0
    v[~valid] = 0.0
    info = {"depth_conversion": f"linear, near bright: {lo:.6g} -> 255, {hi:.6g} -> 0 "
                                f"(2nd-98th percentile); invalid pixels 0",
            "valid_fraction": round(float(valid.mean()), 6)}
    return np.rint(v).astype(np.uint8), info


def normals_to_uint8(n: np.ndarray) -> tuple[np.ndarray, dict[str, Any]]:
    """Float normals [H,W,3] -> 8-bit map."""
    lo, hi = float(n.min()), float(n.max())
    if lo < 0:
        return np.rint((np.clip(n, -1, 1) + 1.0) * 127.5).astype(np.uint8), {"normal_conversion": "(n + 1) / 2 * 255"}
    if hi <= 1.0:
        return np.rint(n * 255.0).astype(np.uint8), {"normal_conversion": "n * 255"}
    return np.rint(np.clip(n, 0, 255)).astype(np.uint8), {"normal_conversion": "values taken as 0-255"}


def _map_array(label: str, arr: np.ndarray, kind: str, expected: str) -> tuple[np.ndarray, dict[str, Any]]:
    """An in-memory or .npy map -> uint8 [H,W] or [H,W,3]."""
    if arr.dtype.kind not in "buif":
        raise InputError(label, expected, f"an array of dtype {arr.dtype}")
    a = arr
    if a.ndim == 3 and a.shape[0] in (1, 3) and a.shape[2] not in (1, 3):
        a = a.transpose(1, 2, 0)
    if a.ndim == 3 and a.shape[2] == 1:
        a = a[:, :, 0]
    if a.ndim not in (2, 3) or (a.ndim == 3 and a.shape[2] != 3) or min(a.shape[:2]) < 1:
        raise InputError(label, f"{expected} as an array [H,W] or [H,W,3]", f"shape {list(arr.shape)}")
    if a.dtype == np.uint8:
        return a, {"map_values": "8-bit, raw"}
    if kind == "depth":
        if a.ndim == 3:
            if not (np.array_equal(a[..., 0], a[..., 1]) and np.array_equal(a[..., 0], a[..., 2])):
                raise InputError(label, "a depth map with one channel", f"shape {list(arr.shape)} "
                                 f"of {arr.dtype} with different channels")
            a = a[..., 0]
        bad = ~np.isfinite(a) if a.dtype.kind == "f" else np.zeros(a.shape, bool)
        if not (np.where(bad, 0, a) > 0).any():
            raise InputError(label, f"{expected} with some valid depth", "no valid (finite, > 0) pixel")
        if bad.any():
            logger.warning("%s: %d NaN/infinite depth pixels are treated as missing depth", label, int(bad.sum()))
        return depth_to_uint8(a)
    if a.ndim != 3:
        raise InputError(label, "a normal map [H,W,3]", f"shape {list(arr.shape)}")
    if a.dtype.kind in "ui" and a.dtype.itemsize == 2:
        out, how = wide_to_uint8(a)
        return out, {"normal_conversion": how}
    if a.dtype.kind == "f" and not np.isfinite(a).all():
        raise InputError(label, "a normal map with finite values", f"{int((~np.isfinite(a)).sum())} NaN/Inf values")
    return normals_to_uint8(a.astype(np.float64))


def _load_map(source: Source, kind: str, expected: str) -> tuple[Any, dict[str, Any]]:
    """The map as an RGB PIL image with raw (or converted) 8-bit values, plus meta."""
    from PIL import Image

    label = source_label(source)
    if is_array(source):
        arr, info = _map_array(label, source, kind, expected)
        meta = {"source": label, **info, "exif_orientation": 1}
    else:
        path = require_file(source, expected)
        if ext_of(path) == ".npy" or path.read_bytes()[:6] == b"\x93NUMPY":
            arr, info = _map_array(str(path), load_npy(path, expected), kind, expected)
            meta = {"source": str(path), "format": "npy", **info, "exif_orientation": 1}
        else:
            im, meta = open_image(path, expected)
            meta = {"source": str(path), **meta}
            if im.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N", "F"):
                a = np.asarray(im)
                if kind == "depth" and meta.get("format") == "PPM":
                    raise InputError(path, f"{expected}: a 16-bit PGM is refused as depth",
                                     "a 16-bit PGM, the format of raw Kinect disparity (e.g. NYU Depth v2 "
                                     "d-*.pgm: larger values are NEARER, often byte-swapped), which cannot "
                                     "be told from depth by its values; convert it to depth first (NYU: "
                                     "metres = 351.3 / (1092.5 - byte-swapped value)) and pass a float .npy "
                                     "in metres or a 16-bit PNG in millimetres")
                if kind == "depth":
                    arr, info = depth_to_uint8(a)
                    if info.get("valid_fraction") == 0.0:
                        raise InputError(path, f"{expected} with some valid depth", "no valid (> 0) pixel")
                else:
                    arr, how = wide_to_uint8(a)
                    info = {"map_values": how}
                meta.update(info)
            else:
                # Raw values: Pillow's plain conversion, alpha dropped, like the reference.
                meta["map_values"] = "8-bit, raw"
                return im.convert("RGB"), meta
    img = Image.fromarray(arr, mode="L" if arr.ndim == 2 else "RGB").convert("RGB")
    return img, meta


def _aspect(w: int, h: int) -> float:
    return w / h


# Pillow transpose for EXIF orientations that swap width and height.
_EXIF_TRANSPOSE = {5: 5, 6: 4, 7: 6, 8: 2}  # Image.Transpose: TRANSPOSE, ROTATE_270, TRANSVERSE, ROTATE_90


def preprocess_pair(modality: str, kind: str, map_source: Source, image: Source | None,
                    expected_map: str) -> ModalityInput:
    """(map, photo) -> [2,3,224,224] float32 for rgbd/rgbn."""
    from PIL import Image

    from .image import load_rgb

    t0 = time.perf_counter()
    map_label = source_label(map_source)
    if image is None:
        raise InputError(map_label, f"the RGB photo this {kind} map belongs to as well (--image photo.jpg)",
                         "no photo")
    photo, photo_meta = load_rgb(image)
    m_img, map_meta = _load_map(map_source, kind, expected_map)
    orient = int(photo_meta.get("exif_orientation", 1))
    if orient in (5, 6, 7, 8) and int(map_meta.get("exif_orientation", 1)) == 1:
        stored_aspect = photo.height / photo.width  # the photo before its rotation
        if abs(_aspect(*m_img.size) / stored_aspect - 1) < 0.02 and abs(
                _aspect(*m_img.size) / _aspect(*photo.size) - 1) >= 0.02:
            m_img = m_img.transpose(_EXIF_TRANSPOSE[orient])
            map_meta["rotated_like_photo"] = orient
            logger.warning("%s: the photo is rotated by its EXIF tag %d and the map has the photo's stored "
                           "shape; the map is rotated the same way", map_label, orient)
    if m_img.size != photo.size:
        if abs(_aspect(*m_img.size) / _aspect(*photo.size) - 1) > 0.01:
            logger.warning("%s: the %s map is %dx%d, the photo %dx%d (other proportions); the map is "
                           "stretched to the photo", map_label, kind, *m_img.size, *photo.size)
        map_meta["resized_from"] = [m_img.width, m_img.height]
        m_img = m_img.resize(photo.size, Image.BICUBIC)
    array = np.stack([clip_image_tensor(photo), clip_image_tensor(m_img)]).astype(np.float32)
    meta = {"source": map_meta.pop("source"), "image": photo_meta.pop("source"), "map": map_meta,
            "photo": photo_meta, "preprocess_s": round(time.perf_counter() - t0, 4)}
    return ModalityInput(modality, array, meta)


def dummy_pair(rng: np.random.Generator) -> np.ndarray:
    from .image import dummy_input

    photo = dummy_input(rng)
    m = dummy_input(rng).mean(axis=0, keepdims=True).repeat(3, axis=0)
    return np.stack([photo, m]).astype(np.float32)
