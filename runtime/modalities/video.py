"""The video modality: video clip (MP4, MOV, WebM, MKV, AVI).

Reading: PyAV (FFmpeg) decodes by content; the display rotation of phone videos
(display-matrix side data) is applied; frame times come from the presentation
timestamps, so variable-frame-rate files are sampled at the right moments.

Preprocessing (spec section 7, video), as the reference (pytorchvideo
`ConstantClipsPerVideoSampler(1 s, 5 clips)` + first frame of each clip +
`ShortSideScale(224)` + `NormalizeVideo` + `SpatialCrop(224, 3)`):

- duration D = last frame time - first frame time + one frame interval (for a
  constant rate this is the reference's n_frames / fps);
- clip starts t_i = i * max(D - 1, 0) / 4, i = 0..4; the frame of clip i is the first
  frame shown at or after t_i (the reference's decord index ceil(fps * t_i) for a
  constant rate; by timestamp here, so variable frame rates are honoured). A clip
  shorter than 1 s gives its first frame five times, as the reference;
- /255; short side to 224 with bilinear interpolation exactly as the reference's
  `torch.nn.functional.interpolate(mode="bilinear", align_corners=False)` (no
  antialiasing: that is what training saw; the long side is floor(long/short*224));
- CLIP normalisation; three 224 crops along the long side at offsets
  0, ceil((L-224)/2), L-224 -> [15,3,224,224] float32, clip-major.

Colour conversion is FFmpeg's (swscale) YUV -> RGB24; the sample aspect ratio of
anamorphic video is ignored, as the reference's decoder did.

In-memory input: uint8 frames [T,H,W,3] with `fps=` (frames per second).
"""

from __future__ import annotations

import logging
import time
from fractions import Fraction
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import InputError
from ._imaging import (
    CLIP_MEAN,
    CLIP_SIZE,
    CLIP_STD,
    resize_bilinear_like_torch,
    short_side_size,
    uniform_crop_offsets,
)
from ._io import (
    Source,
    first_stream,
    is_array,
    open_media,
    number_option,
    require_file,
    require_finite,
    source_label,
)
from .base import Example, ModalityInput, ModalitySpec

logger = logging.getLogger(__name__)

EXPECTED = "a video (MP4, MOV, WebM, MKV or AVI)"
N_CLIPS = 5
CLIP_SECONDS = 1.0
# Frames before the last needed one up to which decoding runs straight through;
# beyond it the reader seeks to each sampled moment.
_SEQUENTIAL_FRAMES = 600
_TIME_EPS = 1e-6


def clip_start_times(duration: float) -> list[float]:
    """t_i = i * max(D - 1, 0) / 4 for the five 1-second clips."""
    span = max(duration - CLIP_SECONDS, 0.0)
    return [i * span / (N_CLIPS - 1) for i in range(N_CLIPS)]


def pick_frames(times: np.ndarray, starts: list[float]) -> list[int]:
    """Index of the first frame shown at or after each start (times relative, sorted)."""
    idx = np.searchsorted(times, np.asarray(starts) - _TIME_EPS, side="left")
    return [int(min(i, len(times) - 1)) for i in idx]


def frames_to_tensor(frames: list[np.ndarray]) -> np.ndarray:
    """Five [H,W,3] uint8 frames -> [15,3,224,224] float32 (resize, normalise, 3 crops)."""
    out = np.empty((N_CLIPS * 3, 3, CLIP_SIZE, CLIP_SIZE), dtype=np.float32)
    for c, frame in enumerate(frames):
        h, w = frame.shape[:2]
        new_h, new_w = short_side_size(h, w)
        x = resize_bilinear_like_torch(frame, new_h, new_w)  # [h', w', 3] in [0, 1]
        x = (x - CLIP_MEAN) / CLIP_STD
        x = x.transpose(2, 0, 1)
        # The short side is exactly 224, so the other offset is 0 (ceil(0 / 2)).
        along_y = new_h > new_w
        for k, off in enumerate(uniform_crop_offsets(new_h if along_y else new_w)):
            out[3 * c + k] = (x[:, off:off + CLIP_SIZE, :] if along_y
                              else x[:, :, off:off + CLIP_SIZE])
    return out


def _rotate(arr: np.ndarray, rotation: float) -> np.ndarray:
    """Apply FFmpeg's display rotation (degrees counter-clockwise) to a decoded frame."""
    k = int(round(rotation / 90.0)) % 4
    return np.ascontiguousarray(np.rot90(arr, k=k)) if k else arr


def _open(path: Path):
    return open_media(path, EXPECTED)


