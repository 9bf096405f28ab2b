"""decode_audio and trim_silence on audio made here, in every format a client may send."""

from __future__ import annotations

import io
from fractions import Fraction

import av
import numpy as np
import pytest
import soundfile as sf

from learner.audio import (
    MIN_SECONDS,
    SAMPLE_RATE,
    AudioError,
    EmptyAudio,
    InvalidSamples,
    SilentAudio,
    TooLong,
    TooShort,
    UnreadableAudio,
    decode_audio,
    trim_silence,
)

F0 = 180.0  # mean pitch of the synthetic voice, Hz
SECONDS = 1.5


def voiced(rate: int, channels: int = 1, seconds: float = SECONDS, seed: int = 0) -> np.ndarray:
    """A vowel-like signal: 5 harmonics with vibrato, two 'syllables' of loudness, a little breath noise.

    Returns (frames, channels) float32 peaking near 0.5 full scale.
    """
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * rate)) / rate
    phase = 2 * np.pi * np.cumsum(F0 + 6.0 * np.sin(2 * np.pi * 5.0 * t)) / rate  # 5 Hz vibrato
    tone = sum(np.sin(k * phase + rng.uniform(0, 2 * np.pi)) / k for k in range(1, 6))
    envelope = np.sin(np.pi * t / seconds) * (0.6 + 0.4 * np.sin(2 * np.pi * 1.3 * t))
    mono = envelope * tone + 0.005 * rng.standard_normal(len(t))
    mono = 0.5 * mono / np.abs(mono).max()
    # Channels differ slightly, as a real stereo recording does.
    return np.stack([mono * (1.0 - 0.1 * c) for c in range(channels)], axis=1).astype(np.float32)


def with_soundfile(samples: np.ndarray, rate: int, fmt: str, subtype: str) -> bytes:
    buf = io.BytesIO()
    sf.write(buf, samples, rate, format=fmt, subtype=subtype)
    return buf.getvalue()


def with_pyav(samples: np.ndarray, rate: int, container: str, codec: str) -> bytes:
    """Encode with FFmpeg, the way browsers' MediaRecorder and most apps produce compressed audio."""
    layout = "stereo" if samples.shape[1] == 2 else "mono"
    buf = io.BytesIO()
    with av.open(buf, "w", format=container) as out:
        stream = out.add_stream(codec, rate=48_000 if codec == "libopus" else rate)
        stream.layout = layout
        frame = av.AudioFrame.from_ndarray(np.ascontiguousarray(samples.T), format="fltp", layout=layout)
        # A timestamp lets the muxer record the encoder's priming samples (AAC's 1024) as an edit
        # list, so decoders drop them, as they do for real recordings. PyAV's encode() resamples
        # and cuts the frame into codec-sized frames itself.
        frame.rate, frame.pts, frame.time_base = rate, 0, Fraction(1, rate)
        out.mux(stream.encode(frame))
        out.mux(stream.encode(None))
    return buf.getvalue()


ENCODINGS = {
    "wav-int16": lambda s, r: with_soundfile(s, r, "WAV", "PCM_16"),
    "wav-float32": lambda s, r: with_soundfile(s, r, "WAV", "FLOAT"),
    "flac": lambda s, r: with_soundfile(s, r, "FLAC", "PCM_16"),
    "ogg-vorbis": lambda s, r: with_soundfile(s, r, "OGG", "VORBIS"),
    "ogg-opus": lambda s, r: with_pyav(s, r, "ogg", "libopus"),
    "mp3": lambda s, r: with_pyav(s, r, "mp3", "libmp3lame"),
    "webm-opus": lambda s, r: with_pyav(s, r, "webm", "libopus"),
    "mp4-aac": lambda s, r: with_pyav(s, r, "mp4", "aac"),
}
SHAPES = [(44_100, 2), (22_050, 1)]


def wav(samples: np.ndarray, rate: int = SAMPLE_RATE, subtype: str = "PCM_16") -> bytes:
    return with_soundfile(np.asarray(samples, np.float32), rate, "WAV", subtype)


