"""Audio reader: real-world files, the fbank's defining properties, bad inputs.

Tolerances: fbank vs kaldi-native-fbank 5e-4 (log-mel, float32 FFT paths differ);
fbank vs the hand-written per-sample derivation 1e-3; empty mel filters exactly
log(float32 eps); resampled sine peak within one FFT bin.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path

import numpy as np
import pytest

from _inputs_helpers import (
    EXAMPLES,
    macroman_handler_names,
    make_mov_with_audio,
    write_audio,
    write_rifx_wav,
    write_wav_header_only,
)
from onellm.runtime.errors import InputError
from onellm.runtime.modalities import audio as A
from onellm.runtime.modalities import get_modality

SPEC = get_modality("audio")


def tone(freq: float, rate: int, seconds: float, amp: float = 0.3) -> np.ndarray:
    t = np.arange(int(rate * seconds)) / rate
    return (amp * np.sin(2 * np.pi * freq * t)).astype(np.float32)


def harmonics(rate: int, seconds: float) -> np.ndarray:
    """220 Hz and its partials up to 7 kHz: energy in every mel filter."""
    t = np.arange(int(rate * seconds)) / rate
    x = sum(np.sin(2 * np.pi * 220 * k * t + k) / k ** 0.5 for k in range(1, 32))
    return (0.3 * x / np.abs(x).max()).astype(np.float32)


def check(result) -> None:
    assert result.array.shape == (1, 128, 1024)
    assert result.array.dtype == np.float32
    assert np.isfinite(result.array).all()


# ------------------------------------------------------------------ happy paths

def test_example_wav() -> None:
    r = SPEC.preprocess(EXAMPLES / "audio" / "speech.wav")
    check(r)
    assert r.meta["sample_rate"] == 16000 and r.meta["fbank_frames"] == A.n_fbank_frames(int(round(r.meta["duration_s"] * 16000)))
    assert r.meta["truncated"] is False


@pytest.mark.parametrize("name,codec,fmt,rate", [
    ("a.flac", "flac", "s16", 44100),
    ("a.ogg", "libopus", "flt", 48000),
    ("a.mp3", "libmp3lame", "fltp", 44100),
    ("a24.wav", "pcm_s24le", "s32", 96000),
    ("af.wav", "pcm_f32le", "flt", 22050),
])
def test_formats_and_rates_match_a_16k_wav(tmp_path, name, codec, fmt, rate) -> None:
    """The same 2 s sound in any container/rate gives (nearly) the features of a 16 kHz WAV."""
    ref = SPEC.preprocess(write_audio(tmp_path / "ref.wav", harmonics(16000, 2.0), 16000, "pcm_f32le", "flt"))
    r = SPEC.preprocess(write_audio(tmp_path / name, harmonics(rate, 2.0), rate, codec, fmt))
    check(r)
    assert r.meta["sample_rate"] == rate
    n = min(r.meta["fbank_frames"], ref.meta["fbank_frames"]) - 4  # codec delay/padding at the ends
    used = A.mel_banks().sum(axis=1) > 0
    a, b = r.array[0, used, 4:n], ref.array[0, used, 4:n]
    # Normalised log-mel units (1 unit = 9.1 in log energy); lossy codecs drop quiet detail.
    tol = 0.05 if codec in ("libopus", "libmp3lame") else 0.005
    assert np.abs(a - b).mean() < tol


def test_stereo_uses_channel_0(tmp_path) -> None:
    left, right = tone(440, 44100, 2.0), tone(3000, 44100, 2.0)
    st = SPEC.preprocess(write_audio(tmp_path / "st.wav", np.stack([left, right]), 44100))
    mono = SPEC.preprocess(write_audio(tmp_path / "m.wav", left, 44100))
    assert st.meta["channels"] == 2
    np.testing.assert_allclose(st.array, mono.array, atol=1e-5)


def test_long_audio_truncated_with_notice_and_start_moves_the_window(tmp_path, caplog) -> None:
    rate = 22050
    t = np.arange(rate * 14) / rate
    sig = 0.3 * np.sin(2 * np.pi * (200 + 50 * t) * t)  # a chirp: every window differs
    path = write_audio(tmp_path / "long.wav", sig[None], rate)
    with caplog.at_level(logging.WARNING):
        r0 = SPEC.preprocess(path)
    assert r0.meta["truncated"] and "--audio-start" in caplog.text
    assert r0.meta["fbank_frames"] == 1024 and r0.meta["padded_frames"] == 0
    r3 = SPEC.preprocess(path, start=3.0)
    assert r3.meta["window_s"][0] == 3.0
    # The window equals cutting the fully resampled file at 3 s: the reader resamples
    # only a slice around the window, on the whole file's 16 kHz grid.
    from onellm.runtime.resample import sinc_resample
    pcm = np.rint(np.clip(sig, -1, 1) * 32767) / 32768
    full = sinc_resample(pcm.astype(np.float32), rate, 16000)[48000:48000 + A.WINDOW_SAMPLES]
    expect = A.fbank_to_tensor(A.compute_fbank(full - full.mean()))
    np.testing.assert_allclose(r3.array, expect, atol=2e-5)
    assert np.abs(r3.array - r0.array).max() > 0.1


def test_in_memory_array_same_as_file(tmp_path) -> None:
    sig = harmonics(16000, 1.5)
    f = SPEC.preprocess(write_audio(tmp_path / "x.wav", sig, 16000, "pcm_f32le", "flt"))
    m = SPEC.preprocess(sig, sample_rate=16000)
    np.testing.assert_allclose(f.array, m.array, atol=1e-6)
    m16 = SPEC.preprocess(np.rint(sig * 32767).astype(np.int16), sample_rate=16000)
    # int16 rounding adds a -96 dB noise floor: visible only in filters above the partials.
    np.testing.assert_allclose(m16.array[0, :100], m.array[0, :100], atol=5e-3)
    st = SPEC.preprocess(np.stack([sig, np.zeros_like(sig)]).T, sample_rate=16000)  # [N, C]
    np.testing.assert_allclose(st.array, m.array, atol=1e-6)


# ------------------------------------------------------------------ fbank fidelity

@pytest.mark.parametrize("n", [400, 401, 559, 560, 16000, 164080, 200000])
def test_frame_count(n) -> None:
    assert A.n_fbank_frames(n) == 1 + (n - 400) // 160
    assert A.compute_fbank(np.random.default_rng(n).standard_normal(n).astype(np.float32)).shape == (
        1 + (n - 400) // 160, 128)


def test_fbank_matches_kaldi_native_fbank() -> None:
    """Independent oracle: kaldi-native-fbank with the same framing/window/mel rules.

    kaldi-native-fbank refuses 128 filters on a 512-point FFT (some filters would be
    empty), so the comparison uses filter counts it accepts; the 128-filter matrix
    comes from the same function.
    """
    knf = pytest.importorskip("kaldi_native_fbank")
    x = (0.1 * np.random.default_rng(0).standard_normal(20000)).astype(np.float32)
    for bins in (23, 40, 80):
        opts = knf.FbankOptions()
        opts.frame_opts.dither = 0.0
        opts.frame_opts.window_type = "hanning"
        opts.frame_opts.samp_freq = 16000
        opts.frame_opts.frame_length_ms = 25
        opts.frame_opts.frame_shift_ms = 10
        opts.frame_opts.snip_edges = True
        opts.frame_opts.remove_dc_offset = True
        opts.frame_opts.preemph_coeff = 0.97
        opts.mel_opts.num_bins = bins
        opts.mel_opts.low_freq = 20
        opts.mel_opts.high_freq = 0
        opts.use_energy = False
        opts.htk_compat = True
        opts.use_log_fbank = True
        opts.use_power = True
        fb = knf.OnlineFbank(opts)
        fb.accept_waveform(16000, x)
        fb.input_finished()
        oracle = np.stack([fb.get_frame(i) for i in range(fb.num_frames_ready)])
        ours = A.compute_fbank(x, A.mel_banks(n_mels=bins))
        assert ours.shape == oracle.shape
        np.testing.assert_allclose(ours, oracle, atol=5e-4)


def _kaldi_frame_by_hand(wave: np.ndarray, index: int) -> np.ndarray:
    """One fbank frame from the Kaldi definitions, written out sample by sample (float64)."""
    frame = [float(v) for v in wave[index * 160: index * 160 + 400]]
    mean = sum(frame) / 400
    frame = [v - mean for v in frame]
    for i in range(399, 0, -1):
        frame[i] -= 0.97 * frame[i - 1]
    frame[0] -= 0.97 * frame[0]
    frame = [v * (0.5 - 0.5 * math.cos(2 * math.pi * i / 399)) for i, v in enumerate(frame)]
    frame = np.array(frame + [0.0] * 112)
    k = np.arange(257)[:, None]
    dft = np.exp(-2j * np.pi * k * np.arange(512)[None, :] / 512) @ frame
    power = np.abs(dft) ** 2

    def mel(f):
        return 1127.0 * math.log(1.0 + f / 700.0)

    lo, hi = mel(20.0), mel(8000.0)
    delta = (hi - lo) / 129
    out = np.empty(128)
    for b in range(128):
        left, center, right = lo + b * delta, lo + (b + 1) * delta, lo + (b + 2) * delta
        e = 0.0
        for i in range(256):
            m = mel(16000 / 512 * i)
            if left < m < right:
                e += power[i] * ((m - left) / (center - left) if m <= center else (right - m) / (right - center))
        out[b] = math.log(max(e, np.finfo(np.float32).eps))
    return out


def test_hand_computed_frame() -> None:
    wave = (0.2 * np.random.default_rng(1).standard_normal(2000)).astype(np.float32)
    ours = A.compute_fbank(wave)
    for index in (0, 5):
        np.testing.assert_allclose(ours[index], _kaldi_frame_by_hand(wave, index), atol=1e-3)


def test_empty_mel_filters_give_log_eps_as_torchaudio() -> None:
    banks = A.mel_banks()
    empty = np.flatnonzero(banks.sum(axis=1) == 0)
    assert empty.size >= 1  # why kaldi-native-fbank cannot be configured for 128 filters
    fb = A.compute_fbank((0.3 * np.random.default_rng(2).standard_normal(8000)).astype(np.float32))
    assert np.all(fb[:, empty] == np.float32(math.log(np.finfo(np.float32).eps)))
    assert np.all(fb[:, banks.sum(axis=1) > 0] > math.log(np.finfo(np.float32).eps))


def test_padding_before_normalisation() -> None:
    r = SPEC.preprocess(tone(500, 16000, 1.0), sample_rate=16000)
    frames = A.n_fbank_frames(16000)
    pad_value = (0.0 + 4.2677393) / (4.5689974 * 2)
    np.testing.assert_allclose(r.array[0, :, frames:], pad_value, rtol=1e-6)
    raw = A.compute_fbank(tone(500, 16000, 1.0) - tone(500, 16000, 1.0).mean())
    np.testing.assert_allclose(r.array[0, :, :frames], ((raw + 4.2677393) / (4.5689974 * 2)).T, atol=1e-5)


def test_resampled_sine_frequency() -> None:
    from onellm.runtime.resample import sinc_resample

    for src in (44100, 22050, 48000, 8000):
        y = sinc_resample(tone(1000.0, src, 2.0), src, 16000)
        assert abs(len(y) - 32000) <= 1
        spec = np.abs(np.fft.rfft(y * np.hanning(len(y))))
        peak_hz = np.argmax(spec) * 16000 / len(y)
        assert abs(peak_hz - 1000.0) <= 16000 / len(y)  # within one FFT bin
        assert abs(np.sqrt(2) * y[2000:-2000].std() - 0.3) < 0.3 * 0.01  # amplitude kept within 1 %


def test_resampling_removes_content_above_8k() -> None:
    from onellm.runtime.resample import sinc_resample

    y = sinc_resample(tone(12000.0, 44100, 1.0), 44100, 16000)  # would alias to 4 kHz
    assert y[1000:-1000].std() < 0.3 * 10 ** (-40 / 20)  # at least 40 dB down


# ------------------------------------------------------------------ the training pipeline

UPSTREAM = Path(__file__).parent / "fixtures" / "upstream"
PAD_VALUE = (0.0 + 4.2677393) / (4.5689974 * 2)


@pytest.mark.parametrize("name,path", [
    ("speech16k", EXAMPLES / "audio" / "speech.wav"),
    ("speech44k_stereo", UPSTREAM / "speech44k_stereo.wav"),
])
def test_matches_upstream_torchaudio_run(name, path) -> None:
    """The model input equals upstream's make_audio_features run with torchaudio on the
    same file (tests/fixtures/make_torchaudio_fixtures.py): 16 kHz as is, and 44.1 kHz
    stereo (channel 0, torchaudio's resampler)."""
    fx = np.load(UPSTREAM / f"audio_{name}.npz")
    r = SPEC.preprocess(path)
    frames = int(fx["frames"])
    assert r.meta["fbank_frames"] == frames and r.meta["sample_rate"] == int(fx["rate"])
    want = np.full((1, 128, 1024), PAD_VALUE, np.float32)
    want[0, :, :frames] = fx["fbank"]
    # Measured: relative L2 1.3e-6, max abs 1.0e-4 (float32 FFT/log paths differ).
    assert np.linalg.norm(r.array - want) / np.linalg.norm(want) < 1e-5
    assert np.abs(r.array - want).max() < 5e-4
    if "wave16" in fx:
        samples, rate, offset, _ = A.read_audio_file(path, 0.0)
        assert offset == 0
        from onellm.runtime.resample import sinc_resample
        wave = sinc_resample(samples, rate, 16000)
        n = len(fx["wave16"])
        np.testing.assert_allclose(wave[:n], fx["wave16"], atol=1e-5 * np.abs(fx["wave16"]).max())


def test_rates_use_the_sinc_resampler(monkeypatch, tmp_path) -> None:
    """Audio off 16 kHz goes through sinc_resample (not another filter)."""
    calls = []
    real = A.sinc_resample

    def spy(x, src, dst, *a, **k):
        calls.append((src, dst))
        return real(x, src, dst, *a, **k)

    monkeypatch.setattr(A, "sinc_resample", spy)
    SPEC.preprocess(write_audio(tmp_path / "a.wav", tone(440, 48000, 1.0), 48000))
    assert calls == [(48000, 16000)]


def test_quicktime_metadata_in_mac_roman(tmp_path) -> None:
    """The audio track of a .mov with Mac Roman handler names is read (and equals the
    same file with UTF-8 names): a 440 Hz tone peaks in the mel bin holding 440 Hz."""
    plain = make_mov_with_audio(tmp_path / "plain.mov")
    roman = macroman_handler_names(plain, tmp_path / "roman.mov")
    a, b = SPEC.preprocess(plain), SPEC.preprocess(roman)
    check(b)
    assert b.meta["container"] == a.meta["container"] and b.meta["codec"] == "aac"
    np.testing.assert_array_equal(a.array, b.array)
    banks = A.mel_banks()
    peak_bin = int(np.argmax(b.array[0, :, 20:80].mean(axis=1)))
    assert banks[peak_bin, int(round(440 / (16000 / 512)))] > 0  # that filter covers 440 Hz


def test_riff_and_rifx(tmp_path) -> None:
    """Little-endian WAV of the same samples reads; big-endian RIFX (which FFmpeg would
    decode byte-swapped) is refused with an error naming the format."""
    pcm = np.rint(tone(440, 16000, 1.0) * 32767).astype(np.int16)
    riff = SPEC.preprocess(write_audio(tmp_path / "le.wav", pcm[None] / 32767, 16000))
    check(riff)
    with pytest.raises(InputError, match="big-endian RIFX") as e:
        SPEC.preprocess(write_rifx_wav(tmp_path / "be.wav", pcm, 16000))
    assert "be.wav" in str(e.value) and "little-endian" in str(e.value)
    from onellm.runtime.modalities._io import describe_content
    assert describe_content(tmp_path / "be.wav") == "a big-endian RIFX WAVE audio file"


def test_rifx_read_when_ffmpeg_honours_the_byte_order(tmp_path, monkeypatch) -> None:
    """With an FFmpeg that reports big-endian PCM for RIFX, the file is not refused."""
    pcm = np.rint(tone(440, 16000, 1.0) * 32767).astype(np.int16)
    path = write_rifx_wav(tmp_path / "be.wav", pcm, 16000)

    class Ctx:
        name = "pcm_s16be"

    class Stream:
        codec_context = Ctx()

    A._refuse_misread_rifx(path, Stream())  # no error
    Ctx.name = "pcm_s16le"
    with pytest.raises(InputError, match="RIFX"):
        A._refuse_misread_rifx(path, Stream())


# ------------------------------------------------------------------ bad inputs

def test_zero_length_wav(tmp_path) -> None:
    with pytest.raises(InputError, match="zero-length"):
        SPEC.preprocess(write_wav_header_only(tmp_path / "empty.wav"))


def test_shorter_than_one_frame(tmp_path) -> None:
    with pytest.raises(InputError, match="25 ms"):
        SPEC.preprocess(write_audio(tmp_path / "tiny.wav", tone(440, 16000, 0.01), 16000))


def test_start_past_the_end(tmp_path) -> None:
    path = write_audio(tmp_path / "s.wav", tone(440, 16000, 1.0), 16000)
    with pytest.raises(InputError, match="start"):
        SPEC.preprocess(path, start=5.0)
    with pytest.raises(InputError, match="start"):
        SPEC.preprocess(path, start=-1.0)


@pytest.mark.parametrize("payload,found", [
    (b"hello, this is not sound\n", "text"),
    (b"\x00\x01\x02garbage" * 50, "binary"),
])
def test_not_audio(tmp_path, payload, found) -> None:
    p = tmp_path / "x.wav"
    p.write_bytes(payload)
    with pytest.raises(InputError, match=found) as e:
        SPEC.preprocess(p)
    assert str(p) in str(e.value) and "expected" in str(e.value)


def test_truncated_flac(tmp_path) -> None:
    good = write_audio(tmp_path / "a.flac", tone(440, 44100, 2.0), 44100, "flac", "s16").read_bytes()
    (tmp_path / "cut.flac").write_bytes(good[:60])
    with pytest.raises(InputError):
        SPEC.preprocess(tmp_path / "cut.flac")


def test_video_without_audio_stream(tmp_path) -> None:
    from _inputs_helpers import make_video

    with pytest.raises(InputError, match="no audio stream"):
        SPEC.preprocess(make_video(tmp_path / "v.mp4", 5))


def test_bad_arrays() -> None:
    with pytest.raises(InputError, match="sample_rate"):
        SPEC.preprocess(tone(440, 16000, 1.0))
    bad = tone(440, 16000, 1.0)
    bad[100] = np.nan
    with pytest.raises(InputError, match="NaN"):
        SPEC.preprocess(bad, sample_rate=16000)
    with pytest.raises(InputError, match="zero-length"):
        SPEC.preprocess(np.zeros(0, np.float32), sample_rate=16000)
    with pytest.raises(InputError, match="shape"):
        SPEC.preprocess(np.zeros((2, 2, 100), np.float32), sample_rate=16000)
