"""IMU exporters' real layouts, units and plausibility, and the training pipeline's window rule.

Each test writes a synthetic file in the exporter's exact layout (quirks included) holding
a device lying flat (accelerometer (0, 0, 1 g) = (0, 0, 9.80665) m/s^2) while turning
at a known constant rate on one gyroscope axis, and checks the [6,400] tensor by value.
Files at 200 Hz are not resampled, so the values are exact to float32 rounding.
"""

from __future__ import annotations

import json
import logging
import math
import zipfile

import numpy as np
import pytest

from onellm.runtime.errors import InputError
from onellm.runtime.modalities import get_modality
from onellm.runtime.modalities import _imu_formats as F
from onellm.runtime.resample import sinc_resample

SPEC = get_modality("imu")
G = 9.80665
RATE = 200
N = 500  # 2.5 s at 200 Hz
EPOCH_NS = 1_403_636_579_758_555_392  # a EuRoC-style absolute ns timestamp


def expect(r, acc, gyro, atol=1e-5) -> None:
    """Every one of the 400 samples equals the given constant accelerometer and gyroscope vectors."""
    assert r.array.shape == (6, 400) and r.array.dtype == np.float32
    want = np.array(list(acc) + list(gyro), dtype=np.float32)[:, None]
    np.testing.assert_allclose(r.array, np.broadcast_to(want, (6, 400)), atol=atol)


def rows(n: int = N, rate: int = RATE):
    return [i / rate for i in range(n)]


# ------------------------------------------------------------------ whole-IMU layouts

def test_physics_toolbox_multi_record_uses_gforce_not_linear(tmp_path) -> None:
    # gF* with gravity (g), a* gravity-free (m/s^2, must be ignored), w* rad/s; a trailing comma on every line.
    lines = ["time,gFx,gFy,gFz,ax,ay,az,wx,wy,wz,"]
    for t in rows():
        lines.append(f"{t:.3f},0.000,0.000,1.000,0.312,-0.205,0.118,0.000,0.000,0.500,")
    p = tmp_path / "physics.csv"
    p.write_text("\n".join(lines) + "\n")
    r = SPEC.preprocess(p)
    expect(r, (0, 0, G), (0, 0, 0.5))
    assert r.meta["format"].startswith("Physics Toolbox")
    assert r.meta["columns"] == {"acc_x": "gFx", "acc_y": "gFy", "acc_z": "gFz", "gyro_x": "wx", "gyro_y": "wy",
                                 "gyro_z": "wz"}
    assert r.meta["columns_ignored"] == ["ax", "ay", "az"]
    assert r.meta["accel_units"].startswith("g (stated by the Physics Toolbox")


def test_physics_toolbox_clock_times_and_header_without_trailing_comma(tmp_path) -> None:
    lines = ["time,gFx,gFy,gFz,ax,ay,az,wx,wy,wz,Bx,By,Bz"]
    for i in range(N):
        ms = 86399 * 1000 + 5 * i  # from 23:59:59.000
        s = ms // 1000 % 86400
        stamp = f"{s // 3600:02d}:{s // 60 % 60:02d}:{s % 60:02d}:{ms % 1000:03d}"
        lines.append(f"{stamp},0,-1.0,0,0.1,0.1,0.1,0.5,0,0,20,30,40,")
    p = tmp_path / "clock.csv"
    p.write_text("\n".join(lines) + "\n")
    r = SPEC.preprocess(p)  # the clock passes midnight after 1 s
    expect(r, (0, -G, 0), (0.5, 0, 0))
    assert r.meta["resampled_from_hz"] == 200 and r.meta["columns_ignored"] == ["ax", "ay", "az", "Bx", "By", "Bz"]


