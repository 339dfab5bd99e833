"""IMU reader: CSV dialects, units, timestamps, npy layouts, the 200 Hz resampler, bad inputs.

Tolerances: resampled sine frequency within one FFT bin; a band-limited signal
resampled to 200 Hz within 1 % of its peak of the exact values (away from the
edges); content above 100 Hz at least 40 dB down; unit conversions exact
(9.80665, pi/180) to float32 rounding.
"""

from __future__ import annotations

import logging
import math

import numpy as np
import pytest

from _inputs_helpers import EXAMPLES
from onellm.runtime.errors import InputError
from onellm.runtime.modalities import get_modality
from onellm.runtime.modalities import imu as I

SPEC = get_modality("imu")
HEADER = ["time_s", "acc_x", "acc_y", "acc_z", "gyro_x", "gyro_y", "gyro_z"]


def signal(t: np.ndarray) -> np.ndarray:
    """[N,6] smooth test signal (m/s^2, rad/s), band-limited well below 100 Hz."""
    return np.stack([np.sin(2 * np.pi * 1.5 * t), -9.81 + np.cos(2 * np.pi * 2 * t), 0.5 * np.sin(2 * np.pi * 3 * t),
                     0.2 * np.sin(2 * np.pi * 1 * t), 0.1 * np.cos(2 * np.pi * 4 * t), 0.3 * np.sin(2 * np.pi * 0.5 * t)], 1)


def write_csv(path, t, data, header=HEADER, delim=",", decimal=".", t_scale=1.0, fmt="{:.6f}"):
    lines = [delim.join(header)] if header else []
    for ti, row in zip(t, data):
        cells = [fmt.format(ti * t_scale)] + [fmt.format(v) for v in row]
        lines.append(delim.join(c.replace(".", decimal) for c in cells))
    path.write_text("\n".join(lines) + "\n")
    return path


def ideal(start: float = 0.0) -> np.ndarray:
    return signal(start + np.arange(400) / 200.0).T.astype(np.float32)


def check(r) -> None:
    assert r.array.shape == (6, 400) and r.array.dtype == np.float32 and np.isfinite(r.array).all()


# ------------------------------------------------------------------ happy paths

def test_example_walk(caplog) -> None:
    with caplog.at_level(logging.WARNING):
        r = SPEC.preprocess(EXAMPLES / "imu" / "walk.csv")
    check(r)
    assert r.meta["source_rate_hz"] == pytest.approx(100.0) and r.meta["padded_samples"] == 0
    assert "--imu-start" in caplog.text  # 4 s file, 2 s window
    assert r.array[1].mean() == pytest.approx(-9.81, abs=0.3)  # gravity on y, m/s^2


def test_100hz_csv_matches_the_signal_at_200hz(tmp_path) -> None:
    t = np.arange(500) / 100.0
    r = SPEC.preprocess(write_csv(tmp_path / "a.csv", t, signal(t)))
    err = np.abs(r.array - ideal())[:, 10:-10]
    assert err.max() < 0.01 * 10  # 1 % of the largest channel magnitude (about 10 m/s^2)
    assert np.abs(r.array - ideal())[[0, 2, 3, 4, 5], 10:-10].max() < 0.01


def test_ego4d_style_ms_timestamps(tmp_path) -> None:
    t = np.arange(600) / 198.7  # Ego4D rates are near, not at, 200 Hz
    header = ["canonical_timestamp_ms", "accl_x", "accl_y", "accl_z", "gyro_x", "gyro_y", "gyro_z"]
    path = write_csv(tmp_path / "e.csv", t, signal(t), header=header, t_scale=1000.0, fmt="{:.4f}")
    r = SPEC.preprocess(path, method="grid")
    assert r.meta["timestamp_unit"] == "ms"
    assert r.meta["source_rate_hz"] == pytest.approx(198.7, rel=1e-3)
    assert np.abs(r.array - ideal())[:, 10:-10].max() < 0.02
    # The training pipeline's rule takes int(198.7...) = 198 Hz as the rate: resampled 198 -> 200 as upstream did.
    up = SPEC.preprocess(path)
    assert up.meta["resampled_from_hz"] == 198 and up.meta["window_samples"] == [0, 398]


