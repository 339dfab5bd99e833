"""The torch-free encoder runtime (onellm.runtime.encoder) and numpy point grouping.

Uses the session's exported tiny encoder (`tiny_encoder_export`). The zero-copy claims
are tested directly: onnxruntime writes the block into the one preallocated host
buffer (same pointer every call, no output array allocated per request), and the
intermediate tensors are OrtValues bound once per modality.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import tracemalloc

import numpy as np
import pytest

from onellm.runtime.encoder import Encoder, physical_cores, select_providers
from onellm.runtime.errors import BackendError, BundleError, InputError
from onellm.runtime.modalities import get_modality
from onellm.runtime.point_grouping import furthest_point_sample, group_points, knn


@pytest.fixture()
def fp32_encoder(tiny_encoder_export):
    root, results = tiny_encoder_export
    with Encoder(results["fp32"], root) as enc:
        yield enc


def _input(modality, seed):
    return get_modality(modality).dummy_input(np.random.default_rng(seed)).astype(np.float32)


def test_output_is_written_into_one_reused_buffer(fp32_encoder):
    enc = fp32_encoder
    pointer = enc.buffer.ctypes.data
    enc.buffer[...] = np.nan  # onnxruntime must overwrite every element
    a = enc.encode("image", _input("image", 1))
    assert not np.isnan(a).any()
    assert a.ctypes.data == pointer and np.shares_memory(a, enc.buffer)
    assert a.shape == (enc.n_inserted, enc.n_embd) and a.dtype == np.float32 and a.flags.c_contiguous
    first = a.copy()
    bindings = [s.binding for s in enc._plans["image"].stages]
    values = list(enc._plans["image"].values)

    x2 = _input("image", 2)
    tracemalloc.start()
    b = enc.encode("image", x2)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert b.ctypes.data == pointer and enc.buffer.ctypes.data == pointer
    assert peak < first.nbytes // 2, f"{peak} bytes allocated by Python/numpy during a request"
    assert not np.array_equal(b, first)  # new content, same memory
    # the chain's bindings and intermediate OrtValues are the ones built on first use
    assert [s.binding for s in enc._plans["image"].stages] == bindings
    assert all(v is w for v, w in zip(enc._plans["image"].values, values))
    # another modality writes the same buffer
    c = enc.encode("imu", _input("imu", 3))
    assert c.ctypes.data == pointer and np.shares_memory(c, a)


def test_intermediates_are_preallocated_ortvalues(fp32_encoder):
    import onnxruntime as ort

    enc = fp32_encoder
    enc.warmup(["video"])  # builds the plan once, runs it on zeros
    plan = enc._plans["video"]
    enc.encode("video", _input("video", 4))
    assert enc._plans["video"] is plan
    assert [s.name for s in plan.stages] == ["tokenizer.clip_patch", "trunk", "pre.video", "upm", "post.video"]
    assert all(isinstance(v, ort.OrtValue) for v in plan.values)
    shapes = sorted(tuple(v.shape()) for v in plan.values)
    w = enc.width
    assert shapes == sorted([(30, 3), (15, 257, w), (15, 257, w), (1, 287, w), (1, 30, w)])
    # shared graphs have one session for every modality
    enc.encode("image", _input("image", 5))
    assert enc._plans["image"].stages[1].session is plan.stages[1].session


def test_results_match_a_fresh_encoder_and_are_deterministic(tiny_encoder_export, fp32_encoder):
    root, results = tiny_encoder_export
    x = _input("audio", 6)
    a = fp32_encoder.encode("audio", x).copy()
    fp32_encoder.encode("point", _input("point", 7))
    b = fp32_encoder.encode("audio", x).copy()
    with Encoder(results["fp32"], root, threads=1) as other:
        c = other.encode("audio", x).copy()
    np.testing.assert_array_equal(a, b)
    np.testing.assert_allclose(a, c, rtol=1e-5, atol=1e-6)


def test_bad_inputs_raise_input_error(fp32_encoder):
    with pytest.raises(InputError, match=r"image input: expected an array of shape \[3, 224, 224\]"):
        fp32_encoder.encode("image", np.zeros((224, 224, 3), np.float32))
    with pytest.raises(InputError, match="floating-point"):
        fp32_encoder.encode("imu", np.zeros((6, 400), np.int64))
    with pytest.raises(InputError, match="one of the bundle's modalities"):
        fp32_encoder.encode("smell", np.zeros(3, np.float32))
    bad = _input("point", 8)
    bad[5, 4] = np.nan
    with pytest.raises(InputError, match="finite"):
        fp32_encoder.encode("point", bad)


def test_checksum_and_missing_file(tiny_encoder_export, tmp_path):
    root, results = tiny_encoder_export
    entries = json.loads(json.dumps(results["fp32"]))
    entries["graphs"]["post.imu"]["sha256"] = "0" * 64
    with Encoder(entries, root) as enc, pytest.raises(BundleError, match="expected sha256"):
        enc.encode("imu", _input("imu", 9))
    with Encoder(results["fp32"], tmp_path) as enc, pytest.raises(BundleError, match="missing from the bundle"):
        enc.encode("imu", _input("imu", 9))


def test_devices_fail_cleanly_without_a_gpu():
    import onnxruntime as ort

    assert select_providers("cpu")[0] == ["CPUExecutionProvider"]
    assert select_providers("auto")[1] in ("cpu", "cuda")
    with pytest.raises(BackendError, match="unknown encoder device"):
        select_providers("tpu")
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        with pytest.raises(BackendError, match="CUDAExecutionProvider"):
            select_providers("cuda")
        with pytest.raises(BackendError, match="CUDAExecutionProvider"):
            select_providers("tensorrt")


@pytest.mark.gpu
def test_cuda_chain_matches_cpu(tiny_encoder_export):
    import onnxruntime as ort

    if "CUDAExecutionProvider" not in ort.get_available_providers():
        pytest.skip("onnxruntime without CUDAExecutionProvider")
    root, results = tiny_encoder_export
    x = _input("image", 10)
    with Encoder(results["fp32"], root) as cpu, Encoder(results["fp32"], root, device="cuda") as gpu:
        want = cpu.encode("image", x).copy()
        pointer = gpu.buffer.ctypes.data
        got = gpu.encode("image", x)
        assert got.ctypes.data == pointer
        np.testing.assert_allclose(got, want, rtol=1e-3, atol=1e-3)


def test_physical_cores_is_sane():
    n = physical_cores()
    assert 1 <= n <= (os.cpu_count() or n)


def test_runtime_runs_with_torch_unimportable(tiny_encoder_export, tmp_path):
    root, results = tiny_encoder_export
    (tmp_path / "entries.json").write_text(json.dumps(results["int8"]))
    script = textwrap.dedent(f"""
        import sys, json
        import numpy as np
        sys.modules["torch"] = None  # any `import torch` now raises ImportError
        from onellm.runtime.encoder import Encoder
        from onellm.runtime.modalities import get_modality
        entries = json.load(open({str(tmp_path / "entries.json")!r}))
        rng = np.random.default_rng(0)
        with Encoder(entries, {str(root)!r}) as enc:
            for m in ("image", "point"):
                out = enc.encode(m, get_modality(m).dummy_input(rng).astype(np.float32))
                assert out.shape == (32, entries["n_embd"]) and np.isfinite(out).all()
        assert "torch" not in {{k for k, v in sys.modules.items() if v is not None}}
        print("ok")
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr[-2000:]