def test_euroc_hash_header_gyro_first_ns(tmp_path) -> None:
    lines = ["#timestamp [ns],w_RS_S_x [rad s^-1],w_RS_S_y [rad s^-1],w_RS_S_z [rad s^-1],"
             "a_RS_S_x [m s^-2],a_RS_S_y [m s^-2],a_RS_S_z [m s^-2]"]
    for i in range(N):
        lines.append(f"{EPOCH_NS + 5_000_000 * i},0.5,0,0,0,0,{G}")
    p = tmp_path / "data.csv"
    p.write_text("\n".join(lines) + "\n")
    r = SPEC.preprocess(p)
    expect(r, (0, 0, G), (0.5, 0, 0))  # read as headerless it would swap gyroscope and accelerometer
    assert r.meta["format"].startswith("EuRoC") and r.meta["timestamp_unit"] == "ns"
    assert r.meta["header"] == "the '#' line above the data"
    assert r.meta["columns"]["acc_x"] == "a_RS_S_x [m s^-2]" and r.meta["columns"]["gyro_x"] == "w_RS_S_x [rad s^-1]"


def test_kalibr_omega_alpha(tmp_path) -> None:
    lines = ["timestamp,omega_x,omega_y,omega_z,alpha_x,alpha_y,alpha_z"]
    lines += [f"{EPOCH_NS + 5_000_000 * i},0,0.25,0,0,{G},0" for i in range(N)]
    p = tmp_path / "imu.csv"
    p.write_text("\n".join(lines) + "\n")
    expect(SPEC.preprocess(p), (0, G, 0), (0, 0.25, 0))


def test_arduino_g_and_dps_with_label_columns_and_rate_comment(tmp_path) -> None:
    dps = 0.5 * 180 / math.pi
    lines = ["# LSM9DS1 log", "# sample rate: 200 Hz", "ax,ay,az,gx,gy,gz,label,subject"]
    lines += [f"0.000,0.000,1.000,0.000,{dps:.6f},0.000,walking,s01" for _ in range(N)]
    p = tmp_path / "log.txt"
    p.write_text("\n".join(lines) + "\n")
    r = SPEC.preprocess(p)
    expect(r, (0, 0, G), (0, 0.5, 0))
    assert r.meta["format"].startswith("Arduino") and r.meta["label_columns_ignored"] == ["label", "subject"]
    assert r.meta["rate_from"] == "the comment line '# sample rate: 200 Hz'"
    assert r.meta["gyro_units"].startswith("deg/s (the accelerometer is in g")
    # m/s^2 and rad/s in the same layout: the magnitude says m/s^2, so the gyroscope stays rad/s.
    lines = ["# data_rate = 2000 Hz", "ax,ay,az,gx,gy,gz"] + ["0,0,9.80665,0,0.5,0" for _ in range(5000)]
    q = tmp_path / "si.csv"
    q.write_text("\n".join(lines) + "\n")
    s = SPEC.preprocess(q)
    assert s.meta["resampled_from_hz"] == 2000 and s.meta["gyro_units"] == "rad/s (assumed)"
    np.testing.assert_allclose(s.array[:, 50:350], np.broadcast_to(
        np.array([0, 0, G, 0, 0.5, 0], np.float32)[:, None], (6, 300)), rtol=2e-3, atol=2e-3)


def test_headerless_android_ns_log(tmp_path) -> None:
    lines = [f"{EPOCH_NS + 5_000_000 * i} 0 {G} 0 0 0 0.5" for i in range(N)]
    p = tmp_path / "android.txt"
    p.write_text("\n".join(lines) + "\n")
    r = SPEC.preprocess(p)
    expect(r, (0, G, 0), (0, 0, 0.5))
    assert r.meta["timestamp_unit"].startswith("ns")


def test_rate_comment_is_not_used_when_there_are_timestamps(tmp_path) -> None:
    lines = ["# sample rate: 50 Hz", "t,acc_x,acc_y,acc_z,gyro_x,gyro_y,gyro_z"]
    lines += [f"{t:.4f},0,0,{G},0.5,0,0" for t in rows()]
    p = tmp_path / "c.csv"
    p.write_text("\n".join(lines) + "\n")
    r = SPEC.preprocess(p)
    assert r.meta["rate_from"] == "the timestamps" and r.meta["rate_comment_ignored"] == "# sample rate: 50 Hz"
    assert r.meta["resampled_from_hz"] == 200


