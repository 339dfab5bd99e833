"""The imu modality: 6-axis IMU recording (CSV, an export folder or zip, or .npy).

Sources: one file, two or more one-sensor files (`--imu ACC.csv --imu GYRO.csv`,
`imu=[acc, gyro]`), an export folder, or its .zip.

CSV layouts (recognised by header and structure, never by file name; the table is in
`_imu_formats.py`): Physics Toolbox Sensor Suite multi-record (gF* x 9.80665 is the
accelerometer, the gravity-free a* columns are ignored, w* rad/s, trailing commas);
EuRoC/ASL/Kalibr/TUM-VI `#timestamp [ns],w_RS_S_x [rad s^-1],...,a_RS_S_x [m s^-2]`
(gyroscope first; a `#` line that names the columns is a header); Sensor Logger and
phyphox one-sensor files (aligned on their timestamps: the other sensors are linearly
interpolated onto the accelerometer's times; a gravity-free accelerometer gets
Gravity.csv added back, or is refused naming the file to pass); Arduino logs
`ax,ay,az,gx,gy,gz` (label columns ignored and reported). Otherwise:

- One header line naming the columns (a file without a header must have exactly 6
  columns acc_x acc_y acc_z gyro_x gyro_y gyro_z, or 7 with a timestamp first).
  Lines starting with `#` are comments, except a `#` line just above the data that
  names its columns. Other columns (magnetometer, labels, ...) are ignored and listed
  in the input facts.
- Channel names, case and punctuation ignored, a unit in brackets allowed
  ("Acceleration x (m/s^2)"): accelerometer `acc_x`, `accl_x`, `accel_x`,
  `acceleration_x`, `accelerometer_x`, `ax`, `x_acc`, ...; gyroscope `gyro_x`, `gyr_x`,
  `gyroscope_x`, `gx`, `wx`, `rotation_rate_x`, `angular_velocity_x`, ... (same for y, z).
  `linear_acceleration_*`/`user_acceleration_*` (gravity removed) are refused unless
  gravity can be added back: the model saw raw accelerometer readings, gravity included.
- Optional timestamp column, recognised by its name (`time`, `timestamp`, `t`,
  `seconds_elapsed`, `canonical_timestamp_ms`, ...); its unit comes from the format,
  the name or bracket (`_ms`, `(s)`, `[ns]`), otherwise from the median step (the first
  of s, ms, us, ns giving a rate between 5 Hz and 20 kHz); ISO date-times and
  `HH:MM:SS:mmm` clock times also work. Without timestamps, the rate comes from
  `rate=` / `--imu-rate HZ`, else from a comment line (`# data_rate = 2000 Hz`).
- Delimiter `,` `;` tab `|` or spaces; decimal commas (`0,981;...`) are recognised.

`.npy`: [6,N] or [N,6] in the channel order above, or [7,N]/[N,7] with timestamps
first; an Ego4D-style `<name>_timestamps.npy` (ms) next to the file is used when present.

Units (spec section 7, imu): accelerometer in m/s^2 and gyroscope in rad/s as the
Ego4D recordings the model saw, raw, no normalisation. From the format or header when
it states them, else: accelerometer by its median magnitude (about 1 -> g, about 9.8 ->
m/s^2; g is multiplied by 9.80665), gyroscope rad/s (deg/s for Arduino logs in g).
Plausibility, each with a notice saying what was concluded and how to override it
(`accel_units=`/`--accel-units`, `gyro_units=`/`--gyro-units`): a gyroscope above 35
rad/s (2000 dps) is deg/s; an accelerometer whose median magnitude is far below 1 g has
no gravity (warned loudly); one fitting neither g nor m/s^2 is reported with channel
statistics.

Window and resampling (`method="upstream"`, the default: exactly the training
pipeline's): the 2 s window [start, start + 2 s) is cut from the raw recording by
timestamps in ms (`bisect_left` on both ends); its source rate is
`int(1000 / mean(diff(timestamps_ms)))` (or the given rate); unless that is 200 the
window alone is resampled to 200 Hz with torchaudio's default windowed-sinc filter
(`onellm.runtime.resample.sinc_resample`, zero-padded edges); then zero-padded or
truncated to 400 samples. `method="grid"` instead interpolates onto a uniform grid
and polyphase-resamples with filter run-in around the window (cleaner edges, but not
what the model saw). Fewer than 10 source samples in the window is an error. Output
[6,400] float32.
"""

from __future__ import annotations

import bisect
import csv
import dataclasses
import io
import logging
import math
import os
import re
import time
import zipfile
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import InputError
from ..resample import rate_ratio, resample_rate, sinc_resample, to_uniform_grid
from . import _imu_formats as F
from ._io import (
    Source,
    describe_content,
    ext_of,
    is_array,
    load_npy,
    number_option,
    require_file,
    require_finite_output,
    source_label,
)
from .base import Example, ModalityInput, ModalitySpec, ReaderFlag

logger = logging.getLogger(__name__)

EXPECTED = "a 6-axis IMU recording (CSV with accelerometer and gyroscope x/y/z columns, or .npy [6,N]/[N,6])"
CHANNELS = ("acc_x", "acc_y", "acc_z", "gyro_x", "gyro_y", "gyro_z")
TARGET_RATE = 200
WINDOW_S = 2.0
N_SAMPLES = 400
MIN_SAMPLES = 10
STANDARD_GRAVITY = 9.80665
GYRO_RAD_S_MAX = 35.0  # rad/s (about 2000 dps, the largest common gyroscope range): above it, deg/s
_RATE_BAND = (5.0, 20000.0)  # plausible IMU rates, for timestamp-unit detection
_RATE_LIMITS = (1.0, 20000.0)  # sample rates accepted at all (the sinc kernel grows with the rate)
_PER_SECOND = {"s": 1, "ms": 1000, "us": 1_000_000, "ns": 1_000_000_000}  # timestamp ticks per second
_MAX_ZIP_MEMBER = 512 * 1024 * 1024

_ACC = r"(?:(?P<lin>lin(?:ear)?_?|user_?)?(?:acc|accl|accel|accelerometer|acceleration|a))"
_GYR = r"(?:gyr|gyro|gyroscope|rot|rotation|rotation_?rate|angular_?velocity|ang_?vel|omega|g|w)"
_AXIS = r"(?P<axis>[xyz])"
_ACC_UNIT = r"(?:_(?P<unit>g|ms2|m_s2|mps2|m_s_2|ms_2))?"
_GYR_UNIT = r"(?:_(?P<unit>dps|deg_s|degs|deg|rad_s|rads|rad))?"
_ACC_RE = (re.compile(rf"^{_ACC}_?{_AXIS}(?:_?axis)?{_ACC_UNIT}$"),
           re.compile(rf"^{_AXIS}_?(?:axis_?)?{_ACC}{_ACC_UNIT}$"))
_GYR_RE = (re.compile(rf"^{_GYR}_?{_AXIS}(?:_?axis)?{_GYR_UNIT}$"),
           re.compile(rf"^{_AXIS}_?(?:axis_?)?{_GYR}{_GYR_UNIT}$"))
