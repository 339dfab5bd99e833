"""Which input did the user give, and is it usable? Checked once, before any model loads.

Used by the CLI (`ask`, `chat`, `encode`, `reference ask`) and by `Pipeline`, so the
rules live in one place:

- `select_input(inputs)`: from keyword inputs (imu=..., depth=..., image=...) the one
  modality to encode, its source and the RGB photo of a depth/normal map. Two inputs,
  an image next to a modality that does not take one, or a depth map without its photo
  are refused.
- `reader_options(...)`: the reader keyword arguments, refusing a modality-specific flag
  given for another modality (`--audio-start` with `--imu`) and any key the reader
  does not take (the message lists the keys it does).
- `check_source(...)`: an input path exists and is readable; `-` is standard input,
  read once into a temporary file whose format is sniffed from its first bytes.
- `select_checked(inputs)`: `select_input` with its files checked as above;
  `read_selected(...)`: that input read to the encoder's array (or an already
  preprocessed `--input-npy` array), for the reference model.
- `check_out_file` / `check_out_dir`: an output can be written, before the work starts.
"""

from __future__ import annotations

import dataclasses
import inspect
import logging
import os
import sys
import tempfile
import weakref
from pathlib import Path
from typing import Any, BinaryIO

from .errors import InputError, describe_os_error, os_error
from .modalities import get_modality, input_names

log = logging.getLogger(__name__)

STDIN = "-"
STDIN_LABEL = "<stdin>"


@dataclasses.dataclass(frozen=True)
class Selection:
    """The input of one request: modality None means a text-only question."""

    modality: str | None
    source: Any = None
    image: Any = None  # the RGB photo of a depth/normal map


def _option(name: str) -> str:
    try:
        return get_modality(input_names().get(name, name)).cli_option
    except Exception:  # noqa: BLE001 - an unknown name is reported by the caller
        return name


def select_input(inputs: dict[str, Any], *, embeddings: bool = False) -> Selection:
    """The one modality input among keyword inputs (None values are "not given").

    `embeddings`: a precomputed block is given too, so no input file may be.
    """
    names = input_names()
    given = {names.get(k, k): v for k, v in inputs.items() if v is not None}
    for name in given:
        get_modality(name)  # an unknown keyword lists the known modalities
    piped = [get_modality(n).cli_option for n, v in given.items() if isinstance(v, str) and v == STDIN]
    if len(piped) > 1:
        raise InputError(STDIN_LABEL, "standard input (-) for one input only", " and ".join(piped))
    if embeddings:
        if given:
            raise InputError("--embeddings", "no input file alongside a precomputed block",
                             " and ".join(get_modality(n).cli_option for n in given))
        return Selection(None)
    image = given.pop("image", None)
    if len(given) > 1:
        raise InputError("inputs", "one modality input per question",
                         " and ".join(get_modality(n).cli_option for n in given))
    if not given:
        return Selection("image", image) if image is not None else Selection(None)
    (name, source), = given.items()
    spec = get_modality(name)
    if spec.requires_image and image is None:
        raise InputError(spec.cli_option, f"its RGB photo as well ({spec.cli_option} FILE --image PHOTO)",
                         "no --image")
    if image is not None and not spec.requires_image:
        raise InputError("inputs", f"one input per question ({spec.cli_option} does not take an --image)",
                         f"{spec.cli_option} and --image")
    return Selection(name, source, image)


def select_checked(inputs: dict[str, Any], *, embeddings: bool = False, stdin_ok: bool = True) -> Selection:
    """`select_input` with its files checked (`check_source`): readable paths, `-` read from standard
    input once (`stdin_ok=False`: refused, because standard input carries something else)."""
    sel = select_input(inputs, embeddings=embeddings)
    if sel.modality is None:
        return sel
    if not stdin_ok and STDIN in (sel.source, sel.image):
        raise InputError(STDIN, "a file path here (standard input carries the chat's questions)", "-")
    source = check_source(sel.source, get_modality(sel.modality).cli_option, sel.modality)
    image = check_source(sel.image, "--image", "image") if sel.image is not None else None
    return Selection(sel.modality, source, image)


