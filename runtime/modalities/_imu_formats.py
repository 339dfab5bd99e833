"""The IMU export layouts onellm recognises, as data: header signature -> channels, units, time.

Each `Layout` names the header columns that identify it (case, quotes, spaces and a
leading `#` ignored; a unit in brackets is part of the name only where the exporter
always writes it), which columns hold which channel, the units the exporter writes,
and what sensor the file holds. `recognise(header)` returns the first layout whose
signature is a subset of the header. A file that matches none falls back to the
column-alias rules of `imu.classify_column`.

Sensor Logger writes the same header (`time,seconds_elapsed,z,y,x`) for every
one-sensor file; which sensor a file holds is the name the app gives it
(`Accelerometer.csv`, `TotalAcceleration.csv`, `Gyroscope.csv`, `Gravity.csv`), so
for that layout alone the role comes from the file's stem (`SENSOR_LOGGER_ROLES`).
"""

from __future__ import annotations

import dataclasses
import re

# Sensor kinds a file can hold.
IMU6 = "imu6"  # accelerometer (with gravity) and gyroscope
IMU6_USER = "imu6_user"  # both, but the accelerometer columns say gravity was removed (linear_acceleration_x ...)
ACCEL = "accel"  # accelerometer including gravity
ACCEL_USER = "accel_user"  # gravity removed (linear / user acceleration)
GRAVITY = "gravity"  # the gravity vector alone
GYRO = "gyro"  # gyroscope alone
SENSOR_WORDS = {ACCEL: "accelerometer (with gravity)", ACCEL_USER: "accelerometer without gravity (user/linear "
                "acceleration)", GRAVITY: "gravity vector", GYRO: "gyroscope", IMU6: "accelerometer and gyroscope"}


@dataclasses.dataclass(frozen=True)
class Layout:
    """One exporter's CSV layout."""

    name: str  # shown in the input facts ("format")
    signature: tuple[str, ...]  # normalised header names that must all be present
    columns: tuple[str, ...]  # normalised names of the channels read, x y z (accelerometer then gyroscope)
    kind: str  # IMU6, ACCEL, ACCEL_USER, GRAVITY, GYRO (or "by_stem": Sensor Logger)
    accel_units: str | None  # "g", "m/s2", or None: decide from the magnitude
    gyro_units: str | None  # "rad/s", "deg/s", or None: deg/s when the accelerometer is in g (Arduino libraries)
    time_column: str | None  # normalised name of the timestamp column
    time_unit: str | None  # "s", "ms", "us", "ns", or None: from the header bracket or the median step
    note: str = ""  # what the reader does differently for this layout, for the input facts


def _xyz(prefix: str, suffix: str = "") -> tuple[str, str, str]:
    return tuple(f"{prefix}{a}{suffix}" for a in "xyz")  # type: ignore[return-value]


LAYOUTS: tuple[Layout, ...] = (
    Layout("Physics Toolbox Sensor Suite (multi record)",
           ("time", *_xyz("gf"), *_xyz("w")), (*_xyz("gf"), *_xyz("w")), IMU6, "g", "rad/s", "time", None,
           "gF* (g-force with gravity, g) read as the accelerometer; a* (linear acceleration, gravity "
           "removed) ignored"),
    Layout("EuRoC/ASL/Kalibr/TUM-VI imu0/data.csv",
           ("timestamp", *_xyz("w_rs_s_"), *_xyz("a_rs_s_")), (*_xyz("a_rs_s_"), *_xyz("w_rs_s_")), IMU6,
           "m/s2", "rad/s", "timestamp", "ns", "gyroscope columns come first in the file"),
    Layout("Kalibr imu.csv", ("timestamp", *_xyz("omega_"), *_xyz("alpha_")), (*_xyz("alpha_"), *_xyz("omega_")),
           IMU6, "m/s2", "rad/s", "timestamp", "ns", "omega = gyroscope, alpha = accelerometer"),
    Layout("Arduino/microcontroller log", (*_xyz("a"), *_xyz("g")), (*_xyz("a"), *_xyz("g")), IMU6, None, None,
           None, None, "units from the magnitude: g with deg/s (Arduino IMU libraries) or m/s^2 with rad/s"),
    Layout("Sensor Logger (one sensor per file)", ("time", "seconds_elapsed", "x", "y", "z"), ("x", "y", "z"),
           "by_stem", "m/s2", "rad/s", "time", "ns"),
    Layout("phyphox (linear acceleration)", ("time (s)", *_xyz("linear acceleration ", " (m/s^2)")),
           _xyz("linear acceleration ", " (m/s^2)"), ACCEL_USER, "m/s2", None, "time (s)", "s"),
    Layout("phyphox (acceleration with g)", ("time (s)", *_xyz("acceleration ", " (m/s^2)")),
           _xyz("acceleration ", " (m/s^2)"), ACCEL, "m/s2", None, "time (s)", "s"),
    Layout("phyphox (gyroscope)", ("time (s)", *_xyz("gyroscope ", " (rad/s)")), _xyz("gyroscope ", " (rad/s)"),
           GYRO, None, "rad/s", "time (s)", "s"),
)

