"""The audio modality: sound (WAV, FLAC, OGG, MP3).

Reading: PyAV (FFmpeg) decodes by content, any sample rate and channel count;
channel 0 is used, as the reference (torchaudio's Kaldi fbank reads channel 0).
Integer PCM is scaled to [-1, 1) as torchaudio loads it (int16 / 32768, ...).

Preprocessing (spec section 7, audio; the reference's `make_audio_features`):
resample to 16 kHz with the reference's own filter (torchaudio's default windowed-sinc
resampler, re-done in numpy as `onellm.runtime.resample.sinc_resample` and checked
against torchaudio's output); subtract the mean; Kaldi fbank
with torchaudio.compliance.kaldi.fbank's semantics (below); zero-pad or truncate to
1024 frames; then (x + 4.2677393) / (4.5689974 * 2); transpose -> [1,128,1024].

The fbank: 25 ms frames (400 samples) every 10 ms (160), snip_edges (frames =
1 + (N - 400) // 160), no dither, per-frame DC removal, pre-emphasis 0.97, symmetric
Hann ("hanning") window, zero-padded to 512, power spectrum, 128 triangular mel
filters on Kaldi's mel scale 1127 ln(1 + f/700) from 20 Hz to 8 kHz, log with a floor
of float32 epsilon, no energy column (htk_compat with use_energy off). With these
sizes several low mel filters cover no FFT bin; torchaudio returns log(epsilon) for
them and the checkpoint was trained so, while Kaldi and kaldi-native-fbank refuse
this configuration ("num_mel_bins too large"). Hence the fbank is computed here in
numpy, and kaldi-native-fbank serves as the independent oracle in the tests.

The mean: the reference subtracts the mean of the whole file over all its channels,
here that of channel 0 in the window; the fbank removes each frame's mean anyway, so
the result is the same to float32 rounding.

The window: the model hears 1024 frames = 10.24 s (10.255 s of samples) starting at
`start` seconds (default 0, the reference's choice); longer audio is truncated with
a notice naming the option that moves the window (`--audio-start`). Only the part of
the file the window needs is decoded and resampled: from a source sample that is a
multiple of the resampler's block (so the 16 kHz grid is the whole file's) 0.1 s
before the window (far more than the filter's reach of 6 zero crossings), to 0.1 s
after it; the window cut from it equals the same window of the whole file resampled.

In-memory input: a float array in [-1, 1] (or int16/int32 PCM), [N] or [C, N],
with `sample_rate=`.
"""

from __future__ import annotations

import logging
import math
import time
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import InputError
from ..resample import aligned_offset, sinc_resample
from ._io import (
    Source,
    first_stream,
    is_array,
    open_media,
    number_option,
    read_head,
    require_file,
    require_finite,
    require_finite_output,
    source_label,
)
from .base import Example, ModalityInput, ModalitySpec, ReaderFlag

logger = logging.getLogger(__name__)

EXPECTED = "an audio file (WAV, FLAC, OGG or MP3)"
SAMPLE_RATE = 16000
FRAME_LENGTH = 400  # 25 ms at 16 kHz
FRAME_SHIFT = 160  # 10 ms
FFT_SIZE = 512  # frame length rounded up to a power of two
N_MELS = 128
N_FRAMES = 1024
LOW_FREQ = 20.0
HIGH_FREQ = SAMPLE_RATE / 2.0  # Kaldi's high_freq=0 means the Nyquist frequency
PREEMPHASIS = 0.97
LOG_FLOOR = float(np.finfo(np.float32).eps)
NORM_MEAN = -4.2677393  # AudioSet fbank statistics the model was trained with
NORM_STD = 4.5689974
WINDOW_SAMPLES = FRAME_LENGTH + (N_FRAMES - 1) * FRAME_SHIFT  # 164080 = 10.255 s
MIN_RATE, MAX_RATE = 1000, 768000  # sample rates real audio files use
_MARGIN_OUT = 1600  # 0.1 s of filter run-in either side of a cut window

_PCM_SCALE = {"u8": 128.0, "s16": 32768.0, "s32": 2.0 ** 31, "s64": 2.0 ** 63}


def n_fbank_frames(n_samples: int) -> int:
    """Kaldi snip_edges frame count: 1 + (N - 400) // 160, or 0 below one frame."""
    return 0 if n_samples < FRAME_LENGTH else 1 + (n_samples - FRAME_LENGTH) // FRAME_SHIFT


def _mel(f):
    return 1127.0 * np.log(1.0 + np.asarray(f) / 700.0)


