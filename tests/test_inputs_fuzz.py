"""Property-based fuzzing of every reader: any byte string (and any mutation of a
valid file) gives either a tensor of exactly the encoder's shape and dtype with
finite values, or an InputError — never another exception, never a hang.

Examples per test are bounded (see EXAMPLES_PER_TEST) so the whole module runs in
well under 30 s on two cores; derandomized so CI is reproducible.
"""

from __future__ import annotations

import functools
import itertools
import os
import tempfile
from pathlib import Path

import numpy as np
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from _inputs_helpers import EXAMPLES, make_video, write_audio
from onellm.runtime.errors import InputError
from onellm.runtime.modalities import get_modality

# ONELLM_FUZZ_EXAMPLES=2000 for a long exploratory run (then also random, not derandomized).
EXAMPLES_PER_TEST = int(os.environ.get("ONELLM_FUZZ_EXAMPLES", "100"))
FUZZ = settings(max_examples=EXAMPLES_PER_TEST, deadline=None, derandomize="ONELLM_FUZZ_EXAMPLES" not in os.environ,
                database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

_TMP = tempfile.TemporaryDirectory(prefix="onellm-fuzz-")
_COUNTER = itertools.count()


def _write(data: bytes, ext: str) -> Path:
    p = Path(_TMP.name) / f"f{next(_COUNTER)}{ext}"
    p.write_bytes(data)
    return p


@functools.lru_cache(maxsize=None)
def seed(name: str) -> bytes:
    """Small valid files to mutate."""
    d = Path(_TMP.name)
    rng = np.random.default_rng(0)
    if name == "png":
        from PIL import Image

        Image.fromarray(rng.integers(0, 256, (20, 30, 3), dtype=np.uint8)).save(d / "s.png")
        return (d / "s.png").read_bytes()
    if name == "jpg":
        from PIL import Image

        Image.fromarray(rng.integers(0, 256, (20, 30, 3), dtype=np.uint8)).save(d / "s.jpg")
        return (d / "s.jpg").read_bytes()
    if name == "mp4":
        return make_video(d / "s.mp4", 8, w=32, h=24).read_bytes()
    if name == "wav":
        return write_audio(d / "s.wav", (0.1 * rng.standard_normal(2000)).astype(np.float32), 16000).read_bytes()
    if name == "flac":
        return write_audio(d / "s.flac", (0.1 * rng.standard_normal(3000)).astype(np.float32), 8000, "flac",
                           "s16").read_bytes()
    if name == "ply":
        xyz = rng.normal(size=(40, 3)).astype("<f4")
        rec = np.empty(40, [("x", "<f4"), ("y", "<f4"), ("z", "<f4"), ("red", "u1"), ("green", "u1"), ("blue", "u1")])
        rec["x"], rec["y"], rec["z"] = xyz.T
        rec["red"] = rec["green"] = rec["blue"] = 100
        head = ("ply\nformat binary_little_endian 1.0\nelement vertex 40\nproperty float x\nproperty float y\n"
                "property float z\nproperty uchar red\nproperty uchar green\nproperty uchar blue\nend_header\n")
        return head.encode() + rec.tobytes()
    if name == "ply_ascii":
        rows = "\n".join(" ".join(f"{v:.3f}" for v in r) + " 10 20 30" for r in rng.normal(size=(40, 3)))
        return (f"ply\nformat ascii 1.0\nelement vertex 40\nproperty float x\nproperty float y\nproperty float z\n"
                f"property uchar red\nproperty uchar green\nproperty uchar blue\nend_header\n{rows}\n").encode()
    if name == "pcd":
        rows = "\n".join(" ".join(f"{v:.3f}" for v in r) for r in rng.normal(size=(40, 3)))
        return ("# .PCD v0.7\nVERSION 0.7\nFIELDS x y z\nSIZE 4 4 4\nTYPE F F F\nCOUNT 1 1 1\nWIDTH 40\nHEIGHT 1\n"
                f"POINTS 40\nDATA ascii\n{rows}\n").encode()
    if name == "pcd_bin":
        body = rng.normal(size=(40, 3)).astype("<f4").tobytes()
        return ("# .PCD v0.7\nVERSION 0.7\nFIELDS x y z\nSIZE 4 4 4\nTYPE F F F\nCOUNT 1 1 1\nWIDTH 40\nHEIGHT 1\n"
                "POINTS 40\nDATA binary\n").encode() + body
    if name == "xyz":
        return "\n".join(f"{a:.3f} {b:.3f} {c:.3f} 200 10 10" for a, b, c in rng.normal(size=(40, 3))).encode()
    if name == "csv":
        t = np.arange(60) / 100
        rows = "\n".join(f"{a:.2f},{b:.3f},{9.8:.1f},0.1,0.01,0.02,0.03" for a, b in zip(t, np.sin(t)))
        return f"time_s,acc_x,acc_y,acc_z,gyro_x,gyro_y,gyro_z\n{rows}\n".encode()
    if name == "npy_imu":
        np.save(d / "i.npy", rng.normal(size=(6, 50)).astype(np.float32))
        return (d / "i.npy").read_bytes()
    if name == "npy_point":
        np.save(d / "p.npy", rng.random((64, 6)).astype(np.float32))
        return (d / "p.npy").read_bytes()
    if name == "npy_fmri":
        np.save(d / "b.npy", rng.normal(size=15724).astype(np.float16))
        return (d / "b.npy").read_bytes()
    raise KeyError(name)


@st.composite
def mutated(draw, name: str) -> bytes:
    """A valid seed file, truncated, with bytes overwritten, or with junk inserted."""
    data = bytearray(seed(name))
    for _ in range(draw(st.integers(1, 4))):
        op = draw(st.sampled_from(["cut", "flip", "insert", "zero"]))
        if not data:
            break
        at = draw(st.integers(0, len(data) - 1))
        if op == "cut":
            data = data[:at]
        elif op == "flip":
            data[at] = draw(st.integers(0, 255))
        elif op == "insert":
            data[at:at] = draw(st.binary(min_size=1, max_size=16))
        else:
            data[at:at + 8] = b"\x00" * len(data[at:at + 8])
    return bytes(data)


def fuzz_bytes(name: str, max_size: int = 1024):
    return st.one_of(st.binary(max_size=max_size), mutated(name))


def assert_valid_or_input_error(modality: str, path: Path, **options) -> str:
    spec = get_modality(modality)
    try:
        r = spec.preprocess(path, **options)
    except InputError as e:
        msg = str(e)
        assert "\n" not in msg and "expected" in msg and str(path) in msg, msg
        event("InputError")
        return "error"
    assert r.array.shape == spec.input_shape and r.array.dtype.name == spec.input_dtype
    assert np.isfinite(r.array).all()
    event("valid tensor")
    return "ok"


@FUZZ
@given(data=fuzz_bytes("png"), ext=st.sampled_from([".png", ".jpg"]))
def test_fuzz_image_png(data, ext) -> None:
    assert_valid_or_input_error("image", _write(data, ext))


@FUZZ
@given(data=fuzz_bytes("jpg"))
def test_fuzz_image_jpeg(data) -> None:
    assert_valid_or_input_error("image", _write(data, ".jpg"))


@FUZZ
@given(data=fuzz_bytes("mp4", 2048))
def test_fuzz_video(data) -> None:
    assert_valid_or_input_error("video", _write(data, ".mp4"))


@FUZZ
@given(data=fuzz_bytes("wav"))
def test_fuzz_audio_wav(data) -> None:
    assert_valid_or_input_error("audio", _write(data, ".wav"))


@FUZZ
@given(data=fuzz_bytes("flac"))
def test_fuzz_audio_flac(data) -> None:
    assert_valid_or_input_error("audio", _write(data, ".flac"))


@FUZZ
@given(name=st.sampled_from(["ply", "ply_ascii", "pcd", "pcd_bin", "npy_point", "xyz"]), data=st.data())
def test_fuzz_point(name, data) -> None:
    ext = {"ply": ".ply", "ply_ascii": ".ply", "pcd": ".pcd", "pcd_bin": ".pcd", "npy_point": ".npy",
           "xyz": ".xyz"}[name]
    assert_valid_or_input_error("point", _write(data.draw(fuzz_bytes(name)), ext))


@FUZZ
@given(data=st.one_of(st.binary(max_size=512), st.text(alphabet="0123456789.,;-e \t\n#xyzabc", max_size=400)
                      .map(str.encode)))
def test_fuzz_point_text(data) -> None:
    assert_valid_or_input_error("point", _write(data, ".xyz"))


@FUZZ
@given(data=fuzz_bytes("csv"), rate=st.sampled_from([None, 100.0]))
def test_fuzz_imu_csv(data, rate) -> None:
    assert_valid_or_input_error("imu", _write(data, ".csv"), rate=rate)


_ALIASES = ["time", "timestamp_ms", "t", "acc_x", "accel_y", "az", "accl_z", "gyro_x", "gy", "wz", "ax", "ay",
            "gx", "gz", "Acc X (g)", "mag_x", ""]


@st.composite
def csv_text(draw) -> bytes:
    """Header from channel aliases plus numeric-ish rows, with spreadsheet dialects."""
    cols = draw(st.lists(st.sampled_from(_ALIASES), min_size=1, max_size=9))
    if draw(st.booleans()):  # usually complete: reach the numeric paths
        cols = ["t"] + draw(st.permutations(["acc_x", "accel_y", "az", "gyro_x", "gy", "wz"] + cols[:1]))
    delim = draw(st.sampled_from([",", ";", "\t", " "]))
    n = draw(st.integers(0, 250))
    num = st.one_of(st.floats(-1e6, 1e6).map(lambda v: f"{v:.4g}"),
                    st.sampled_from(["", "x", "1,5", "-0", "1e400", "nan"]))
    good = st.floats(-20, 20).map(lambda v: f"{v:.3f}")
    rows = []
    for i in range(n):
        if draw(st.integers(0, 99)):  # mostly well-formed rows with increasing time first
            rows.append(delim.join([f"{i / 100:.2f}"] + [draw(good) for _ in cols[1:]]))
        else:
            rows.append(delim.join(draw(st.lists(num, min_size=len(cols) - 1, max_size=len(cols) + 1))))
    return ("\n".join([delim.join(cols)] + rows) + "\n").encode()


@FUZZ
@given(data=csv_text(), rate=st.sampled_from([None, 50.0]), start=st.sampled_from([0.0, 0.5, 3.0]))
def test_fuzz_imu_csv_dialects(data, rate, start) -> None:
    assert_valid_or_input_error("imu", _write(data, ".csv"), rate=rate, start=start)


@FUZZ
@given(data=fuzz_bytes("npy_imu"))
def test_fuzz_imu_npy(data) -> None:
    assert_valid_or_input_error("imu", _write(data, ".npy"), rate=100.0)


@FUZZ
@given(data=fuzz_bytes("npy_fmri"))
def test_fuzz_fmri(data) -> None:
    assert_valid_or_input_error("fmri", _write(data, ".npy"))


@FUZZ
@given(data=fuzz_bytes("png"), kind=st.sampled_from(["rgbd", "rgbn"]))
def test_fuzz_maps(data, kind) -> None:
    assert_valid_or_input_error(kind, _write(data, ".png"), image=EXAMPLES / "image" / "photo.jpg")


@FUZZ
@given(arr=st.one_of(
    st.builds(lambda n, c, s: np.random.default_rng(s).normal(size=(n, c)),
              st.integers(0, 80), st.integers(1, 8), st.integers(0, 9)),
    st.builds(lambda v: np.full((40, 6), v), st.sampled_from([0.0, np.nan, np.inf, 1e308]))))
def test_fuzz_in_memory_arrays(arr) -> None:
    """Arrays go through the same validation as files."""
    for modality, opts in (("point", {}), ("imu", {"rate": 100.0}), ("fmri", {})):
        spec = get_modality(modality)
        try:
            r = spec.preprocess(arr, **opts)
        except InputError:
            continue
        assert r.array.shape == spec.input_shape and np.isfinite(r.array).all()


def test_fuzz_budget_is_bounded() -> None:
    """The number of fuzz examples stays what the module docstring promises."""
    n_tests = sum(1 for k in globals() if k.startswith("test_fuzz_") and k != "test_fuzz_budget_is_bounded")
    assert n_tests == 15
    assert "ONELLM_FUZZ_EXAMPLES" in os.environ or n_tests * EXAMPLES_PER_TEST <= 1500


# IMU exporters' layouts (runtime/modalities/_imu_formats.py): mutated seeds and one-sensor sets.

def _imu_layout_seed(name: str) -> bytes:
    n = 60
    if name == "physics_toolbox":
        rows = [f"{i / 100:.3f},0.01,-0.02,1.00,0.3,0.1,0.2,0.0,0.5,0.0," for i in range(n)]
        return ("time,gFx,gFy,gFz,ax,ay,az,wx,wy,wz,\n" + "\n".join(rows) + "\n").encode()
    if name == "euroc":
        rows = [f"{1403636579758555392 + 5000000 * i},0.5,0,0,0,0,9.81" for i in range(n)]
        return ("#timestamp [ns],w_RS_S_x [rad s^-1],w_RS_S_y [rad s^-1],w_RS_S_z [rad s^-1],a_RS_S_x [m s^-2],"
                "a_RS_S_y [m s^-2],a_RS_S_z [m s^-2]\n" + "\n".join(rows) + "\n").encode()
    if name == "arduino":
        rows = [f"0.01,0.02,1.0,1.5,-3.0,28.6,walk" for _ in range(n)]
        return ("# sample rate: 100 Hz\nax,ay,az,gx,gy,gz,label\n" + "\n".join(rows) + "\n").encode()
    if name in ("TotalAcceleration", "Accelerometer", "Gravity", "Gyroscope"):
        rows = [f"{1700000000000000000 + 10000000 * i},{i / 100:.2f},9.8,0.1,0.2" for i in range(n)]
        return ("time,seconds_elapsed,z,y,x\n" + "\n".join(rows) + "\n").encode()
    if name == "phyphox_acc":
        rows = [f"{i / 100:.9E},1.0E-2,2.0E-2,9.81E0,9.81E0" for i in range(n)]
        return ('"Time (s)","Acceleration x (m/s^2)","Acceleration y (m/s^2)","Acceleration z (m/s^2)",'
                '"Absolute acceleration (m/s^2)"\n' + "\n".join(rows) + "\n").encode()
    if name == "phyphox_gyro":
        rows = [f"{i / 100:.9E},1.0E-2,2.0E-2,5.0E-1" for i in range(n)]
        return ('"Time (s)","Gyroscope x (rad/s)","Gyroscope y (rad/s)","Gyroscope z (rad/s)"\n'
                + "\n".join(rows) + "\n").encode()
    raise KeyError(name)


@st.composite
def _mutated_imu_layout(draw, name: str) -> bytes:
    """A layout seed truncated, with bytes overwritten, or with junk inserted (as `mutated`)."""
    data = bytearray(_imu_layout_seed(name))
    for _ in range(draw(st.integers(0, 3))):
        op = draw(st.sampled_from(["cut", "flip", "insert"]))
        at = draw(st.integers(0, max(len(data) - 1, 0)))
        if op == "cut":
            data = data[:at]
        elif op == "flip" and data:
            data[at] = draw(st.sampled_from(b"0123456789.,;-#e \n\"xX"))
        else:
            data[at:at] = draw(st.binary(min_size=1, max_size=8))
    return bytes(data)


@FUZZ
@given(name=st.sampled_from(["physics_toolbox", "euroc", "arduino", "phyphox_acc"]), data=st.data(),
       rate=st.sampled_from([None, 100.0]), method=st.sampled_from(["upstream", "grid"]))
def test_fuzz_imu_layouts(name, data, rate, method) -> None:
    raw = data.draw(_mutated_imu_layout(name))
    assert_valid_or_input_error("imu", _write(raw, ".csv"), rate=rate, method=method)


@FUZZ
@given(names=st.one_of(
    st.sampled_from([["TotalAcceleration", "Gyroscope"], ["Accelerometer", "Gravity", "Gyroscope"],
                     ["phyphox_acc", "phyphox_gyro"]]),
    st.lists(st.sampled_from(["TotalAcceleration", "Accelerometer", "Gravity", "Gyroscope", "phyphox_acc",
                              "phyphox_gyro"]), min_size=1, max_size=4, unique=True)),
       data=st.data(), how=st.sampled_from(["files", "folder", "zip"]))
def test_fuzz_imu_one_sensor_sets(names, data, how) -> None:
    """Sensor Logger/phyphox one-sensor files, mutated, given as files, an export folder or its zip."""
    d = Path(_TMP.name) / f"set{next(_COUNTER)}"
    d.mkdir()
    paths = []
    for name in names:
        p = d / f"{name}.csv"
        p.write_bytes(data.draw(_mutated_imu_layout(name)))
        paths.append(p)
    if how == "zip":
        import zipfile

        src = d.with_suffix(".zip")
        with zipfile.ZipFile(src, "w") as zf:
            for p in paths:
                zf.write(p, f"export/{p.name}")
        raw = bytearray(src.read_bytes())
        if data.draw(st.booleans()) and raw:  # a damaged archive too
            at = data.draw(st.integers(0, len(raw) - 1))
            raw[at] ^= 0xFF
            src.write_bytes(bytes(raw))
        sources: object = src
    else:
        sources = d if how == "folder" else paths
    spec = get_modality("imu")
    try:
        r = spec.preprocess(sources)
    except InputError as e:
        msg = str(e)
        assert "\n" not in msg and "expected" in msg and str(d) in msg, msg
        event("InputError")
        return
    assert r.array.shape == spec.input_shape and np.isfinite(r.array).all()
    event("valid tensor")