_TIME_RE = re.compile(
    r"^(?:canonical_|unix_|epoch_|sensor_|utc_)?(?P<base>time|timestamp|timestamps|t|ts|times|elapsed|"
    r"seconds_elapsed|time_elapsed|elapsed_time|sec|secs|seconds|millis|milliseconds|epoch|datetime|"
    r"date_time|time_stamp)(?:_(?P<unit>s|sec|secs|seconds|ms|msec|millis|milliseconds|us|usec|micros|"
    r"microseconds|ns|nsec|nanos|nanoseconds))?$")


# ------------------------------------------------------------------ names and units

def _unit_word(text: str | None) -> str | None:
    """Canonical unit from a header fragment: g, m/s2, deg/s, rad/s, s, ms, us, ns."""
    if not text:
        return None
    u = text.strip().lower().replace(" ", "").replace("²", "2").replace("^", "").replace("*", "")
    u = u.replace("µ", "u").replace("μ", "u")
    table = {
        "g": "g", "gs": "g", "gforce": "g",
        "m/s2": "m/s2", "ms-2": "m/s2", "ms2": "m/s2", "mps2": "m/s2", "m_s2": "m/s2", "m_s_2": "m/s2",
        "ms_2": "m/s2", "m/ss": "m/s2", "m/s/s": "m/s2",
        "deg/s": "deg/s", "dps": "deg/s", "°/s": "deg/s", "deg_s": "deg/s", "degs": "deg/s", "deg": "deg/s",
        "rad/s": "rad/s", "rad_s": "rad/s", "rads": "rad/s", "rad": "rad/s", "1/s": "rad/s",
        "s": "s", "sec": "s", "secs": "s", "seconds": "s",
        "ms": "ms", "msec": "ms", "millis": "ms", "milliseconds": "ms",
        "us": "us", "usec": "us", "micros": "us", "microseconds": "us",
        "ns": "ns", "nsec": "ns", "nanos": "ns", "nanoseconds": "ns",
    }
    return table.get(u)


def _split_name(name: str) -> tuple[str, str | None]:
    """'Acc X (m/s^2)' -> ('acc_x', 'm/s2'); 'gyro.x' -> ('gyro_x', None)."""
    unit = None
    m = re.search(r"[\(\[\{]([^\)\]\}]*)[\)\]\}]", name)
    if m:
        unit = _unit_word(m.group(1))
        name = name[:m.start()] + name[m.end():]
    base = re.sub(r"[^0-9a-z]+", "_", name.strip().lower()).strip("_")
    return base, unit


def classify_column(name: str) -> tuple[str, str | None, bool] | None:
    """(channel or 'time', unit hint, gravity removed) for a header name, or None."""
    base, unit = _split_name(name)
    m = _TIME_RE.match(base)
    if m:
        hint = _unit_word(m.group("unit")) or unit or ("ms" if m.group("base") in ("millis", "milliseconds") else None)
        return "time", hint, False
    for pat in _ACC_RE:
        m = pat.match(base)
        if m:
            return f"acc_{m.group('axis')}", unit or _unit_word(m.group("unit")), bool(m.group("lin"))
    for pat in _GYR_RE:
        m = pat.match(base)
        if m:
            return f"gyro_{m.group('axis')}", unit or _unit_word(m.group("unit")), False
    return None


# ------------------------------------------------------------------ CSV

_DECIMAL_COMMA = re.compile(r"^[+-]?\d*,\d+(?:[eE][+-]?\d+)?$")


def _is_number(cell: str) -> bool:
    try:
        float(cell)
        return True
    except ValueError:
        return bool(_DECIMAL_COMMA.match(cell.strip()))


def _pick_delimiter(lines: list[str]) -> str | None:
    """The delimiter whose count is the same (and > 0) on every sample line; None = spaces."""
    for d in ("\t", ";", ",", "|"):
        counts = {ln.count(d) for ln in lines}
        if len(counts) == 1 and counts.pop() > 0:
            return d
    # Ragged lines: the header's most frequent delimiter, so the error names the bad row.
    best = max(("\t", ";", ",", "|"), key=lines[0].count)
    return best if lines[0].count(best) else None




# ------------------------------------------------------------------ one table of text

@dataclasses.dataclass
class _Table:
    label: str
    header: list[str] | None
    cols: list[tuple[str, ...]]  # cell strings per column
    n_rows: int
    comments: list[str]
    decimal_comma: bool
    meta: dict[str, Any]

    def numeric(self, j: int, what: str) -> np.ndarray:
        cells = self.cols[j]
        try:  # fast path: numpy parses the whole column in C
            fast = np.asarray(cells if not self.decimal_comma else [c.replace(",", ".") for c in cells],
                              dtype=np.float64)
            if np.isfinite(fast).all():
                return fast
        except ValueError:
            pass
        out = np.empty(self.n_rows, dtype=np.float64)  # slow path: find and name the bad cell
        for i, cell in enumerate(cells):
            c = cell.strip()
            if self.decimal_comma:
                c = c.replace(",", ".")
            try:
                out[i] = float(c) if c else math.nan
            except ValueError:
                raise InputError(self.label, f"numbers in column {what}", f"{cell!r} on data row {i + 1}") from None
            if not math.isfinite(out[i]):
                raise InputError(self.label, f"finite numbers in column {what}",
                                 f"{cell.strip() or 'an empty cell'!r} on data row {i + 1}")
        return out

    def is_numeric_column(self, j: int) -> bool:
        sample = [c for c in self.cols[j][:50] if c.strip()]
        return bool(sample) and all(_is_number(c) for c in sample)


def _split(lines: list[str], delim: str | None) -> list[list[str]]:
    if delim is None:
        return [ln.split() for ln in lines]
    return list(csv.reader(io.StringIO("\n".join(lines)), delimiter=delim))


def _parse_table(label: str, raw: bytes) -> _Table:
    if b"\x00" in raw[:4096]:
        raise InputError(label, EXPECTED, describe_content(Path(label), raw[:512]))
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError:
        text = raw.decode("latin-1")
    comments: list[str] = []
    lines: list[str] = []
    header_comment: str | None = None  # the last `#` line before the first data line
    for ln in text.splitlines():
        if not ln.strip():
            continue
        if ln.lstrip().startswith("#"):
            comments.append(ln)
            if not lines:
                header_comment = ln.lstrip()[1:]
            continue
        lines.append(ln)
    if not lines:
        raise InputError(label, EXPECTED, "no data lines (only blank or comment lines)")
    delim = _pick_delimiter(lines[: min(len(lines), 20)])
    rows = _split(lines, delim)
    header: list[str] | None = None
    meta: dict[str, Any] = {"delimiter": delim or "whitespace"}
    if not all(_is_number(c) for c in rows[0] if c.strip()):
        header, rows = [c.strip() for c in rows[0]], rows[1:]
    elif header_comment is not None:
        # EuRoC-style: `#timestamp [ns],w_RS_S_x [rad s^-1],...` names the columns of the data below.
        cand = [c.strip() for c in _split([header_comment], delim)[0]] if header_comment.strip() else []
        width = len(rows[0])
        names_columns = F.recognise(cand) is not None or any(classify_column(c) for c in cand)
        if names_columns and not all(_is_number(c) for c in cand if c) and len(cand) in (width, width - 1, width + 1):
            header = cand
            meta["header"] = "the '#' line above the data"
    if not rows:
        raise InputError(label, EXPECTED, "a header line and no data")
    if header is not None:
        # Trailing commas (Physics Toolbox): one empty field more on the data rows, or on the header.
        if all(len(r) == len(header) + 1 and not r[-1].strip() for r in rows):
            rows = [r[:-1] for r in rows]
        elif header and not header[-1] and all(len(r) == len(header) - 1 for r in rows):
            header = header[:-1]
    width = len(header) if header is not None else len(rows[0])
    for i, r in enumerate(rows):
        if len(r) != width:
            raise InputError(label, EXPECTED, f"{len(r)} fields on data row {i + 1}, {width} in the header"
                             if header is not None else f"{len(r)} fields on data row {i + 1}, {width} on the first")
    cols = list(zip(*rows)) if width else []
    decimal_comma = delim != "," and any(_DECIMAL_COMMA.match(c.strip()) for col in cols for c in col[:50])
    if decimal_comma:
        meta["decimal"] = "comma"
    return _Table(label, header, cols, len(rows), comments, decimal_comma, meta)


