"""Depth (rgbd) and normal (rgbn) maps paired with their photo.

Tolerances: 8-bit maps exactly equal the image pipeline of the raw map resized with
Pillow's bicubic filter; 16-bit/float conversions exactly equal the documented
formula (percentiles, (n + 1) / 2 * 255).
"""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from _inputs_helpers import EXAMPLES
from onellm.runtime.errors import InputError
from onellm.runtime.modalities import get_modality
from onellm.runtime.modalities._imaging import clip_image_tensor
from onellm.runtime.modalities._rgbx import depth_to_uint8, normals_to_uint8

RGBD, RGBN = get_modality("rgbd"), get_modality("rgbn")
PHOTO = EXAMPLES / "image" / "photo.jpg"


def photo_tensor() -> np.ndarray:
    return clip_image_tensor(Image.open(PHOTO).convert("RGB"))


def check(r) -> None:
    assert r.array.shape == (2, 3, 224, 224) and r.array.dtype == np.float32
    assert np.array_equal(r.array[0], photo_tensor())


def test_examples() -> None:
    d = RGBD.preprocess(EXAMPLES / "depth" / "depth.png", image=PHOTO)
    check(d)
    grey = Image.open(EXAMPLES / "depth" / "depth.png").convert("RGB")
    assert np.array_equal(d.array[1], clip_image_tensor(grey))  # raw values, 3 equal channels
    n = RGBN.preprocess(EXAMPLES / "normal" / "normal.png", image=PHOTO)
    check(n)
    assert np.array_equal(n.array[1], clip_image_tensor(Image.open(EXAMPLES / "normal" / "normal.png")))


def test_map_resized_to_photo_size_bicubic(tmp_path) -> None:
    small = Image.open(EXAMPLES / "depth" / "depth.png").resize((160, 120))
    small.save(tmp_path / "small.png")
    r = RGBD.preprocess(tmp_path / "small.png", image=PHOTO)
    up = small.convert("RGB").resize((320, 240), Image.BICUBIC)
    assert np.array_equal(r.array[1], clip_image_tensor(up))
    assert r.meta["map"]["resized_from"] == [160, 120]


def test_16bit_depth_png(tmp_path) -> None:
    rng = np.random.default_rng(0)
    mm = rng.integers(500, 4000, (240, 320)).astype(np.uint16)
    mm[:10] = 0  # no depth
    Image.fromarray(mm).save(tmp_path / "d16.png")
    r = RGBD.preprocess(tmp_path / "d16.png", image=PHOTO)
    check(r)
    lo, hi = np.percentile(mm[mm > 0].astype(np.float64), [2, 98])
    want = np.rint((hi - np.clip(mm, lo, hi)) / (hi - lo) * 255).astype(np.uint8)
    want[:10] = 0
    assert np.array_equal(depth_to_uint8(mm)[0], want)
    assert np.array_equal(r.array[1], clip_image_tensor(Image.fromarray(want).convert("RGB")))
    assert "near bright" in r.meta["map"]["depth_conversion"]


def test_float_depth_npy_metres_with_nan(tmp_path, caplog) -> None:
    yy = np.linspace(1.0, 6.0, 240)[:, None].repeat(320, 1)
    d = yy.copy()
    d[0, :5] = np.nan
    np.save(tmp_path / "d.npy", d.astype(np.float32))
    r = RGBD.preprocess(tmp_path / "d.npy", image=PHOTO)
    check(r)
    assert "missing depth" in caplog.text
    m8 = depth_to_uint8(d)[0]
    assert m8[0, 0] == 0 and m8[-1, 0] < m8[20, 0]  # invalid -> 0; far darker than near
    # the same depth in millimetres as uint16 gives the same map: the scale is relative
    assert np.array_equal(depth_to_uint8(np.nan_to_num(d * 1000).astype(np.uint16))[0][1:], m8[1:])


def test_16bit_depth_png_with_small_values_still_depth(tmp_path) -> None:
    """A 16-bit depth PNG is millimetres whatever its values: values below 256 do not
    make it an 8-bit map (bit depth decides, as for photos)."""
    mm = np.random.default_rng(3).integers(20, 250, (240, 320)).astype(np.uint16)
    Image.fromarray(mm).save(tmp_path / "d.png")
    r = RGBD.preprocess(tmp_path / "d.png", image=PHOTO)
    want = depth_to_uint8(mm)[0]
    assert np.array_equal(r.array[1], clip_image_tensor(Image.fromarray(want).convert("RGB")))
    assert "near bright" in r.meta["map"]["depth_conversion"]
    assert np.array_equal(RGBD.preprocess(mm, image=PHOTO).array, r.array)  # same as an array
    raw = clip_image_tensor(Image.fromarray(mm.astype(np.uint8)).convert("RGB"))
    assert not np.array_equal(r.array[1], raw)