@pytest.mark.parametrize("line,hz", [("# data_rate = 2000 Hz", 2000.0), ("# sample rate: 100 Hz", 100.0),
                                     ("#ODR: 1.6 kHz", 1600.0), ("# sampling frequency=52Hz", 52.0),
                                     ("# recorded on a phone", None)])
def test_rate_comment_forms(line, hz) -> None:
    got = F.rate_from_comments([line])
    assert (got[0] if got else None) == hz


# ------------------------------------------------------------------ one sensor per file

def sensor_logger(folder, names=("TotalAcceleration", "Accelerometer", "Gravity", "Gyroscope"), n=N,
                  gyro_offset_ns=2_500_000):
    """Sensor Logger's export: time (ns), seconds_elapsed, then z, y, x (that order)."""
    folder.mkdir(exist_ok=True)
    values = {"TotalAcceleration": (0, 0, G), "Accelerometer": (0.02, -0.01, 0.03), "Gravity": (-0.02, 0.01, G - 0.03),
              "Gyroscope": (0.5, 0, 0), "Magnetometer": (20, 30, 40)}
    for name in names:
        x, y, z = values[name]
        off = gyro_offset_ns if name == "Gyroscope" else 0
        lines = ["time,seconds_elapsed,z,y,x"]
        lines += [f"{EPOCH_NS + off + 5_000_000 * i},{(off + 5_000_000 * i) / 1e9:.6f},{z},{y},{x}" for i in range(n)]
        (folder / f"{name}.csv").write_text("\n".join(lines) + "\n")
    return folder


def test_sensor_logger_folder_zip_and_two_files(tmp_path) -> None:
    d = sensor_logger(tmp_path / "export", ("TotalAcceleration", "Gyroscope", "Magnetometer"))
    r = SPEC.preprocess(d)
    expect(r, (0, 0, G), (0.5, 0, 0))
    assert r.meta["format"].startswith("Sensor Logger") and "interpolated onto the accelerometer" in r.meta["aligned"]
    assert r.meta["files"]["gyroscope"].endswith("Gyroscope.csv")
    assert any(s.startswith("Magnetometer.csv") for s in r.meta["files_skipped"])
    z = tmp_path / "export.zip"
    with zipfile.ZipFile(z, "w") as zf:
        for f in sorted(d.iterdir()):
            zf.write(f, f"export/{f.name}")
    np.testing.assert_array_equal(SPEC.preprocess(z).array, r.array)
    two = SPEC.preprocess([d / "TotalAcceleration.csv", d / "Gyroscope.csv"])
    np.testing.assert_array_equal(two.array, r.array)
    json.dumps(two.meta)  # the --json input facts
    other = tmp_path / "other"
    other.mkdir()
    (other / "Location.csv").write_text("time,latitude\n1,2\n")
    with pytest.raises(InputError, match="a directory with 1 CSV files, none of them IMU data: Location.csv"):
        SPEC.preprocess(other)


def test_sensor_logger_user_acceleration_gets_gravity_back(tmp_path) -> None:
    d = sensor_logger(tmp_path / "e", ("Accelerometer", "Gravity", "Gyroscope"))
    r = SPEC.preprocess(d)
    expect(r, (0, 0, G), (0.5, 0, 0))
    assert r.meta["gravity"].startswith("added back from") and r.meta["gravity"].endswith("Gravity.csv")


def test_sensor_logger_user_acceleration_without_gravity_is_refused(tmp_path) -> None:
    d = sensor_logger(tmp_path / "e", ("Accelerometer", "Gyroscope"))
    with pytest.raises(InputError, match="gravity removed.*pass TotalAcceleration.csv instead, or add Gravity.csv"):
        SPEC.preprocess(d)
    with pytest.raises(InputError, match="gravity removed"):
        SPEC.preprocess([d / "Accelerometer.csv", d / "Gyroscope.csv"])