def test_semicolon_and_decimal_comma(tmp_path) -> None:
    t = np.arange(500) / 100.0
    a = SPEC.preprocess(write_csv(tmp_path / "de.csv", t, signal(t), delim=";", decimal=","))
    b = SPEC.preprocess(write_csv(tmp_path / "en.csv", t, signal(t)))
    assert a.meta["decimal"] == "comma" and a.meta["delimiter"] == ";"
    assert np.array_equal(a.array, b.array)
    c = SPEC.preprocess(write_csv(tmp_path / "tab.tsv", t, signal(t), delim="\t", decimal=","))
    assert np.array_equal(c.array, b.array)


def test_irregular_timestamps(tmp_path) -> None:
    rng = np.random.default_rng(0)
    t = np.cumsum(rng.uniform(0.006, 0.014, 500))  # a jittery ~100 Hz logger
    t -= t[0]
    r = SPEC.preprocess(write_csv(tmp_path / "j.csv", t, signal(t)), method="grid")
    assert np.abs(r.array - ideal())[[0, 2, 3, 4, 5], 10:-10].max() < 0.02


def test_accelerometer_in_g(tmp_path) -> None:
    t = np.arange(500) / 100.0
    data = signal(t)
    g = data.copy()
    g[:, :3] /= 9.80665
    ms2 = SPEC.preprocess(write_csv(tmp_path / "ms2.csv", t, data, fmt="{:.9f}"))
    auto = SPEC.preprocess(write_csv(tmp_path / "g.csv", t, g, fmt="{:.9f}"))
    assert auto.meta["accel_units"].startswith("g (detected")
    np.testing.assert_allclose(auto.array, ms2.array, atol=1e-5)
    header = ["time_s", "Acc X (g)", "Acc Y (g)", "Acc Z (g)", "Gyro X (deg/s)", "Gyro Y (deg/s)", "Gyro Z (deg/s)"]
    gd = g.copy()
    gd[:, 3:] *= 180 / math.pi
    hinted = SPEC.preprocess(write_csv(tmp_path / "h.csv", t, gd, header=header, fmt="{:.9f}"))
    assert hinted.meta["accel_units"] == "g (from the header)" and hinted.meta["gyro_units"].startswith("deg/s")
    np.testing.assert_allclose(hinted.array, ms2.array, atol=1e-5)
    forced = SPEC.preprocess(write_csv(tmp_path / "f.csv", t, data), accel_units="g")
    np.testing.assert_allclose(forced.array[:3], ms2.array[:3] * 9.80665, rtol=1e-5, atol=1e-5)


def test_phyphox_style_names_and_no_header(tmp_path) -> None:
    t = np.arange(300) / 100.0
    header = ["Time (s)", "Acceleration x (m/s^2)", "Acceleration y (m/s^2)", "Acceleration z (m/s^2)",
              "Gyroscope x (rad/s)", "Gyroscope y (rad/s)", "Gyroscope z (rad/s)"]
    a = SPEC.preprocess(write_csv(tmp_path / "p.csv", t, signal(t), header=header))
    b = SPEC.preprocess(write_csv(tmp_path / "n.csv", t, signal(t), header=None))
    assert a.meta["accel_units"] == "m/s2 (from the header)"
    assert np.array_equal(a.array, b.array)


@pytest.mark.parametrize("names", [
    ["ax", "ay", "az", "gx", "gy", "gz"],
    ["accel_x", "accel_y", "accel_z", "gyr_x", "gyr_y", "gyr_z"],
    ["x_acc", "y_acc", "z_acc", "wx", "wy", "wz"],
    ["AccelerometerX", "AccelerometerY", "AccelerometerZ", "rotationRate.x", "rotationRate.y", "rotationRate.z"],
])
def test_channel_aliases(names) -> None:
    assert [I.classify_column(n)[0] for n in names] == list(I.CHANNELS)


def test_extra_columns_and_iso_datetimes(tmp_path) -> None:
    t = np.arange(300) / 100.0
    base = np.datetime64("2024-05-01T10:00:00.000")
    lines = ["timestamp,mag_x,acc_x,acc_y,acc_z,gyro_x,gyro_y,gyro_z"]
    for ti, row in zip(t, signal(t)):
        stamp = str(base + np.timedelta64(int(round(ti * 1000)), "ms")).replace("T", " ")
        lines.append(",".join([stamp, "12.5"] + [f"{v:.6f}" for v in row]))
    (tmp_path / "iso.csv").write_text("\n".join(lines) + "\n")
    r = SPEC.preprocess(tmp_path / "iso.csv")
    ref = SPEC.preprocess(write_csv(tmp_path / "ref.csv", t, signal(t)))
    np.testing.assert_allclose(r.array, ref.array, atol=1e-6)


