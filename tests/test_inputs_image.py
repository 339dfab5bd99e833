"""Image reader: formats and modes real files come in, the exact evaluation transform, bad inputs.

Tolerance: the pipeline must equal a straightforward Pillow + numpy implementation of
torchvision's Resize(224, BICUBIC) / CenterCrop(224) / ToTensor / Normalize exactly
(0 difference); crop offsets are checked against hand-computed values.
"""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from _inputs_helpers import EXAMPLES
from onellm.runtime.errors import InputError
from onellm.runtime.modalities import get_modality
from onellm.runtime.modalities._imaging import (
    CLIP_MEAN,
    CLIP_STD,
    center_crop_box,
    resized_size,
)

SPEC = get_modality("image")


def scene(w: int = 300, h: int = 200) -> np.ndarray:
    yy, xx = np.mgrid[0:h, 0:w]
    img = np.stack([(xx * 255 // max(w - 1, 1)), (yy * 255 // max(h - 1, 1)), ((xx + yy) % 64) * 4], -1)
    img[: h // 5, : w // 5] = [255, 255, 255]  # a white marker in the top-left corner
    return img.astype(np.uint8)


def reference_transform(im: Image.Image) -> np.ndarray:
    """torchvision's evaluation transform spelled out with Pillow (what it does for PIL input)."""
    w, h = im.size
    if w <= h:
        size = (224, int(224 * h / w))
    else:
        size = (int(224 * w / h), 224)
    im = im.resize(size, Image.BICUBIC)
    top, left = int(round((im.height - 224) / 2.0)), int(round((im.width - 224) / 2.0))
    im = im.crop((left, top, left + 224, top + 224))
    x = np.asarray(im, dtype=np.float32) / 255.0
    return ((x - CLIP_MEAN) / CLIP_STD).transpose(2, 0, 1)


def check(r) -> None:
    assert r.array.shape == (3, 224, 224) and r.array.dtype == np.float32
    assert np.isfinite(r.array).all()


# ------------------------------------------------------------------ happy paths

def test_example_photo_equals_reference_transform() -> None:
    r = SPEC.preprocess(EXAMPLES / "image" / "photo.jpg")
    check(r)
    expect = reference_transform(Image.open(EXAMPLES / "image" / "photo.jpg").convert("RGB"))
    assert np.array_equal(r.array, expect)


@pytest.mark.parametrize("w,h", [(300, 200), (200, 300), (224, 224), (100, 60), (1600, 1200), (225, 1000)])
def test_sizes_equal_reference_transform(tmp_path, w, h) -> None:
    p = tmp_path / "x.png"
    Image.fromarray(scene(w, h)).save(p)
    assert np.array_equal(SPEC.preprocess(p).array, reference_transform(Image.open(p).convert("RGB")))


def test_resize_and_crop_arithmetic() -> None:
    assert resized_size(640, 480) == (298, 224)  # int(224 * 640 / 480) = int(298.67)
    assert resized_size(480, 640) == (224, 298)
    assert resized_size(500, 333) == (336, 224)  # int(336.34): truncation, not rounding
    assert center_crop_box(298, 224) == (37, 0, 261, 224)  # round(37.0)
    assert center_crop_box(299, 224) == (38, 0, 262, 224)  # round(37.5) = 38 (half to even)
    assert center_crop_box(297, 224) == (36, 0, 260, 224)  # round(36.5) = 36 (half to even)
    assert center_crop_box(224, 301) == (0, 38, 224, 262)  # round(38.5) = 38


def test_cmyk_jpeg(tmp_path) -> None:
    p = tmp_path / "cmyk.jpg"
    Image.fromarray(scene()).convert("CMYK").save(p, quality=95)
    r = SPEC.preprocess(p)
    check(r)
    assert r.meta["mode"] == "CMYK"
    ref = reference_transform(Image.fromarray(scene()))
    assert np.abs(r.array - ref).mean() < 0.1  # JPEG + naive CMYK round trip


def test_palette_png_with_transparency_composited_on_white(tmp_path) -> None:
    img = Image.fromarray(scene()).convert("P", palette=Image.ADAPTIVE, colors=64)
    img.info["transparency"] = 0
    p = tmp_path / "pal.png"
    img.save(p, transparency=0)
    r = SPEC.preprocess(p)
    check(r)
    assert "white" in r.meta["conversion"]


def test_rgba_transparent_pixels_become_white(tmp_path) -> None:
    a = np.zeros((224, 224, 4), np.uint8)  # fully transparent black
    p = tmp_path / "clear.png"
    Image.fromarray(a, "RGBA").save(p)
    x = SPEC.preprocess(p).array
    np.testing.assert_allclose(x, ((1.0 - CLIP_MEAN) / CLIP_STD)[:, None, None].repeat(224, 1).repeat(224, 2),
                               atol=1e-6)


def test_16bit_greyscale_png_is_scaled_not_clipped(tmp_path) -> None:
    g = (np.linspace(0, 65535, 300)[None, :].repeat(200, 0)).astype(np.uint16)
    p = tmp_path / "g16.png"
    Image.fromarray(g).save(p)
    r = SPEC.preprocess(p)
    check(r)
    assert r.meta["mode"].startswith("I")
    g8 = np.rint(g / 257.0).astype(np.uint8)
    expect = reference_transform(Image.fromarray(g8, "L").convert("RGB"))
    assert np.array_equal(r.array, expect)


@pytest.mark.parametrize("top", [65535, 200])
def test_16bit_greyscale_by_bit_depth_not_values(tmp_path, top) -> None:
    """One rule for 16-bit greyscale, whatever the values (a dark 16-bit photo whose
    values stay below 256 is NOT read as 8-bit) and whatever the carrier: PNG (Pillow
    mode I;16), PGM (Pillow mode I) and a uint16 array give the same tensor."""
    g = (np.linspace(0, top, 300)[None, :].repeat(200, 0)).astype(np.uint16)
    expect = reference_transform(Image.fromarray(np.rint(g / 257.0).astype(np.uint8), "L").convert("RGB"))
    Image.fromarray(g).save(tmp_path / "g.png")
    (tmp_path / "g.pgm").write_bytes(b"P5\n300 200\n65535\n" + g.astype(">u2").tobytes())
    png, pgm = SPEC.preprocess(tmp_path / "g.png"), SPEC.preprocess(tmp_path / "g.pgm")
    assert png.meta["mode"] == "I;16" and pgm.meta["mode"] == "I"
    assert png.meta["conversion"] == pgm.meta["conversion"] == "16-bit scaled by 1/257"
    for r in (png, pgm, SPEC.preprocess(g)):
        assert np.array_equal(r.array, expect)
    if top == 200:  # all but black: values 0 or 1 after / 257
        assert np.rint(g / 257.0).max() == 1


def test_exif_orientation_applied(tmp_path) -> None:
    img = Image.fromarray(scene(300, 200))  # marker top-left, landscape
    exif = img.getexif()
    exif[0x0112] = 6  # stored rotated: display = rotate 90 degrees clockwise
    p = tmp_path / "rot.jpg"
    img.save(p, exif=exif.tobytes(), quality=95)
    r = SPEC.preprocess(p)
    assert r.meta["exif_orientation"] == 6
    upright = img.transpose(Image.Transpose.ROTATE_270)  # clockwise
    assert upright.size == (200, 300)
    assert np.abs(r.array - reference_transform(upright)).mean() < 0.05
    assert np.abs(r.array - reference_transform(img)).mean() > 0.3


@pytest.mark.parametrize("fmt,ext", [("WEBP", ".webp"), ("BMP", ".bmp"), ("GIF", ".gif"), ("TIFF", ".tif")])
def test_other_formats(tmp_path, fmt, ext) -> None:
    p = tmp_path / f"x{ext}"
    Image.fromarray(scene()).save(p, format=fmt, **({"lossless": True} if fmt == "WEBP" else {}))
    r = SPEC.preprocess(p)
    check(r)
    if fmt in ("WEBP", "BMP", "TIFF"):
        assert np.array_equal(r.array, reference_transform(Image.fromarray(scene())))


def test_la_and_grey(tmp_path) -> None:
    for mode in ("L", "LA", "1"):
        p = tmp_path / f"{mode}.png"
        Image.fromarray(scene()).convert(mode).save(p)
        check(SPEC.preprocess(p))


def test_wrong_extension_decoded_by_content(tmp_path) -> None:
    p = tmp_path / "really_a_png.jpg"
    Image.fromarray(scene()).save(p, format="PNG")
    assert np.array_equal(SPEC.preprocess(p).array, reference_transform(Image.fromarray(scene())))


def test_in_memory_arrays() -> None:
    img = scene()
    ref = reference_transform(Image.fromarray(img))
    assert np.array_equal(SPEC.preprocess(img).array, ref)
    assert np.array_equal(SPEC.preprocess(img.astype(np.float32) / 255.0).array, ref)
    assert np.array_equal(SPEC.preprocess(Image.fromarray(img)).array, ref)
    check(SPEC.preprocess(img[..., 0]))


# ------------------------------------------------------------------ bad inputs

def test_truncated_jpeg(tmp_path) -> None:
    p = tmp_path / "ok.jpg"
    Image.fromarray(scene(640, 480)).save(p, quality=95)
    cut = tmp_path / "cut.jpg"
    cut.write_bytes(p.read_bytes()[:3000])
    with pytest.raises(InputError, match="truncated|damaged") as e:
        SPEC.preprocess(cut)
    assert str(cut) in str(e.value)


@pytest.mark.parametrize("payload,found", [
    (b"", "empty"),
    (b"just some text\n", "text"),
    (b"\x89PNG\r\n\x1a\n" + b"\x00" * 40, "PNG image"),
    (b"\x00\x00\x00\x18ftypmp42" + b"\x00" * 100, "MP4"),
])
def test_not_an_image(tmp_path, payload, found) -> None:
    p = tmp_path / "x.png"
    p.write_bytes(payload)
    with pytest.raises(InputError, match=found) as e:
        SPEC.preprocess(p)
    assert "expected" in str(e.value)


def test_missing_file_and_directory(tmp_path) -> None:
    with pytest.raises(InputError, match="no such file"):
        SPEC.preprocess(tmp_path / "nope.jpg")
    with pytest.raises(InputError, match="a directory"):
        SPEC.preprocess(tmp_path)


def test_bad_arrays() -> None:
    with pytest.raises(InputError, match="shape"):
        SPEC.preprocess(np.zeros((10, 10, 5), np.uint8))
    bad = np.zeros((10, 10, 3), np.float32)
    bad[0, 0, 0] = np.nan
    with pytest.raises(InputError, match="NaN"):
        SPEC.preprocess(bad)
    with pytest.raises(InputError, match="0-255"):
        SPEC.preprocess(np.full((10, 10, 3), 300, np.int32))