def mel_banks(n_mels: int = N_MELS, low: float = LOW_FREQ, high: float = HIGH_FREQ,
              fft_size: int = FFT_SIZE, rate: int = SAMPLE_RATE) -> np.ndarray:
    """Kaldi's triangular mel filters [n_mels, fft_size // 2] (float32, as torchaudio).

    Filters that cover no FFT bin stay all zero (torchaudio's behaviour).
    """
    n_bins = fft_size // 2
    mel_low, mel_high = float(_mel(low)), float(_mel(high))
    delta = (mel_high - mel_low) / (n_mels + 1)
    b = np.arange(n_mels, dtype=np.float32)[:, None]
    left = (mel_low + b * np.float32(delta)).astype(np.float32)
    center = (mel_low + (b + 1) * np.float32(delta)).astype(np.float32)
    right = (mel_low + (b + 2) * np.float32(delta)).astype(np.float32)
    fft_mel = _mel(np.float32(rate / fft_size) * np.arange(n_bins, dtype=np.float32)).astype(np.float32)[None, :]
    up = (fft_mel - left) / (center - left)
    down = (right - fft_mel) / (right - center)
    return np.maximum(np.float32(0.0), np.minimum(up, down)).astype(np.float32)


_TABLES: tuple[np.ndarray, np.ndarray] | None = None


def _tables() -> tuple[np.ndarray, np.ndarray]:
    """(mel filters [128, 256], symmetric Hann window [400]), built once."""
    global _TABLES
    if _TABLES is None:
        n = np.arange(FRAME_LENGTH, dtype=np.float64)
        window = (0.5 - 0.5 * np.cos(2.0 * np.pi * n / (FRAME_LENGTH - 1))).astype(np.float32)
        _TABLES = (mel_banks(), window)
    return _TABLES