def test_npy_layouts(tmp_path) -> None:
    t = np.arange(500) / 100.0
    data = signal(t)
    ref = SPEC.preprocess(write_csv(tmp_path / "ref.csv", t, data, fmt="{:.9f}"))
    np.save(tmp_path / "n6.npy", data.astype(np.float32))
    a = SPEC.preprocess(tmp_path / "n6.npy", rate=100)
    np.save(tmp_path / "six.npy", data.T.astype(np.float32))
    np.save(tmp_path / "six_timestamps.npy", t * 1000.0)  # Ego4D: a sidecar in ms
    b = SPEC.preprocess(tmp_path / "six.npy")
    assert b.meta["timestamps"] == "six_timestamps.npy" and b.meta["timestamp_unit"].startswith("ms")
    np.save(tmp_path / "seven.npy", np.concatenate([t[:, None], data], 1))
    c = SPEC.preprocess(tmp_path / "seven.npy")
    for r in (a, b, c):
        np.testing.assert_allclose(r.array, ref.array, atol=1e-5)
    m = SPEC.preprocess(data, timestamps=t)
    np.testing.assert_allclose(m.array, ref.array, atol=1e-5)


def test_start_option_and_padding(tmp_path) -> None:
    t = np.arange(500) / 100.0  # 5 s
    path = write_csv(tmp_path / "a.csv", t, signal(t))
    r = SPEC.preprocess(path, start=1.5)
    assert r.meta["window_s"] == [1.5, 3.5] and r.meta["window_samples"] == [150, 350]
    assert np.abs(r.array - ideal(1.5))[[0, 2, 3, 4, 5], 20:-20].max() < 0.01
    tail = SPEC.preprocess(path, start=4.0)  # 1 s of data left (100 samples -> 200 at 200 Hz): zeros after
    assert tail.meta["padded_samples"] == 200
    assert np.all(tail.array[:, 200:] == 0)
    assert np.abs(tail.array[:, 20:180] - ideal(4.0)[:, 20:180])[[0, 2]].max() < 0.02
    short = SPEC.preprocess(write_csv(tmp_path / "s.csv", t[:50], signal(t[:50])))
    assert short.meta["padded_samples"] == 400 - 100
    grid = SPEC.preprocess(path, start=4.0, method="grid")  # the grid method pads from the last sample's time
    assert grid.meta["padded_samples"] == 201
    assert np.all(grid.array[:, 199:] == 0) and np.abs(grid.array[:, :190] - ideal(4.0)[:, :190])[[0, 2]].max() < 0.02


# ------------------------------------------------------------------ resampler properties

def test_resampled_sine_frequency_and_rate() -> None:
    for src, f in ((100, 7.0), (50, 11.0), (400, 31.0), (1000, 60.0)):
        t = np.arange(int(src * 2.5)) / src
        data = np.zeros((len(t), 6))
        data[:, 3] = np.sin(2 * np.pi * f * t)
        data[:, 1] = 9.81
        out = SPEC.preprocess(data, rate=src).array[3]
        spec = np.abs(np.fft.rfft(out * np.hanning(400)))
        peak = np.argmax(spec) * 200 / 400
        assert abs(peak - f) <= 200 / 400, (src, peak)


def test_anti_aliasing() -> None:
    src = 1000
    t = np.arange(src * 3) / src
    data = np.zeros((len(t), 6))
    data[:, 1] = 9.81
    data[:, 3] = np.sin(2 * np.pi * 300 * t)  # above the new Nyquist (100 Hz): must vanish, not alias
    out = SPEC.preprocess(data, rate=src).array[3]
    assert np.abs(out[20:-20]).max() < 10 ** (-40 / 20)


def test_200hz_input_passes_through() -> None:
    t = np.arange(450) / 200.0
    data = signal(t)
    out = SPEC.preprocess(data, rate=200).array
    np.testing.assert_allclose(out, data[:400].T, atol=1e-5)


# ------------------------------------------------------------------ bad inputs

def test_missing_columns(tmp_path) -> None:
    p = tmp_path / "m.csv"
    p.write_text("time,acc_x,acc_y,acc_z,temp\n" + "\n".join(f"{i/100},0,0,9.8,20" for i in range(50)))
    with pytest.raises(InputError, match="missing: gyro_x, gyro_y, gyro_z") as e:
        SPEC.preprocess(p)
    assert "'temp'" in str(e.value)


def test_non_monotonic_timestamps(tmp_path) -> None:
    t = np.arange(100) / 100.0
    t[50] = 0.2
    with pytest.raises(InputError, match="never go backwards.*sample 51 at 0.2 s"):
        SPEC.preprocess(write_csv(tmp_path / "b.csv", t, signal(t)))