_CLOCK = re.compile(r"^\s*(\d{1,2}):(\d{2}):(\d{2})(?:[:.](\d+))?\s*$")


def _parse_times(label: str, cells, name: str) -> np.ndarray:
    """Seconds from ISO date-times or `HH:MM:SS:mmm` clock times (Physics Toolbox), from the first."""
    first = cells[0] if cells else ""
    if _CLOCK.match(first):
        out = np.empty(len(cells), dtype=np.float64)
        for i, c in enumerate(cells):
            m = _CLOCK.match(c)
            if not m:
                raise InputError(label, f"clock times HH:MM:SS:mmm in the timestamp column {name!r}",
                                 f"{c!r} on data row {i + 1}")
            frac = m.group(4) or "0"
            out[i] = int(m.group(1)) * 3600 + int(m.group(2)) * 60 + int(m.group(3)) + int(frac) / 10 ** len(frac)
        out += 86400.0 * np.concatenate([[0], np.cumsum(np.diff(out) < -43200)])  # past midnight
        return out - out[0]
    try:
        stamps = np.array([c.strip().replace("Z", "") for c in cells], dtype="datetime64[ns]")
    except ValueError:
        raise InputError(label, f"numbers, ISO date-times or HH:MM:SS clock times in the timestamp column {name!r}",
                         f"values such as {first!r}") from None
    return (stamps - stamps[0]).astype(np.int64) / 1e9


def _detect_unit(label: str, t: np.ndarray, unit: str | None, meta: dict[str, Any], why: str) -> str:
    """The timestamp unit: the given one (recorded with `why`), else the one the median step fits."""
    if len(t) < MIN_SAMPLES:
        raise InputError(label, f"an IMU recording of at least {MIN_SAMPLES} samples", f"{len(t)} sample(s)")
    if unit in _PER_SECOND:
        meta["timestamp_unit"] = unit if why == "the header" else f"{unit} ({why})"
        return unit
    steps = np.diff(t)
    steps = steps[steps > 0]
    step = float(np.median(steps)) if steps.size else 0.0
    unit = "s"
    for u, ticks in _PER_SECOND.items():
        if step > 0 and _RATE_BAND[0] <= ticks / step <= _RATE_BAND[1]:
            unit = u
            break
    meta["timestamp_unit"] = f"{unit} (from the median step)"
    return unit


# ------------------------------------------------------------------ streams

@dataclasses.dataclass
class _Stream:
    """One file's samples before alignment."""

    label: str
    kind: str  # _imu_formats.IMU6 / ACCEL / ACCEL_USER / GRAVITY / GYRO
    data: np.ndarray  # [N,6] or [N,3], float64, file units
    t: np.ndarray | None  # raw timestamps as written (not rebased)
    t_unit: str | None  # s/ms/us/ns once known
    meta: dict[str, Any]
    accel_hint: tuple[str, str] | None = None  # (unit, why)
    gyro_hint: tuple[str, str] | None = None
    gyro_deg_with_g: bool = False  # Arduino convention: deg/s when the accelerometer is in g
    rate_comment: tuple[float, str] | None = None
    t_offset: float = 0  # the first raw timestamp (t holds t_raw - t_offset, exact for integer clocks)


def _table_stream(table: _Table, stem: str) -> _Stream:
    label, header, meta = table.label, table.header, dict(table.meta)
    rate_comment = F.rate_from_comments(table.comments)
    if header is None:
        width = len(table.cols)
        if width not in (6, 7):
            raise InputError(label, "a header line naming the IMU columns, or exactly 6 columns "
                             "(acc_x acc_y acc_z gyro_x gyro_y gyro_z) or 7 (timestamp first)",
                             f"{width} unnamed columns")
        first = width - 6
        data = np.stack([table.numeric(first + k, CHANNELS[k]) for k in range(6)], axis=1)
        t, t0 = _numeric_time(table, 0, "timestamp") if first else (None, 0)
        meta["format"] = "CSV without a header" + (" (timestamp first: Android-style log)" if first else "")
        meta["columns"] = "unnamed: " + ("timestamp, " if first else "") + ", ".join(CHANNELS)
        unit = None
        if t is not None:
            meta["timestamp_column"] = "column 1"
            unit = _detect_unit(label, t, None, meta, "")
        return _Stream(label, F.IMU6, data, t, unit, meta, rate_comment=rate_comment, t_offset=t0)

    match = F.recognise(header)
    generic = _generic_columns(header)
    if match is not None and (match.layout.kind == F.IMU6 or generic is None):
        return _layout_stream(table, match, stem, meta, rate_comment)
    if generic is None:
        found = {c for c in (classify_column(h) for h in header) if c} if header else set()
        chans = {c[0] for c in found}
        missing = [c for c in CHANNELS if c not in chans]
        has_acc, has_gyr = all(c in chans for c in CHANNELS[:3]), all(c in chans for c in CHANNELS[3:])
        shown = "columns " + ", ".join(repr(h) for h in header[:12]) + (" ..." if len(header) > 12 else "")
        if has_acc != has_gyr:
            other = "gyroscope" if has_acc else "accelerometer"
            raise InputError(label, f"columns for {', '.join(CHANNELS)} (missing: {', '.join(missing)}); this file "
                             f"holds one sensor, pass the {other} file too "
                             f"(--imu {Path(label).name} --imu <{other} file>)", shown)
        raise InputError(
            label,
            f"columns for {', '.join(CHANNELS)} (aliases such as accel_x, accl_x, ax, gyro_x, gx; missing: "
            f"{', '.join(missing)})", shown)
    found_cols, time_col = generic
    meta["format"] = "CSV with named columns"
    data = np.stack([table.numeric(found_cols[c][0], header[found_cols[c][0]]) for c in CHANNELS], axis=1)
    meta["columns"] = {c: header[found_cols[c][0]] for c in CHANNELS}
    used = {found_cols[c][0] for c in CHANNELS} | ({time_col[0]} if time_col else set())
    _note_ignored(table, used, meta)
    stream = _Stream(label, F.IMU6, data, None, None, meta, rate_comment=rate_comment)
    units = {found_cols[c][1] for c in CHANNELS[:3]} - {None}
    if len(units) == 1:
        stream.accel_hint = (units.pop(), "from the header")
    gunits = {found_cols[c][1] for c in CHANNELS[3:]} - {None}
    if len(gunits) == 1:
        stream.gyro_hint = (gunits.pop(), "from the header")
    if any(found_cols[c][2] for c in CHANNELS[:3]):
        stream.kind = F.IMU6_USER
    if time_col is not None:
        _read_time(table, stream, time_col[0], time_col[1], "the header")
    return stream


