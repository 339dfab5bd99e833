"""The imu modality: 6-axis IMU recording (CSV or .npy).

CSV format (what phone apps, loggers and spreadsheets export):

- One header line naming the columns (a file without a header must have exactly 6
  columns acc_x acc_y acc_z gyro_x gyro_y gyro_z, or 7 with a timestamp first).
  Lines starting with `#` are comments. Other columns (magnetometer, ...) are ignored.
- Channel names, case and punctuation ignored, a unit in brackets allowed
  ("Acceleration x (m/s^2)"): accelerometer `acc_x`, `accl_x`, `accel_x`,
  `acceleration_x`, `accelerometer_x`, `ax`, `x_acc`, ...; gyroscope `gyro_x`, `gyr_x`,
  `gyroscope_x`, `gx`, `wx`, `rotation_rate_x`, `angular_velocity_x`, ... (same for y, z).
  `linear_acceleration_*`/`user_acceleration_*` (gravity removed) are accepted with
  a warning: the model saw raw accelerometer readings, gravity included.
- Optional timestamp column, recognised by its name (`time`, `timestamp`, `t`,
  `seconds_elapsed`, `canonical_timestamp_ms`, ...); its unit comes from the name or
  bracket (`_ms`, `(s)`, `_us`, `_ns`), otherwise from the median step (the first of
  s, ms, us, ns giving a rate between 5 Hz and 20 kHz); ISO date-times also work.
  Without timestamps, pass the rate (`rate=` / `--imu-rate HZ`).
- Delimiter `,` `;` tab `|` or spaces; decimal commas (`0,981;...`) are recognised.

`.npy`: [6,N] or [N,6] in the channel order above, or [7,N]/[N,7] with timestamps
first; an Ego4D-style `<name>_timestamps.npy` next to the file is used when present.

Preprocessing (spec section 7, imu): raw units, no normalisation; accelerometer
in m/s^2 and gyroscope in rad/s as the Ego4D recordings the model saw. Accelerometer
units: `accel_units="auto"` (a unit in the header, else the median magnitude: about
1 -> g, about 9.8 -> m/s^2; g is multiplied by 9.80665), or "g" / "m/s2". Gyroscope:
`gyro_units="auto"` (deg/s only when the header says so), "deg/s" or "rad/s".
Resampling to 200 Hz: the samples are linearly interpolated onto a uniform grid at
the rounded source rate (irregular or jittery timestamps), then polyphase-resampled
with `scipy.signal.resample_poly` (anti-aliased; see `onellm.runtime.resample`).
Window: 2 s from `start` seconds after the first sample (`--imu-start`, default 0,
with a notice when the recording is longer) -> 400 samples, zero-padded past the end
of the recording as the reference pads; fewer than 10 source samples in the window
is an error. Output [6,400] float32.
"""

from __future__ import annotations

import csv
import io
import logging
import math
import re
import time
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import InputError
from ..resample import rate_ratio, resample_rate, to_uniform_grid
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
from .base import ModalityInput, ModalitySpec

logger = logging.getLogger(__name__)

EXPECTED = "a 6-axis IMU recording (CSV with accelerometer and gyroscope x/y/z columns, or .npy [6,N]/[N,6])"
CHANNELS = ("acc_x", "acc_y", "acc_z", "gyro_x", "gyro_y", "gyro_z")
TARGET_RATE = 200
WINDOW_S = 2.0
N_SAMPLES = 400
MIN_SAMPLES = 10
STANDARD_GRAVITY = 9.80665
_RATE_BAND = (5.0, 20000.0)  # plausible IMU rates, for timestamp-unit detection
_RATE_LIMITS = (1.0, 100000.0)  # sample rates accepted at all
_UNIT_SCALE = {"s": 1.0, "ms": 1e-3, "us": 1e-6, "ns": 1e-9}

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