def test_nan_and_empty_cells(tmp_path) -> None:
    t = np.arange(100) / 100.0
    p = write_csv(tmp_path / "n.csv", t, signal(t))
    text = p.read_text().splitlines()
    text[10] = text[10].rsplit(",", 1)[0] + ",nan"
    p.write_text("\n".join(text))
    with pytest.raises(InputError, match="finite numbers in column gyro_z.*data row 10"):
        SPEC.preprocess(p)
    text[10] = text[10].rsplit(",", 1)[0] + ","
    p.write_text("\n".join(text))
    with pytest.raises(InputError, match="empty cell"):
        SPEC.preprocess(p)


def test_too_few_samples(tmp_path) -> None:
    t = np.arange(9) / 100.0
    with pytest.raises(InputError, match="at least 10 samples, found 9"):
        SPEC.preprocess(write_csv(tmp_path / "f.csv", t, signal(t)))


def test_wrong_channel_count(tmp_path) -> None:
    np.save(tmp_path / "five.npy", np.zeros((5, 100)))
    with pytest.raises(InputError, match=r"6 IMU channels.*shape \[5, 100\]"):
        SPEC.preprocess(tmp_path / "five.npy", rate=100)
    p = tmp_path / "five.csv"
    p.write_text("\n".join("1,2,3,4,5" for _ in range(20)))
    with pytest.raises(InputError, match="5 unnamed columns"):
        SPEC.preprocess(p)


def test_no_timestamps_and_no_rate(tmp_path) -> None:
    np.save(tmp_path / "x.npy", np.zeros((100, 6)))
    with pytest.raises(InputError, match="--imu-rate"):
        SPEC.preprocess(tmp_path / "x.npy")


def test_start_past_the_end_and_bad_options(tmp_path) -> None:
    t = np.arange(300) / 100.0
    p = write_csv(tmp_path / "a.csv", t, signal(t))
    with pytest.raises(InputError, match="before the end of the recording"):
        SPEC.preprocess(p, start=10)
    with pytest.raises(InputError, match="at least 10 samples in the 2 s window"):
        SPEC.preprocess(p, start=2.95)
    with pytest.raises(InputError, match="accel_units"):
        SPEC.preprocess(p, accel_units="furlongs")


@pytest.mark.parametrize("payload,found", [
    (b"", "empty"),
    (b"# only a comment\n\n", "no data lines"),
    (b"time,acc_x,acc_y,acc_z,gyro_x,gyro_y,gyro_z\n", "header line and no data"),
    (b"\x89PNG\r\n\x1a\n\x00\x00\x00", "PNG"),
    (b"a,b\n1,2,3\n", "3 fields on data row 1, 2 in the header"),
])
def test_not_an_imu_file(tmp_path, payload, found) -> None:
    p = tmp_path / "x.csv"
    p.write_bytes(payload)
    with pytest.raises(InputError, match=found):
        SPEC.preprocess(p, rate=100)


# ------------------------------------------------------------------ against the training pipeline itself

FIXTURES = EXAMPLES.parent / "tests" / "fixtures" / "upstream"


@pytest.mark.parametrize("case,path", [
    ("walk100_start0", EXAMPLES / "imu" / "walk.csv"),
    ("walk100_start1.3", EXAMPLES / "imu" / "walk.csv"),
    ("walk50_start0", FIXTURES / "walk_50hz.csv"),
    ("walk200_start0.5", FIXTURES / "walk_200hz.csv"),
])
def test_matches_upstream_torchaudio_fixtures(case, path) -> None:
    """The default reader gives upstream's IMU input (made with torchaudio by tests/fixtures/
    make_torchaudio_fixtures.py) to 1e-5 of the signal's scale; the grid method does not."""
    z = np.load(FIXTURES / f"imu_{case}.npz")
    r = SPEC.preprocess(path, start=float(z["start_s"]))
    assert r.meta["resampled_from_hz"] == int(z["src_rate"])
    assert r.meta["window_samples"][1] - r.meta["window_samples"][0] == int(z["n_window"])
    scale = float(np.abs(z["imu"]).max())
    assert np.abs(r.array - z["imu"]).max() <= 1e-5 * scale
    if int(z["src_rate"]) != 200:
        grid = SPEC.preprocess(path, start=float(z["start_s"]), method="grid")
        assert np.abs(grid.array - z["imu"]).max() > 0.1 * scale
