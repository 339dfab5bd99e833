"""Video reader: containers and codecs, rotation, variable frame rate, short clips,
the 5 x 3 sampling of spec section 7, bad inputs.

Tolerances: the bilinear resize equals torch.nn.functional.interpolate(bilinear,
align_corners=False) within 2.5e-7 (float32 rounding of the final sum; the source positions match exactly); frame choice and crop offsets
exactly.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from _inputs_helpers import EXAMPLES, macroman_handler_names, make_mov_with_audio, make_video, marker_frame, read_code
from onellm.runtime.errors import InputError
from onellm.runtime.modalities import get_modality
from onellm.runtime.modalities import video as V
from onellm.runtime.modalities._imaging import (
    CLIP_MEAN,
    CLIP_STD,
    resize_bilinear_like_torch,
    short_side_size,
    uniform_crop_offsets,
)

SPEC = get_modality("video")


def green_levels(r) -> list[int]:
    """The frame index each clip's frame encodes (flat colour code), read from the tensor."""
    out = []
    for x in r.array[::3]:  # first crop of each clip
        rgb = (x * CLIP_STD[:, None, None] + CLIP_MEAN[:, None, None]) * 255
        out.append(read_code(np.median(rgb[:, 150:, 150:].reshape(3, -1), axis=1)))
    return out


def check(r) -> None:
    assert r.array.shape == (15, 3, 224, 224) and r.array.dtype == np.float32
    assert np.isfinite(r.array).all()


# ------------------------------------------------------------------ happy paths

def test_example_clip() -> None:
    r = SPEC.preprocess(EXAMPLES / "video" / "clip.mp4")
    check(r)
    assert r.meta["n_frames"] == 50 and r.meta["duration_s"] == pytest.approx(2.0)
    assert r.meta["clip_starts_s"] == pytest.approx([0, 0.25, 0.5, 0.75, 1.0])
    # decord's index ceil(fps * t) for 25 fps
    assert r.meta["frame_indices"] == [math.ceil(25 * t) for t in (0, 0.25, 0.5, 0.75, 1.0)]


@pytest.mark.parametrize("name,codec,pix_fmt", [
    ("a.mov", "mjpeg", "yuvj420p"),
    ("a.webm", "libvpx", "yuv420p"),
    ("a.avi", "mpeg4", "yuv420p"),
    ("a.mkv", "libx264", "yuv420p"),
    ("a.mp4", "libx264", "yuv420p"),
])
def test_containers_pick_the_reference_frames(tmp_path, name, codec, pix_fmt) -> None:
    r = SPEC.preprocess(make_video(tmp_path / name, 75, fps=25, codec=codec, pix_fmt=pix_fmt))
    check(r)
    starts = [i * (3.0 - 1) / 4 for i in range(5)]
    expect = [math.ceil(25 * t - 1e-9) for t in starts]
    assert r.meta["frame_indices"] == expect
    assert green_levels(r) == expect  # the decoded pixels are those frames


def test_rotation_metadata_honoured(tmp_path) -> None:
    r = SPEC.preprocess(make_video(tmp_path / "rot.mp4", 30, w=64, h=48, rotation=90))
    assert r.meta["rotation"] == 90
    # Displayed portrait: 48 wide, 64 high -> the crops run along y; the white
    # marker (stored top-left) is shown bottom-left after a 90-degree turn
    # counter-clockwise, FFmpeg's convention for a +90 display matrix.
    frame = r.array[0] * CLIP_STD[:, None, None] + CLIP_MEAN[:, None, None]
    bottom_crop = r.array[2] * CLIP_STD[:, None, None] + CLIP_MEAN[:, None, None]
    assert frame[0, :20, :20].mean() < 0.3  # top-left of the top crop is not white
    assert bottom_crop[0, -20:, :20].mean() > 0.9  # bottom-left of the bottom crop is white
    plain = SPEC.preprocess(make_video(tmp_path / "plain.mp4", 30, w=64, h=48))
    assert plain.meta["rotation"] == 0


