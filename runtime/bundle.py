"""The bundle: a directory with `manifest.json`, ONNX encoder graphs, a GGUF decoder
and the SentencePiece tokenizer. The manifest is the one contract between export and
runtime; nothing is inferred from file names.

`load_manifest(dir)` parses the typed `Manifest` (runtime/manifest.py; older schema
versions are migrated), checks every listed file's sha256 (a verified bundle is
remembered by size and mtime in a small stamp file in the user's cache, so a multi-GB
GGUF is hashed once, not at every start) and returns a `Bundle`: the directory and
its manifest.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
from pathlib import Path

from .errors import BundleError
from .manifest import MANIFEST, SCHEMA, SCHEMA_VERSION, Manifest

logger = logging.getLogger(__name__)

__all__ = ["MANIFEST", "SCHEMA", "SCHEMA_VERSION", "Bundle", "Manifest", "cache_dir", "load_manifest", "sha256_file"]


@dataclasses.dataclass(frozen=True)
class Bundle:
    """A bundle on disk: where it is and what its manifest says."""

    dir: Path  # the bundle directory, resolved
    manifest: Manifest  # the parsed manifest.json

    def path(self, rel: str) -> Path:
        """A file of the bundle, from its manifest-relative path."""
        return self.dir / rel


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


def load_manifest(bundle_dir: str | Path, verify: bool = True) -> Bundle:
    """Read and check `manifest.json`; with `verify`, every file's sha256 too."""
    bundle_dir = Path(bundle_dir)
    path = bundle_dir / MANIFEST
    if not bundle_dir.is_dir():
        raise BundleError(f"{bundle_dir}: expected a bundle directory, found no such directory")
    if not path.is_file():
        raise BundleError(f"{bundle_dir}: expected a bundle with {MANIFEST}, found none (build one with `onellm export`)")
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BundleError(f"{path}: expected a JSON manifest, could not parse it ({exc})") from None
    manifest = Manifest.from_dict(data, where=str(path))
    files = manifest.files
    if not files:
        raise BundleError(f"{path}: expected a non-empty 'files' table, found {files!r}")
    for rel in files:
        if Path(rel).is_absolute() or ".." in Path(rel).parts:
            raise BundleError(f"{path}: file entry {rel!r} points outside the bundle")
        if not (bundle_dir / rel).is_file():
            raise BundleError(f"{bundle_dir}: file {rel!r} listed in the manifest is missing")
    if verify:
        verify_files(bundle_dir, files)
    return Bundle(bundle_dir.resolve(), manifest)


def verify_checksums(bundle_dir: str | Path) -> tuple[list[str], int, int]:
    """Re-hash every file of a bundle (no cached stamp): (report lines, checks, failures)."""
    bundle_dir = Path(bundle_dir)
    files = load_manifest(bundle_dir, verify=False).manifest.files
    lines: list[str] = []
    failures = 0
    for rel, digest in files.items():
        if sha256_file(bundle_dir / rel) != digest:
            failures += 1
            lines.append(f"FAIL checksum {rel}")
    if not failures:
        lines.append(f"ok   checksums of {len(files)} files")
        record_verified(bundle_dir, dict(files))
    return lines, len(files), failures


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