def _generic_columns(header: list[str]):
    """({channel: (index, unit, gravity removed)}, (time index, unit) | None) when all six are named."""
    found: dict[str, tuple[int, str | None, bool]] = {}
    time_col: tuple[int, str | None] | None = None
    for j, name in enumerate(header):
        kind = classify_column(name)
        if kind is None:
            continue
        chan, unit, lin = kind
        if chan == "time":
            if time_col is None:
                time_col = (j, unit)
        elif chan not in found:
            found[chan] = (j, unit, lin)
    if any(c not in found for c in CHANNELS):
        return None
    return found, time_col


def _note_ignored(table: _Table, used: set[int], meta: dict[str, Any]) -> None:
    ignored = [h for j, h in enumerate(table.header or []) if j not in used and h]
    if ignored:
        meta["columns_ignored"] = ignored
        labels = [h for j, h in enumerate(table.header or []) if j not in used and h and not table.is_numeric_column(j)]
        if labels:
            meta["label_columns_ignored"] = labels


_INTEGER = re.compile(r"^\s*[+-]?\d{1,19}\s*$")


def _numeric_time(table: _Table, j: int, name: str) -> tuple[np.ndarray, float]:
    """(timestamps - the first, the first): integer clocks (ns since the epoch) exactly, not via float64."""
    cells = table.cols[j]
    if cells and all(_INTEGER.match(c) for c in cells):
        try:
            ticks = np.asarray([int(c) for c in cells], dtype=np.int64)
        except OverflowError:  # beyond int64: floats below
            ticks = None
        if ticks is not None:
            return (ticks - ticks[0]).astype(np.float64), int(ticks[0])
    t = table.numeric(j, name)
    return t - t[0], float(t[0])


def _read_time(table: _Table, stream: _Stream, j: int, unit: str | None, why: str) -> None:
    name = table.header[j] if table.header else f"column {j + 1}"
    stream.meta["timestamp_column"] = name
    try:
        stream.t, stream.t_offset = _numeric_time(table, j, name)
        stream.t_unit = unit
    except InputError:
        stream.t = _parse_times(table.label, table.cols[j], name)
        stream.t_unit, why = "s", "date/clock times"
    stream.t_unit = _detect_unit(table.label, stream.t, stream.t_unit, stream.meta, why)


def _layout_stream(table: _Table, match: F.Match, stem: str, meta: dict[str, Any],
                   rate_comment: tuple[float, str] | None) -> _Stream:
    layout, header, label = match.layout, table.header or [], table.label
    kind = layout.kind
    meta["format"] = layout.name
    if layout.note:
        meta["format_note"] = layout.note
    if kind == "by_stem":
        kind = F.SENSOR_LOGGER_ROLES.get(stem.lower().replace(" ", "").replace("_", ""), "")
        if not kind:
            raise InputError(label, "a Sensor Logger file named as the app names it (" +
                             ", ".join(f"{n}.csv" for n in ("TotalAcceleration", "Accelerometer", "Gyroscope",
                                                             "Gravity")) + "): its header does not say which sensor "
                             "it holds", f"the file stem {stem!r}")
        meta["sensor"] = f"{F.SENSOR_WORDS[kind]} (Sensor Logger file {stem})"
    data = np.stack([table.numeric(j, header[j]) for j in match.indices], axis=1)
    names = [header[j] for j in match.indices]
    meta["columns"] = dict(zip(CHANNELS if kind == F.IMU6 else ("x", "y", "z"), names))
    used = set(match.indices) | ({match.time_index} if match.time_index is not None else set())
    stream = _Stream(label, kind, data, None, None, meta, rate_comment=rate_comment)
    why = f"stated by the {layout.name} format"
    if layout.accel_units and kind in (F.IMU6, F.ACCEL, F.ACCEL_USER, F.GRAVITY):
        stream.accel_hint = (layout.accel_units, why)
    if layout.gyro_units and kind in (F.IMU6, F.GYRO):
        stream.gyro_hint = (layout.gyro_units, why)
    stream.gyro_deg_with_g = layout.gyro_units is None and kind == F.IMU6
    t_index, t_unit, t_why = match.time_index, layout.time_unit, why
    if match.time_bracket:
        t_unit, t_why = _unit_word(match.time_bracket) or t_unit, "the header"
    if t_index is None:  # layouts without a fixed time column: any column the aliases call time
        for j, h in enumerate(header):
            kind_j = classify_column(h)
            if kind_j and kind_j[0] == "time" and j not in used:
                t_index, t_unit, t_why = j, kind_j[1], "the header"
                break
    if t_index is not None:
        used.add(t_index)
        _read_time(table, stream, t_index, t_unit, t_why)
    _note_ignored(table, used, meta)
    return stream


def _read_stream(label: str, raw: bytes, stem: str) -> _Stream:
    return _table_stream(_parse_table(label, raw), stem)


# ------------------------------------------------------------------ npy and arrays

def _channels_from_array(label: Any, arr: np.ndarray, meta: dict[str, Any]) -> tuple[np.ndarray | None, np.ndarray]:
    if arr.dtype.kind not in "biuf":
        raise InputError(label, "a numeric IMU array", f"dtype {arr.dtype}")
    if arr.ndim != 2:
        raise InputError(label, "an IMU array [6,N] or [N,6] (or 7 with timestamps)", f"shape {list(arr.shape)}")
    if arr.shape[1] in (6, 7) and arr.shape[0] not in (6, 7):
        table = arr
    elif arr.shape[0] in (6, 7):
        table = arr.T
    else:
        raise InputError(label, "6 IMU channels (acc x/y/z, gyro x/y/z): an array [6,N] or [N,6], "
                         "or [7,N]/[N,7] with timestamps first", f"shape {list(arr.shape)}")
    with np.errstate(all="ignore"):
        table = table.astype(np.float64)
    bad = ~np.isfinite(table)
    if bad.any():
        r, c = (int(v) for v in np.argwhere(bad)[0])
        raise InputError(label, "finite IMU values", f"{int(bad.sum())} NaN/Inf values (first at sample {r}, "
                         f"channel {c})")
    if table.shape[1] == 7:
        meta["timestamps"] = "first channel of the array"
        return table[:, 0], table[:, 1:]
    return None, table