def test_variable_frame_rate_by_timestamps(tmp_path) -> None:
    steps = [20 if i % 4 else 100 for i in range(59)]  # bursts and pauses, in ms
    pts = np.concatenate([[0], np.cumsum(steps)]).astype(int)
    r = SPEC.preprocess(make_video(tmp_path / "vfr.mp4", 60, pts_ms=list(pts)))
    assert r.meta["variable_frame_rate"] is True
    times = pts / 1000.0
    d = times[-1] + np.median(np.diff(times))
    starts = [i * max(d - 1, 0) / 4 for i in range(5)]
    expect = [int(np.searchsorted(times, s - 1e-6)) for s in starts]
    assert r.meta["frame_indices"] == expect
    assert green_levels(r) == expect
    assert r.meta["frame_times_s"] == pytest.approx([times[i] for i in expect])


def test_clip_shorter_than_one_second(tmp_path, caplog) -> None:
    r = SPEC.preprocess(make_video(tmp_path / "short.mp4", 12, fps=25))
    check(r)
    assert r.meta["frame_indices"] == [0] * 5
    assert "< 1 s" in caplog.text
    assert np.array_equal(r.array[0], r.array[12])


def test_quicktime_metadata_in_mac_roman(tmp_path) -> None:
    """A .mov whose handler names are Mac Roman (not UTF-8) reads as the same file with
    UTF-8 names (PyAV's default strict decoding refused it)."""
    import av

    plain = make_mov_with_audio(tmp_path / "plain.mov")
    roman = macroman_handler_names(plain, tmp_path / "roman.mov")
    with pytest.raises(UnicodeDecodeError):  # the quirk is really there
        av.open(str(roman)).close()
    a, b = SPEC.preprocess(plain), SPEC.preprocess(roman)
    check(b)
    assert b.meta["frame_indices"] == a.meta["frame_indices"] == [0, 0, 0, 0, 0]
    assert np.array_equal(a.array, b.array)


def test_long_video_seeking_equals_sequential_decoding(tmp_path, monkeypatch) -> None:
    path = make_video(tmp_path / "long.mp4", 700, fps=50, w=32, h=24)
    seek = SPEC.preprocess(path)
    monkeypatch.setattr(V, "_SEQUENTIAL_FRAMES", 10 ** 9)
    seq = SPEC.preprocess(path)
    assert seek.meta["frame_indices"] == seq.meta["frame_indices"] == [0, 163, 325, 488, 650]
    assert np.array_equal(seek.array, seq.array)


def test_in_memory_frames_equal_file_pipeline() -> None:
    frames = np.stack([marker_frame(i, 64, 48) for i in range(40)])
    r = SPEC.preprocess(frames, fps=20)
    check(r)
    assert r.meta["frame_indices"] == [math.ceil(20 * i * 1.0 / 4 - 1e-9) for i in range(5)]
    assert np.array_equal(r.array, V.frames_to_tensor([frames[k] for k in r.meta["frame_indices"]]))


# ------------------------------------------------------------------ fidelity

def test_bilinear_resize_matches_torch() -> None:
    torch = pytest.importorskip("torch")
    F = torch.nn.functional
    rng = np.random.default_rng(0)
    for h, w in [(240, 320), (1080, 1920), (480, 270), (100, 100), (150, 224), (300, 224)]:
        frame = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        new_h, new_w = short_side_size(h, w)
        ours = resize_bilinear_like_torch(frame, new_h, new_w)
        x = torch.from_numpy(frame).permute(2, 0, 1)[None].float() / 255.0
        ref = F.interpolate(x, size=(new_h, new_w), mode="bilinear", align_corners=False)[0].permute(1, 2, 0)
        np.testing.assert_allclose(ours, ref.numpy(), rtol=0, atol=2.5e-7)  # 2 float32 ulps at 1.0


