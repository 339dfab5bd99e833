"""Point-cloud file parsers (numpy only): PLY, PCD, plain-text XYZ.

Each returns `PointTable(xyz [N,3] float64, rgb [N,3] float64 in [0,1] or None, notes)`.
Malformed files raise `InputError` naming what was expected and found.

- PLY: ascii, binary_little_endian, binary_big_endian; the `vertex` element's
  x/y/z and red/green/blue (also r/g/b, diffuse_red/...); integer colours are scaled
  by their type's maximum (uchar /255, ushort /65535), float colours above 1 by /255.
  Other elements (faces, ...) are skipped.
- PCD (PCL): DATA ascii, binary and binary_compressed (LZF); colour from a packed
  `rgb`/`rgba` field (float or uint bits 0x00RRGGBB) or from r/g/b fields. PCL marks
  invalid points of organised clouds with NaN coordinates: those points are dropped.
- XYZ/TXT: one point per line, whitespace, comma or semicolon separated, optional
  header/comment lines (`#`, `//`, or a non-numeric first line); columns x y z
  [r g b [...]]; a 4th-5th column (intensity) is ignored; colour columns with negative
  values are normals, not colours, and are ignored.
"""

from __future__ import annotations

import dataclasses
import logging
import re
from pathlib import Path

import numpy as np

from ..errors import InputError

logger = logging.getLogger(__name__)

EXPECTED_PLY = "a PLY point cloud (ascii or binary) with x, y, z vertex properties"
EXPECTED_PCD = "a PCD point cloud (DATA ascii, binary or binary_compressed) with x, y, z fields"
EXPECTED_XYZ = "a text point cloud: one point per line, columns x y z [r g b]"

_MAX_HEADER = 1 << 16
# Float colours above this are taken as 0-255 values (float rounding may push 0-1 values a hair over 1).
COLOUR_255_ABOVE = 1.001


@dataclasses.dataclass
class PointTable:
    xyz: np.ndarray  # [N,3] float64
    rgb: np.ndarray | None  # [N,3] float64 in [0,1], or None when the file has no colour
    notes: dict  # format facts for meta (JSON-serialisable)


def _scale_colours(cols: np.ndarray, dtype: np.dtype) -> tuple[np.ndarray, str]:
    cols = cols.astype(np.float64)
    if dtype.kind in "iu":
        top = float(np.iinfo(dtype).max)
        if dtype.itemsize > 1 and cols.size and cols.max() <= 255:
            top = 255.0  # 8-bit values stored in a wider integer
        return cols / top, f"{dtype.name} / {top:g}"
    finite = cols[np.isfinite(cols)]
    if finite.size and finite.max() > COLOUR_255_ABOVE:
        return cols / 255.0, "float 0-255 / 255"
    return cols, "float 0-1"


# ---------------------------------------------------------------- PLY

_PLY_TYPES = {
    "char": "i1", "int8": "i1", "uchar": "u1", "uint8": "u1",
    "short": "i2", "int16": "i2", "ushort": "u2", "uint16": "u2",
    "int": "i4", "int32": "i4", "uint": "u4", "uint32": "u4",
    "float": "f4", "float32": "f4", "double": "f8", "float64": "f8",
}
_COLOUR_NAMES = (("red", "green", "blue"), ("r", "g", "b"),
                 ("diffuse_red", "diffuse_green", "diffuse_blue"))


def _split_header(path: Path, data: bytes, marker: bytes, expected: str) -> tuple[list[str], int]:
    """Header lines and the byte offset of the body (after the marker line)."""
    idx = data.find(marker, 0, _MAX_HEADER)
    if idx < 0:
        raise InputError(path, expected, f"no {marker.decode().strip()!r} line in the first 64 KiB")
    end = data.find(b"\n", idx)
    end = len(data) if end < 0 else end + 1
    try:
        text = data[:idx].decode("ascii")
    except UnicodeDecodeError:
        raise InputError(path, expected, "a header with non-ASCII bytes") from None
    return [ln.strip() for ln in text.replace("\r", "").split("\n")], end