def test_one_sensor_file_names_the_missing_one(tmp_path) -> None:
    d = sensor_logger(tmp_path / "e", ("TotalAcceleration", "Gyroscope"))
    with pytest.raises(InputError, match=r"one sensor \(accelerometer \(with gravity\)\).*--imu Gyroscope.csv"):
        SPEC.preprocess(d / "TotalAcceleration.csv")
    with pytest.raises(InputError, match=r"one sensor \(gyroscope\).*--imu TotalAcceleration.csv"):
        SPEC.preprocess(d / "Gyroscope.csv")
    renamed = tmp_path / "acc.csv"
    renamed.write_bytes((d / "Gyroscope.csv").read_bytes())
    with pytest.raises(InputError, match="Sensor Logger file named as the app names it.*'acc'"):
        SPEC.preprocess([renamed, d / "Gyroscope.csv"])


def test_sensor_logger_streams_that_do_not_overlap(tmp_path) -> None:
    d = sensor_logger(tmp_path / "e", ("TotalAcceleration", "Gyroscope"), gyro_offset_ns=10 ** 10)
    with pytest.raises(InputError, match="recorded at the same time"):
        SPEC.preprocess(d)


def phyphox(path, names: list[str], value, extra: str = ""):
    head = ['"Time (s)"'] + [f'"{n}"' for n in names] + ([f'"{extra}"'] if extra else [])
    lines = [",".join(head)]
    for i in range(N):
        cells = [f"{i / RATE:.9E}"] + [f"{v:.9E}" for v in value] + ([f"{np.linalg.norm(value):.9E}"] if extra else [])
        lines.append(",".join(cells))
    path.write_text("\n".join(lines) + "\n")
    return path


def test_phyphox_acceleration_with_g_and_gyroscope(tmp_path) -> None:
    acc = phyphox(tmp_path / "Raw Data.csv", [f"Acceleration {a} (m/s^2)" for a in "xyz"], (0, 0, G),
                  "Absolute acceleration (m/s^2)")
    gyr = phyphox(tmp_path / "Gyro.csv", [f"Gyroscope {a} (rad/s)" for a in "xyz"], (0, 0, 0.5),
                  "Absolute (rad/s)")
    r = SPEC.preprocess([gyr, acc])  # any order
    expect(r, (0, 0, G), (0, 0, 0.5))
    assert r.meta["files"] == {"accelerometer (with gravity)": str(acc), "gyroscope": str(gyr)}
    lin = phyphox(tmp_path / "Linear.csv", [f"Linear Acceleration {a} (m/s^2)" for a in "xyz"], (0, 0, 0.1))
    with pytest.raises(InputError, match='gravity removed.*pass the phyphox "Acceleration with g" export instead$'):
        SPEC.preprocess([lin, gyr])
    with pytest.raises(InputError, match="one sensor"):
        SPEC.preprocess(acc)


def test_generic_single_sensor_file(tmp_path) -> None:
    p = tmp_path / "a.csv"
    p.write_text("time,acc_x,acc_y,acc_z\n" + "\n".join(f"{t},0,0,9.8" for t in rows()))
    with pytest.raises(InputError, match="holds one sensor, pass the gyroscope file too"):
        SPEC.preprocess(p)


# ------------------------------------------------------------------ units and plausibility

def generic(path, acc, gyro, header="t,acc_x,acc_y,acc_z,gyro_x,gyro_y,gyro_z"):
    lines = [header] + [f"{t:.4f}," + ",".join(f"{v:.6f}" for v in (*acc(t), *gyro(t))) for t in rows()]
    path.write_text("\n".join(lines) + "\n")
    return path