# ---------------------------------------------------------------------------- point grouping


def _clouds():
    rng = np.random.default_rng(11)
    smooth = rng.random((8192, 6), dtype=np.float32)
    quantised = smooth.copy()
    quantised[:, 3:] = rng.integers(0, 8, (8192, 3)) / np.float32(7)  # few colours: many exact ties
    return {"smooth": smooth, "quantised": quantised.astype(np.float32)}


@pytest.mark.parametrize("cloud", ["smooth", "quantised"])
def test_point_grouping_is_bit_exact_with_reference(cloud):
    torch = pytest.importorskip("torch")
    from onellm.ref import point_utils as ref

    x = _clouds()[cloud]
    p = np.ascontiguousarray(x[:, 3:])
    for tie_break in ("cuda", "first"):
        got = furthest_point_sample(p, 1024, tie_break)
        want = ref.furthest_point_sample(torch.from_numpy(p)[None], 1024, tie_break)[0].numpy()
        np.testing.assert_array_equal(got, want, err_msg=tie_break)
    centres = p[got]
    mine = np.sort(knn(p, centres, 32), axis=1)
    theirs = np.sort(ref.knn(torch.from_numpy(p)[None], torch.from_numpy(centres)[None], 32)[0].numpy(), axis=1)
    np.testing.assert_array_equal(mine, theirs)
    grouped = group_points(x, 1024, 32)  # [M, k, C]
    with torch.no_grad():
        want = ref.group_points(torch.from_numpy(x)[None], 1024, 32)[0].numpy()  # [C, M, k]
    np.testing.assert_array_equal(np.sort(grouped, axis=1), np.sort(want.transpose(1, 2, 0), axis=1))


def test_knn_ties_go_to_the_lower_index():
    p = np.zeros((10, 3), np.float32)
    p[[2, 5, 7], 0] = 1.0  # three points at distance 1, the rest at 0 from the origin centre
    got = set(knn(p, np.zeros((1, 3), np.float32), 8)[0].tolist())
    assert got == {0, 1, 3, 4, 6, 8, 9, 2}


@pytest.mark.parametrize("modality", ["image", "video", "audio", "point", "imu", "fmri", "rgbd", "rgbn"])
def test_a_batch_gives_each_input_its_own_block(fp32_encoder, modality):
    """encode_many stacks k inputs along every graph's leading axis; row i must equal input i alone."""
    enc = fp32_encoder
    if modality not in enc.modalities:
        pytest.skip(f"the tiny export has no {modality}")
    xs = [_input(modality, 20 + i) for i in range(3)]
    alone = [enc.encode(modality, x).copy() for x in xs]
    seen = []
    batch = enc.encode_many(modality, xs, stage_hook=lambda m, g, s: seen.append(g))
    assert batch.shape == (3, enc.n_inserted, enc.n_embd)
    assert seen == [s.name for s in enc._plans[modality].stages]  # each graph ran once for the batch
    for i in range(3):
        np.testing.assert_allclose(batch[i], alone[i], rtol=1e-4, atol=1e-5)
    assert not np.allclose(batch[0], batch[1])  # rows are not one input repeated
    assert not np.shares_memory(batch, enc.buffer)
    with pytest.raises(InputError, match=r"image input 1: expected an array of shape"):
        enc.encode_many("image", [_input("image", 1), np.zeros((2, 2), np.float32)])
