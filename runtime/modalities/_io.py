"""Shared plumbing of the input readers: sources, file checks, content sniffing.

A *source* is what a user hands a reader: a path (str or os.PathLike) or an in-memory
numpy array (a desktop app holding sensor data). Both go through the same validation;
every failure is an `InputError` naming the source, what was expected and what was
found, never a library traceback.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, Union

import numpy as np

from ..errors import InputError

logger = logging.getLogger(__name__)

Source = Union[str, "os.PathLike[str]", np.ndarray]

ARRAY_LABEL = "<in-memory array>"

# First bytes of common files, for "found ..." in error messages.
_MAGIC: tuple[tuple[bytes, int, str], ...] = (
    (b"\x89PNG\r\n\x1a\n", 0, "a PNG image"),
    (b"\xff\xd8\xff", 0, "a JPEG image"),
    (b"GIF8", 0, "a GIF image"),
    (b"BM", 0, "a BMP image"),
    (b"II*\x00", 0, "a TIFF image"),
    (b"MM\x00*", 0, "a TIFF image"),
    (b"\x93NUMPY", 0, "a NumPy .npy array"),
    (b"PK\x03\x04", 0, "a ZIP archive (.npz, .zip, ...)"),
    (b"\x1f\x8b", 0, "a gzip archive"),
    (b"%PDF", 0, "a PDF document"),
    (b"fLaC", 0, "a FLAC audio file"),
    (b"OggS", 0, "an Ogg container"),
    (b"ID3", 0, "an MP3 audio file"),
    (b"\x1a\x45\xdf\xa3", 0, "a Matroska/WebM container"),
    (b"ftyp", 4, "an MP4/MOV container"),
    (b"ply", 0, "a PLY point cloud"),
    (b"# .PCD", 0, "a PCD point cloud"),
    (b"\x80\x02", 0, "a Python pickle (e.g. a torch .pt/.pth file)"),
)


def is_array(source: Any) -> bool:
    return isinstance(source, np.ndarray)


def source_label(source: Any) -> str:
    """How a source is named in messages and in `meta["source"]`."""
    if is_array(source):
        return f"{ARRAY_LABEL} shape {list(source.shape)} {source.dtype}"
    return os.fspath(source) if isinstance(source, (str, os.PathLike)) else repr(source)


def describe_content(path: Path, head: bytes | None = None) -> str:
    """A few words on what a file really holds, from its first bytes."""
    if head is None:
        try:
            with open(path, "rb") as f:
                head = f.read(512)
        except OSError as e:
            return f"an unreadable file ({e.strerror or e})"
    if not head:
        return "an empty file (0 bytes)"
    for magic, offset, what in _MAGIC:
        if head[offset:offset + len(magic)] == magic:
            return what
    if head[:4] == b"RIFF" and head[8:12] == b"WAVE":
        return "a RIFF WAVE audio file"
    if head[:4] == b"RIFX" and head[8:12] == b"WAVE":
        return "a big-endian RIFX WAVE audio file"
    if head[:4] == b"RIFF" and head[8:12] == b"AVI ":
        return "an AVI container"
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "a WebP image"
    if head[:2] in (b"\xff\xfb", b"\xff\xf3", b"\xff\xf2"):
        return "an MP3 audio file"
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError:
        return f"binary data of an unknown kind (first bytes {head[:8].hex(' ')})"
    first = text.strip().splitlines()[0][:60] if text.strip() else ""
    return f"text (first line {first!r})" if first else "blank text"


def require_file(source: Source, expected: str) -> Path:
    """The source as an existing, non-empty regular file, or an InputError."""
    if not isinstance(source, (str, os.PathLike)):
        raise InputError(source_label(source), f"{expected} (a file path or a numpy array)",
                         f"a {type(source).__name__} object")
    path = Path(source)
    if not path.exists():
        raise InputError(path, expected, "no such file")
    if path.is_dir():
        raise InputError(path, expected, "a directory")
    try:
        size = path.stat().st_size
    except OSError as e:  # pragma: no cover - permissions races
        raise InputError(path, expected, f"an unreadable file ({e.strerror or e})") from None
    if size == 0:
        raise InputError(path, expected, "an empty file (0 bytes)")
    return path


def read_head(path: Path, n: int = 512) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read(n)
    except OSError as e:
        raise InputError(path, "a readable file", f"an unreadable file ({e.strerror or e})") from None


def load_npy(path: Path, expected: str) -> np.ndarray:
    """np.load without pickles; any failure is an InputError saying what the file is."""
    head = read_head(path, 16)
    if head[:6] != b"\x93NUMPY":
        raise InputError(path, expected, describe_content(path))
    # Check the declared size against the file before np.load allocates it.
    try:
        with open(path, "rb") as f:
            fmt = np.lib.format
            version = fmt.read_magic(f)
            read = fmt.read_array_header_1_0 if version == (1, 0) else fmt.read_array_header_2_0
            shape, _, dtype = read(f)
            body = path.stat().st_size - f.tell()
    except Exception as e:  # noqa: BLE001 - any malformed header
        raise InputError(path, expected, f"a damaged .npy header ({type(e).__name__}: {e})") from None
    if dtype.hasobject:
        raise InputError(path, expected, "an object array (pickled Python objects are not loaded)")
    need = int(np.prod(shape, dtype=np.float64)) * dtype.itemsize
    if need > body:
        raise InputError(path, expected, f"a truncated .npy file ({body} data bytes of the {need} its header "
                         f"declares for shape {list(shape)})")
    try:
        arr = np.load(path, allow_pickle=False, mmap_mode=None)
    except ValueError as e:
        found = ("an object array (pickled Python objects are not loaded)"
                 if "pickle" in str(e).lower() else f"a damaged .npy file ({e})")
        raise InputError(path, expected, found) from None
    except (OSError, EOFError) as e:
        raise InputError(path, expected, f"a truncated or damaged .npy file ({e})") from None
    if not isinstance(arr, np.ndarray):  # pragma: no cover - np.load of .npy is an array
        raise InputError(path, expected, type(arr).__name__)
    return arr


def require_finite(label: str, arr: np.ndarray, expected: str, what: str = "values") -> None:
    """No NaN/Inf; the message counts them and gives the first position."""
    if arr.dtype.kind != "f":
        return
    bad = ~np.isfinite(arr)
    if bad.any():
        first = tuple(int(i) for i in np.argwhere(bad)[0])
        n_nan = int(np.isnan(arr).sum())
        raise InputError(
            label, f"{expected} with finite {what}",
            f"{n_nan} NaN and {int(bad.sum()) - n_nan} infinite {what} (first at index {list(first)})",
        )


def ext_of(path: Path) -> str:
    return path.suffix.lower()


def plural(n: int, word: str) -> str:
    return f"{n} {word}" if n == 1 else f"{n} {word}s"


def require_finite_output(label: str, arr: np.ndarray, expected: str) -> np.ndarray:
    """The preprocessed tensor is finite, else the input's values were out of range."""
    if not np.isfinite(arr).all():
        raise InputError(label, f"{expected} with values in float32 range",
                         "values so large that preprocessing overflows")
    return arr


