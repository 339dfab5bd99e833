"""Point-cloud reader: .npy/.ply/.pcd/.xyz variants, resampling, normalisation, bad inputs.

Tolerances: coordinates read back within float32 rounding (1e-6 relative); the
normalisation properties (centroid 0, largest radius 1) within 1e-6.
"""

from __future__ import annotations

import logging
import struct
import sys

import numpy as np
import pytest

from _inputs_helpers import EXAMPLES
from onellm.runtime.errors import InputError
from onellm.runtime.modalities import get_modality
from onellm.runtime.modalities import point as P
from onellm.runtime.modalities._pointio import lzf_decompress

sys.path.insert(0, str(EXAMPLES))
from make_examples import mug_points, write_ply  # noqa: E402

SPEC = get_modality("point")


def cloud(n: int = 5000, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    xyz = rng.normal(size=(n, 3)) * [1.0, 2.0, 0.5] + [10.0, -3.0, 2.0]
    rgb = rng.integers(0, 256, size=(n, 3)).astype(np.uint8)
    return xyz.astype(np.float32), rgb


def check(r) -> None:
    assert r.array.shape == (8192, 6) and r.array.dtype == np.float32
    xyz = r.array[:, :3].astype(np.float64)
    np.testing.assert_allclose(xyz.mean(axis=0), 0, atol=1e-6)
    assert np.sqrt((xyz ** 2).sum(1)).max() == pytest.approx(1.0, abs=1e-6)
    assert r.array[:, 3:].min() >= 0 and r.array[:, 3:].max() <= 1


def expected(xyz: np.ndarray, rgb01: np.ndarray) -> np.ndarray:
    idx = P.resample_indices(len(xyz))
    x = xyz[idx].astype(np.float64)
    x = x - x.mean(0)
    x /= np.sqrt((x ** 2).sum(1)).max()
    return np.concatenate([x, rgb01[idx]], 1).astype(np.float32)


def write_pcd(path, xyz, rgb=None, mode="ascii"):
    fields = "x y z" + (" rgb" if rgb is not None else "")
    n_f = 3 + (rgb is not None)
    head = (f"# .PCD v0.7 - Point Cloud Data file format\nVERSION 0.7\nFIELDS {fields}\nSIZE {' '.join(['4'] * n_f)}\n"
            f"TYPE {' '.join(['F'] * n_f)}\nCOUNT {' '.join(['1'] * n_f)}\nWIDTH {len(xyz)}\nHEIGHT 1\n"
            f"VIEWPOINT 0 0 0 1 0 0 0\nPOINTS {len(xyz)}\nDATA {mode}\n")
    packed = None
    if rgb is not None:
        u = (rgb[:, 0].astype(np.uint32) << 16) | (rgb[:, 1].astype(np.uint32) << 8) | rgb[:, 2].astype(np.uint32)
        packed = u.view(np.float32)
    with open(path, "wb") as f:
        f.write(head.encode())
        cols = [xyz[:, 0], xyz[:, 1], xyz[:, 2]] + ([packed] if packed is not None else [])
        if mode == "ascii":
            for i in range(len(xyz)):
                vals = [repr(float(c[i])) for c in cols[:3]]
                if packed is not None:
                    vals.append(repr(float(packed[i])))  # PCL writes the float bits in ascii too
                f.write((" ".join(vals) + "\n").encode())
        elif mode == "binary":
            f.write(np.stack(cols, 1).astype("<f4").tobytes())
        else:  # binary_compressed: structure of arrays, LZF with literal runs only
            raw = b"".join(np.asarray(c, "<f4").tobytes() for c in cols)
            comp = bytearray()
            for a in range(0, len(raw), 32):
                chunk = raw[a:a + 32]
                comp += bytes([len(chunk) - 1]) + chunk
            f.write(struct.pack("<II", len(comp), len(raw)) + bytes(comp))
    return path


# ------------------------------------------------------------------ happy paths

def test_example_mug() -> None:
    r = SPEC.preprocess(EXAMPLES / "point" / "mug.ply")
    check(r)
    xyz, rgb = mug_points()
    np.testing.assert_allclose(r.array, expected(xyz, rgb / 255.0), atol=1e-6)
    assert r.meta["colour"] == "from the file"


def test_ascii_ply_with_colour(tmp_path) -> None:
    xyz, rgb = cloud(3000)
    r = SPEC.preprocess(write_ply(tmp_path / "a.ply", xyz, rgb, binary=False))
    check(r)
    np.testing.assert_allclose(r.array, expected(xyz, rgb / 255.0), atol=2e-6)
    assert r.meta["n_points"] == 3000 and r.meta["resampled"] == "repeated"


def test_binary_big_endian_ply_float_colours_and_faces(tmp_path) -> None:
    xyz, rgb = cloud(9000)
    rgb01 = (rgb / 255.0).astype(np.float32)
    head = ("ply\nformat binary_big_endian 1.0\nelement vertex 9000\nproperty float x\nproperty float y\n"
            "property float z\nproperty float red\nproperty float green\nproperty float blue\n"
            "element face 2\nproperty list uchar int vertex_indices\nend_header\n").encode()
    body = np.concatenate([xyz, rgb01], 1).astype(">f4").tobytes()
    faces = b"\x03" + struct.pack(">3i", 0, 1, 2) + b"\x03" + struct.pack(">3i", 1, 2, 3)
    p = tmp_path / "be.ply"
    p.write_bytes(head + body + faces)
    r = SPEC.preprocess(p)
    check(r)
    np.testing.assert_allclose(r.array, expected(xyz, rgb01.astype(np.float64)), atol=2e-6)
    assert r.meta["resampled"] == "subset"


def test_binary_ply_with_element_before_vertices(tmp_path) -> None:
    xyz, rgb = cloud(100)
    head = ("ply\nformat binary_little_endian 1.0\nelement camera 1\nproperty list uchar float k\n"
            "element vertex 100\nproperty double x\nproperty double y\nproperty double z\n"
            "property uchar r\nproperty uchar g\nproperty uchar b\nend_header\n").encode()
    cam = b"\x02" + struct.pack("<2f", 1.0, 2.0)
    rec = np.empty(100, dtype=[("x", "<f8"), ("y", "<f8"), ("z", "<f8"), ("r", "u1"), ("g", "u1"), ("b", "u1")])
    rec["x"], rec["y"], rec["z"] = xyz.T
    rec["r"], rec["g"], rec["b"] = rgb.T
    p = tmp_path / "cam.ply"
    p.write_bytes(head + cam + rec.tobytes())
    np.testing.assert_allclose(SPEC.preprocess(p).array, expected(xyz, rgb / 255.0), atol=2e-6)


@pytest.mark.parametrize("mode", ["ascii", "binary", "binary_compressed"])
def test_pcd(tmp_path, mode) -> None:
    xyz, rgb = cloud(2000)
    r = SPEC.preprocess(write_pcd(tmp_path / f"{mode}.pcd", xyz, rgb, mode))
    check(r)
    np.testing.assert_allclose(r.array, expected(xyz, rgb / 255.0), atol=2e-6)
    assert r.meta["format"] == f"pcd {mode}"


def test_pcd_drops_nan_points_of_organised_clouds(tmp_path, caplog) -> None:
    xyz, rgb = cloud(500)
    xyz[::10] = np.nan
    r = SPEC.preprocess(write_pcd(tmp_path / "org.pcd", xyz, rgb, "binary"))
    assert r.meta["invalid_points_dropped"] == 50 and r.meta["n_points"] == 450


def test_lzf_back_references() -> None:
    # "abcabcabcX": literal "abc", back-reference length 6 at distance 3 (overlapping), literal "X"
    comp = bytes([2]) + b"abc" + bytes([(4 << 5) | 0, 2]) + bytes([0]) + b"X"
    assert lzf_decompress(comp, 10) == b"abcabcabcX"
    with pytest.raises(ValueError):
        lzf_decompress(bytes([(4 << 5), 50]), 10)


def test_xyz_without_colour_warns_loudly(tmp_path, caplog) -> None:
    xyz, _ = cloud(4000)
    p = tmp_path / "scan.xyz"
    np.savetxt(p, xyz, fmt="%.6f")
    with caplog.at_level(logging.WARNING):
        r = SPEC.preprocess(p)
    check(r)
    assert "NO COLOURS" in caplog.text
    assert r.meta["colour"].startswith("none in the file")
    # pseudo-colours are (xyz + 1) / 2: not constant, so the tokenizer's grouping is not degenerate
    np.testing.assert_allclose(r.array[:, 3:], (r.array[:, :3] + 1) / 2, atol=1e-6)
    assert r.array[:, 3:].std(axis=0).min() > 0.01


def test_txt_with_header_and_0_255_colours(tmp_path) -> None:
    xyz, rgb = cloud(1000)
    p = tmp_path / "cc.txt"
    lines = ["//X,Y,Z,R,G,B"] + [f"{a:.6f},{b:.6f},{c:.6f},{r},{g},{bl}" for (a, b, c), (r, g, bl) in zip(xyz, rgb)]
    p.write_text("\n".join(lines) + "\n")
    r = SPEC.preprocess(p)
    np.testing.assert_allclose(r.array, expected(xyz.astype(np.float64), rgb / 255.0), atol=2e-6)


def test_txt_with_normals_is_colourless(tmp_path, caplog) -> None:
    xyz, _ = cloud(500)
    normals = xyz / np.linalg.norm(xyz, axis=1, keepdims=True)
    p = tmp_path / "n.txt"
    np.savetxt(p, np.concatenate([xyz, normals], 1))
    r = SPEC.preprocess(p)
    assert "normals" in caplog.text and r.meta["colour"].startswith("none")


def test_npy_pointllm_style_and_xyz_only(tmp_path) -> None:
    xyz, rgb = cloud(8192)
    arr = np.concatenate([xyz, rgb / 255.0], 1).astype(np.float32)
    np.save(tmp_path / "p.npy", arr)
    r = SPEC.preprocess(tmp_path / "p.npy")
    assert r.meta["resampled"] == "kept"
    np.testing.assert_allclose(r.array, expected(xyz, arr[:, 3:].astype(np.float64)), atol=2e-6)
    # colours untouched by the normalisation
    assert np.array_equal(r.array[:, 3:], arr[:, 3:])
    np.save(tmp_path / "q.npy", xyz)
    check(SPEC.preprocess(tmp_path / "q.npy"))
    np.testing.assert_allclose(SPEC.preprocess(arr).array, r.array)


def test_resampling_is_deterministic_and_covers_every_point() -> None:
    a, b = P.resample_indices(20000), P.resample_indices(20000)
    assert np.array_equal(a, b) and len(np.unique(a)) == 8192 and np.all(np.diff(a) > 0)
    small = P.resample_indices(100)
    assert len(small) == 8192 and set(small.tolist()) == set(range(100))


def test_uniform_colour_warns(tmp_path, caplog) -> None:
    xyz, _ = cloud(1000)
    arr = np.concatenate([xyz, np.full((1000, 3), 0.5)], 1)
    with caplog.at_level(logging.WARNING):
        r = SPEC.preprocess(arr)
    assert r.meta["colour"] == "uniform" and "SAME COLOUR" in caplog.text


# ------------------------------------------------------------------ bad inputs

def test_three_points() -> None:
    with pytest.raises(InputError, match="at least 32 points, found 3 point"):
        SPEC.preprocess(np.random.default_rng(0).normal(size=(3, 6)))


def test_nan_and_coincident() -> None:
    xyz, rgb = cloud(100)
    bad = np.concatenate([xyz, rgb / 255.0], 1)
    bad[5, 1] = np.inf
    with pytest.raises(InputError, match="infinite"):
        SPEC.preprocess(bad)
    with pytest.raises(InputError, match="coincide"):
        SPEC.preprocess(np.ones((100, 3)))


def test_wrong_channel_count(tmp_path) -> None:
    np.save(tmp_path / "four.npy", np.zeros((100, 4), np.float32))
    with pytest.raises(InputError, match=r"\[N,6\].*shape \[100, 4\]"):
        SPEC.preprocess(tmp_path / "four.npy")


def test_truncated_binary_ply(tmp_path) -> None:
    xyz, rgb = cloud(1000)
    data = write_ply(tmp_path / "ok.ply", xyz, rgb).read_bytes()
    (tmp_path / "cut.ply").write_bytes(data[: len(data) - 500])
    with pytest.raises(InputError, match="truncated"):
        SPEC.preprocess(tmp_path / "cut.ply")


def test_ply_without_xyz(tmp_path) -> None:
    p = tmp_path / "bad.ply"
    p.write_text("ply\nformat ascii 1.0\nelement vertex 1\nproperty float a\nend_header\n1\n")
    with pytest.raises(InputError, match="vertex properties a"):
        SPEC.preprocess(p)


@pytest.mark.parametrize("name,payload,found", [
    ("x.ply", b"\x89PNG\r\n\x1a\n" + b"\x00" * 30, "PNG"),
    ("x.npy", b"not numpy", "text"),
    ("x.pcd", b"# .PCD v0.7\nFIELDS x y z\nDATA weird\n", "DATA weird"),
    ("x.xyz", b"a b c\nd e f\ng h i\nj k l\nm n o\np q r\ns t u\n", "non-numeric"),
    ("x.ply", b"", "empty"),
])
def test_not_a_point_cloud(tmp_path, name, payload, found) -> None:
    p = tmp_path / name
    p.write_bytes(payload)
    with pytest.raises(InputError, match=found):
        SPEC.preprocess(p)


def test_pickled_npy_refused(tmp_path) -> None:
    np.save(tmp_path / "obj.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(InputError, match="object array"):
        SPEC.preprocess(tmp_path / "obj.npy")
