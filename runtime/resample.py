"""Anti-aliased sample-rate conversion for 1-D signals (audio, IMU), numpy + scipy.

`resample_rate` converts between integer rates with `scipy.signal.resample_poly`
(a polyphase FIR: Kaiser-windowed sinc, beta 5, 10 zero crossings per side of the
slower rate, so downsampling low-passes below the new Nyquist frequency first).
Output sample k sits at input time k / dst_rate exactly.

`sinc_resample` is the training pipeline's filter: the windowed-sinc resampler that
torchaudio applies by default (`torchaudio.functional.resample` with
`sinc_interp_hann`, `lowpass_filter_width=6`, `rolloff=0.99`, the two rates reduced by
their gcd), zero-padded at both edges, output length ceil(n * new / orig) (the
quotient rounded to float32 first, as torchaudio does). It is written here in numpy
(torchaudio cannot be a runtime dependency) with torchaudio's float32 kernel
arithmetic, and checked against fixtures made with torchaudio itself
(tests/fixtures/resample/: max-abs difference <= 3.6e-7 of the signal's scale on
every rate pair there). Unlike torchaudio it applies only each output phase's ~2 *
width non-zero taps, so rates with no common factor (44099 -> 16000) cost no more
than others instead of a dense new x orig kernel. The audio reader uses it.

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


def _sinc_taps(phase: np.ndarray, tap: np.ndarray, orig: int, new: int, lowpass_width: int,
               rolloff: float) -> np.ndarray:
    """Kernel values for output phases `phase` and input taps `tap` (broadcast; tap i is
    input sample i of the block, -width <= i < width + orig), in float32 step by step
    as torchaudio computes them for a float32 waveform: its kernel is only
    float32-accurate (the sine's argument reaches pi * 0.99 * min(orig, new)), and a
    float64 kernel differs from the training pipeline's by up to 3e-5 of the signal
    for rates such as 11025 -> 16000."""
    f32 = np.float32
    base = min(orig, new) * rolloff
    idx = np.asarray(tap).astype(f32) / f32(orig)
    t = (-np.asarray(phase).astype(f32)) / f32(new) + idx
    t = np.clip(t * f32(base), f32(-lowpass_width), f32(lowpass_width))
    window = np.cos(t * f32(math.pi) / f32(lowpass_width) / f32(2)) ** 2
    t = t * f32(math.pi)
    with np.errstate(invalid="ignore", divide="ignore"):
        kernel = np.where(t == 0, f32(1.0), np.sin(t) / t)
    return (kernel * (window * f32(base / orig))).astype(f32)


def sinc_width(orig: int, new: int, lowpass_width: int = SINC_LOWPASS_WIDTH,
               rolloff: float = SINC_ROLLOFF) -> int:
    """One-sided reach of the filter in input samples (rates reduced by their gcd)."""
    return math.ceil(lowpass_width * orig / (min(orig, new) * rolloff))


def sinc_kernel(orig: int, new: int, lowpass_width: int = SINC_LOWPASS_WIDTH,
                rolloff: float = SINC_ROLLOFF) -> tuple[np.ndarray, int]:
    """torchaudio's dense kernels [new, 2 * width + orig] (float32) for rates already
    reduced by their gcd, and `width`.

    Output phase j of every block of `orig` input samples is the dot product of kernel
    row j with the padded input starting at that block. Only about 2 * width taps of a
    row are non-zero, so `sinc_resample` uses just those (`sinc_band`): the dense
    form grows as new * orig (2.8 GB for 44099 -> 16000 Hz) and is kept for tests.
    """
    width = sinc_width(orig, new, lowpass_width, rolloff)
    taps = np.arange(-width, width + orig)
    return _sinc_taps(np.arange(new)[:, None], taps[None, :], orig, new, lowpass_width, rolloff), width


def sinc_band(orig: int, new: int, lowpass_width: int = SINC_LOWPASS_WIDTH,
              rolloff: float = SINC_ROLLOFF) -> tuple[np.ndarray, np.ndarray, int]:
    """The non-zero part of `sinc_kernel`: (taps [new, T] float32, first tap of each
    phase [new] (offset into the kernel row, i.e. into the padded block), width).

    Phase j is centred on input sample j * orig / new; its window is zero beyond
    `width` samples either side, so T = 2 * width + 2 taps from
    floor(j * orig / new) - width hold all of it. (Taps outside it carry the window's
    float32 residue cos(pi/2)^2 ~ 2e-15, which the dense form sums and this one drops.)
    """
    width = sinc_width(orig, new, lowpass_width, rolloff)
    n_taps = min(2 * width + 2, 2 * width + orig)
    phase = np.arange(new)
    first = (phase * orig) // new - width  # tap index, >= -width
    first = np.minimum(first, width + orig - n_taps)
    taps = first[:, None] + np.arange(n_taps)[None, :]
    kernel = _sinc_taps(phase[:, None], taps, orig, new, lowpass_width, rolloff)
    return kernel, first + width, width


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
    kernel, first, width = sinc_band(down, up)
    padded = np.pad(rows, ((0, 0), (width, width + down))).astype(np.float64)
    n_blocks = n // down + 1  # torchaudio's conv1d: (n + 2 * width + down - klen) // down + 1
    length = sinc_length(n, src_rate, dst_rate)
    # start[b, j]: padded index of phase j's first tap in block b.
    start = np.arange(n_blocks)[:, None] * down + first[None, :]
    taps = kernel.astype(np.float64)
    # float64 accumulation: within float32 rounding of torch's float32 convolution.
    out = np.zeros((rows.shape[0], n_blocks, up), dtype=np.float64)
    for k in range(taps.shape[1]):
        out += padded[:, start + k] * taps[:, k]
    out = out.reshape(rows.shape[0], -1)[:, :length].astype(np.float32)
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