# Sensor Logger's file stems (lower case) -> the sensor the file holds.
SENSOR_LOGGER_ROLES = {
    "accelerometer": ACCEL_USER,  # user acceleration: the app removes gravity
    "totalacceleration": ACCEL,
    "accelerometeruncalibrated": ACCEL,
    "gyroscope": GYRO,
    "gyroscopeuncalibrated": GYRO,
    "gravity": GRAVITY,
}
# The file name to ask for, per missing sensor, in messages.
SENSOR_LOGGER_FILES = {ACCEL: "TotalAcceleration.csv", ACCEL_USER: "Accelerometer.csv", GYRO: "Gyroscope.csv",
                       GRAVITY: "Gravity.csv"}

# phyphox's experiments, named in messages.
PHYPHOX_EXPORTS = {ACCEL: 'the phyphox "Acceleration with g" export', ACCEL_USER: 'the phyphox "Linear '
                   'Acceleration" export', GYRO: 'the phyphox "Gyroscope" export'}

_BRACKET = re.compile(r"\s*\[([^\]]*)\]\s*$")


def normalise(name: str) -> str:
    """'"#Timestamp  [ns]"' -> 'timestamp [ns]': quotes, '#', case and runs of spaces dropped."""
    n = name.strip().strip('"').strip("'").strip()
    n = n.lstrip("#").strip()
    return re.sub(r"\s+", " ", n.lower())


def base_and_bracket(name: str) -> tuple[str, str | None]:
    """'w_rs_s_x [rad s^-1]' -> ('w_rs_s_x', 'rad s^-1'); brackets in [] only (EuRoC style)."""
    m = _BRACKET.search(name)
    return (name[:m.start()], m.group(1).strip()) if m else (name, None)


@dataclasses.dataclass(frozen=True)
class Match:
    layout: Layout
    indices: tuple[int, ...]  # header index of each entry of layout.columns
    time_index: int | None
    time_bracket: str | None  # the unit written in the time column's [] bracket, if any


def recognise(header: list[str]) -> Match | None:
    """The first layout whose signature the header contains, with column indices."""
    names: dict[str, int] = {}
    brackets: dict[str, str | None] = {}
    for j, raw in enumerate(header):
        n = normalise(raw)
        base, br = base_and_bracket(n)
        for key in (n, base):
            if key and key not in names:
                names[key] = j
                brackets[key] = br
    for layout in LAYOUTS:
        if all(s in names for s in layout.signature):
            t = names.get(layout.time_column) if layout.time_column else None
            return Match(layout, tuple(names[c] for c in layout.columns), t,
                         brackets.get(layout.time_column) if layout.time_column else None)
    return None


_RATE_COMMENT = re.compile(
    r"(?:data[_ ]?rate|sampl(?:e|ing)[_ ]?(?:rate|frequency|freq)|odr|output[_ ]data[_ ]rate|rate|frequency|freq|fs)"
    r"\s*[:=]?\s*([0-9]+(?:\.[0-9]+)?)\s*(k?hz)\b", re.IGNORECASE)


def rate_from_comments(comments: list[str]) -> tuple[float, str] | None:
    """(Hz, the comment line) from a line such as '# data_rate = 2000 Hz' or '# sample rate: 100 Hz'."""
    for line in comments:
        m = _RATE_COMMENT.search(line)
        if m:
            hz = float(m.group(1)) * (1000.0 if m.group(2).lower() == "khz" else 1.0)
            if hz > 0:
                return hz, line.strip()
    return None