def read_ply(path: Path, data: bytes) -> PointTable:
    if not data.startswith(b"ply"):
        raise InputError(path, EXPECTED_PLY, "no 'ply' magic line")
    lines, body = _split_header(path, data, b"end_header", EXPECTED_PLY)
    fmt = None
    elements: list[tuple[str, int, list[tuple]]] = []  # (name, count, props)
    for ln in lines[1:]:
        parts = ln.split()
        if not parts or parts[0] in ("comment", "obj_info"):
            continue
        key = parts[0]
        if key == "format" and len(parts) >= 2:
            fmt = parts[1]
        elif key == "element" and len(parts) == 3:
            try:
                count = int(parts[2])
            except ValueError:
                raise InputError(path, EXPECTED_PLY, f"a bad element line {ln!r}") from None
            if count < 0:
                raise InputError(path, EXPECTED_PLY, f"a negative element count in {ln!r}")
            elements.append((parts[1], count, []))
        elif key == "property" and elements:
            if len(parts) == 5 and parts[1] == "list":
                if parts[2] not in _PLY_TYPES or parts[3] not in _PLY_TYPES:
                    raise InputError(path, EXPECTED_PLY, f"an unknown type in {ln!r}")
                elements[-1][2].append(("list", parts[4], _PLY_TYPES[parts[2]], _PLY_TYPES[parts[3]]))
            elif len(parts) == 3 and parts[1] in _PLY_TYPES:
                elements[-1][2].append(("scalar", parts[2], _PLY_TYPES[parts[1]]))
            else:
                raise InputError(path, EXPECTED_PLY, f"an unknown property line {ln!r}")
        else:
            raise InputError(path, EXPECTED_PLY, f"an unexpected header line {ln[:60]!r}")
    if fmt not in ("ascii", "binary_little_endian", "binary_big_endian"):
        raise InputError(path, EXPECTED_PLY, f"format {fmt!r}")
    names = [e[0] for e in elements]
    if "vertex" not in names:
        raise InputError(path, EXPECTED_PLY, f"no vertex element (elements: {', '.join(names) or 'none'})")
    vi = names.index("vertex")
    _, count, props = elements[vi]
    pnames = [p[1] for p in props]
    if not all(a in pnames for a in "xyz"):
        raise InputError(path, EXPECTED_PLY, f"vertex properties {', '.join(pnames) or 'none'}")
    if any(p[0] == "list" for p in props):
        raise InputError(path, EXPECTED_PLY, "a list property inside the vertex element")
    if fmt == "ascii":
        columns = _ply_ascii_vertices(path, data[body:], elements, vi)
    else:
        columns = _ply_binary_vertices(path, data, body, elements, vi, "<" if "little" in fmt else ">")
    xyz = np.stack([columns["x"], columns["y"], columns["z"]], axis=1).astype(np.float64)
    notes = {"format": f"ply {fmt}", "elements": {e[0]: e[1] for e in elements}}
    rgb = None
    for cn in _COLOUR_NAMES:
        if all(c in columns for c in cn):
            dtype = np.dtype(dict((p[1], p[2]) for p in props)[cn[0]])
            rgb, how = _scale_colours(np.stack([columns[c] for c in cn], axis=1), dtype)
            notes["colour_scale"] = how
            break
    return PointTable(xyz, rgb, notes)


def _ply_ascii_vertices(path: Path, body: bytes, elements, vi: int) -> dict[str, np.ndarray]:
    try:
        text = body.decode("ascii")
    except UnicodeDecodeError:
        raise InputError(path, EXPECTED_PLY, "non-ASCII bytes in an ascii PLY body") from None
    rows = [ln for ln in text.splitlines() if ln.strip()]
    skip = sum(e[1] for e in elements[:vi])
    _, count, props = elements[vi]
    chunk = rows[skip:skip + count]
    if len(chunk) < count:
        raise InputError(path, EXPECTED_PLY, f"{len(chunk)} vertex lines of the {count} the header declares "
                         "(a truncated file)")
    try:
        values = np.array(" ".join(chunk).split(), dtype=np.float64)
    except ValueError:
        raise InputError(path, EXPECTED_PLY, "non-numeric vertex values") from None
    if values.size != count * len(props):
        raise InputError(path, EXPECTED_PLY, f"{values.size} vertex values, not {count} x {len(props)}")
    table = values.reshape(count, len(props))
    return {p[1]: table[:, i] for i, p in enumerate(props)}