def _read_npy(path: Path, meta: dict[str, Any]) -> _Stream:
    arr = load_npy(path, EXPECTED)
    meta["format"] = "npy"
    t, data = _channels_from_array(path, arr, meta)
    side = path.with_name(path.stem + "_timestamps.npy")
    if t is None and side.is_file():
        ts = load_npy(side, "timestamps for the IMU samples (.npy [N])").astype(np.float64).reshape(-1)
        if len(ts) != len(data):
            raise InputError(side, f"{len(data)} timestamps (one per sample of {path.name})", f"{len(ts)}")
        if not np.isfinite(ts).all():
            raise InputError(side, "finite timestamps", "NaN/Inf values")
        meta["timestamps"] = side.name
        meta["format"] = "npy with Ego4D-style _timestamps.npy"
        t = ts
    stream = _Stream(str(path), F.IMU6, data, None, None, meta)
    if t is not None:
        stream.t, stream.t_offset = t - t[0], float(t[0])
        stream.t_unit = _detect_unit(str(path), t, None, meta, "")
    return stream


# ------------------------------------------------------------------ sources: file, files, folder, zip

def _is_zip(path: Path) -> bool:
    return path.is_file() and (ext_of(path) == ".zip" or zipfile.is_zipfile(path)) and ext_of(path) != ".npy"


def _streams_from_zip(path: Path) -> list[_Stream]:
    try:
        zf = zipfile.ZipFile(path)
        infos = sorted(zf.infolist(), key=lambda i: i.filename)
    except Exception as exc:  # noqa: BLE001 - any damaged archive (BadZipFile, struct/zlib errors, ...)
        raise InputError(path, "an IMU export .zip", f"an unreadable zip ({type(exc).__name__}: {exc})") from None
    out = []
    with zf:
        for info in infos:
            name = info.filename
            if info.is_dir() or "__MACOSX" in name or not name.lower().endswith((".csv", ".tsv", ".txt")):
                continue
            if info.file_size > _MAX_ZIP_MEMBER:
                raise InputError(f"{path}:{name}", "an IMU CSV", f"{info.file_size} bytes uncompressed")
            try:
                raw = zf.read(info)
            except Exception as exc:  # noqa: BLE001 - CRC, zlib, encryption, unsupported compression
                raise InputError(f"{path}:{name}", "a readable zip member",
                                 f"{type(exc).__name__}: {str(exc)[:120]}") from None
            out.append((f"{path}:{name}", raw, Path(name).stem))
    return _export_streams(path, out)


def _streams_from_folder(path: Path) -> list[_Stream]:
    files = sorted(p for p in path.iterdir() if p.is_file() and ext_of(p) in (".csv", ".tsv", ".txt"))
    return _export_streams(path, [(str(p), p.read_bytes(), p.stem) for p in files], "a directory with ")


def _export_streams(where: Path, files: list[tuple[str, bytes, str]], what: str = "") -> list[_Stream]:
    """The IMU files of an export: a 6-axis file, or the one-sensor files; others skipped."""
    streams, skipped = [], []
    for label, raw, stem in files:
        try:
            streams.append(_read_stream(label, raw, stem))
        except InputError as exc:
            skipped.append(f"{Path(label.split(':')[-1]).name} ({exc.found})")
    six = [s for s in streams if s.kind == F.IMU6]
    chosen = six[:1] if six else [s for s in streams if s.kind in (F.ACCEL, F.ACCEL_USER, F.GRAVITY, F.GYRO)]
    if not chosen:
        raise InputError(where, "an IMU export holding accelerometer and gyroscope CSV files",
                         f"{what}{len(files)} CSV files, none of them IMU data" + (
                             f": {'; '.join(skipped[:4])}" if skipped else ""))
    for s in chosen if skipped else ():
        s.meta["files_skipped"] = skipped
    return chosen


def _open_source(source: Any) -> list[_Stream]:
    if isinstance(source, (list, tuple)):
        if not source:
            raise InputError("imu", "one or more IMU files", "an empty list")
        streams: list[_Stream] = []
        for s in source:
            streams.extend(_open_source(s))
        return streams
    if isinstance(source, (str, os.PathLike)) and Path(source).is_dir():
        return _streams_from_folder(Path(source))
    path = require_file(source, EXPECTED)
    if ext_of(path) == ".npy" or path.read_bytes()[:6] == b"\x93NUMPY":
        return [_read_npy(path, {})]
    if _is_zip(path):
        return _streams_from_zip(path)
    return [_read_stream(str(path), path.read_bytes(), path.stem)]