def _read_csv(path: Path) -> tuple[np.ndarray | None, np.ndarray, dict[str, Any]]:
    raw = path.read_bytes()
    if b"\x00" in raw[:4096]:
        raise InputError(path, EXPECTED, describe_content(path, raw[:512]))
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError:
        text = raw.decode("latin-1")
    lines = [ln for ln in text.splitlines() if ln.strip() and not ln.lstrip().startswith("#")]
    if not lines:
        raise InputError(path, EXPECTED, "no data lines (only blank or comment lines)")
    delim = _pick_delimiter(lines[: min(len(lines), 20)])
    if delim is None:
        rows = [ln.split() for ln in lines]
    else:
        rows = list(csv.reader(io.StringIO("\n".join(lines)), delimiter=delim))
    header: list[str] | None = None
    if not all(_is_number(c) for c in rows[0] if c.strip()):
        header, rows = [c.strip() for c in rows[0]], rows[1:]
    if not rows:
        raise InputError(path, EXPECTED, "a header line and no data")
    width = len(header) if header else len(rows[0])
    for i, r in enumerate(rows):
        if len(r) != width:
            raise InputError(path, EXPECTED, f"{len(r)} fields on data row {i + 1}, {width} in the header"
                             if header else f"{len(r)} fields on data row {i + 1}, {width} on the first")
    meta: dict[str, Any] = {"format": "csv", "delimiter": delim or "whitespace"}
    cols = list(zip(*rows))
    decimal_comma = delim != "," and any(_DECIMAL_COMMA.match(c.strip()) for col in cols for c in col[:50])
    if decimal_comma:
        meta["decimal"] = "comma"

    def numeric(j: int, what: str) -> np.ndarray:
        try:  # fast path: numpy parses the whole column in C
            fast = np.asarray(cols[j] if not decimal_comma else [c.replace(",", ".") for c in cols[j]],
                              dtype=np.float64)
            if np.isfinite(fast).all():
                return fast
        except ValueError:
            pass
        out = np.empty(len(rows), dtype=np.float64)  # slow path: find and name the bad cell
        for i, cell in enumerate(cols[j]):
            c = cell.strip()
            if decimal_comma:
                c = c.replace(",", ".")
            try:
                out[i] = float(c) if c else math.nan
            except ValueError:
                raise InputError(path, f"numbers in column {what}",
                                 f"{cell!r} on data row {i + 1}") from None
            if not math.isfinite(out[i]):
                raise InputError(path, f"finite numbers in column {what}",
                                 f"{cell.strip() or 'an empty cell'!r} on data row {i + 1}")
        return out

    if header is None:
        if width not in (6, 7):
            raise InputError(path, "a header line naming the IMU columns, or exactly 6 columns "
                             "(acc_x acc_y acc_z gyro_x gyro_y gyro_z) or 7 (timestamp first)",
                             f"{width} unnamed columns")
        first = width - 6
        data = np.stack([numeric(first + k, CHANNELS[k]) for k in range(6)], axis=1)
        t = numeric(0, "timestamp") if first else None
        meta["columns"] = "unnamed: " + ("timestamp, " if first else "") + ", ".join(CHANNELS)
        return (None if t is None else _time_seconds(path, t, None, meta)), data, meta

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
    missing = [c for c in CHANNELS if c not in found]
    if missing:
        raise InputError(
            path,
            f"columns for {', '.join(CHANNELS)} (aliases such as accel_x, accl_x, ax, gyro_x, gx; missing: "
            f"{', '.join(missing)})",
            "columns " + ", ".join(repr(h) for h in header[:12]) + (" ..." if len(header) > 12 else ""))
    data = np.stack([numeric(found[c][0], header[found[c][0]]) for c in CHANNELS], axis=1)
    meta["columns"] = {c: header[found[c][0]] for c in CHANNELS}
    units = {found[c][1] for c in CHANNELS[:3]} - {None}
    if len(units) == 1:
        meta["accel_unit_header"] = units.pop()
    gunits = {found[c][1] for c in CHANNELS[3:]} - {None}
    if len(gunits) == 1:
        meta["gyro_unit_header"] = gunits.pop()
    if any(found[c][2] for c in CHANNELS[:3]):
        logger.warning("%s: the accelerometer columns hold linear acceleration (gravity removed); the model "
                       "saw raw accelerometer readings with gravity", path)
        meta["gravity_removed"] = True
    t = None
    if time_col is not None:
        j, unit = time_col
        meta["timestamp_column"] = header[j]
        try:
            t_raw = numeric(j, header[j])
        except InputError:
            t_raw = _parse_datetimes(path, cols[j], header[j])
            unit = "s"
        t = _time_seconds(path, t_raw, unit, meta)
    return t, data, meta


def _parse_datetimes(path: Path, cells, name: str) -> np.ndarray:
    try:
        stamps = np.array([c.strip().replace("Z", "") for c in cells], dtype="datetime64[ns]")
    except ValueError:
        raise InputError(path, f"numbers or ISO date-times in the timestamp column {name!r}",
                         f"values such as {cells[0]!r}") from None
    return (stamps - stamps[0]).astype(np.int64) / 1e9