def _ply_binary_vertices(path: Path, data: bytes, pos: int, elements, vi: int, order: str):
    for name, count, props in elements[:vi]:
        if all(p[0] == "scalar" for p in props):
            pos += count * sum(np.dtype(p[2]).itemsize for p in props)
            continue
        for _ in range(count):  # rows with lists: walk them (rare before vertices)
            for p in props:
                if p[0] == "scalar":
                    pos += np.dtype(p[2]).itemsize
                else:
                    ct = np.dtype(p[2]).newbyteorder(order)
                    if pos + ct.itemsize > len(data):
                        raise InputError(path, EXPECTED_PLY, f"a truncated {name} element")
                    n = int(np.frombuffer(data, ct, 1, pos)[0])
                    if n < 0:
                        raise InputError(path, EXPECTED_PLY, f"a negative list length in {name}")
                    pos += ct.itemsize + n * np.dtype(p[3]).itemsize
    _, count, props = elements[vi]
    dtype = np.dtype([(p[1], np.dtype(p[2]).newbyteorder(order)) for p in props])
    need = count * dtype.itemsize
    if pos + need > len(data):
        have = max(len(data) - pos, 0) // max(dtype.itemsize, 1)
        raise InputError(path, EXPECTED_PLY, f"{have} complete vertices of the {count} the header declares "
                         "(a truncated file)")
    rec = np.frombuffer(data, dtype, count, pos)
    return {p[1]: rec[p[1]].astype(np.dtype(p[2])) for p in props}


# ---------------------------------------------------------------- PCD

def lzf_decompress(src: bytes, out_len: int) -> bytes:
    """LZF (liblzf) decompression, as PCD binary_compressed uses it; strict bounds."""
    out = bytearray(out_len)
    ip = op = 0
    n = len(src)
    while ip < n:
        ctrl = src[ip]
        ip += 1
        if ctrl < 32:
            ln = ctrl + 1
            if ip + ln > n or op + ln > out_len:
                raise ValueError("literal run past the end")
            out[op:op + ln] = src[ip:ip + ln]
            ip += ln
            op += ln
            continue
        ln = ctrl >> 5
        if ln == 7:
            if ip >= n:
                raise ValueError("truncated length byte")
            ln += src[ip]
            ip += 1
        if ip >= n:
            raise ValueError("truncated offset byte")
        ref = op - ((ctrl & 0x1F) << 8) - 1 - src[ip]
        ip += 1
        ln += 2
        if ref < 0 or op + ln > out_len:
            raise ValueError("back reference out of range")
        if ref + ln <= op:
            out[op:op + ln] = out[ref:ref + ln]
        else:
            for k in range(ln):
                out[op + k] = out[ref + k]
        op += ln
    if op != out_len:
        raise ValueError(f"decompressed {op} bytes, header says {out_len}")
    return bytes(out)


