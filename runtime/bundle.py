"""The bundle: a directory with `manifest.json`, ONNX encoder graphs, a GGUF decoder
and the SentencePiece tokenizer. The manifest is the one contract between export and
runtime; nothing is inferred from file names.

`load_manifest(dir)` checks the schema version and every listed file's sha256 (a
verified bundle is remembered by size and mtime in a small stamp file in the user's
cache, so a multi-GB GGUF is hashed once, not at every start).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Any

from .errors import BundleError

logger = logging.getLogger(__name__)

SCHEMA = "onellm-bundle"
SCHEMA_VERSION = 1
MANIFEST = "manifest.json"


def sha256_file(path: str | Path, chunk: int = 1 << 22) -> str:
    """Hex sha256 of a file, read in 4 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while True:
            block = f.read(chunk)
            if not block:
                break
            h.update(block)
    return h.hexdigest()


def cache_dir() -> Path:
    """Where onellm keeps its own files (ONELLM_CACHE_DIR, else XDG cache)."""
    env = os.environ.get("ONELLM_CACHE_DIR")
    if env:
        return Path(env).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or (Path.home() / ".cache")
    return Path(base).expanduser() / "onellm"


def _stamp_path(bundle_dir: Path) -> Path:
    key = hashlib.sha256(str(bundle_dir.resolve()).encode()).hexdigest()[:16]
    return cache_dir() / "verified" / f"{key}.json"


def _file_state(path: Path) -> list[int]:
    st = path.stat()
    return [st.st_size, st.st_mtime_ns]


def load_manifest(bundle_dir: str | Path, verify: bool = True) -> dict[str, Any]:
    """Read and check `manifest.json`; with `verify`, every file's sha256 too."""
    bundle_dir = Path(bundle_dir)
    path = bundle_dir / MANIFEST
    if not bundle_dir.is_dir():
        raise BundleError(f"{bundle_dir}: expected a bundle directory, found no such directory")
    if not path.is_file():
        raise BundleError(f"{bundle_dir}: expected a bundle with {MANIFEST}, found none (build one with `onellm export`)")
    try:
        manifest = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BundleError(f"{path}: expected a JSON manifest, could not parse it ({exc})") from None
    if not isinstance(manifest, dict) or manifest.get("schema") != SCHEMA:
        raise BundleError(f"{path}: expected schema {SCHEMA!r}, found {manifest.get('schema') if isinstance(manifest, dict) else type(manifest).__name__!r}")
    version = manifest.get("schema_version")
    if version != SCHEMA_VERSION:
        raise BundleError(
            f"{path}: expected schema version {SCHEMA_VERSION}, found {version!r} "
            f"(re-export the bundle with this onellm version)"
        )
    files = manifest.get("files")
    if not isinstance(files, dict) or not files:
        raise BundleError(f"{path}: expected a non-empty 'files' table, found {files!r}")
    for rel in files:
        if Path(rel).is_absolute() or ".." in Path(rel).parts:
            raise BundleError(f"{path}: file entry {rel!r} points outside the bundle")
        if not (bundle_dir / rel).is_file():
            raise BundleError(f"{bundle_dir}: file {rel!r} listed in the manifest is missing")
    if verify:
        verify_files(bundle_dir, files)
    manifest = _ManifestDict.wrap(manifest, str(path), "")
    manifest["_dir"] = str(bundle_dir.resolve())
    return manifest


class ManifestKeyError(BundleError, KeyError):
    """A key the runtime needs is missing from manifest.json (a BundleError naming the key)."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0])


class _ManifestDict(dict):
    """A manifest table whose missing keys raise `ManifestKeyError` with the key's full path."""

    _file = "manifest.json"
    _where = ""

    @classmethod
    def wrap(cls, value: Any, file: str, where: str) -> Any:
        if isinstance(value, dict):
            out = cls((k, cls.wrap(v, file, f"{where}.{k}" if where else str(k))) for k, v in value.items())
            out._file, out._where = file, where
            return out
        if isinstance(value, list):
            return [cls.wrap(v, file, f"{where}[{i}]") for i, v in enumerate(value)]
        return value

    def __missing__(self, key: Any) -> Any:
        full = f"{self._where}.{key}" if self._where else str(key)
        raise ManifestKeyError(f"{self._file}: expected the key {full!r}, found none "
                               f"(a damaged manifest or another onellm version; re-export the bundle)")


def verify_checksums(bundle_dir: str | Path) -> tuple[list[str], int, int]:
    """Re-hash every file of a bundle (no cached stamp): (report lines, checks, failures)."""
    bundle_dir = Path(bundle_dir)
    manifest = load_manifest(bundle_dir, verify=False)
    lines: list[str] = []
    failures = 0
    for rel, digest in manifest["files"].items():
        if sha256_file(bundle_dir / rel) != digest:
            failures += 1
            lines.append(f"FAIL checksum {rel}")
    if not failures:
        lines.append(f"ok   checksums of {len(manifest['files'])} files")
        record_verified(bundle_dir, dict(manifest["files"]))
    return lines, len(manifest["files"]), failures


def verify_files(bundle_dir: Path, files: dict[str, str]) -> None:
    """Check sha256 of every file; remembers a verified state to skip re-hashing."""
    stamp = _stamp_path(bundle_dir)
    state = {rel: _file_state(bundle_dir / rel) for rel in files}
    try:
        cached = json.loads(stamp.read_text())
        if cached.get("files") == files and cached.get("state") == state:
            return
    except (OSError, ValueError):
        pass
    for rel, digest in files.items():
        actual = sha256_file(bundle_dir / rel)
        if actual != digest:
            raise BundleError(
                f"{bundle_dir / rel}: checksum mismatch (expected sha256 {digest[:12]}…, found {actual[:12]}…); "
                f"the file was changed or truncated - re-export the bundle"
            )
    record_verified(bundle_dir, files, state)


def record_verified(bundle_dir: Path, files: dict[str, str], state: dict[str, list[int]] | None = None) -> None:
    """Remember that every file was just hashed and matched, so the next load skips re-hashing."""
    if state is None:
        state = {rel: _file_state(bundle_dir / rel) for rel in files}
    stamp = _stamp_path(bundle_dir)
    try:
        stamp.parent.mkdir(parents=True, exist_ok=True)
        stamp.write_text(json.dumps({"files": files, "state": state}))
    except OSError as exc:  # a read-only cache only costs re-hashing next time
        logger.debug("could not record verified bundle state: %s", exc)
