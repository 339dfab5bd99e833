"""Builders of real-world input files for the reader tests (PyAV, Pillow, numpy)."""

from __future__ import annotations

from fractions import Fraction
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
EXAMPLES = REPO / "examples"


def frame_code(i: int) -> tuple[int, int, int]:
    """A flat colour naming frame i (216 codes, 40 levels apart: robust to lossy codecs)."""
    return 20 + 40 * (i % 6), 20 + 40 * ((i // 6) % 6), 20 + 40 * ((i // 36) % 6)


def read_code(rgb: np.ndarray) -> int:
    """The frame index of a colour made by frame_code (rgb in 0-255)."""
    r, g, b = (int(np.clip(round((v - 20) / 40), 0, 5)) for v in rgb)
    return r + 6 * g + 36 * b


def marker_frame(i: int, w: int, h: int) -> np.ndarray:
    """A frame coloured by frame_code(i) with a white top-left quarter."""
    a = np.empty((h, w, 3), np.uint8)
    a[:] = frame_code(i)
    a[: h // 4, : w // 4] = 255
    return a


def make_video(path: Path, n: int, fps: int = 25, w: int = 64, h: int = 48, codec: str = "libx264",
               pix_fmt: str = "yuv420p", rotation: float | None = None, pts_ms: list[int] | None = None,
               frames: list[np.ndarray] | None = None) -> Path:
    import av

    with av.open(str(path), "w") as c:
        s = c.add_stream(codec, rate=fps)
        s.width, s.height, s.pix_fmt = w, h, pix_fmt
        if pts_ms is not None:
            s.codec_context.time_base = Fraction(1, 1000)
            s.time_base = Fraction(1, 1000)
        if rotation is not None:
            s.set_display_rotation(rotation)
        for i in range(n):
            img = frames[i] if frames is not None else marker_frame(i, w, h)
            f = av.VideoFrame.from_ndarray(img, format="rgb24")
            if pts_ms is not None:
                f.pts, f.time_base = int(pts_ms[i]), Fraction(1, 1000)
            for p in s.encode(f):
                c.mux(p)
        for p in s.encode():
            c.mux(p)
    return path


def write_audio(path: Path, sig: np.ndarray, rate: int, codec: str = "pcm_s16le", fmt: str = "s16") -> Path:
    """sig [C, N] float in [-1, 1] -> an audio file through PyAV."""
    import av

    sig = np.atleast_2d(sig)
    layout = {1: "mono", 2: "stereo"}[sig.shape[0]]
    with av.open(str(path), "w") as c:
        s = c.add_stream(codec, rate=rate)
        s.layout = layout
        planar = fmt.endswith("p")
        if fmt.startswith("s16"):
            data = np.rint(np.clip(sig, -1, 1) * 32767).astype(np.int16)
        elif fmt.startswith("s32"):
            data = np.rint(np.clip(sig, -1, 1) * (2 ** 31 - 1)).astype(np.int32)
        else:
            data = sig.astype(np.float32)
        frame_size = s.codec_context.frame_size or 1024
        for a in range(0, data.shape[1], frame_size):
            chunk = data[:, a:a + frame_size]
            arr = np.ascontiguousarray(chunk) if planar else np.ascontiguousarray(chunk.T.reshape(1, -1))
            fr = av.AudioFrame.from_ndarray(arr, format=fmt, layout=layout)
            fr.sample_rate = rate
            fr.pts = a
            for p in s.encode(fr):
                c.mux(p)
        for p in s.encode(None):
            c.mux(p)
    return path


def write_wav_header_only(path: Path, rate: int = 16000) -> Path:
    """A WAV file with a valid header and 0 samples."""
    import struct

    data = b""
    hdr = b"RIFF" + struct.pack("<I", 36 + len(data)) + b"WAVEfmt " + struct.pack(
        "<IHHIIHH", 16, 1, 1, rate, rate * 2, 2, 16) + b"data" + struct.pack("<I", len(data))
    path.write_bytes(hdr + data)
    return path


def make_mov_with_audio(path: Path, n_frames: int = 10, fps: int = 10, rate: int = 16000,
                        seconds: float = 1.0) -> Path:
    """A QuickTime .mov with an H.264 video track (marker frames) and an AAC track (440 Hz)."""
    import av

    with av.open(str(path), "w", format="mov") as c:
        v = c.add_stream("libx264", rate=fps)
        v.width, v.height, v.pix_fmt = 64, 48, "yuv420p"
        a = c.add_stream("aac", rate=rate)
        a.layout = "mono"
        for i in range(n_frames):
            for p in v.encode(av.VideoFrame.from_ndarray(marker_frame(i, 64, 48), format="rgb24")):
                c.mux(p)
        for p in v.encode():
            c.mux(p)
        x = (0.3 * np.sin(2 * np.pi * 440 * np.arange(int(rate * seconds)) / rate)).astype(np.float32)
        size = a.codec_context.frame_size or 1024
        for s in range(0, len(x), size):
            fr = av.AudioFrame.from_ndarray(np.ascontiguousarray(x[None, s:s + size]), format="fltp", layout="mono")
            fr.sample_rate, fr.pts = rate, s
            for p in a.encode(fr):
                c.mux(p)
        for p in a.encode(None):
            c.mux(p)
    return path


def macroman_handler_names(src: Path, dst: Path) -> Path:
    """A copy of a .mov whose track handler names are Mac Roman, not UTF-8, as QuickTime
    writes them: FFmpeg's Pascal-string "VideoHandler"/"SoundHandler" become "Vidéo..."/
    "Söund..." with é = 0x8E and ö = 0x9A (same lengths, so no atom size changes)."""
    data = src.read_bytes()
    patched = data.replace(b"\x0cVideoHandler", b"\x0cVid\x8eoHandler").replace(
        b"\x0cSoundHandler", b"\x0cS\x9aundHandler")
    assert patched.count(b"\x8e") > data.count(b"\x8e") and patched.count(b"\x9a") > data.count(b"\x9a")
    dst.write_bytes(patched)
    return dst


def write_rifx_wav(path: Path, pcm: np.ndarray, rate: int) -> Path:
    """A big-endian RIFX WAVE file of 16-bit mono PCM (every field and sample big-endian)."""
    import struct

    data = np.asarray(pcm, dtype=">i2").tobytes()
    fmt = struct.pack(">HHIIHH", 1, 1, rate, rate * 2, 2, 16)
    body = b"WAVE" + b"fmt " + struct.pack(">I", len(fmt)) + fmt + b"data" + struct.pack(">I", len(data)) + data
    path.write_bytes(b"RIFX" + struct.pack(">I", len(body)) + body)
    return path