def rms_envelope(wave: np.ndarray, frame: int = 800) -> np.ndarray:
    """Loudness every 50 ms: robust to the phase shifts and small delays of lossy codecs."""
    n = len(wave) // frame * frame
    return np.sqrt((wave[:n].reshape(-1, frame) ** 2).mean(axis=1))


def pitch_peak(wave: np.ndarray) -> float:
    spectrum = np.abs(np.fft.rfft(wave * np.hanning(len(wave))))
    freqs = np.fft.rfftfreq(len(wave), 1 / SAMPLE_RATE)
    return float(freqs[np.argmax(spectrum)])


@pytest.mark.parametrize("rate,channels", SHAPES, ids=[f"{r}Hz-{c}ch" for r, c in SHAPES])
@pytest.mark.parametrize("encoding", list(ENCODINGS))
def test_every_format_decodes_to_16k_mono_float32_matching_the_original(encoding, rate, channels):
    original = voiced(rate, channels)
    wave = decode_audio(ENCODINGS[encoding](original, rate))

    assert wave.dtype == np.float32 and wave.ndim == 1
    assert abs(len(wave) / SAMPLE_RATE - SECONDS) < 0.1
    assert np.abs(wave).max() <= 1.0
    expected = voiced(SAMPLE_RATE, channels).mean(axis=1)
    # Same loudness contour over time and same pitch: it is the same sound, not just any audio.
    n = min(len(wave), len(expected))
    env, expected_env = rms_envelope(wave[:n]), rms_envelope(expected[:n])
    assert np.corrcoef(env, expected_env)[0, 1] > 0.95
    assert np.allclose(env.max(), expected_env.max(), rtol=0.2)
    assert abs(pitch_peak(wave) - F0) < 10


def test_lossless_formats_keep_the_samples():
    original = voiced(SAMPLE_RATE, 1)[:, 0]
    assert np.allclose(decode_audio(wav(original, subtype="FLOAT")), original, atol=1e-7)
    assert np.allclose(decode_audio(wav(original)), original, atol=1 / 32768)


def test_stereo_is_the_mean_of_the_channels():
    left = voiced(SAMPLE_RATE, 1)[:, 0]
    right = 0.5 * voiced(SAMPLE_RATE, 1, seed=1)[:, 0]
    wave = decode_audio(wav(np.stack([left, right], axis=1), subtype="FLOAT"))
    assert np.allclose(wave, (left + right) / 2, atol=1e-6)


def test_float_samples_past_full_scale_are_clipped():
    loud = 3.0 * voiced(SAMPLE_RATE, 1)[:, 0]  # peaks at 1.5
    wave = decode_audio(wav(loud, subtype="FLOAT"))
    assert wave.max() == pytest.approx(1.0) and wave.min() == pytest.approx(-1.0)


@pytest.mark.parametrize("encoding", ["wav-int16", "webm-opus"])
def test_bytes_and_path_inputs_decode_the_same(tmp_path, encoding):
    data = ENCODINGS[encoding](voiced(44_100, 2), 44_100)
    path = tmp_path / f"clip.{encoding}"
    path.write_bytes(data)
    from_bytes = decode_audio(data)
    np.testing.assert_array_equal(decode_audio(path), from_bytes)
    np.testing.assert_array_equal(decode_audio(str(path)), from_bytes)
    np.testing.assert_array_equal(decode_audio(bytearray(data)), from_bytes)


def _quiet_noise() -> np.ndarray:
    return 1e-6 * np.random.default_rng(0).standard_normal(SAMPLE_RATE)


def _nan_wav() -> bytes:
    samples = voiced(SAMPLE_RATE, 1)[:, 0]
    samples[1000:1010] = np.nan
    return wav(samples, subtype="FLOAT")