def read_pcd(path: Path, data: bytes) -> PointTable:
    # The header ends with the DATA line.
    m = re.search(rb"^DATA[ \t]+(\S+)[ \t]*\r?$", data[:_MAX_HEADER], re.MULTILINE)
    if m is None:
        raise InputError(path, EXPECTED_PCD, "no DATA line in the header")
    mode = m.group(1).decode("ascii", "replace").lower()
    if mode not in ("ascii", "binary", "binary_compressed"):
        raise InputError(path, EXPECTED_PCD, f"DATA {mode}")
    body = data.find(b"\n", m.end())
    body = len(data) if body < 0 else body + 1
    fields: dict[str, list[str]] = {}
    try:
        header = data[:m.start()].decode("ascii")
    except UnicodeDecodeError:
        raise InputError(path, EXPECTED_PCD, "a header with non-ASCII bytes") from None
    for ln in header.replace("\r", "").split("\n"):
        parts = ln.split()
        if parts and not parts[0].startswith("#"):
            fields[parts[0].upper()] = parts[1:]
    names = fields.get("FIELDS", [])
    n_f = len(names)
    sizes = fields.get("SIZE", ["4"] * n_f)
    types = fields.get("TYPE", ["F"] * n_f)
    counts = fields.get("COUNT", ["1"] * n_f)
    if not names or not (len(sizes) == len(types) == len(counts) == n_f):
        raise InputError(path, EXPECTED_PCD, f"FIELDS/SIZE/TYPE/COUNT of different lengths ({n_f}, "
                         f"{len(sizes)}, {len(types)}, {len(counts)})")
    try:
        points = int(fields.get("POINTS", [None])[0] or int(fields["WIDTH"][0]) * int(fields.get("HEIGHT", ["1"])[0]))
        sizes_i = [int(s) for s in sizes]
        counts_i = [int(c) for c in counts]
    except (KeyError, ValueError, IndexError):
        raise InputError(path, EXPECTED_PCD, "a missing or bad POINTS/WIDTH/SIZE/COUNT line") from None
    if points < 0 or any(c < 1 for c in counts_i):
        raise InputError(path, EXPECTED_PCD, "a negative POINTS or a COUNT below 1")
    dtypes = []
    for name, t, s in zip(names, types, sizes_i):
        code = {"F": "f", "I": "i", "U": "u"}.get(t.upper())
        if code is None or s not in (1, 2, 4, 8) or (code == "f" and s not in (4, 8)):
            raise InputError(path, EXPECTED_PCD, f"field {name} of TYPE {t} SIZE {s}")
        dtypes.append(np.dtype(f"<{code}{s}"))
    if not all(a in names for a in "xyz"):
        raise InputError(path, EXPECTED_PCD, f"fields {', '.join(names)}")
    cols: dict[str, np.ndarray] = {}
    if mode == "ascii":
        try:
            text = data[body:].decode("ascii")
        except UnicodeDecodeError:
            raise InputError(path, EXPECTED_PCD, "non-ASCII bytes in an ascii PCD body") from None
        width = sum(counts_i)
        rows = [ln for ln in text.splitlines() if ln.strip()][:points]
        if len(rows) < points:
            raise InputError(path, EXPECTED_PCD, f"{len(rows)} point lines of the {points} declared (a truncated file)")
        try:
            values = np.array(" ".join(rows).split(), dtype=np.float64) if rows else np.zeros(0)
        except ValueError:
            raise InputError(path, EXPECTED_PCD, "non-numeric point values") from None
        if values.size != points * width:
            raise InputError(path, EXPECTED_PCD, f"{values.size} values, not {points} x {width}")
        table = values.reshape(points, width)
        at = 0
        for name, dt, c in zip(names, dtypes, counts_i):
            col = table[:, at]
            if name.lower() in ("rgb", "rgba"):
                col = col.astype(dt).view(np.uint32) if dt.kind == "f" else col.astype(np.uint32)
            cols[name] = col
            at += c
    elif mode == "binary":
        rec = np.dtype([(f"f{i}", dt, (c,)) for i, (dt, c) in enumerate(zip(dtypes, counts_i))])
        if body + points * rec.itemsize > len(data):
            raise InputError(path, EXPECTED_PCD, f"{(len(data) - body) // max(rec.itemsize, 1)} complete points "
                             f"of the {points} declared (a truncated file)")
        arr = np.frombuffer(data, rec, points, body)
        for i, name in enumerate(names):
            cols[name] = arr[f"f{i}"][:, 0]
    elif mode == "binary_compressed":
        if body + 8 > len(data):
            raise InputError(path, EXPECTED_PCD, "a truncated compressed block")
        csize, usize = (int(v) for v in np.frombuffer(data, "<u4", 2, body))
        expect = points * sum(dt.itemsize * c for dt, c in zip(dtypes, counts_i))
        # LZF expands at most ~100x (a 264-byte copy from a 3-byte reference).
        if usize != expect or body + 8 + csize > len(data) or usize > 100 * csize + 1024:
            raise InputError(path, EXPECTED_PCD, f"a compressed block of {csize} -> {usize} bytes "
                             f"(expected {expect} bytes uncompressed, {len(data) - body - 8} available)")
        try:
            raw = lzf_decompress(data[body + 8: body + 8 + csize], usize)
        except ValueError as e:
            raise InputError(path, EXPECTED_PCD, f"a damaged compressed block ({e})") from None
        at = 0
        for name, dt, c in zip(names, dtypes, counts_i):  # structure of arrays
            block = np.frombuffer(raw, dt, points * c, at).reshape(points, c)
            cols[name] = block[:, 0]
            at += points * c * dt.itemsize
    else:
        raise InputError(path, EXPECTED_PCD, f"DATA {mode}")
    xyz = np.stack([cols["x"], cols["y"], cols["z"]], axis=1).astype(np.float64)
    notes: dict = {"format": f"pcd {mode}", "fields": names}
    rgb = None
    packed = next((n for n in names if n.lower() in ("rgb", "rgba")), None)
    if packed is not None:
        v = cols[packed]
        v = v.view(np.uint32) if v.dtype.kind == "f" and v.dtype.itemsize == 4 else v.astype(np.uint32)
        rgb = np.stack([(v >> 16) & 255, (v >> 8) & 255, v & 255], axis=1).astype(np.float64) / 255.0
        notes["colour_scale"] = "packed rgb / 255"
    elif all(c in cols for c in "rgb"):
        rgb, notes["colour_scale"] = _scale_colours(np.stack([cols[c] for c in "rgb"], axis=1),
                                                    dtypes[names.index("r")])
    nan = np.isnan(xyz).any(axis=1)
    if nan.any():
        logger.warning("%s: %d of %d points have NaN coordinates (PCL's invalid points); dropped",
                       path, int(nan.sum()), len(xyz))
        notes["invalid_points_dropped"] = int(nan.sum())
        xyz = xyz[~nan]
        rgb = None if rgb is None else rgb[~nan]
    return PointTable(xyz, rgb, notes)