def test_gyroscope_above_35_rad_s_is_deg_s(tmp_path, caplog) -> None:
    p = generic(tmp_path / "d.csv", lambda t: (0, 0, G), lambda t: (0, 0, 90 * math.sin(2 * math.pi * t)))
    with caplog.at_level(logging.WARNING):
        r = SPEC.preprocess(p)
    assert r.meta["gyro_units"].startswith("deg/s (concluded") and "--gyro-units" in caplog.text
    want = np.radians(90 * np.sin(2 * np.pi * np.arange(400) / RATE))
    np.testing.assert_allclose(r.array[5], want, atol=1e-4)
    forced = SPEC.preprocess(p, gyro_units="rad/s")
    assert forced.meta["gyro_units"] == "rad/s (given (--gyro-units))"
    np.testing.assert_allclose(forced.array[5], np.degrees(want), atol=1e-3)
    with pytest.raises(InputError, match="gyro_units"):
        SPEC.preprocess(p, gyro_units="rpm")


def test_gravity_free_accelerometer_is_flagged_loudly(tmp_path, caplog) -> None:
    p = generic(tmp_path / "lin.csv", lambda t: (0.3 * math.sin(9 * t), 0.2, 0.1 * math.cos(7 * t)),
                lambda t: (0, 0, 0.5))
    with caplog.at_level(logging.WARNING):
        r = SPEC.preprocess(p)
    assert r.meta["gravity_check"].startswith("failed") and "NO GRAVITY" in caplog.text
    assert "--accel-units" in caplog.text and "--imu-accel-units" not in caplog.text


def test_magnitude_fitting_neither_unit_is_reported_with_statistics(tmp_path, caplog) -> None:
    p = generic(tmp_path / "odd.csv", lambda t: (0, 0, 45.0), lambda t: (0, 0, 0))
    with caplog.at_level(logging.WARNING):
        r = SPEC.preprocess(p)
    assert r.meta["gravity_check"].startswith("doubtful") and "z mean 45" in r.meta["gravity_check"]
    assert "fits neither g nor m/s^2" in caplog.text and "--accel-units" in caplog.text


def test_units_from_the_header(tmp_path) -> None:
    header = "Time (s),Accelerometer X (g),Accelerometer Y (g),Accelerometer Z (g),Gyroscope X (deg/s)," \
             "Gyroscope Y (deg/s),Gyroscope Z (deg/s)"
    p = generic(tmp_path / "xio.csv", lambda t: (0, 0, 1), lambda t: (0, 0, 0.5 * 180 / math.pi), header)
    r = SPEC.preprocess(p)
    expect(r, (0, 0, G), (0, 0, 0.5))
    assert r.meta["accel_units"] == "g (from the header)" and r.meta["gyro_units"] == "deg/s (from the header)"


# ------------------------------------------------------------------ the training pipeline's window rule

def test_window_is_cut_first_then_resampled_alone(tmp_path) -> None:
    rng = np.random.default_rng(1)
    t = np.arange(500) / 100.0  # 5 s at 100 Hz
    data = np.cumsum(rng.normal(size=(500, 6)), axis=0) * 0.1 + np.array([0, 0, G, 0, 0, 0])
    p = tmp_path / "r.csv"
    p.write_text("t_ms,acc_x,acc_y,acc_z,gyro_x,gyro_y,gyro_z\n" + "\n".join(
        f"{ti * 1000:.1f}," + ",".join(f"{v:.6f}" for v in row) for ti, row in zip(t, data)))
    r = SPEC.preprocess(p, start=1.234)
    # upstream: bisect_left on ms timestamps, int(1000 / mean step), resample only that window, pad/truncate to 400
    ms = [round(ti * 1000, 1) for ti in t]
    import bisect

    i0, i1 = bisect.bisect_left(ms, 1234.0), bisect.bisect_left(ms, 3234.0)
    assert (i0, i1) == (124, 324) and r.meta["window_samples"] == [i0, i1]
    rate = int(1000 / np.mean(np.diff(ms[i0:i1])))
    assert rate == 100 == r.meta["resampled_from_hz"]
    want = sinc_resample(data[i0:i1].astype(np.float32), 100, 200, axis=0)[:400].T
    np.testing.assert_allclose(r.array, want, atol=1e-5)
    # Resampling first (the grid method) gives different edge samples: the window's edges see zeros upstream.
    grid = SPEC.preprocess(p, start=1.234, method="grid")
    assert np.abs(grid.array[:, -4:] - r.array[:, -4:]).max() > 0.5


