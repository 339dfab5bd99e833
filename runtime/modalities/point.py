"""The point modality: coloured point cloud (.npy, .ply, .pcd, .xyz, .txt).

Reading (see `_pointio` for the file formats): `.npy` [N,6] (x y z r g b, the
PointLLM files the model was tuned on) or [N,3]; `.ply` ascii/binary with or without
colour; `.pcd` ascii/binary/binary_compressed; `.xyz`/`.txt` text columns. The
format is recognised by content first (magic bytes), then by extension. Colours
0-255 are scaled to 0-1.

Preprocessing (spec section 7, point): any N becomes exactly 8192 points,
deterministically: more points -> a fixed-seed random subset without replacement
(kept in file order); fewer -> every point once plus fixed-seed random repeats.
Then xyz minus its centroid, divided by the largest distance from it; colours
untouched -> [8192,6] float32.

The tokenizer samples centres and neighbours on the *colour* channels (spec
section 4). A cloud without colour would give it identical values everywhere and a
degenerate result, so a colourless cloud is given pseudo-colours from its normalised
coordinates ((xyz + 1) / 2), with a loud warning: the grouping then follows the
geometry, but the model never saw such colours, so answers are less reliable.
A cloud of a single colour is kept as it is, with the same kind of warning.

In-memory input: an array [N,6] or [N,3].
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import InputError
from ._io import (
    Source,
    describe_content,
    ext_of,
    is_array,
    load_npy,
    require_file,
    require_finite,
    require_finite_output,
    source_label,
)
from ._pointio import COLOUR_255_ABOVE, PointTable, read_pcd, read_ply, read_xyz
from .base import Example, ModalityInput, ModalitySpec

logger = logging.getLogger(__name__)

EXPECTED = "a point cloud (.npy [N,6]/[N,3], .ply, .pcd, .xyz or .txt)"
N_POINTS = 8192
MIN_POINTS = 32  # the tokenizer groups each centre with its 32 nearest neighbours
RESAMPLE_SEED = 0
_MAX_BYTES = 2 << 30


def resample_indices(n: int, target: int = N_POINTS, seed: int = RESAMPLE_SEED) -> np.ndarray:
    """Deterministic choice of `target` row indices out of n."""
    rng = np.random.default_rng(seed)
    if n == target:
        return np.arange(n)
    if n > target:
        return np.sort(rng.choice(n, size=target, replace=False))
    extra = rng.choice(n, size=target - n, replace=True)
    return np.concatenate([np.arange(n), extra])


def normalize_xyz(xyz: np.ndarray) -> np.ndarray:
    """The reference's pc_norm: minus the centroid, over the largest radius."""
    centred = xyz - xyz.mean(axis=0)
    radius = float(np.sqrt((centred ** 2).sum(axis=1)).max())
    return centred / radius


def _read_table(path: Path) -> PointTable:
    size = path.stat().st_size
    if size > _MAX_BYTES:
        raise InputError(path, f"{EXPECTED} under 2 GiB", f"{size / 2 ** 30:.1f} GiB")
    with open(path, "rb") as f:
        data = f.read()
    ext = ext_of(path)
    if data[:6] == b"\x93NUMPY":
        return _table_from_array(str(path), load_npy(path, EXPECTED), {"format": "npy"})
    if data[:3] == b"ply":
        return read_ply(path, data)
    if data[:6] == b"# .PCD" or data[:7] == b"VERSION" or ext == ".pcd":
        return read_pcd(path, data)
    if ext in (".xyz", ".txt", ".pts", ".csv", ".asc"):
        return read_xyz(path, data)
    if ext in (".npy", ".ply"):
        raise InputError(path, EXPECTED, describe_content(path, data[:512]))
    found = describe_content(path, data[:512])
    if found.startswith("text"):
        return read_xyz(path, data)
    raise InputError(path, EXPECTED, found)


def _table_from_array(label: str, arr: np.ndarray, notes: dict[str, Any]) -> PointTable:
    if arr.dtype.kind not in "biuf":
        raise InputError(label, f"{EXPECTED}: a numeric array", f"dtype {arr.dtype}")
    if arr.ndim == 2 and arr.shape[0] in (3, 6) and arr.shape[1] not in (3, 6):
        logger.warning("%s: array [%d,%d] read as [N,%d] (transposed)", label, *arr.shape, arr.shape[0])
        arr = arr.T
        notes["transposed"] = True
    if arr.ndim != 2 or arr.shape[1] not in (3, 6):
        raise InputError(label, "a point array [N,6] (x y z r g b) or [N,3] (x y z)", f"shape {list(arr.shape)}")
    xyz = arr[:, :3].astype(np.float64)
    rgb = None
    if arr.shape[1] == 6:
        cols = arr[:, 3:].astype(np.float64)
        top = float(np.nanmax(cols)) if cols.size and np.isfinite(cols).any() else 0.0
        rgb = cols / 255.0 if (arr.dtype.kind in "iu" or top > COLOUR_255_ABOVE) else cols
        notes["colour_scale"] = "0-255 / 255" if rgb is not cols else "0-1"
    return PointTable(xyz, rgb, notes)