# ---------------------------------------------------------------- XYZ / TXT

_SPLIT = re.compile(r"[,;\s]+")


def read_xyz(path: Path, data: bytes) -> PointTable:
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError:
        raise InputError(path, EXPECTED_XYZ, "binary data, not text") from None
    rows: list[list[str]] = []
    skipped = 0
    for ln in text.splitlines():
        s = ln.strip()
        if not s or s.startswith(("#", "//", "%")):
            continue
        parts = [p for p in _SPLIT.split(s) if p]
        if not rows:
            try:
                [float(p) for p in parts]
            except ValueError:
                skipped += 1
                if skipped > 5:
                    raise InputError(path, EXPECTED_XYZ, f"non-numeric lines such as {s[:60]!r}") from None
                continue  # a header line
        rows.append(parts)
    if not rows:
        raise InputError(path, EXPECTED_XYZ, "no numeric lines")
    width = len(rows[0])
    if width < 3:
        raise InputError(path, EXPECTED_XYZ, f"{width} column(s) per line")
    for i, r in enumerate(rows):
        if len(r) != width:
            raise InputError(path, EXPECTED_XYZ, f"{len(r)} columns on data line {i + 1}, {width} on the first")
    try:
        table = np.array(rows, dtype=np.float64)
    except ValueError:
        raise InputError(path, EXPECTED_XYZ, "non-numeric values") from None
    notes: dict = {"format": "text", "columns": width}
    rgb = None
    if width >= 6:
        cand = table[:, 3:6]
        if np.isfinite(cand).all() and cand.min() < 0:
            logger.warning("%s: columns 4-6 have negative values: read as normals, not colours", path)
            notes["columns_4_6"] = "normals (ignored)"
        else:
            rgb, notes["colour_scale"] = _scale_colours(cand, np.dtype(np.float64))
            if np.all(cand == np.round(cand)) and cand.max() > 1:
                notes["colour_scale"] = "0-255 / 255"
        if width > 6:
            notes["extra_columns_ignored"] = width - 6
    elif width > 3:
        notes["extra_columns_ignored"] = width - 3
    return PointTable(table[:, :3].copy(), rgb, notes)