def test_16bit_pgm_depth_refused_8bit_pgm_read(tmp_path) -> None:
    """A 16-bit PGM (raw Kinect disparity's format, larger = nearer) is refused with
    guidance; an 8-bit PGM depth map is an ordinary 8-bit map, read raw."""
    disparity = np.random.default_rng(4).integers(400, 1000, (240, 320)).astype(">u2")
    (tmp_path / "d-1.pgm").write_bytes(b"P5\n320 240\n2047\n" + disparity.tobytes())
    with pytest.raises(InputError, match="disparity") as e:
        RGBD.preprocess(tmp_path / "d-1.pgm", image=PHOTO)
    msg = str(e.value)
    assert "d-1.pgm" in msg and "16-bit PGM" in msg and ".npy" in msg and "NEARER" in msg
    d8 = np.asarray(Image.open(EXAMPLES / "depth" / "depth.png").convert("L"))
    (tmp_path / "d8.pgm").write_bytes(b"P5\n%d %d\n255\n" % (d8.shape[1], d8.shape[0]) + d8.tobytes())
    a = RGBD.preprocess(tmp_path / "d8.pgm", image=PHOTO)
    b = RGBD.preprocess(EXAMPLES / "depth" / "depth.png", image=PHOTO)
    assert np.array_equal(a.array, b.array)


def test_16bit_normals_by_bit_depth(tmp_path) -> None:
    n = np.random.default_rng(5).integers(0, 65536, (240, 320, 3)).astype(np.uint16)
    r = RGBN.preprocess(n, image=PHOTO)
    enc = np.rint(n / 257.0).astype(np.uint8)
    assert np.array_equal(r.array[1], clip_image_tensor(Image.fromarray(enc)))
    assert r.meta["map"]["normal_conversion"] == "16-bit scaled by 1/257"
    np.save(tmp_path / "n16.npy", n)
    assert np.array_equal(RGBN.preprocess(tmp_path / "n16.npy", image=PHOTO).array, r.array)


def test_float_normals_npy(tmp_path) -> None:
    n = np.random.default_rng(1).normal(size=(240, 320, 3))
    n /= np.linalg.norm(n, axis=-1, keepdims=True)
    np.save(tmp_path / "n.npy", n.astype(np.float32).transpose(2, 0, 1))  # [3,H,W]
    r = RGBN.preprocess(tmp_path / "n.npy", image=PHOTO)
    enc = np.rint((n.astype(np.float32).astype(np.float64) + 1) * 127.5).astype(np.uint8)
    assert np.array_equal(normals_to_uint8(n.astype(np.float32).astype(np.float64))[0], enc)
    assert np.array_equal(r.array[1], clip_image_tensor(Image.fromarray(enc)))


def test_in_memory_map_and_photo() -> None:
    photo = np.asarray(Image.open(PHOTO).convert("RGB"))
    depth = np.asarray(Image.open(EXAMPLES / "depth" / "depth.png"))
    a = RGBD.preprocess(depth, image=photo)
    b = RGBD.preprocess(EXAMPLES / "depth" / "depth.png", image=PHOTO)
    assert np.array_equal(a.array, b.array)


def test_photo_rotated_by_exif_map_stored_unrotated(tmp_path, caplog) -> None:
    img = Image.open(PHOTO)
    exif = img.getexif()
    exif[0x0112] = 6
    img.save(tmp_path / "rot.jpg", exif=exif.tobytes(), quality=95)
    r = RGBD.preprocess(EXAMPLES / "depth" / "depth.png", image=tmp_path / "rot.jpg")
    assert r.meta["map"]["rotated_like_photo"] == 6 and "rotated the same way" in caplog.text
    turned = Image.open(EXAMPLES / "depth" / "depth.png").convert("RGB").transpose(Image.Transpose.ROTATE_270)
    assert np.array_equal(r.array[1], clip_image_tensor(turned))


def test_missing_photo_and_bad_maps(tmp_path) -> None:
    with pytest.raises(InputError, match="--image"):
        RGBD.preprocess(EXAMPLES / "depth" / "depth.png")
    np.save(tmp_path / "z.npy", np.zeros((10, 10), np.float32))
    with pytest.raises(InputError, match="valid depth"):
        RGBD.preprocess(tmp_path / "z.npy", image=PHOTO)
    np.save(tmp_path / "bad.npy", np.zeros((10, 10, 5), np.float32))
    with pytest.raises(InputError, match="shape"):
        RGBN.preprocess(tmp_path / "bad.npy", image=PHOTO)
    nan = np.zeros((10, 10, 3), np.float32)
    nan[0, 0] = np.nan
    with pytest.raises(InputError, match="NaN"):
        RGBN.preprocess(nan, image=PHOTO)
    (tmp_path / "t.png").write_text("no picture")
    with pytest.raises(InputError, match="text"):
        RGBD.preprocess(tmp_path / "t.png", image=PHOTO)
    with pytest.raises(InputError, match="no such file"):
        RGBD.preprocess(EXAMPLES / "depth" / "depth.png", image=tmp_path / "nope.jpg")