def _finish(label: str, table: PointTable, meta: dict[str, Any]) -> np.ndarray:
    xyz, rgb = table.xyz, table.rgb
    n = len(xyz)
    require_finite(label, xyz, EXPECTED, "coordinates")
    if rgb is not None:
        require_finite(label, rgb, EXPECTED, "colours")
    if n < MIN_POINTS:
        raise InputError(label, f"a point cloud of at least {MIN_POINTS} points", f"{n} point(s)")
    meta["n_points"] = int(n)
    idx = resample_indices(n)
    xyz = xyz[idx]
    with np.errstate(over="ignore", invalid="ignore"):
        centred = xyz - xyz.mean(axis=0)
        radius = float(np.sqrt((centred ** 2).sum(axis=1)).max())
    if not np.isfinite(radius):
        raise InputError(label, f"{EXPECTED} with coordinates in float range", "values so large they overflow")
    if not radius > 0:
        raise InputError(label, "a point cloud with some spatial extent", f"{n} points that all coincide")
    xyz_n = centred / radius
    meta["resampled"] = "kept" if n == N_POINTS else ("subset" if n > N_POINTS else "repeated")
    meta["scale"] = {"centroid": [round(float(v), 6) for v in xyz.mean(axis=0)], "radius": round(radius, 6)}
    if rgb is None:
        logger.warning(
            "%s: THE POINT CLOUD HAS NO COLOURS. The model groups points by colour; "
            "pseudo-colours from the coordinates are used instead, which it never saw in "
            "training: expect a less reliable answer. Pass a coloured cloud if you have one.", label)
        colours = np.clip((xyz_n + 1.0) / 2.0, 0.0, 1.0)
        meta["colour"] = "none in the file: pseudo-colours (xyz + 1) / 2"
    else:
        colours = rgb[idx]
        lo, hi = float(colours.min()), float(colours.max())
        if lo < -1e-6 or hi > 1.0 + 1e-6:
            logger.warning("%s: colours range %.3g..%.3g after scaling; clipped to 0..1", label, lo, hi)
            colours = np.clip(colours, 0.0, 1.0)
        if float(np.ptp(colours, axis=0).max()) < 1e-6:
            logger.warning(
                "%s: EVERY POINT HAS THE SAME COLOUR. The model groups points by colour, so all "
                "its point tokens will be alike: expect a poor answer.", label)
            meta["colour"] = "uniform"
        else:
            meta["colour"] = "from the file"
    return require_finite_output(label, np.concatenate([xyz_n, colours], axis=1).astype(np.float32), EXPECTED)


def preprocess(source: Source) -> ModalityInput:
    """A point cloud -> [8192,6] float32 (spec section 7, point)."""
    t0 = time.perf_counter()
    label = source_label(source)
    if is_array(source):
        table = _table_from_array(label, source, {"format": "array"})
        meta: dict[str, Any] = {"source": label}
    else:
        path = require_file(source, EXPECTED)
        table = _read_table(path)
        meta = {"source": str(path)}
        label = str(path)
    meta.update(table.notes)
    array = _finish(label, table, meta)
    meta["preprocess_s"] = round(time.perf_counter() - t0, 4)
    return ModalityInput("point", array, meta)


def dummy_input(rng: np.random.Generator) -> np.ndarray:
    """A normalised cloud on a bumpy sphere with smoothly varying colours in [0,1]."""
    v = rng.standard_normal((N_POINTS, 3))
    v /= np.linalg.norm(v, axis=1, keepdims=True)
    xyz = v * (1.0 + 0.1 * np.sin(4 * v[:, :1]))
    xyz = normalize_xyz(xyz)
    rgb = 0.5 + 0.4 * np.sin(3.0 * xyz + rng.uniform(0, 2 * np.pi, size=3))
    return np.concatenate([xyz, rgb], axis=1).astype(np.float32)


SPEC = ModalitySpec(
    name='point',
    cli_option='--point',
    description='coloured point cloud (.npy, .ply, .pcd, .xyz, .txt)',
    file_types=('.npy', '.ply', '.pcd', '.xyz', '.txt'),
    input_shape=(8192, 6),
    tokenizer_kind='point_patch',
    n_frames=1,
    n_tokens=1025,
    preprocess=preprocess,
    dummy_input=dummy_input,
    caption_prompt='What is this?',
    example=Example('point/mug.ply'),
)