def _time_seconds(label: Any, t: np.ndarray, unit: str | None, meta: dict[str, Any]) -> np.ndarray:
    """Timestamps in seconds; the unit from the header hint or from the median step."""
    if len(t) < MIN_SAMPLES:
        raise InputError(label, f"an IMU recording of at least {MIN_SAMPLES} samples", f"{len(t)} sample(s)")
    if unit not in _UNIT_SCALE:
        steps = np.diff(t)
        steps = steps[steps > 0]
        step = float(np.median(steps)) if steps.size else 0.0
        unit = "s"
        for u, scale in _UNIT_SCALE.items():
            if step > 0 and _RATE_BAND[0] <= 1.0 / (step * scale) <= _RATE_BAND[1]:
                unit = u
                break
        meta["timestamp_unit"] = f"{unit} (from the median step)"
    else:
        meta["timestamp_unit"] = unit
    return (t - t[0]) * _UNIT_SCALE[unit]


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
        return _time_seconds(label, table[:, 0], None, meta), table[:, 1:]
    return None, table


def _read_npy(path: Path, meta: dict[str, Any]) -> tuple[np.ndarray | None, np.ndarray]:
    arr = load_npy(path, EXPECTED)
    t, data = _channels_from_array(path, arr, meta)
    side = path.with_name(path.stem + "_timestamps.npy")
    if t is None and side.is_file():
        ts = load_npy(side, "timestamps for the IMU samples (.npy [N])").astype(np.float64).reshape(-1)
        if len(ts) != len(data):
            raise InputError(side, f"{len(data)} timestamps (one per sample of {path.name})", f"{len(ts)}")
        if not np.isfinite(ts).all():
            raise InputError(side, "finite timestamps", "NaN/Inf values")
        meta["timestamps"] = side.name
        t = _time_seconds(side, ts, None, meta)
    return t, data


# ------------------------------------------------------------------ window

def _check_times(label: Any, t: np.ndarray, data: np.ndarray, meta: dict[str, Any]) -> tuple[np.ndarray, np.ndarray]:
    d = np.diff(t)
    back = np.flatnonzero(d < 0)
    if back.size:
        i = int(back[0])
        raise InputError(label, "timestamps that never go backwards",
                         f"sample {i + 2} at {t[i + 1]:.6g} s after sample {i + 1} at {t[i]:.6g} s "
                         f"({back.size} backward steps)")
    dup = np.flatnonzero(d == 0)
    if dup.size:
        keep = np.ones(len(t), dtype=bool)
        keep[dup + 1] = False
        logger.warning("%s: %d repeated timestamps; those samples are dropped", label, dup.size)
        meta["repeated_timestamps_dropped"] = int(dup.size)
        t, data = t[keep], data[keep]
    return t, data


def _convert_units(label: Any, data: np.ndarray, accel_units: str, gyro_units: str,
                   meta: dict[str, Any], in_window: np.ndarray) -> np.ndarray:
    acc = _unit_word(accel_units) if accel_units != "auto" else "auto"
    if acc not in ("auto", "g", "m/s2"):
        raise InputError(label, 'accel_units "auto", "g" or "m/s2"', repr(accel_units))
    gyr = _unit_word(gyro_units) if gyro_units != "auto" else "auto"
    if gyr not in ("auto", "deg/s", "rad/s"):
        raise InputError(label, 'gyro_units "auto", "deg/s" or "rad/s"', repr(gyro_units))
    how = "given"
    if acc == "auto":
        header = meta.get("accel_unit_header")
        if header in ("g", "m/s2"):
            acc, how = header, "from the header"
        else:
            mag = float(np.median(np.linalg.norm(data[in_window, :3], axis=1)))
            if 0.5 <= mag <= 2.0:
                acc, how = "g", f"detected: median |a| = {mag:.3g}"
            elif 5.0 <= mag <= 20.0:
                acc, how = "m/s2", f"detected: median |a| = {mag:.3g}"
            else:
                acc, how = "m/s2", f"assumed: median |a| = {mag:.3g} fits neither 1 g nor 9.8 m/s^2"
                logger.warning("%s: accelerometer magnitude %.3g fits neither g nor m/s^2; read as m/s^2 "
                               "(set --imu-accel-units to choose)", label, mag)
    meta["accel_units"] = f"{acc} ({how})"
    data = data.copy()
    if acc == "g":
        data[:, :3] *= STANDARD_GRAVITY
    if gyr == "auto":
        gyr = "deg/s" if meta.get("gyro_unit_header") == "deg/s" else "rad/s"
        meta["gyro_units"] = f"{gyr} ({'from the header' if meta.get('gyro_unit_header') else 'assumed'})"
    else:
        meta["gyro_units"] = f"{gyr} (given)"
    if gyr == "deg/s":
        data[:, 3:] *= math.pi / 180.0
    return data


