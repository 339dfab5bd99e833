"""sinc_resample against torchaudio's own output (fixtures made by
tests/fixtures/make_torchaudio_fixtures.py in a throwaway torch environment)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

from onellm.runtime.resample import aligned_offset, rate_ratio, sinc_band, sinc_kernel, sinc_resample

FIXTURES = Path(__file__).parent / "fixtures" / "resample"
PAIRS = sorted(FIXTURES.glob("*.npz"))


def test_fixtures_present():
    # The rate pairs issue #10 names, integer and non-integer ratios, down and up.
    names = {p.stem for p in PAIRS}
    for pair in ("44100_16000", "48000_16000", "8000_16000", "100_200", "400_200", "256_200",
                 "22050_16000", "197_200", "333_200"):
        assert pair in names


@pytest.mark.parametrize("path", PAIRS, ids=[p.stem for p in PAIRS])
def test_matches_torchaudio(path):
    fx = np.load(path)
    src, dst = (int(r) for r in fx["rates"])
    x, want = fx["x"], fx["y"]
    got = sinc_resample(x, src, dst)
    assert got.dtype == np.float32
    assert got.shape == want.shape
    scale = float(np.abs(want).max())
    err = float(np.abs(got - want).max())
    assert err <= 1e-5 * scale, f"{src}->{dst}: max abs {err:.3g}, scale {scale:.3g}"


def test_axis_and_leading_dims():
    fx = np.load(FIXTURES / "100_200.npz")
    x, want = fx["x"], fx["y"]  # [6, N]
    assert x.ndim == 2
    got = sinc_resample(x.T, 100, 200, axis=0)
    np.testing.assert_allclose(got.T, want, atol=1e-5 * np.abs(want).max())
    stacked = sinc_resample(np.stack([x, 2 * x]), 100, 200)
    np.testing.assert_allclose(stacked[1], 2 * stacked[0], rtol=1e-6, atol=1e-6)


def test_same_rate_is_a_copy():
    x = np.arange(10, dtype=np.float32)
    y = sinc_resample(x, 16000, 16000)
    np.testing.assert_array_equal(x, y)
    y[0] = 99
    assert x[0] == 0


def test_length_and_dc_gain():
    # ceil(n * new / orig) samples; a constant stays constant away from the edges.
    for src, dst, n in ((44100, 16000, 4411), (197, 200, 500), (8000, 16000, 333)):
        y = sinc_resample(np.ones(n, np.float32), src, dst)
        assert len(y) == math.ceil(n * dst / src)
        mid = y[len(y) // 4: 3 * len(y) // 4]
        np.testing.assert_allclose(mid, 1.0, atol=2e-3)


def test_stop_band():
    # A tone above the new Nyquist frequency is removed, one below it kept.
    src, dst = 48000, 16000
    t = np.arange(48000) / src
    high = sinc_resample(np.sin(2 * np.pi * 12000 * t).astype(np.float32), src, dst)[2000:-2000]
    low = sinc_resample(np.sin(2 * np.pi * 1000 * t).astype(np.float32), src, dst)[2000:-2000]
    assert np.abs(high).max() < 1e-2
    assert 0.95 < np.abs(low).max() < 1.05


def test_kernel_rows_sum_to_gain():
    # Each phase's taps sum to ~1 (unit DC gain) for an upsampler.
    kernel, width = sinc_kernel(1, 2)
    assert kernel.shape == (2, 2 * width + 1)
    np.testing.assert_allclose(kernel.sum(axis=1), 1.0, atol=2e-3)


def test_slice_equals_full_resample():
    # Cutting the source at aligned_offset with a margin gives the same samples as
    # resampling the whole signal and cutting after (the audio reader relies on it).
    rng = np.random.default_rng(0)
    x = rng.standard_normal(44100).astype(np.float32)
    full = sinc_resample(x, 44100, 16000)
    start = 7001
    offset, lead = aligned_offset(start, 44100, 16000, 1600)
    assert offset % rate_ratio(44100, 16000)[1] == 0
    part = sinc_resample(x[offset:], 44100, 16000)
    np.testing.assert_allclose(part[lead:lead + 3000], full[start:start + 3000], atol=1e-6)


def test_bad_rates():
    with pytest.raises(ValueError):
        sinc_resample(np.zeros(4, np.float32), 0, 16000)
    with pytest.raises(ValueError):
        sinc_resample(np.zeros(4, np.float32), 44100.5, 16000)


def test_length_rounds_like_torchaudio():
    # torchaudio rounds n * new / orig to float32 before the ceil; for this n it
    # returns 65559 samples, not ceil(65559.0002) = 65560 (measured with torchaudio 2.9.1).
    from onellm.runtime.resample import sinc_length

    assert sinc_length(180697, 44100, 16000) == 65559
    assert len(sinc_resample(np.zeros(180697, np.float32), 44100, 16000)) == 65559
    assert sinc_length(4411, 44100, 16000) == math.ceil(4411 * 160 / 441)


def dense_resample(x: np.ndarray, src: int, dst: int) -> np.ndarray:
    """torchaudio's algorithm literally: the dense kernel as a strided convolution."""
    up, down = rate_ratio(src, dst)
    kernel, width = sinc_kernel(down, up)
    padded = np.pad(x.astype(np.float64), (width, width + down))
    frames = np.lib.stride_tricks.sliding_window_view(padded, kernel.shape[1])[::down]
    out = (frames @ kernel.T.astype(np.float64)).reshape(-1)
    return out[: math.ceil(up * len(x) / down)]


@pytest.mark.parametrize("src,dst", [(44100, 16000), (4409, 1600), (197, 200), (16000, 44100), (3, 7)])
def test_band_equals_dense_kernel(src, dst):
    # sinc_resample keeps only each phase's non-zero taps; the dense kernel gives the same.
    x = np.random.default_rng(src).standard_normal(3 * src + 5).astype(np.float32)
    np.testing.assert_allclose(sinc_resample(x, src, dst), dense_resample(x, src, dst), atol=1e-6)
    up, down = rate_ratio(src, dst)
    band, first, width = sinc_band(down, up)
    dense, _ = sinc_kernel(down, up)
    rows = np.arange(up)[:, None]
    np.testing.assert_array_equal(dense[rows, first[:, None] + np.arange(band.shape[1])], band)
    outside = dense.copy()
    outside[rows, first[:, None] + np.arange(band.shape[1])] = 0
    assert np.abs(outside).max() < 1e-12  # only the window's float32 residue is left out


def test_coprime_rates_stay_small():
    # 44099 -> 16000 has no common factor: torchaudio's dense kernel would be
    # 16000 x 44133 floats (2.8 GB); the band form is 16000 x 38.
    band, first, width = sinc_band(44099, 16000)
    assert band.shape == (16000, 2 * width + 2) and band.nbytes < 3e6
    t = np.arange(44099) / 44099
    y = sinc_resample(np.sin(2 * np.pi * 1000 * t).astype(np.float32), 44099, 16000)
    assert len(y) == 16000
    ref = np.sin(2 * np.pi * 1000 * np.arange(16000) / 16000)
    np.testing.assert_allclose(y[200:-200], ref[200:-200], atol=2e-3)
