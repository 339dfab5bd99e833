"""Embeddings files: the [n_inserted, n_embd] block `onellm encode` writes, with its metadata.

A block only means something to the model that made it, so the file says which:

- `.npz`: arrays `embeddings` (float32) and `meta` (a JSON string);
- any other name: a `.npy` array plus a sidecar `<name>.json` with the same metadata.

The metadata: format and version, modality, n_embd, n_inserted, the bundle's identity
(the sha256 of the checkpoint it was exported from, recorded in its manifest) and the
encoder precision. `check_embeddings` refuses a block for another modality, another
model or another width; a bare `.npy` (no sidecar) is still taken with `--modality`.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from .errors import InputError, os_error
from .manifest import Manifest

FORMAT = "onellm-embeddings"
VERSION = 1


def sidecar_path(path: str | os.PathLike) -> Path:
    return Path(f"{os.fspath(path)}.json")


def bundle_identity(manifest: Manifest) -> str:
    """What makes two bundles' blocks interchangeable: the source checkpoint's sha256."""
    return manifest.source.sha256


def embeddings_meta(manifest: Manifest, modality: str, precision: str | None = None,
                    inputs: dict[str, Any] | None = None) -> dict[str, Any]:
    return {
        "format": FORMAT,
        "version": VERSION,
        "modality": modality,
        "n_embd": manifest.n_embd,
        "n_inserted": manifest.n_inserted,
        "bundle": {"source_sha256": bundle_identity(manifest), "preset": manifest.preset,
                   "encoder_precision": precision},
        "input": inputs or {},
    }


def save_embeddings(path: str | os.PathLike, block: np.ndarray, meta: dict[str, Any]) -> list[Path]:
    """Write the block (and its metadata) atomically; returns the files written."""
    target = Path(path)
    arr = np.ascontiguousarray(block, dtype=np.float32)
    text = json.dumps(meta, default=str)
    written = [target]
    if target.suffix.lower() == ".npz":
        _atomic(target, lambda f: np.savez(f, embeddings=arr, meta=np.array(text)))
    else:
        _atomic(target, lambda f: np.save(f, arr, allow_pickle=False))
        side = sidecar_path(target)
        _atomic(side, lambda f: f.write(text.encode()))
        written.append(side)
    return written


def _atomic(target: Path, write) -> None:
    tmp = None
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".partial", dir=target.parent or ".")
        with os.fdopen(fd, "wb") as f:
            write(f)
        os.replace(tmp, target)
        tmp = None
    except OSError as exc:
        raise os_error(exc, target) from None
    finally:
        if tmp is not None:
            try:
                os.unlink(tmp)
            except OSError:
                pass


def load_embeddings(path: str | os.PathLike) -> tuple[np.ndarray, dict[str, Any] | None]:
    """(block, metadata or None for a bare .npy) from a file `onellm encode` wrote."""
    path = Path(path)
    expected = "an embeddings file from `onellm encode` (.npz, or .npy with its .json sidecar)"
    try:
        with open(path, "rb") as f:
            head = f.read(8)
    except FileNotFoundError:
        raise InputError(path, expected, "no such file") from None
    except IsADirectoryError:
        raise InputError(path, expected, "a directory") from None
    except OSError as exc:
        from .errors import describe_os_error

        raise InputError(path, expected, describe_os_error(exc)) from None
    try:
        if head[:4] == b"PK\x03\x04":
            with np.load(path, allow_pickle=False) as z:
                if "embeddings" not in z.files or "meta" not in z.files:
                    raise InputError(path, expected, f"an .npz with arrays {', '.join(z.files) or 'none'}")
                block, meta_text = z["embeddings"], str(z["meta"])
            meta = _parse_meta(path, meta_text)
        elif head[:6] == b"\x93NUMPY":
            block = np.load(path, allow_pickle=False)
            side = sidecar_path(path)
            meta = _parse_meta(side, side.read_text()) if side.is_file() else None
        else:
            from .modalities._io import describe_content

            raise InputError(path, expected, describe_content(path, head))
    except (OSError, ValueError, EOFError) as exc:
        raise InputError(path, expected, f"an unreadable file ({str(exc).splitlines()[0][:120]})") from None
    return block, meta


def _parse_meta(where: Path, text: str) -> dict[str, Any]:
    try:
        meta = json.loads(text)
    except json.JSONDecodeError as exc:
        raise InputError(where, "embeddings metadata (JSON)", f"unparsable text ({exc})") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise InputError(where, f"embeddings metadata of format {FORMAT!r}",
                         repr(meta.get("format") if isinstance(meta, dict) else type(meta).__name__))
    for key in ("modality", "n_embd", "n_inserted", "bundle"):
        if key not in meta:
            raise InputError(where, f"embeddings metadata with the key {key!r}", "none")
    return meta


def check_embeddings(block: Any, manifest: Manifest, *, modality: str | None = None,
                     meta: dict[str, Any] | None = None, source: str = "--embeddings") -> tuple[np.ndarray, str | None]:
    """The block as contiguous float32 [n_inserted, n_embd] and its modality, or an InputError.

    With `meta` (from the file): the modality, the width and the bundle must match.
    Without: `modality` must be given (a bare array says nothing about itself).
    """
    rows, n_embd = manifest.n_inserted, manifest.n_embd
    if meta is not None:
        recorded = meta.get("modality")
        if modality is not None and modality != recorded:
            raise InputError(source, f"--modality {recorded} (the block was encoded from {recorded})",
                             f"--modality {modality}")
        modality = recorded
        if meta.get("n_embd") != n_embd or meta.get("n_inserted") != rows:
            raise InputError(source, f"a block of [{rows}, {n_embd}] for this bundle",
                             f"one made for [{meta.get('n_inserted')}, {meta.get('n_embd')}]")
        mine = bundle_identity(manifest)
        theirs = (meta.get("bundle") or {}).get("source_sha256")
        if theirs != mine:
            raise InputError(source, f"a block encoded by this bundle's model (checkpoint {mine[:12]}…)",
                             f"one from another model (checkpoint {str(theirs)[:12]}…)")
    if modality is None:
        raise InputError(source, "the modality the block was encoded from (--modality)", "none")
    arr = np.asarray(block)
    if arr.ndim == 3 and arr.shape[0] == 1:
        arr = arr[0]
    if arr.shape != (rows, n_embd):
        raise InputError(source, f"a float32 array [{rows}, {n_embd}] for this bundle", f"shape {list(arr.shape)}")
    if arr.dtype.kind not in "fiu":
        raise InputError(source, "a float32 array", f"dtype {arr.dtype}")
    if not np.isfinite(arr).all():
        raise InputError(source, "finite values", "NaN or inf")
    return np.ascontiguousarray(arr, dtype=np.float32), modality
