"""Anti-aliased sample-rate conversion for 1-D signals (audio, IMU), numpy + scipy.

`resample_rate` converts between integer rates with `scipy.signal.resample_poly`
(a polyphase FIR: Kaiser-windowed sinc, beta 5, 10 zero crossings per side of the
slower rate, so downsampling low-passes below the new Nyquist frequency first).
Output sample k sits at input time k / dst_rate exactly.

`to_uniform_grid` puts irregularly timed samples onto a uniform grid by linear
interpolation (sensor logs jitter, drop samples or drift), so the polyphase filter
sees the regular signal it assumes.
"""

from __future__ import annotations

import math

import numpy as np


def rate_ratio(src_rate: int, dst_rate: int) -> tuple[int, int]:
    """(up, down) in lowest terms with src_rate * up / down == dst_rate."""
    if src_rate <= 0 or dst_rate <= 0:
        raise ValueError(f"sample rates must be positive, got {src_rate} -> {dst_rate}")
    g = math.gcd(int(src_rate), int(dst_rate))
    return int(dst_rate) // g, int(src_rate) // g


def resample_rate(x: np.ndarray, src_rate: int, dst_rate: int, axis: int = -1) -> np.ndarray:
    """Resample `x` along `axis` from src_rate to dst_rate (integers, Hz), float32 out."""
    from scipy.signal import resample_poly

    up, down = rate_ratio(src_rate, dst_rate)
    x = np.asarray(x, dtype=np.float32)
    if up == down:
        return x.copy()
    return resample_poly(x, up, down, axis=axis).astype(np.float32, copy=False)


def aligned_offset(start_sample_dst: int, src_rate: int, dst_rate: int, margin_dst: int) -> tuple[int, int]:
    """Where to cut the source so that resampling a slice equals slicing the full result.

    For output samples starting at `start_sample_dst` (at dst_rate) with `margin_dst`
    samples of filter run-in, returns (source offset, output index of the start within
    the resampled slice). The source offset is a multiple of `down`, so the slice's
    output grid coincides with the full signal's.
    """
    up, down = rate_ratio(src_rate, dst_rate)
    first_dst = max(start_sample_dst - margin_dst, 0)
    blocks = first_dst // up  # whole (down source -> up output) blocks before the cut
    return blocks * down, start_sample_dst - blocks * up


def to_uniform_grid(t: np.ndarray, x: np.ndarray, rate: float, t0: float, n: int) -> np.ndarray:
    """Linear interpolation of x [N, C] sampled at times t (s, increasing) onto
    t0 + k / rate, k = 0..n-1; values outside [t[0], t[-1]] hold the edge sample."""
    grid = t0 + np.arange(n, dtype=np.float64) / float(rate)
    out = np.empty((n, x.shape[1]), dtype=np.float32)
    for c in range(x.shape[1]):
        out[:, c] = np.interp(grid, t, x[:, c].astype(np.float64))
    return out