def read_selected(inputs: dict[str, Any], options: dict[str, Any] | None = None, *, input_npy: str | None = None,
                  modality: str | None = None) -> tuple[str, Any] | None:
    """(modality, encoder input array) of the one input given, or None for a text-only question.

    `input_npy` with `modality`: an already-preprocessed array (.npy of the modality's input
    shape, optionally with a batch axis of 1) instead of a file for the reader.
    """
    given = {name: path for name, path in inputs.items() if path}
    if input_npy:
        if not modality:
            raise InputError("--input-npy", "--modality NAME saying which modality the array is", "no --modality")
        if given:
            raise InputError("--input-npy", "no modality file options alongside it",
                             " ".join(get_modality(input_names().get(n, n)).cli_option for n in given))
        return modality, _load_input_npy(input_npy, modality)
    if modality:
        raise InputError("--modality", "--input-npy FILE to go with it", "no --input-npy")
    sel = select_checked(given)
    if sel.modality is None:
        return None
    opts = reader_options(sel.modality, options)
    if sel.image is not None:
        opts["image"] = sel.image
    try:
        return sel.modality, get_modality(sel.modality).preprocess(sel.source, **opts).array
    except NotImplementedError:
        raise InputError(sel.source, f"a file the {sel.modality} reader can read",
                         f"no {sel.modality} reader yet; pass a preprocessed array with --input-npy FILE "
                         f"--modality {sel.modality}") from None