def test_short_side_and_crop_offsets() -> None:
    assert short_side_size(240, 320) == (224, 298)  # floor(320 / 240 * 224) = floor(298.67)
    assert short_side_size(1080, 1920) == (224, 398)
    assert short_side_size(1920, 1080) == (398, 224)
    assert short_side_size(100, 100) == (224, 224)
    assert uniform_crop_offsets(398) == (0, 87, 174)
    assert uniform_crop_offsets(299) == (0, 38, 75)  # ceil(37.5)
    assert uniform_crop_offsets(224) == (0, 0, 0)


def test_clip_start_times() -> None:
    assert V.clip_start_times(11.0) == pytest.approx([0, 2.5, 5, 7.5, 10])
    assert V.clip_start_times(0.4) == [0.0] * 5


def test_full_pipeline_matches_torch_reference() -> None:
    """frames -> /255 -> interpolate -> normalise -> 3 crops, written with torch."""
    torch = pytest.importorskip("torch")
    F = torch.nn.functional
    rng = np.random.default_rng(1)
    for h, w in [(240, 320), (320, 240)]:
        frames = [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for _ in range(5)]
        ours = V.frames_to_tensor(frames)
        mean = torch.tensor(CLIP_MEAN)[:, None, None, None]
        std = torch.tensor(CLIP_STD)[:, None, None, None]
        cthw = torch.from_numpy(np.stack(frames)).permute(3, 0, 1, 2).float() / 255.0
        new_h, new_w = short_side_size(h, w)
        scaled = F.interpolate(cthw, size=(new_h, new_w), mode="bilinear", align_corners=False)
        scaled = (scaled - mean) / std
        crops = []
        for t in range(5):
            for off in uniform_crop_offsets(max(new_h, new_w)):
                c = scaled[:, t, off:off + 224, :] if new_h > new_w else scaled[:, t, :, off:off + 224]
                crops.append(c[:, :224, :224])
        ref = torch.stack(crops).numpy()
        np.testing.assert_allclose(ours, ref, atol=2e-6)


# ------------------------------------------------------------------ bad inputs

def test_one_frame_video(tmp_path) -> None:
    with pytest.raises(InputError, match="single frame"):
        SPEC.preprocess(make_video(tmp_path / "one.mp4", 1))


def test_truncated_and_corrupt(tmp_path) -> None:
    good = make_video(tmp_path / "ok.mp4", 30, w=160, h=120).read_bytes()
    cut = tmp_path / "cut.mp4"
    cut.write_bytes(good[: len(good) // 3])
    with pytest.raises(InputError) as e:
        SPEC.preprocess(cut)
    assert str(cut) in str(e.value)
    junk = tmp_path / "junk.mp4"
    junk.write_bytes(bytes(np.random.default_rng(0).integers(0, 256, 4000, dtype=np.uint8)))
    with pytest.raises(InputError, match="expected a video"):
        SPEC.preprocess(junk)


def test_audio_file_is_not_a_video(tmp_path) -> None:
    from _inputs_helpers import write_audio

    p = write_audio(tmp_path / "a.mp4", np.zeros(16000, np.float32), 16000, "aac", "fltp")
    with pytest.raises(InputError, match="no video stream"):
        SPEC.preprocess(p)


def test_text_and_empty(tmp_path) -> None:
    t = tmp_path / "t.mp4"
    t.write_text("not a video\n")
    with pytest.raises(InputError, match="text"):
        SPEC.preprocess(t)
    e = tmp_path / "e.mp4"
    e.write_bytes(b"")
    with pytest.raises(InputError, match="empty"):
        SPEC.preprocess(e)


def test_bad_arrays() -> None:
    with pytest.raises(InputError, match="fps"):
        SPEC.preprocess(np.zeros((5, 8, 8, 3), np.uint8))
    with pytest.raises(InputError, match="2 video frames"):
        SPEC.preprocess(np.zeros((1, 8, 8, 3), np.uint8), fps=10)
    with pytest.raises(InputError, match="uint8"):
        SPEC.preprocess(np.zeros((5, 8, 8, 3), np.float32), fps=10)