def test_window_at_200hz_is_the_raw_samples(tmp_path) -> None:
    rng = np.random.default_rng(2)
    data = rng.normal(size=(700, 6)) + np.array([0, 0, G, 0, 0, 0])
    r = SPEC.preprocess(data, rate=200, start=0.5)
    np.testing.assert_array_equal(r.array, data[100:500].T.astype(np.float32))
    assert r.meta["resampling"].startswith("none")


def test_short_window_is_zero_padded_after_resampling() -> None:
    data = np.tile([0, 0, G, 0, 0, 0.5], (120, 1)).astype(np.float64)  # 1.2 s at 100 Hz
    r = SPEC.preprocess(data, rate=100)
    assert r.meta["padded_samples"] == 400 - 240 and np.all(r.array[:, 240:] == 0)
    np.testing.assert_allclose(r.array[2, 20:220], G, rtol=1e-3)


def test_bad_method(tmp_path) -> None:
    with pytest.raises(InputError, match='method "upstream" or "grid"'):
        SPEC.preprocess(np.zeros((100, 6)), rate=100, method="nearest")


# ------------------------------------------------------------------ command line

def test_cli_gyro_units_and_repeated_imu() -> None:
    from click.testing import CliRunner

    from onellm.cli import _one_or_list, _reader_kwargs, main

    assert _reader_kwargs("imu", {"gyro_units": "deg/s", "audio_start": None}, ()) == {"gyro_units": "deg/s"}
    assert _one_or_list(()) is None and _one_or_list(("a",)) == "a" and _one_or_list(("a", "b")) == ["a", "b"]
    shown = CliRunner().invoke(main, ["ask", "--help"]).output
    assert "--gyro-units [auto|deg/s|rad/s]" in shown and "repeat for one-sensor files" in shown


def test_cli_two_one_sensor_files_equal_their_preprocessed_array(tiny_checkpoint, tiny_tokenizer, tmp_path) -> None:
    pytest.importorskip("torch")
    from click.testing import CliRunner

    from onellm.cli import main

    def ask(*args):
        return CliRunner().invoke(main, ["reference", "ask", "--checkpoint", str(tiny_checkpoint), "--tokenizer",
                                         str(tiny_tokenizer), "--preset", "tiny", "--greedy", "--max-tokens", "5",
                                         "--json", *args, "Q?"], catch_exceptions=False)

    d = sensor_logger(tmp_path / "e", ("TotalAcceleration", "Gyroscope"))
    acc, gyr = d / "TotalAcceleration.csv", d / "Gyroscope.csv"
    np.save(tmp_path / "x.npy", SPEC.preprocess([acc, gyr]).array)
    two = ask("--imu", str(acc), "--imu", str(gyr))
    assert two.exit_code == 0, two.output
    ref = ask("--input-npy", str(tmp_path / "x.npy"), "--modality", "imu")
    assert json.loads(two.stdout)["answer"] == json.loads(ref.stdout)["answer"]
    folder = ask("--imu", str(d))
    assert json.loads(folder.stdout)["answer"] == json.loads(ref.stdout)["answer"]
    one = ask("--imu", str(acc))
    assert one.exit_code == 2 and "Gyroscope.csv" in one.stderr and "\n" not in one.stderr.strip()


def test_a_comment_that_names_no_columns_is_not_a_header(tmp_path) -> None:
    p = tmp_path / "plain.txt"
    p.write_text("# recorded with my phone app today\n" + "\n".join(f"{t:.3f} 0 0 {G} 0 0 0.5" for t in rows()))
    r = SPEC.preprocess(p)
    expect(r, (0, 0, G), (0, 0, 0.5))
    assert "header" not in r.meta