def compute_fbank(wave: np.ndarray, banks: np.ndarray | None = None) -> np.ndarray:
    """Log-mel fbank [frames, mels] float32 of a 16 kHz waveform (scale of torchaudio.load).

    banks: other mel filters [mels, 256] (tests compare against kaldi-native-fbank
    with filter counts it accepts); default the model's 128.
    """
    default_banks, window = _tables()
    banks = default_banks if banks is None else banks
    m = n_fbank_frames(len(wave))
    if m == 0:
        return np.zeros((0, banks.shape[0]), dtype=np.float32)
    wave = np.ascontiguousarray(wave, dtype=np.float32)
    frames = np.lib.stride_tricks.sliding_window_view(wave, FRAME_LENGTH)[::FRAME_SHIFT][:m]
    frames = frames - frames.mean(axis=1, keepdims=True, dtype=np.float32)
    prev = np.concatenate([frames[:, :1], frames[:, :-1]], axis=1)
    frames = (frames - np.float32(PREEMPHASIS) * prev) * window
    spec = np.fft.rfft(frames, n=FFT_SIZE, axis=1)
    power = (spec.real ** 2 + spec.imag ** 2).astype(np.float32)
    energies = power[:, : FFT_SIZE // 2] @ banks.T
    return np.log(np.maximum(energies, np.float32(LOG_FLOOR))).astype(np.float32)


def fbank_to_tensor(fbank: np.ndarray) -> np.ndarray:
    """[frames, 128] -> [1, 128, 1024]: pad/truncate to 1024 frames, then normalise."""
    out = np.zeros((N_FRAMES, N_MELS), dtype=np.float32)
    n = min(len(fbank), N_FRAMES)
    out[:n] = fbank[:n]
    out = (out - np.float32(NORM_MEAN)) / np.float32(NORM_STD * 2)
    return np.ascontiguousarray(out.T[None], dtype=np.float32)


def _pcm_to_float(arr: np.ndarray, fmt: str) -> np.ndarray:
    base = fmt.rstrip("p")
    if base in ("flt", "dbl"):
        return arr.astype(np.float32, copy=False)
    scale = _PCM_SCALE.get(base)
    if scale is None:  # pragma: no cover - FFmpeg has no other sample formats
        raise ValueError(f"unknown sample format {fmt}")
    x = arr.astype(np.float32)
    if base == "u8":
        x -= 128.0
    return x / np.float32(scale)


def _refuse_misread_rifx(path: Path, stream) -> None:
    """A big-endian RIFX WAV that FFmpeg decodes as little-endian PCM (it does, in the
    FFmpeg PyAV ships) would be heard as loud noise: refuse it, naming the format."""
    if read_head(path, 12)[:4] != b"RIFX":
        return
    codec = stream.codec_context.name or ""
    if codec.startswith("pcm_") and codec.endswith("be"):
        return  # an FFmpeg that honours the byte order
    raise InputError(path, EXPECTED, f"a big-endian RIFX WAVE file, which FFmpeg decodes with the wrong "
                     f"byte order (as {codec or 'an unknown codec'}); convert it to a standard "
                     f"little-endian WAV first (e.g. sox in.wav -L out.wav)")


def read_audio_file(path: Path, start_s: float) -> tuple[np.ndarray, int, int, dict[str, Any]]:
    """Decode what the window needs: (channel-0 samples, source rate, offset of the
    first returned sample in the file, info). Stops decoding after the window."""
    info: dict[str, Any] = {}
    container = open_media(path, EXPECTED)
    try:
        stream = first_stream(container, "audio", path, EXPECTED)
        _refuse_misread_rifx(path, stream)
        rate = int(stream.codec_context.sample_rate or stream.rate or 0)
        if not MIN_RATE <= rate <= MAX_RATE:
            raise InputError(path, f"{EXPECTED} with a sample rate of {MIN_RATE}-{MAX_RATE} Hz", f"{rate} Hz")
        channels = int(stream.codec_context.channels or 0)
        info.update(codec=stream.codec_context.name, container=container.format.name,
                    sample_rate=rate, channels=channels)
        if stream.duration is not None and stream.time_base is not None:
            info["duration_s_metadata"] = float(stream.duration * stream.time_base)
        elif container.duration:
            info["duration_s_metadata"] = container.duration / 1e6
        start_out = int(round(start_s * SAMPLE_RATE))
        offset, _ = aligned_offset(start_out, rate, SAMPLE_RATE, _MARGIN_OUT)
        need_out = start_out + WINDOW_SAMPLES + _MARGIN_OUT
        stop = int(math.ceil(need_out * rate / SAMPLE_RATE)) + 1
        chunks: list[np.ndarray] = []
        pos = 0  # samples decoded so far (channel 0)
        more = False
        try:
            for frame in container.decode(stream):
                arr = frame.to_ndarray()
                fmt = frame.format.name
                if frame.format.is_planar:
                    ch0 = arr[0]
                else:
                    nch = max(len(frame.layout.channels), 1)
                    ch0 = arr.reshape(-1)[::nch]
                n = ch0.shape[0]
                lo, hi = max(offset - pos, 0), min(stop - pos, n)
                if hi > lo:
                    chunks.append(_pcm_to_float(ch0[lo:hi], fmt))
                pos += n
                if pos >= stop:
                    more = True
                    break
        except InputError:
            raise
        except Exception as e:  # noqa: BLE001 - damaged stream part-way
            if pos == 0:
                raise InputError(path, EXPECTED, f"damaged audio ({type(e).__name__}: {e})") from None
            logger.warning("%s: decoding stopped after %.2f s (%s)", path, pos / rate, e)
    finally:
        container.close()
    info["decoded_samples"] = pos
    info["more_after_window"] = more
    samples = np.concatenate(chunks) if chunks else np.zeros(0, dtype=np.float32)
    return samples, rate, offset, info


def _window(label: str, samples: np.ndarray, rate: int, offset: int, total_src: int,
            start_s: float, more: bool, meta: dict[str, Any]) -> np.ndarray:
    """Resample the decoded part to 16 kHz and cut the model's window from `start_s`.

    `samples` start at source sample `offset` (a multiple of the resampler's down
    factor, so the 16 kHz grid of the slice is the grid of the whole file).
    """
    if total_src == 0:
        raise InputError(label, "audio with at least 25 ms of sound (400 samples at 16 kHz)",
                         "zero-length audio (no samples)")
    duration = total_src / rate
    if start_s >= duration and not more:
        raise InputError(label, f"a start time before the end of the audio ({duration:.3f} s)",
                         f"start {start_s:g} s")
    wave16 = sinc_resample(samples, rate, SAMPLE_RATE)
    lo = int(round(start_s * SAMPLE_RATE)) - offset * SAMPLE_RATE // rate
    wave = wave16[lo:lo + WINDOW_SAMPLES]
    if len(wave) < FRAME_LENGTH:
        raise InputError(label, "at least 25 ms of sound (400 samples at 16 kHz) after the start time",
                         f"{len(wave)} samples ({len(wave) / SAMPLE_RATE * 1000:.1f} ms)")
    truncated = more or len(wave16) - lo > WINDOW_SAMPLES
    meta.update(window_s=[round(start_s, 6), round(start_s + len(wave) / SAMPLE_RATE, 6)],
                truncated=bool(truncated))
    if truncated:
        total = f"{meta['duration_s']:.2f} s" if meta.get("duration_s") else "longer than that"
        logger.warning("%s: the audio lasts %s; the model hears 10.24 s of it, from %.2f s "
                       "(choose another window with --audio-start)", label, total, start_s)
    return wave


def preprocess(source: Source, *, start: float = 0.0, sample_rate: int | None = None) -> ModalityInput:
    """Audio -> [1,128,1024] float32 (spec section 7, audio).

    start: seconds into the audio where the model's 10.24 s window begins.
    sample_rate: rate of an in-memory array (Hz); not used for files.
    """
    t0 = time.perf_counter()
    label = source_label(source)
    start = number_option(label, "start", start) or 0.0
    sample_rate = number_option(label, "sample_rate", sample_rate)
    if start < 0:
        raise InputError(label, "a start time >= 0 seconds", f"start {start}")
    if is_array(source):
        samples, rate, meta = _from_array(source, sample_rate)
        offset, more = 0, False
        total = len(samples)
    else:
        path = require_file(source, EXPECTED)
        samples, rate, offset, info = read_audio_file(path, float(start))
        more = info.pop("more_after_window")
        total = info.pop("decoded_samples")
        meta = {"source": str(path), **info}
    meta["duration_s"] = round(total / rate, 6) if not more else meta.get("duration_s_metadata")
    require_finite(label, samples, EXPECTED, "samples")
    wave = _window(meta["source"], samples, rate, offset, total, float(start), more, meta)
    with np.errstate(over="ignore", invalid="ignore"):
        wave = wave - wave.mean(dtype=np.float64).astype(np.float32)
        fbank = compute_fbank(wave)
    require_finite_output(meta["source"], fbank, EXPECTED)
    meta["fbank_frames"] = int(len(fbank))
    meta["padded_frames"] = int(max(N_FRAMES - len(fbank), 0))
    array = fbank_to_tensor(fbank)
    meta["preprocess_s"] = round(time.perf_counter() - t0, 4)
    return ModalityInput("audio", array, meta)


def _from_array(arr: np.ndarray, sample_rate: int | None) -> tuple[np.ndarray, int, dict[str, Any]]:
    label = source_label(arr)
    if sample_rate is None or not np.isfinite(sample_rate) or float(sample_rate) != int(sample_rate) \
            or not MIN_RATE <= int(sample_rate) <= MAX_RATE:
        raise InputError(label, f"an integer sample_rate of {MIN_RATE}-{MAX_RATE} Hz with in-memory audio",
                         f"sample_rate={sample_rate}")
    if arr.ndim == 2:
        # [C, N] with few channels; [N, C] is transposed.
        if arr.shape[0] > arr.shape[1]:
            arr = arr.T
        channels = arr.shape[0]
        arr = arr[0] if channels else arr.reshape(-1)
    elif arr.ndim == 1:
        channels = 1
    else:
        raise InputError(label, "audio samples as an array [N] or [channels, N]", f"shape {list(arr.shape)}")
    if arr.dtype.kind == "f":
        require_finite(label, arr, EXPECTED, "samples")
        x = arr.astype(np.float32)
        peak = float(np.abs(x).max()) if x.size else 0.0
        if peak > 1.5:
            logger.warning("%s: samples reach %.3g; float audio is expected in [-1, 1] "
                           "(the model was trained on that scale)", label, peak)
    elif arr.dtype.kind in "iu":
        kinds = {np.dtype(np.int16): ("s16", 0), np.dtype(np.int32): ("s32", 0),
                 np.dtype(np.uint8): ("u8", 0)}
        if arr.dtype not in kinds:
            raise InputError(label, "float32/float64, int16, int32 or uint8 samples", f"dtype {arr.dtype}")
        x = _pcm_to_float(arr, kinds[arr.dtype][0])
    else:
        raise InputError(label, "numeric audio samples", f"dtype {arr.dtype}")
    return x, int(sample_rate), {"source": label, "sample_rate": int(sample_rate), "channels": int(channels)}


def dummy_input(rng: np.random.Generator) -> np.ndarray:
    """The real pipeline on 3 s of a random harmonic tone with noise (padded like a short clip)."""
    t = np.arange(3 * SAMPLE_RATE) / SAMPLE_RATE
    f0 = rng.uniform(100, 300)
    wave = sum(np.sin(2 * np.pi * f0 * k * t + rng.uniform(0, 6.3)) / k for k in range(1, 8))
    wave = 0.1 * wave + 0.01 * rng.standard_normal(len(t))
    wave = (wave - wave.mean()).astype(np.float32)
    return fbank_to_tensor(compute_fbank(wave))


SPEC = ModalitySpec(
    name='audio',
    cli_option='--audio',
    description='sound (WAV, FLAC, OGG, MP3)',
    file_types=('.wav', '.flac', '.ogg', '.mp3'),
    input_shape=(1, 128, 1024),
    tokenizer_kind='conv2d',
    n_frames=1,
    n_tokens=1213,
    preprocess=preprocess,
    dummy_input=dummy_input,
    caption_prompt='Provide a one-sentence caption for the provided audio.',
    example=Example('audio/speech.wav'),
    flags=(ReaderFlag("--audio-start", "start", float, "Start of the 10.24 s audio window, seconds."),),
)