def _frame_times(path: Path) -> tuple[np.ndarray, list[int | None], dict[str, Any]]:
    """Pass 1 (demux only): presentation times of every video frame, sorted."""
    info: dict[str, Any] = {}
    container = _open(path)
    try:
        vs = first_stream(container, "video", path, EXPECTED)
        tb = vs.time_base or Fraction(1, 1)
        rate = vs.average_rate or vs.guessed_rate or vs.base_rate
        info.update(codec=vs.codec_context.name, width=int(vs.codec_context.width or 0),
                    height=int(vs.codec_context.height or 0),
                    container=container.format.name,
                    average_rate=float(rate) if rate else None)
        raw: list[int | None] = []
        try:
            for packet in container.demux(vs):
                if packet.size == 0 or packet.is_discard:
                    continue
                raw.append(packet.pts if packet.pts is not None else packet.dts)
        except Exception as e:  # noqa: BLE001 - a damaged tail: keep what was read
            if not raw:
                raise InputError(path, EXPECTED, f"a damaged video ({type(e).__name__}: {e})") from None
            logger.warning("%s: demuxing stopped early (%s); %d frames found", path, e, len(raw))
    finally:
        container.close()
    if not raw:
        raise InputError(path, f"{EXPECTED} with at least 2 frames", "no video frames")
    if all(r is not None for r in raw):
        stamps = sorted(int(r) for r in raw)
        times = np.array([float(s * tb) for s in stamps], dtype=np.float64)
        # Duplicate stamps (broken muxers): fall back to the nominal rate below.
        if len(set(stamps)) != len(stamps):
            stamps = None
    else:
        stamps = None
    if stamps is None:
        if not rate:
            raise InputError(path, f"{EXPECTED} with timestamps or a frame rate", "neither")
        times = np.arange(len(raw), dtype=np.float64) / float(rate)
        info["timestamps"] = "from the nominal frame rate"
    return times - times[0], (stamps or [None] * len(raw)), info


def _decode_frames(path: Path, wanted: list[int], stamps: list[int | None]) -> tuple[dict[int, np.ndarray], float]:
    """Pass 2: decode the frames at sorted indices `wanted` (presentation order)."""
    need = sorted(set(wanted))
    got: dict[int, np.ndarray] = {}
    rotation = 0.0
    container = _open(path)
    try:
        vs = container.streams.video[0]
        vs.thread_type = "AUTO"
        seek = need[-1] > _SEQUENTIAL_FRAMES and all(s is not None for s in stamps)
        if seek:
            for k in need:
                target = stamps[k]
                container.seek(int(target), stream=vs, backward=True, any_frame=False)
                for frame in container.decode(vs):
                    if frame.pts is None:
                        break
                    if frame.pts >= target:
                        rotation = float(getattr(frame, "rotation", 0) or 0)
                        got[k] = _rotate(frame.to_ndarray(format="rgb24"), rotation)
                        break
                if k not in got:
                    break
            if len(got) == len(need):
                return got, rotation
            got.clear()
            container.close()
            container = _open(path)
            vs = container.streams.video[0]
            vs.thread_type = "AUTO"
        index = 0
        last = None
        try:
            for frame in container.decode(vs):
                if index in need:
                    rotation = float(getattr(frame, "rotation", 0) or 0)
                    got[index] = _rotate(frame.to_ndarray(format="rgb24"), rotation)
                    if index == need[-1]:
                        break
                last = frame
                index += 1
        except Exception as e:  # noqa: BLE001 - damaged stream part-way
            if not got:
                raise InputError(path, EXPECTED, f"a damaged video ({type(e).__name__}: {e})") from None
            logger.warning("%s: decoding stopped at frame %d (%s)", path, index, e)
        missing = [k for k in need if k not in got]
        if missing:
            if not got and last is None:
                raise InputError(path, EXPECTED, "a video whose frames cannot be decoded")
            fill = got[max(got)] if got else _rotate(last.to_ndarray(format="rgb24"), rotation)
            logger.warning("%s: only %d frames decode; the last one stands in for later clips",
                           path, index)
            for k in missing:
                got[k] = fill
    finally:
        container.close()
    return got, rotation