BAD_INPUTS = {
    "random-bytes": (lambda: np.random.default_rng(0).bytes(20_000), UnreadableAudio),
    "text": (lambda: b'{"emotion": "happy"}\n' * 50, UnreadableAudio),
    "truncated-wav-header": (lambda: wav(voiced(SAMPLE_RATE, 1))[:30], UnreadableAudio),
    "no-bytes": (lambda: b"", EmptyAudio),
    "wav-0-samples": (lambda: wav(np.zeros(0)), EmptyAudio),
    "0.1-seconds": (lambda: wav(voiced(SAMPLE_RATE, 1, seconds=0.1)), TooShort),
    "all-zeros": (lambda: wav(np.zeros(SAMPLE_RATE)), SilentAudio),
    "noise-floor-1e-6": (lambda: wav(_quiet_noise(), subtype="FLOAT"), SilentAudio),
    "nan-samples": (_nan_wav, InvalidSamples),
    "31-seconds": (lambda: wav(voiced(SAMPLE_RATE, 1, seconds=31.0)), TooLong),
}


@pytest.mark.parametrize("name", list(BAD_INPUTS))
def test_bad_input_raises_the_right_error_with_a_human_message(name):
    make, expected = BAD_INPUTS[name]
    with pytest.raises(AudioError) as caught:
        decode_audio(make())
    assert type(caught.value) is expected
    assert isinstance(caught.value, ValueError)
    message = str(caught.value)
    assert message and "Errno" not in message and "\n" not in message
    assert caught.value.code == expected.code


def test_too_long_is_refused_for_compressed_audio_without_a_length_header():
    # A browser's WebM carries no duration: the limit must still hold while decoding.
    with pytest.raises(TooLong, match="limit is 1 s"):
        decode_audio(ENCODINGS["webm-opus"](voiced(44_100, 2), 44_100), max_seconds=1.0)


def test_max_seconds_is_the_callers_choice():
    data = wav(voiced(SAMPLE_RATE, 1, seconds=1.5))
    with pytest.raises(TooLong):
        decode_audio(data, max_seconds=1.0)
    assert len(decode_audio(data, max_seconds=2.0)) == int(1.5 * SAMPLE_RATE)


def test_a_missing_file_is_unreadable_audio(tmp_path):
    with pytest.raises(UnreadableAudio):
        decode_audio(tmp_path / "nowhere.wav")


def test_error_codes_are_distinct_slugs():
    classes = [UnreadableAudio, EmptyAudio, TooShort, TooLong, SilentAudio, InvalidSamples]
    codes = [c.code for c in classes]
    assert len(set(codes)) == len(codes) and AudioError.code not in codes
    assert codes == ["unreadable_audio", "empty_audio", "audio_too_short", "audio_too_long",
                     "silent_audio", "invalid_samples"]


def _tone(seconds: float) -> np.ndarray:
    t = np.arange(int(seconds * SAMPLE_RATE)) / SAMPLE_RATE
    return (0.5 * np.sin(2 * np.pi * 220 * t)).astype(np.float32)


def test_trim_silence_removes_leading_and_trailing_silence():
    silence = np.zeros(SAMPLE_RATE, np.float32)
    tone = _tone(1.0)
    trimmed = trim_silence(np.concatenate([silence, tone, silence]))
    assert abs(len(trimmed) - len(tone)) < 0.05 * SAMPLE_RATE
    assert np.abs(trimmed).max() == pytest.approx(0.5, abs=1e-3)


def test_trim_silence_keeps_at_least_min_seconds_around_the_sound():
    min_len = int(MIN_SECONDS * SAMPLE_RATE)
    wave = np.zeros(2 * SAMPLE_RATE, np.float32)
    wave[20_000:20_160] = _tone(0.01)  # a 10 ms click: trimming alone would keep ~20 ms
    trimmed = trim_silence(wave)
    assert len(trimmed) == min_len
    assert np.abs(trimmed).max() == np.abs(wave).max()  # the click is inside the window

    short = _tone(0.1)  # already below the minimum: left as it is
    np.testing.assert_array_equal(trim_silence(short), short)
    assert len(trim_silence(np.zeros(SAMPLE_RATE, np.float32))) >= min_len