def number_option(label: str, name: str, value: Any) -> float | None:
    """A numeric reader option (given as a number or a string) as a finite float, or None."""
    if value is None:
        return None
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise InputError(label, f"a number for the option {name}", repr(value)) from None
    if not np.isfinite(v):
        raise InputError(label, f"a finite number for the option {name}", repr(value))
    return v


def open_media(path: Path, expected: str):
    """Open a file with FFmpeg (PyAV); a file it refuses is an InputError saying what it looks like.

    Metadata that is not UTF-8 (QuickTime writes handler names and other strings in
    Mac Roman) is decoded with replacement characters instead of failing: no reader
    uses the metadata text, and PyAV's default ("strict") refuses the whole file.
    """
    import av

    try:
        return av.open(str(path), mode="r", metadata_errors="replace")
    except Exception as err:  # noqa: BLE001 - FFmpeg errors of every kind on bad files
        found = describe_content(path)
        if not found.startswith(("text", "blank", "binary data", "an empty")):
            found = f"{found} that FFmpeg cannot read ({type(err).__name__}: {err})"
        raise InputError(path, expected, found) from None


def first_stream(container, kind: str, path: Path, expected: str):
    """The container's first `kind` ("audio" or "video") stream that FFmpeg can decode."""
    streams = getattr(container.streams, kind)
    if not streams:
        kinds = sorted({s.type for s in container.streams}) or ["none"]
        raise InputError(path, expected, f"no {kind} stream (streams: {', '.join(kinds)})")
    stream = streams[0]
    if stream.codec_context is None:
        raise InputError(path, expected, f"a {kind} stream in a format FFmpeg has no decoder for")
    return stream