def _load_input_npy(path: str, modality: str):
    import numpy as np

    spec = get_modality(modality)
    checked = check_source(path, "--input-npy", modality)
    try:
        array = np.load(checked, allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise InputError(path, "a .npy array", f"an unreadable file ({str(exc).splitlines()[0][:120]})") from None
    if tuple(array.shape) not in (spec.input_shape, (1, *spec.input_shape)):
        raise InputError(path, f"a preprocessed {spec.name} array of shape {list(spec.input_shape)}",
                         f"shape {list(array.shape)}")
    return array.astype(spec.input_dtype, copy=False)


def reader_parameters(modality: str) -> list[str]:
    """Keyword options the modality's reader takes (the photo of a paired map excluded)."""
    sig = inspect.signature(get_modality(modality).preprocess)
    return [p.name for p in sig.parameters.values()
            if p.kind is inspect.Parameter.KEYWORD_ONLY and p.name != "image"]


def reader_options(modality: str | None, options: dict[str, Any] | None = None,
                   flags: list[tuple[str, str, str, Any]] | None = None) -> dict[str, Any]:
    """Reader keyword arguments for `modality`, refusing options meant for another one.

    flags: (option as the user typed it, modality it is for, reader key, value) of the
    dedicated CLI options (--imu-rate, --audio-start, ...); a None value is "not given".
    options: free KEY=VALUE reader options (--reader-option).
    """
    out: dict[str, Any] = {}
    for option, for_modality, key, value in flags or ():
        if value is None:
            continue
        if modality != for_modality:
            found = f"the input is {get_modality(modality).cli_option}" if modality else "no input file"
            raise InputError(option, f"an {get_modality(for_modality).cli_option} input to apply to", found)
        out[key] = value
    extra = dict(options or {})
    if extra:
        if modality is None:
            raise InputError("--reader-option", "an input file whose reader takes it", "no input file")
        known = reader_parameters(modality)
        unknown = sorted(k for k in extra if k not in known)
        if unknown:
            raise InputError("--reader-option", f"an option of the {modality} reader "
                             f"({', '.join(known) if known else 'it takes none'})", ", ".join(unknown))
    return {**extra, **out}


def parse_reader_options(items: tuple[str, ...] | list[str]) -> dict[str, Any]:
    """KEY=VALUE strings -> keyword arguments (numbers become float, true/false bool)."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.isidentifier():
            raise InputError("--reader-option", "KEY=VALUE", repr(item))
        if value.lower() in ("true", "false"):
            out[key] = value.lower() == "true"
        else:
            try:
                out[key] = float(value)
            except ValueError:
                out[key] = value
    return out


# ------------------------------------------------------------------ paths


def check_source(source: Any, option: str, modality: str, stdin: BinaryIO | None = None) -> Any:
    """A path that exists and can be read (or an array, unchanged); `-` reads standard input.

    Returns the source to hand the reader: for `-`, a `StdinFile` (a path to the bytes
    read, with the sniffed format in `.facts`).
    """
    if isinstance(source, (list, tuple)) and all(isinstance(s, (str, os.PathLike)) for s in source):
        if any(os.fspath(s) == STDIN for s in source):
            raise InputError(STDIN, f"one {option} source when reading standard input", f"{len(source)} sources")
        return [check_source(s, option, modality) for s in source]
    if source is None or not isinstance(source, (str, os.PathLike)):
        return source
    if os.fspath(source) == STDIN:
        return read_stdin(modality, stdin)
    if isinstance(source, StdinFile):
        return source
    path = Path(source)
    expected = f"a readable {modality} file ({option})"
    try:
        st = path.stat()
    except FileNotFoundError:
        parent = path.parent
        found = "no such file" if parent.is_dir() else f"no such file (its directory {parent} does not exist)"
        raise InputError(path, expected, found) from None
    except OSError as exc:
        raise InputError(path, expected, describe_os_error(exc)) from None
    import stat as _stat

    if _stat.S_ISDIR(st.st_mode):
        from .modalities import get_modality

        if get_modality(modality).accepts_folder:
            return path  # the reader lists and checks the folder's files itself
        raise InputError(path, expected, "a directory")
    try:
        with open(path, "rb") as f:
            f.read(1)
    except OSError as exc:
        raise InputError(path, expected, describe_os_error(exc)) from None
    return path


# First bytes -> file suffix the readers know; checked in order.
_SNIFF: tuple[tuple[bytes, int, str, str], ...] = (
    (b"\x93NUMPY", 0, ".npy", "npy"),
    (b"\x89PNG\r\n\x1a\n", 0, ".png", "png"),
    (b"\xff\xd8\xff", 0, ".jpg", "jpeg"),
    (b"fLaC", 0, ".flac", "flac"),
    (b"OggS", 0, ".ogg", "ogg"),
    (b"ID3", 0, ".mp3", "mp3"),
    (b"\xff\xfb", 0, ".mp3", "mp3"),
    (b"\xff\xf3", 0, ".mp3", "mp3"),
    (b"\xff\xf2", 0, ".mp3", "mp3"),
    (b"\x1a\x45\xdf\xa3", 0, ".mkv", "matroska/webm"),
    (b"ply", 0, ".ply", "ply"),
    (b"# .PCD", 0, ".pcd", "pcd"),
    (b"VERSION", 0, ".pcd", "pcd"),
    (b"BM", 0, ".bmp", "bmp"),
)
# Text on stdin: the modality's text format.
_TEXT_SUFFIX = {"imu": ".csv", "point": ".xyz"}


def sniff_format(head: bytes, modality: str) -> tuple[str, str]:
    """(file suffix, format name) of content from its first bytes, or an InputError."""
    from .modalities._io import describe_content

    spec = get_modality(modality)
    expected = f"{modality} data ({' '.join(spec.file_types)}) on standard input"
    if not head:
        raise InputError(STDIN_LABEL, expected, "no data (0 bytes)")
    found: tuple[str, str] | None = None
    if head[:4] in (b"RIFF", b"RIFX") and head[8:12] == b"WAVE":
        found = (".wav", "wav")
    elif head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        found = (".webp", "webp")
    elif head[:4] == b"RIFF" and head[8:12] == b"AVI ":
        found = (".avi", "avi")
    elif head[4:8] == b"ftyp":
        found = (".mov", "mov") if head[8:12] == b"qt  " else (".mp4", "mp4")
    else:
        for magic, offset, suffix, name in _SNIFF:
            if head[offset:offset + len(magic)] == magic:
                found = (suffix, name)
                break
    if found is None and modality in _TEXT_SUFFIX:
        try:
            head.decode("utf-8")
            found = (_TEXT_SUFFIX[modality], "text")
        except UnicodeDecodeError as exc:
            if exc.start < len(head) - 4:  # not just a character cut at the end of the head
                found = None
            else:
                found = (_TEXT_SUFFIX[modality], "text")
    if found is None or found[0] not in spec.file_types:
        raise InputError(STDIN_LABEL, expected, describe_content(Path(STDIN_LABEL), head))
    return found


class StdinFile(os.PathLike):
    """Standard input saved to a temporary file (removed when this object is collected)."""

    def __init__(self, path: Path, facts: dict[str, Any]) -> None:
        self.path = path
        self.facts = facts
        self._finalizer = weakref.finalize(self, _unlink, str(path))

    def __fspath__(self) -> str:
        return str(self.path)

    def __str__(self) -> str:
        return str(self.path)

    def close(self) -> None:
        self._finalizer()


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass


def read_stdin(modality: str, stream: BinaryIO | None = None) -> StdinFile:
    """Read all of standard input (or `stream`) into a temporary file named by its sniffed format."""
    stream = stream if stream is not None else sys.stdin.buffer
    if getattr(stream, "isatty", lambda: False)():
        raise InputError(STDIN_LABEL, f"{modality} data piped in (e.g. `... | onellm ask {get_modality(modality).cli_option} -`)",
                         "a terminal")
    data = stream.read()
    suffix, name = sniff_format(data[:512], modality)
    try:
        fd, tmp = tempfile.mkstemp(prefix="onellm-stdin-", suffix=suffix)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
    except OSError as exc:
        raise os_error(exc, tempfile.gettempdir(), "write standard input to a temporary file") from None
    facts = {"source": STDIN_LABEL, "format": name, "bytes": len(data)}
    log.info("standard input: %d bytes of %s", len(data), name)
    return StdinFile(Path(tmp), facts)


def stdin_facts(source: Any) -> dict[str, Any] | None:
    """The input facts of a source read from standard input (None for any other source)."""
    return dict(source.facts) if isinstance(source, StdinFile) else None


def check_out_file(path: str | os.PathLike, *, force: bool, option: str = "--out") -> Path:
    """An output file that can be created: parent directory present and writable, nothing in the way."""
    target = Path(path)
    if target.is_dir():
        raise InputError(target, f"a file path for {option}", "a directory in the way")
    if target.exists() and not force:
        raise InputError(target, "a new file (pass --force to overwrite)", "an existing file")
    parent = target.parent if str(target.parent) else Path(".")
    if not parent.exists():
        raise InputError(target, f"an existing directory for {option}", f"no directory {parent}")
    if not parent.is_dir():
        raise InputError(target, f"a directory above {option}", f"a file in the way at {parent}")
    _probe_write(parent)
    return target


def check_out_dir(path: str | os.PathLike, option: str = "--out") -> Path:
    """An output directory that exists or can be created (its parents are created too)."""
    target = Path(path)
    if target.exists() and not target.is_dir():
        raise InputError(target, f"a directory for {option}", "a file in the way")
    probe = target
    while not probe.exists():
        if probe.parent == probe:
            break
        probe = probe.parent
    if not probe.is_dir():
        raise InputError(target, f"a directory path for {option}", f"a file in the way at {probe}")
    _probe_write(probe)
    return target


def _probe_write(directory: Path) -> None:
    """Create and remove a small file in `directory`: permission, read-only, disk full show now."""
    try:
        fd, tmp = tempfile.mkstemp(prefix=".onellm-probe-", dir=directory)
    except OSError as exc:
        raise os_error(exc, directory, "write into the directory") from None
    try:
        os.write(fd, b"0")
    except OSError as exc:
        raise os_error(exc, directory, "write into the directory") from None
    finally:
        os.close(fd)
        _unlink(tmp)