def _to_ms(t: np.ndarray, unit: str | None) -> np.ndarray:
    """Timestamps in ms; integer tick ratios divide exactly (5e6 ns -> 5.0 ms, not 4.999...)."""
    unit = unit or "s"
    return t * 1000.0 if unit == "s" else t / float(_PER_SECOND[unit] // 1000)


def _ms_from(s: _Stream, origin: _Stream) -> np.ndarray:
    """The stream's timestamps in ms from the origin stream's first sample."""
    if s.t_unit == origin.t_unit:
        return _to_ms(s.t + (s.t_offset - origin.t_offset), s.t_unit)
    return _to_ms(s.t, s.t_unit) + (_to_ms(np.array([s.t_offset], np.float64), s.t_unit)[0]
                                    - _to_ms(np.array([origin.t_offset], np.float64), origin.t_unit)[0])


def _combine(streams: list[_Stream], meta: dict[str, Any]) -> _Stream:
    """One stream of six channels: a single 6-axis file, or one-sensor files aligned on their timestamps."""
    if len(streams) == 1 and streams[0].kind in (F.IMU6, F.IMU6_USER):
        return streams[0]
    if any(s.kind in (F.IMU6, F.IMU6_USER) for s in streams):
        raise InputError(" + ".join(s.label for s in streams), "either one 6-axis IMU file or one-sensor files",
                         "a 6-axis file together with other files")
    by_kind: dict[str, _Stream] = {}
    for s in streams:
        if s.kind in by_kind:
            raise InputError(s.label, f"one {F.SENSOR_WORDS[s.kind]} file", f"a second one besides "
                             f"{by_kind[s.kind].label}")
        by_kind[s.kind] = s
    acc = by_kind.get(F.ACCEL) or by_kind.get(F.ACCEL_USER)
    gyr = by_kind.get(F.GYRO)
    formats = " ".join(s.meta.get("format", "") for s in streams)
    exports = (F.SENSOR_LOGGER_FILES if "Sensor Logger" in formats else F.PHYPHOX_EXPORTS if "phyphox" in formats
               else {})

    def name_of(kind: str) -> str:
        return exports.get(kind) or f"the {F.SENSOR_WORDS[kind]} file"

    first = streams[0]
    if acc is None or gyr is None:
        have = acc or gyr or first
        missing = F.GYRO if acc is not None else F.ACCEL
        raise InputError(have.label, "accelerometer and gyroscope data", f"one sensor ({F.SENSOR_WORDS[have.kind]}) "
                         f"in this file; pass the {F.SENSOR_WORDS[missing]} file too: --imu {Path(have.label).name} "
                         f"--imu {name_of(missing)}")
    grav = by_kind.get(F.GRAVITY)
    if acc.kind == F.ACCEL_USER and grav is None:
        add = (f", or add {name_of(F.GRAVITY)} (--imu {Path(acc.label).name} --imu {name_of(F.GRAVITY)} "
               f"--imu {Path(gyr.label).name})" if F.GRAVITY in exports else "")
        raise InputError(acc.label, "an accelerometer with gravity (the model never saw gravity-free data)",
                         f"user/linear acceleration with gravity removed and no gravity file; pass "
                         f"{name_of(F.ACCEL)} instead{add}")
    parts = [acc, gyr] + ([grav] if acc.kind == F.ACCEL_USER and grav is not None else [])
    for s in parts:
        if s.t is None:
            raise InputError(s.label, "timestamps to align the sensors on", "no timestamp column")
    times = {id(s): _ms_from(s, acc) for s in parts}
    ta = times[id(acc)]
    lo = max(float(times[id(s)][0]) for s in parts)
    hi = min(float(times[id(s)][-1]) for s in parts)
    keep = (ta >= lo) & (ta <= hi)
    if keep.sum() < MIN_SAMPLES:
        raise InputError(" + ".join(s.label for s in parts), "sensor files recorded at the same time",
                         f"{int(keep.sum())} accelerometer samples inside the time span all files cover")
    t = ta[keep]
    accel = acc.data[keep]
    for s in parts[1:]:
        ts = times[id(s)]
        order = np.argsort(ts, kind="stable")
        ts = ts[order]
        vals = np.stack([np.interp(t, ts, s.data[order, k]) for k in range(3)], axis=1)
        if s is grav:
            accel = accel + vals
        else:
            gyro = vals
    merged = _Stream(acc.label, F.IMU6, np.concatenate([accel, gyro], axis=1), t, "ms", dict(acc.meta),
                     accel_hint=acc.accel_hint or (grav.accel_hint if grav else None), gyro_hint=gyr.gyro_hint)
    merged.meta["timestamp_unit"] = acc.meta.get("timestamp_unit")
    meta["files"] = {F.SENSOR_WORDS[s.kind]: s.label for s in parts}
    meta["columns"] = {"accelerometer": acc.meta.get("columns"), "gyroscope": gyr.meta.get("columns")}
    meta["aligned"] = (f"{' and '.join(F.SENSOR_WORDS[s.kind] for s in parts[1:])} linearly interpolated onto the "
                       f"accelerometer's {len(t)} timestamps (the {(hi - lo) / 1000:.3f} s all files cover)")
    if grav is not None and acc.kind == F.ACCEL_USER:
        meta["gravity"] = f"added back from {grav.label}"
    merged.t = t
    merged.meta.pop("columns", None)
    return merged


# ------------------------------------------------------------------ times, units, plausibility

def _check_times(label: Any, t: np.ndarray, data: np.ndarray, meta: dict[str, Any]) -> tuple[np.ndarray, np.ndarray]:
    """Timestamps (ms) that never go backwards; repeated ones dropped."""
    d = np.diff(t)
    back = np.flatnonzero(d < 0)
    if back.size:
        i = int(back[0])
        raise InputError(label, "timestamps that never go backwards",
                         f"sample {i + 2} at {t[i + 1] / 1000:.6g} s after sample {i + 1} at {t[i] / 1000:.6g} s "
                         f"({back.size} backward steps)")
    dup = np.flatnonzero(d == 0)
    if dup.size:
        keep = np.ones(len(t), dtype=bool)
        keep[dup + 1] = False
        logger.warning("%s: %d repeated timestamps; those samples are dropped", label, dup.size)
        meta["repeated_timestamps_dropped"] = int(dup.size)
        t, data = t[keep], data[keep]
    return t, data


def _channel_stats(data: np.ndarray) -> str:
    return ", ".join(f"{n} mean {m:.3g} sd {s:.3g}" for n, m, s in zip(("x", "y", "z"), data.mean(0), data.std(0)))


def _convert_units(label: Any, data: np.ndarray, accel_units: str, gyro_units: str, meta: dict[str, Any],
                   in_window: np.ndarray, stream: _Stream) -> np.ndarray:
    acc = _unit_word(accel_units) if accel_units != "auto" else "auto"
    if acc not in ("auto", "g", "m/s2"):
        raise InputError(label, 'accel_units "auto", "g" or "m/s2"', repr(accel_units))
    gyr = _unit_word(gyro_units) if gyro_units != "auto" else "auto"
    if gyr not in ("auto", "deg/s", "rad/s"):
        raise InputError(label, 'gyro_units "auto", "deg/s" or "rad/s"', repr(gyro_units))
    raw_mag = float(np.median(np.linalg.norm(data[in_window, :3], axis=1)))
    how = "given (--accel-units)"
    if acc == "auto":
        if stream.accel_hint and stream.accel_hint[0] in ("g", "m/s2"):
            acc, how = stream.accel_hint
        elif 0.5 <= raw_mag <= 2.0:
            acc, how = "g", f"detected: median |a| = {raw_mag:.3g}"
        elif 5.0 <= raw_mag <= 20.0:
            acc, how = "m/s2", f"detected: median |a| = {raw_mag:.3g}"
        else:
            acc, how = "m/s2", f"assumed: median |a| = {raw_mag:.3g} fits neither 1 g nor 9.8 m/s^2"
    meta["accel_units"] = f"{acc} ({how})"
    data = data.copy()
    if acc == "g":
        data[:, :3] *= STANDARD_GRAVITY
    mag = float(np.median(np.linalg.norm(data[in_window, :3], axis=1)))
    ratio = mag / STANDARD_GRAVITY
    stats = _channel_stats(data[in_window, :3])
    if ratio < 0.5:
        msg = (f"NO GRAVITY in the accelerometer: median |a| = {mag:.3g} m/s^2 in the window, far below 1 g "
               f"({stats}); the model was trained on readings that include gravity, so its answer is unreliable. "
               f"Pass the accelerometer export that includes gravity (or add the gravity file); if the units are "
               f"wrong, set --accel-units")
        logger.warning("%s: %s", label, msg)
        meta["gravity_check"] = f"failed: median |a| = {mag:.3g} m/s^2 (no gravity?)"
    elif not 0.7 <= ratio <= 1.5:
        msg = (f"accelerometer magnitude fits neither g nor m/s^2: median |a| = {mag:.3g} m/s^2 read as {acc} "
               f"({stats}); set --accel-units to choose")
        logger.warning("%s: %s", label, msg)
        meta["gravity_check"] = f"doubtful: median |a| = {mag:.3g} m/s^2 ({stats})"
    else:
        meta["gravity_check"] = f"ok: median |a| = {mag:.3g} m/s^2"
    big = float(np.percentile(np.abs(data[:, 3:]), 99.9)) if len(data) else 0.0
    if gyr == "auto":
        if stream.gyro_hint and stream.gyro_hint[0] in ("deg/s", "rad/s"):
            gyr, ghow = stream.gyro_hint
        elif stream.gyro_deg_with_g and acc == "g":
            gyr, ghow = "deg/s", "the accelerometer is in g: Arduino IMU libraries report deg/s with g"
        else:
            gyr, ghow = "rad/s", "assumed"
        if gyr == "rad/s" and big > GYRO_RAD_S_MAX:
            logger.warning("%s: gyroscope values up to %.4g cannot be rad/s (above %g rad/s, about 2000 dps): "
                           "read as deg/s (set --gyro-units to choose)", label, big, GYRO_RAD_S_MAX)
            gyr, ghow = "deg/s", f"concluded: |w| reaches {big:.4g}, above {GYRO_RAD_S_MAX:g} rad/s"
    else:
        ghow = "given (--gyro-units)"
    meta["gyro_units"] = f"{gyr} ({ghow})"
    if gyr == "deg/s":
        data[:, 3:] *= math.pi / 180.0
    return data


# ------------------------------------------------------------------ window

def window_upstream(t_ms: np.ndarray, data: np.ndarray, start: float,
                    rate: float | None = None) -> tuple[np.ndarray, int, tuple[int, int], int]:
    """The training pipeline's window: ([6,400] float32, source rate, (first, end) sample, valid samples).

    Cut [start, start + 2 s) from the raw samples by `bisect_left` on the ms timestamps
    (counted from the first sample), take `int(1000 / mean step)` (or int(rate) when
    given) as the source rate, resample that window alone to 200 Hz with the torchaudio
    default filter unless the rate is 200, then pad with zeros or truncate to 400.
    """
    stamps = t_ms.tolist()
    i0 = bisect.bisect_left(stamps, stamps[0] + start * 1000.0)
    i1 = bisect.bisect_left(stamps, stamps[0] + (start + WINDOW_S) * 1000.0)
    if i0 == i1:
        i0, i1 = max(i0 - 1, 0), min(i1 + 1, len(stamps))
    seg = data[i0:i1]
    if rate is not None:
        src = int(rate + 1e-9)
    else:
        # + 1e-6: float noise of a unit conversion must not turn 200.0 into 199 (the rule truncates)
        src = int(1000.0 / float(np.mean(np.diff(t_ms[i0:i1]))) + 1e-6)
    if not _RATE_LIMITS[0] <= src <= _RATE_LIMITS[1]:
        raise ValueError(src)
    out = seg.astype(np.float32) if src == TARGET_RATE else sinc_resample(seg, src, TARGET_RATE, axis=0)
    win = np.zeros((N_SAMPLES, 6), dtype=np.float32)
    valid = min(N_SAMPLES, len(out))
    win[:valid] = out[:valid]
    return np.ascontiguousarray(win.T), src, (i0, i1), valid


def window_200hz(t: np.ndarray, data: np.ndarray, start: float) -> tuple[np.ndarray, int, int]:
    """`method="grid"`: [N,6] at times t (s from the first sample) -> ([6,400] float32, grid rate, valid samples).

    Linear interpolation onto a grid at the rounded source rate, polyphase resampling
    to 200 Hz with filter run-in on both sides, the window [start, start + 2 s), zeros
    after the last sample.
    """
    steps = np.diff(t)
    src_rate = 1.0 / float(np.median(steps))
    grid_rate = max(1, int(round(src_rate)))
    up, down = rate_ratio(grid_rate, TARGET_RATE)
    k = max(1, math.ceil(0.5 * grid_rate / down))  # >= 0.5 s of filter run-in before the start
    lead = k * down  # grid samples before `start`; lands on output sample k * up
    span = min(start + WINDOW_S, float(t[-1])) + 0.5  # 0.5 s run-out past the window or the data
    n_grid = lead + int(math.ceil((span - start) * grid_rate)) + 1
    grid = to_uniform_grid(t, data, grid_rate, start - lead / grid_rate, n_grid)
    out = resample_rate(grid, grid_rate, TARGET_RATE, axis=0)
    j0 = k * up
    win = np.zeros((N_SAMPLES, 6), dtype=np.float32)
    valid = int(math.floor((float(t[-1]) - start) * TARGET_RATE + 1e-9)) + 1
    valid = max(0, min(valid, N_SAMPLES, len(out) - j0))
    win[:valid] = out[j0:j0 + valid]
    return np.ascontiguousarray(win.T), grid_rate, valid


# ------------------------------------------------------------------ entry point

def _label_of(source: Any) -> str:
    if isinstance(source, (list, tuple)):
        return " + ".join(source_label(s) for s in source)
    return source_label(source)


def preprocess(source: Source | list | tuple, *, rate: float | None = None, start: float = 0.0,
               accel_units: str = "auto", gyro_units: str = "auto", timestamps: np.ndarray | None = None,
               method: str = "upstream") -> ModalityInput:
    """An IMU recording -> [6,400] float32 (spec section 7, imu).

    source: a file, a list of one-sensor files, an export folder or .zip, or an array.
    rate: sample rate in Hz when the file has no timestamp column (overrides one if given).
    start: seconds after the first sample where the 2 s window begins.
    accel_units / gyro_units: "auto" or the unit; see the module docstring.
    timestamps: seconds, one per sample, for an in-memory array.
    method: "upstream" (the training pipeline's window-then-resample, default) or "grid".
    """
    t0 = time.perf_counter()
    label = _label_of(source)
    meta: dict[str, Any] = {"source": label}
    start = number_option(label, "start", start) or 0.0
    rate = number_option(label, "rate", rate)
    if start < 0:
        raise InputError(label, "a window start >= 0 seconds", f"start {start}")
    if rate is not None and rate <= 0:
        raise InputError(label, "a positive sample rate in Hz", f"rate {rate}")
    if method not in ("upstream", "grid"):
        raise InputError(label, 'method "upstream" or "grid"', repr(method))
    if is_array(source):
        t_raw, data = _channels_from_array(label, source, meta)
        meta["format"] = "array"
        stream = _Stream(label, F.IMU6, data, t_raw, None, meta)
        if timestamps is not None:
            ts = np.asarray(timestamps, dtype=np.float64).reshape(-1)
            if len(ts) != len(data) or not np.isfinite(ts).all():
                raise InputError(label, f"{len(data)} finite timestamps (seconds)", f"{len(ts)} values")
            stream.t, stream.t_unit = ts - ts[0], "s"
            meta["timestamps"] = "given (s)"
        elif t_raw is not None:
            stream.t, stream.t_offset = t_raw - t_raw[0], float(t_raw[0])
            stream.t_unit = _detect_unit(label, t_raw, None, meta, "")
    else:
        stream = _combine(_open_source(source), meta)
        for key, value in stream.meta.items():
            meta.setdefault(key, value)
        if isinstance(source, (list, tuple)) or Path(os.fspath(source)).is_dir() or "files" in meta:
            meta["source"] = label
        else:
            label = meta["source"] = stream.label
    if stream.kind == F.IMU6_USER:
        logger.warning("%s: the accelerometer columns hold linear acceleration (gravity removed); the model saw "
                       "raw accelerometer readings with gravity, so its answer is unreliable", label)
        meta["gravity_removed"] = True
    data = stream.data
    n = len(data)
    if n < MIN_SAMPLES:
        raise InputError(label, f"an IMU recording of at least {MIN_SAMPLES} samples", f"{n} sample(s)")
    given_rate = None
    if rate is not None:
        if stream.t is not None:
            logger.warning("%s: --imu-rate %g Hz given; the file's timestamps are ignored", label, rate)
        t_ms = np.arange(n, dtype=np.float64) * (1000.0 / float(rate))
        given_rate = float(rate)
        meta["timestamps"] = f"from the rate option ({rate:g} Hz)"
        meta["rate_from"] = "the rate option"
    elif stream.t is not None:
        t_ms = _to_ms(stream.t - stream.t[0], stream.t_unit)
        meta["rate_from"] = "the timestamps"
        if stream.rate_comment:
            meta["rate_comment_ignored"] = stream.rate_comment[1]
    elif stream.rate_comment is not None:
        given_rate = stream.rate_comment[0]
        t_ms = np.arange(n, dtype=np.float64) * (1000.0 / given_rate)
        meta["timestamps"] = f"from the comment line {stream.rate_comment[1]!r} ({given_rate:g} Hz)"
        meta["rate_from"] = f"the comment line {stream.rate_comment[1]!r}"
    else:
        raise InputError(label, "a timestamp column, a '# sample rate: N Hz' comment, or the sample rate "
                         "(--imu-rate HZ / rate=)", "none of them")
    t_ms, data = _check_times(label, t_ms, data, meta)
    t = t_ms / 1000.0
    if len(t) < MIN_SAMPLES:
        raise InputError(label, f"at least {MIN_SAMPLES} samples with distinct timestamps", f"{len(t)}")
    step = float(np.median(np.diff(t)))
    if not _RATE_LIMITS[0] <= 1.0 / step <= _RATE_LIMITS[1]:
        raise InputError(label, f"an IMU sample rate of {_RATE_LIMITS[0]:g}-{_RATE_LIMITS[1]:g} Hz",
                         f"{1.0 / step:.6g} Hz (median step {step:.6g} s)")
    duration = float(t[-1]) + step
    meta["source_rate_hz"] = round(1.0 / step, 4)
    meta["duration_s"] = round(duration, 6)
    meta["n_samples"] = int(len(t))
    if start >= duration:
        raise InputError(label, f"a window start before the end of the recording ({duration:.3f} s)",
                         f"start {start:g} s")
    in_window = (t >= start) & (t < start + WINDOW_S)
    n_in = int(in_window.sum())
    if n_in < MIN_SAMPLES:
        raise InputError(label, f"at least {MIN_SAMPLES} samples in the 2 s window from {start:g} s",
                         f"{n_in} sample(s)")
    gaps = np.diff(t)
    big = gaps > 10 * step
    if big.any():
        logger.warning("%s: %d gaps longer than 10 samples (largest %.3g s)%s", label, int(big.sum()),
                       float(gaps.max()), " are bridged by interpolation" if method == "grid" else "")
        meta["gaps"] = int(big.sum())
    with np.errstate(over="ignore", invalid="ignore"):
        data = _convert_units(label, data, accel_units, gyro_units, meta, in_window, stream)
    with np.errstate(over="ignore", invalid="ignore"):
        if method == "grid":
            array, src, valid = window_200hz(t, data, float(start))
            meta["resampling"] = f"grid: linear interpolation at {src} Hz, then polyphase (scipy) to 200 Hz"
        else:
            try:
                array, src, (i0, i1), valid = window_upstream(t_ms, data, float(start), given_rate)
            except ValueError:
                raise InputError(label, f"a mean sample rate of {_RATE_LIMITS[0]:g}-{_RATE_LIMITS[1]:g} Hz in the "
                                 f"2 s window", "one outside it (long gaps?)") from None
            meta["window_samples"] = [int(i0), int(i1)]
            meta["resampling"] = ("none: the window is at 200 Hz" if src == TARGET_RATE else
                                  f"window alone, {src} -> 200 Hz, windowed sinc (torchaudio's default filter)")
            meta["rate_rule"] = ("int(rate given)" if given_rate is not None else
                                 "int(1000 / mean step in ms) over the window (the training pipeline's rule)")
    require_finite_output(label, array, EXPECTED)
    if duration > WINDOW_S + 1e-6:
        logger.warning("%s: the recording lasts %.2f s; the model sees 2 s of it, from %.2f s "
                       "(choose the window with --imu-start)", label, duration, start)
    meta.update(window_s=[round(float(start), 6), round(float(start) + WINDOW_S, 6)], method=method,
                resampled_from_hz=src, padded_samples=N_SAMPLES - valid,
                preprocess_s=round(time.perf_counter() - t0, 4))
    return ModalityInput("imu", array, meta)


def dummy_input(rng: np.random.Generator) -> np.ndarray:
    """2 s at 200 Hz of walking: gravity on y, a 2 Hz step bounce, gentle head turns."""
    t = np.arange(N_SAMPLES) / TARGET_RATE
    f = rng.uniform(1.6, 2.2)
    acc = np.stack([0.8 * np.sin(2 * np.pi * f / 2 * t), -STANDARD_GRAVITY + 1.5 * np.sin(2 * np.pi * f * t),
                    0.6 * np.cos(2 * np.pi * f * t)])
    gyr = np.stack([0.2 * np.sin(2 * np.pi * f * t), 0.4 * np.sin(2 * np.pi * 0.3 * t), 0.1 * np.cos(2 * np.pi * f * t)])
    x = np.concatenate([acc, gyr]) + 0.02 * rng.standard_normal((6, N_SAMPLES))
    return x.astype(np.float32)



def write_example(path: Path) -> None:
    """A stand-in recording (where examples/ is missing): 4 s at 100 Hz of walking, m/s^2 and rad/s."""
    t = np.arange(400) / 100.0
    acc = [0.8 * np.sin(np.pi * 1.8 * t), -STANDARD_GRAVITY + 1.5 * np.sin(2 * np.pi * 1.8 * t),
           0.6 * np.cos(2 * np.pi * 1.8 * t)]
    gyr = [0.2 * np.sin(2 * np.pi * 1.8 * t), 0.4 * np.sin(2 * np.pi * 0.3 * t), 0.1 * np.cos(2 * np.pi * 1.8 * t)]
    rows = ["time_s,acc_x,acc_y,acc_z,gyro_x,gyro_y,gyro_z"]
    rows += [",".join(f"{v:.5f}" for v in r) for r in np.stack([t, *acc, *gyr], 1)]
    path.write_text("\n".join(rows) + "\n")


SPEC = ModalitySpec(
    name='imu',
    cli_option='--imu',
    description='6-axis IMU recording (CSV, export folder or .zip, or .npy; repeat for one-sensor files)',
    file_types=('.csv', '.tsv', '.txt', '.zip', '.npy'),
    input_shape=(6, 400),
    tokenizer_kind='conv1d',
    n_frames=1,
    n_tokens=392,
    preprocess=preprocess,
    dummy_input=dummy_input,
    caption_prompt='Describe the scene.',
    example=Example('imu/walk.csv', synthesize=write_example),
    several_files=True,
    accepts_folder=True,
    flags=(
        ReaderFlag("--imu-rate", "rate", float, "IMU sample rate in Hz when the file has no timestamps."),
        ReaderFlag("--imu-start", "start", float, "Start of the 2 s IMU window, seconds (default 0)."),
        ReaderFlag("--accel-units", "accel_units", ("auto", "g", "m/s2"),
                   "Accelerometer units of the IMU file (default: detected)."),
        ReaderFlag("--gyro-units", "gyro_units", ("auto", "deg/s", "rad/s"),
                   "Gyroscope units of the IMU file (default: from the header, else rad/s unless impossible)."),
    ),
)