def window_200hz(t: np.ndarray, data: np.ndarray, start: float) -> tuple[np.ndarray, int, int]:
    """[N,6] at times t (s from the first sample) -> ([6,400] float32, grid rate, valid samples).

    Linear interpolation onto a grid at the rounded source rate, polyphase resampling
    to 200 Hz, the window [start, start + 2 s), zeros after the last sample.
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

def preprocess(source: Source, *, rate: float | None = None, start: float = 0.0, accel_units: str = "auto",
               gyro_units: str = "auto", timestamps: np.ndarray | None = None) -> ModalityInput:
    """An IMU recording -> [6,400] float32 (spec section 7, imu).

    rate: sample rate in Hz when the file has no timestamp column (overrides one if given).
    start: seconds after the first sample where the 2 s window begins.
    accel_units / gyro_units: see the module docstring.
    timestamps: seconds, one per sample, for an in-memory array.
    """
    t0 = time.perf_counter()
    label = source_label(source)
    meta: dict[str, Any] = {"source": label}
    start = number_option(label, "start", start) or 0.0
    rate = number_option(label, "rate", rate)
    if start < 0:
        raise InputError(label, "a window start >= 0 seconds", f"start {start}")
    if rate is not None and rate <= 0:
        raise InputError(label, "a positive sample rate in Hz", f"rate {rate}")
    if is_array(source):
        t, data = _channels_from_array(label, source, meta)
        if timestamps is not None:
            ts = np.asarray(timestamps, dtype=np.float64).reshape(-1)
            if len(ts) != len(data) or not np.isfinite(ts).all():
                raise InputError(label, f"{len(data)} finite timestamps (seconds)", f"{len(ts)} values")
            t = ts - ts[0]
            meta["timestamps"] = "given (s)"
    else:
        path = require_file(source, EXPECTED)
        label = str(path)
        meta["source"] = label
        if ext_of(path) == ".npy" or path.read_bytes()[:6] == b"\x93NUMPY":
            meta["format"] = "npy"
            t, data = _read_npy(path, meta)
        else:
            t, data, csv_meta = _read_csv(path)
            meta.update(csv_meta)
    n = len(data)
    if n < MIN_SAMPLES:
        raise InputError(label, f"an IMU recording of at least {MIN_SAMPLES} samples", f"{n} sample(s)")
    if rate is not None:
        if t is not None:
            logger.warning("%s: --imu-rate %g Hz given; the file's timestamps are ignored", label, rate)
        t = np.arange(n, dtype=np.float64) / float(rate)
        meta["timestamps"] = f"from the rate option ({rate:g} Hz)"
    elif t is None:
        raise InputError(label, "a timestamp column, or the sample rate (--imu-rate HZ / rate=)",
                         "neither")
    t, data = _check_times(label, t, data, meta)
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
        logger.warning("%s: %d gaps longer than 10 samples (largest %.3g s) are bridged by interpolation",
                       label, int(big.sum()), float(gaps.max()))
        meta["gaps_bridged"] = int(big.sum())
    with np.errstate(over="ignore", invalid="ignore"):
        data = _convert_units(label, data, accel_units, gyro_units, meta, in_window)
    with np.errstate(over="ignore", invalid="ignore"):
        array, grid_rate, valid = window_200hz(t, data, float(start))
    require_finite_output(label, array, EXPECTED)
    if duration > WINDOW_S + 1e-6:
        logger.warning("%s: the recording lasts %.2f s; the model sees 2 s of it, from %.2f s "
                       "(choose the window with --imu-start)", label, duration, start)
    meta.update(window_s=[round(float(start), 6), round(float(start) + WINDOW_S, 6)],
                resampled_from_hz=grid_rate, padded_samples=N_SAMPLES - valid,
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


SPEC = ModalitySpec(
    name='imu',
    cli_option='--imu',
    description='6-axis IMU recording (CSV or .npy)',
    file_types=('.csv', '.tsv', '.txt', '.npy'),
    input_shape=(6, 400),
    tokenizer_kind='conv1d',
    n_frames=1,
    n_tokens=392,
    preprocess=preprocess,
    dummy_input=dummy_input,
    caption_prompt='Describe the scene.',
)
