"""fMRI reader: NSD subject-1 nsdgeneral betas, repeats averaged, every other shape refused."""

from __future__ import annotations

import numpy as np
import pytest

from _inputs_helpers import EXAMPLES
from onellm.runtime.errors import InputError
from onellm.runtime.modalities import get_modality

SPEC = get_modality("fmri")


def test_example_float16() -> None:
    r = SPEC.preprocess(EXAMPLES / "fmri" / "betas.npy")
    assert r.array.shape == (1, 15724) and r.array.dtype == np.float32
    raw = np.load(EXAMPLES / "fmri" / "betas.npy")
    assert np.array_equal(r.array[0], raw.astype(np.float32))
    assert r.meta == {**r.meta, "dtype": "float16", "repeats": 1}


@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
def test_repeats_are_averaged(tmp_path, dtype) -> None:
    x = np.random.default_rng(0).normal(size=(3, 15724)).astype(dtype)
    np.save(tmp_path / "r.npy", x)
    r = SPEC.preprocess(tmp_path / "r.npy")
    np.testing.assert_allclose(r.array[0], x.astype(np.float64).mean(0), rtol=1e-6, atol=1e-6)
    assert r.meta["repeats"] == 3
    np.testing.assert_allclose(SPEC.preprocess(x).array, r.array)


@pytest.mark.parametrize("shape", [(15723,), (14278,), (2, 16000), (15724, 3), (1, 1, 15724), ()])
def test_other_shapes_name_15724_and_nsdgeneral(tmp_path, shape) -> None:
    np.save(tmp_path / "b.npy", np.zeros(shape, np.float32))
    with pytest.raises(InputError, match="15724") as e:
        SPEC.preprocess(tmp_path / "b.npy")
    assert "nsdgeneral" in str(e.value) and "subject-1" in str(e.value)


def test_nan_text_and_objects(tmp_path) -> None:
    x = np.zeros(15724, np.float32)
    x[7] = np.nan
    with pytest.raises(InputError, match="NaN"):
        SPEC.preprocess(x)
    (tmp_path / "t.npy").write_text("0.1 0.2 0.3")
    with pytest.raises(InputError, match="text"):
        SPEC.preprocess(tmp_path / "t.npy")
    np.save(tmp_path / "o.npy", np.array(["a"] * 15724))
    with pytest.raises(InputError, match="dtype"):
        SPEC.preprocess(tmp_path / "o.npy")
    good = tmp_path / "g.npy"
    np.save(good, np.zeros(15724, np.float32))
    (tmp_path / "cut.npy").write_bytes(good.read_bytes()[:1000])
    with pytest.raises(InputError, match="truncated|damaged"):
        SPEC.preprocess(tmp_path / "cut.npy")


def test_nsd_int16_betas_rescaled_with_notice(tmp_path, caplog) -> None:
    """NSD's int16 files (percent signal change x 300) are divided by 300, with a notice."""
    betas = np.random.default_rng(1).normal(scale=2.0, size=(2, 15724))
    stored = np.rint(betas * 300).astype(np.int16)
    np.save(tmp_path / "nsd.npy", stored)
    with caplog.at_level("WARNING"):
        r = SPEC.preprocess(tmp_path / "nsd.npy")
    assert "divided by 300" in caplog.text
    np.testing.assert_allclose(r.array[0], stored.astype(np.float64).mean(0) / 300, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(r.array[0], betas.mean(0), atol=1 / 300)
    assert "300" in r.meta["rescaled"] and r.meta["dtype"] == "int16"


@pytest.mark.parametrize("dtype", [np.int32, np.int64, np.uint8, np.bool_])
def test_other_integer_betas_refused_with_guidance(tmp_path, dtype) -> None:
    np.save(tmp_path / "i.npy", np.ones(15724, dtype))
    with pytest.raises(InputError, match="divide them by 300") as e:
        SPEC.preprocess(tmp_path / "i.npy")
    assert str(np.dtype(dtype)) in str(e.value) and "i.npy" in str(e.value)


def test_float_betas_at_storage_scale_noticed(caplog) -> None:
    x = (np.random.default_rng(2).normal(scale=2.0, size=15724) * 300).astype(np.float32)
    with caplog.at_level("WARNING"):
        r = SPEC.preprocess(x)
    assert "dividing by 300" in caplog.text
    np.testing.assert_array_equal(r.array[0], x)  # used as given
    caplog.clear()
    with caplog.at_level("WARNING"):
        SPEC.preprocess(x / 300)
    assert caplog.text == ""
