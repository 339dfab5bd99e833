"""Anti-aliased sample-rate conversion for 1-D signals (audio, IMU), numpy + scipy.

`resample_rate` converts between integer rates with `scipy.signal.resample_poly`
(a polyphase FIR: Kaiser-windowed sinc, beta 5, 10 zero crossings per side of the
slower rate, so downsampling low-passes below the new Nyquist frequency first).
Output sample k sits at input time k / dst_rate exactly.

`sinc_resample` is the training pipeline's filter: the windowed-sinc resampler that
torchaudio applies by default (`torchaudio.functional.resample` with
`sinc_interp_hann`, `lowpass_filter_width=6`, `rolloff=0.99`, the two rates reduced by
their gcd), zero-padded at both edges, output length ceil(n * new / orig). It is
written here in numpy (torchaudio cannot be a runtime dependency) and checked against
fixtures made with torchaudio itself (tests/fixtures/resample/).

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


SINC_LOWPASS_WIDTH = 6  # zero crossings of the sinc on each side (torchaudio's default)
SINC_ROLLOFF = 0.99  # cutoff as a fraction of the lower rate's Nyquist (torchaudio's default)


def sinc_kernel(orig: int, new: int, lowpass_width: int = SINC_LOWPASS_WIDTH,
                rolloff: float = SINC_ROLLOFF) -> tuple[np.ndarray, int]:
    """Hann-windowed sinc kernels [new, 2 * width + orig] (float32) for rates already
    reduced by their gcd.

    Output phase j of every block of `orig` input samples is the dot product of kernel
    row j with the padded input starting at that block; `width` is the one-sided reach
    in input samples. Computed in float32 step by step as torchaudio does for a
    float32 waveform: its kernel is only float32-accurate (the sine's argument reaches
    pi * 0.99 * min(orig, new)), and a float64 kernel would differ from the training
    pipeline's by up to 3e-5 of the signal for rates such as 11025 -> 16000.
    """
    f32 = np.float32
    base = min(orig, new) * rolloff
    width = math.ceil(lowpass_width * orig / base)
    idx = np.arange(-width, width + orig, dtype=f32) / f32(orig)
    t = (np.arange(0, -new, -1, dtype=f32) / f32(new))[:, None] + idx[None, :]
    t = np.clip(t * f32(base), f32(-lowpass_width), f32(lowpass_width))
    window = np.cos(t * f32(math.pi) / f32(lowpass_width) / f32(2)) ** 2
    t = t * f32(math.pi)
    with np.errstate(invalid="ignore", divide="ignore"):
        kernel = np.where(t == 0, f32(1.0), np.sin(t) / t)
    return (kernel * (window * f32(base / orig))).astype(f32), width


def sinc_length(n: int, src_rate: int, dst_rate: int) -> int:
    """Samples sinc_resample returns for n input samples: ceil(n * new / orig), with the
    quotient rounded to float32 first as torchaudio does (torch.as_tensor of a Python
    float), which can drop the last sample of a long signal."""
    up, down = rate_ratio(int(src_rate), int(dst_rate))
    return int(math.ceil(float(np.float32(up * n / down))))


def sinc_resample(x: np.ndarray, src_rate: int, dst_rate: int, axis: int = -1) -> np.ndarray:
    """Resample `x` along `axis` from src_rate to dst_rate (integers, Hz) exactly as
    torchaudio's default resampler does; float32 out, `sinc_length(n)` samples."""
    if int(src_rate) != src_rate or int(dst_rate) != dst_rate:
        raise ValueError(f"sinc_resample takes integer rates, got {src_rate} -> {dst_rate}")
    up, down = rate_ratio(int(src_rate), int(dst_rate))  # new, orig reduced by the gcd
    x = np.asarray(x, dtype=np.float32)
    if up == down:
        return x.copy()
    moved = np.moveaxis(x, axis, -1)
    lead_shape, n = moved.shape[:-1], moved.shape[-1]
    rows = moved.reshape(-1, n)
    kernel, width = sinc_kernel(down, up)
    padded = np.pad(rows, ((0, 0), (width, width + down)))
    klen = kernel.shape[1]
    n_blocks = (padded.shape[1] - klen) // down + 1
    frames = np.lib.stride_tricks.sliding_window_view(padded, klen, axis=1)[:, ::down][:, :n_blocks]
    # float64 accumulation: within float32 rounding of torch's float32 convolution.
    out = np.matmul(frames.astype(np.float64), kernel.T.astype(np.float64)).reshape(rows.shape[0], -1)
    out = out[:, : sinc_length(n, src_rate, dst_rate)].astype(np.float32)
    return np.moveaxis(out.reshape(*lead_shape, -1), -1, axis)


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
