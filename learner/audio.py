"""Audio in: decode any common format to 16 kHz mono float32, and refuse clips we cannot use.

Every clip, whether uploaded to the API or read from a training corpus, goes through
`decode_audio`, so the model always sees the same kind of signal. Bad input raises an
`AudioError` subclass whose message can be shown to a person and whose `code` the API returns.
"""

from __future__ import annotations

import io
import os

import av
import numpy as np
import soundfile as sf
import soxr

SAMPLE_RATE = 16_000
MIN_SECONDS = 0.25

# A clip is silent when no 25 ms frame reaches -60 dBFS RMS: quieter than any usable recording,
# louder than the dither and noise floor of a muted microphone.
_SILENCE_RMS = 10 ** (-60 / 20)
_SILENCE_FRAME = SAMPLE_RATE // 40

_FORMATS = "WAV, FLAC, OGG, MP3, WebM, MP4"


class AudioError(ValueError):
    """A clip we refuse, with a message a person understands. `code` is a short machine-readable slug."""

    code: str = "invalid_audio"


class UnreadableAudio(AudioError):
    code = "unreadable_audio"


class EmptyAudio(AudioError):
    code = "empty_audio"


class TooShort(AudioError):
    code = "audio_too_short"


class TooLong(AudioError):
    code = "audio_too_long"


class SilentAudio(AudioError):
    code = "silent_audio"


class InvalidSamples(AudioError):
    code = "invalid_samples"


def decode_audio(source: bytes | str | os.PathLike, *, max_seconds: float = 30.0) -> np.ndarray:
    """Decode any common format to 16 kHz mono float32 in [-1, 1] and validate it.

    Raises AudioError subclasses only (never anything else for bad input).
    """
    data = _read_bytes(source)
    if not data:
        raise EmptyAudio("the audio file is empty (0 bytes)")
    samples, rate = _decode(data, max_seconds)  # (frames, channels) float32
    if samples.size == 0:
        raise EmptyAudio("the audio file contains no samples")
    if not np.isfinite(samples).all():
        raise InvalidSamples("the audio contains invalid samples (NaN or infinity)")
    seconds = len(samples) / rate
    _check_not_too_long(seconds, max_seconds)
    if seconds < MIN_SECONDS:
        raise TooShort(f"the audio is {seconds:.2f} s long; at least {MIN_SECONDS} s is needed")

    wave = samples.mean(axis=1)
    if rate != SAMPLE_RATE:
        wave = soxr.resample(wave, rate, SAMPLE_RATE, quality="HQ")
    # Float files may hold values past full scale, and lossy codecs and resampling overshoot.
    wave = np.clip(wave, -1.0, 1.0).astype(np.float32, copy=False)
    if _is_silent(wave):
        raise SilentAudio("the audio is silent; nothing was recorded")
    return wave


def trim_silence(wave: np.ndarray, top_db: float = 30.0) -> np.ndarray:
    """Cut leading and trailing silence, keeping at least MIN_SECONDS of audio.

    The same cut as `librosa.effects.trim(wave, top_db, frame_length=512, hop_length=128)`
    (the tests hold the two equal), in plain NumPy: librosa's import pulls in scipy.signal and
    numba, seconds of start-up the service cannot afford."""
    min_len = int(MIN_SECONDS * SAMPLE_RATE)
    if len(wave) <= min_len:
        return wave
    trimmed = _trim(wave, top_db)
    if len(trimmed) >= min_len:
        return trimmed
    # Too little survived (a click, a short syllable): keep the window centred on the loudest sample.
    start = int(np.clip(np.argmax(np.abs(wave)) - min_len // 2, 0, len(wave) - min_len))
    return wave[start : start + min_len]


def _trim(wave: np.ndarray, top_db: float, frame: int = 512, hop: int = 128) -> np.ndarray:
    """Keep from the first to the last frame whose RMS is within `top_db` of the loudest."""
    padded = np.pad(wave, frame // 2)  # centred frames, zero padding
    frames = np.lib.stride_tricks.sliding_window_view(padded, frame)[::hop]
    power = np.mean(np.abs(frames) ** 2, axis=1)
    # librosa's amplitude_to_db with ref=max and amin=1e-5, on power: floor, then relative dB.
    floor = 1e-10
    db = 10 * np.log10(np.maximum(floor, power)) - 10 * np.log10(max(floor, float(power.max())))
    loud = np.flatnonzero(db > -top_db)
    if loud.size == 0:
        return wave[:0]
    return wave[loud[0] * hop : min(len(wave), (loud[-1] + 1) * hop)]


def _read_bytes(source: bytes | str | os.PathLike) -> bytes:
    if isinstance(source, (bytes, bytearray, memoryview)):
        return bytes(source)
    try:
        with open(source, "rb") as f:
            return f.read()
    except OSError as e:
        raise UnreadableAudio(f"could not read the audio file: {e.strerror or e}") from e


def _decode(data: bytes, max_seconds: float) -> tuple[np.ndarray, int]:
    """Return (frames, channels) float32 samples and their rate: libsndfile first, then FFmpeg."""
    try:
        return _decode_soundfile(data, max_seconds)
    except AudioError:
        raise
    except Exception:
        pass  # Not a format libsndfile knows (WebM, MP4, ...): let FFmpeg try.
    try:
        return _decode_pyav(data, max_seconds)
    except AudioError:
        raise
    except Exception as e:
        raise UnreadableAudio(f"could not decode the file as audio ({_FORMATS}...)") from e


def _decode_soundfile(data: bytes, max_seconds: float) -> tuple[np.ndarray, int]:
    with sf.SoundFile(io.BytesIO(data)) as f:
        # The header knows the length: refuse an hour-long file before decoding it.
        _check_not_too_long(f.frames / f.samplerate, max_seconds)
        # soundfile scales integer PCM to [-1, 1) when reading as float.
        return f.read(dtype="float32", always_2d=True), f.samplerate


def _decode_pyav(data: bytes, max_seconds: float) -> tuple[np.ndarray, int]:
    with av.open(io.BytesIO(data)) as container:
        if not container.streams.audio:
            raise UnreadableAudio("the file has no audio track")
        stream = container.streams.audio[0]
        # Planar float keeps channels apart, so we downmix the same way as for libsndfile.
        resampler = av.AudioResampler(format="fltp")
        chunks, frames, rate = [], 0, None
        for frame in container.decode(stream):
            for out in resampler.resample(frame):
                rate = rate or out.sample_rate
                chunks.append(out.to_ndarray())
                frames += out.samples
            # Containers from browsers often carry no duration, so stop once we are past the limit.
            if rate and frames / rate > max_seconds:
                _check_not_too_long(frames / rate, max_seconds)
        for out in resampler.resample(None):
            chunks.append(out.to_ndarray())
    if not chunks:
        return np.zeros((0, 1), np.float32), stream.rate or SAMPLE_RATE
    return np.concatenate(chunks, axis=1).T.astype(np.float32, copy=False), rate


def _check_not_too_long(seconds: float, max_seconds: float) -> None:
    if seconds > max_seconds:
        raise TooLong(f"the audio is {seconds:.1f} s long; the limit is {max_seconds:g} s")


def _is_silent(wave: np.ndarray) -> bool:
    n = len(wave) // _SILENCE_FRAME * _SILENCE_FRAME
    frames = wave[:n].reshape(-1, _SILENCE_FRAME).astype(np.float64)
    return float(np.sqrt((frames**2).mean(axis=1)).max()) < _SILENCE_RMS