def _from_file(path: Path) -> tuple[list[np.ndarray], dict[str, Any]]:
    times, stamps, info = _frame_times(path)
    n = len(times)
    if n < 2:
        raise InputError(path, f"{EXPECTED} with at least 2 frames",
                         "a single frame (a still picture: pass it with --image)")
    steps = np.diff(times)
    frame_dt = float(np.median(steps)) if n > 1 else 0.0
    duration = float(times[-1] + frame_dt)
    starts = clip_start_times(duration)
    picks = pick_frames(times, starts)
    try:
        frames, rotation = _decode_frames(path, picks, stamps)
    except InputError:
        raise
    except Exception as e:  # noqa: BLE001
        raise InputError(path, EXPECTED, f"a damaged video ({type(e).__name__}: {e})") from None
    vfr = bool(frame_dt > 0 and np.std(steps) > 0.05 * frame_dt)
    meta = {
        "source": str(path),
        **info,
        "n_frames": n,
        "duration_s": round(duration, 6),
        "frame_rate": round((n / duration) if duration > 0 else 0.0, 4),
        "variable_frame_rate": vfr,
        "rotation": rotation,
        "clip_starts_s": [round(s, 6) for s in starts],
        "frame_times_s": [round(float(times[k]), 6) for k in picks],
        "frame_indices": picks,
    }
    if duration < CLIP_SECONDS:
        logger.warning("%s: the clip lasts %.2f s (< 1 s): all five samples are its first frame",
                       path, duration)
    return [frames[k] for k in picks], meta


def _from_array(arr: np.ndarray, fps: float | None) -> tuple[list[np.ndarray], dict[str, Any]]:
    label = source_label(arr)
    if arr.ndim != 4 or arr.shape[3] != 3:
        raise InputError(label, "video frames as an array [T,H,W,3]", f"shape {list(arr.shape)}")
    if arr.dtype != np.uint8:
        raise InputError(label, "video frames of dtype uint8", f"dtype {arr.dtype}")
    if arr.shape[0] < 2:
        raise InputError(label, "at least 2 video frames",
                         f"{arr.shape[0]} (a still picture: pass it as an image)")
    if arr.shape[1] < 1 or arr.shape[2] < 1:
        raise InputError(label, "frames of at least 1x1 pixels", f"shape {list(arr.shape)}")
    if fps is None or not np.isfinite(fps) or fps <= 0:
        raise InputError(label, "a positive frame rate (fps=...) with in-memory frames", f"fps={fps}")
    n = arr.shape[0]
    times = np.arange(n, dtype=np.float64) / float(fps)
    duration = n / float(fps)
    starts = clip_start_times(duration)
    picks = pick_frames(times, starts)
    meta = {"source": label, "n_frames": n, "duration_s": round(duration, 6), "frame_rate": float(fps),
            "clip_starts_s": [round(s, 6) for s in starts], "frame_indices": picks,
            "frame_times_s": [round(float(times[k]), 6) for k in picks]}
    return [arr[k] for k in picks], meta


def preprocess(source: Source, *, fps: float | None = None) -> ModalityInput:
    """A video -> [15,3,224,224] float32 (spec section 7, video)."""
    t0 = time.perf_counter()
    if is_array(source):
        frames, meta = _from_array(source, number_option(source_label(source), "fps", fps))
    else:
        path = require_file(source, EXPECTED)
        frames, meta = _from_file(path)
    array = frames_to_tensor(frames)
    require_finite(meta["source"], array, EXPECTED)
    meta["preprocess_s"] = round(time.perf_counter() - t0, 4)
    return ModalityInput("video", array, meta)


def dummy_input(rng: np.random.Generator) -> np.ndarray:
    """15 CLIP-normalised frames of a smooth colour field drifting over five clips."""
    yy, xx = np.mgrid[0:CLIP_SIZE, 0:CLIP_SIZE].astype(np.float32) / CLIP_SIZE
    phase = rng.uniform(0, 2 * np.pi, size=3)
    out = np.empty((15, 3, CLIP_SIZE, CLIP_SIZE), dtype=np.float32)
    for i in range(15):
        shift = (i // 3) * 0.1 + (i % 3) * 0.3
        x = np.stack([0.5 + 0.45 * np.sin(2 * np.pi * (xx + shift) * (c + 1) + phase[c]) * np.cos(
            2 * np.pi * yy) for c in range(3)])
        out[i] = (x - CLIP_MEAN[:, None, None]) / CLIP_STD[:, None, None]
    return out


SPEC = ModalitySpec(
    name='video',
    cli_option='--video',
    description='video clip (MP4, MOV, WebM, MKV, AVI)',
    file_types=('.mp4', '.mov', '.webm', '.mkv', '.avi'),
    input_shape=(15, 3, 224, 224),
    tokenizer_kind='clip_patch',
    n_frames=15,
    n_tokens=257,
    preprocess=preprocess,
    dummy_input=dummy_input,
    caption_prompt='Provide a one-sentence caption for the provided video.',
    example=Example('video/clip.mp4'),
)
