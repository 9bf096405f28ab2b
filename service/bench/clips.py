"""Synthetic speech-like clips for benchmarks and tests, encoded the ways apps send them."""
import io

import numpy as np
import soundfile as sf


def voiced_clip(seconds: float, sample_rate: int = 16_000, seed: int = 0) -> np.ndarray:
    """A harmonic 'vowel' with vibrato and syllable-rate amplitude, no leading or trailing
    silence, so the feature pipeline keeps all of it. float32 mono in [-1, 1]."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * sample_rate)) / sample_rate
    f0 = 140 + 25 * np.sin(2 * np.pi * 0.7 * t) + 6 * np.sin(2 * np.pi * 5.5 * t)
    phase = 2 * np.pi * np.cumsum(f0) / sample_rate
    wave = sum(np.sin(k * phase) / k for k in range(1, 12))
    envelope = 0.55 + 0.45 * np.sin(2 * np.pi * 3.0 * t) ** 2
    wave = wave * envelope + 0.01 * rng.standard_normal(t.size)
    return (0.3 * wave / np.abs(wave).max()).astype(np.float32)


def to_wav(wave: np.ndarray, sample_rate: int, subtype: str = "PCM_16") -> bytes:
    buf = io.BytesIO()
    sf.write(buf, wave, sample_rate, format="WAV", subtype=subtype)
    return buf.getvalue()


def to_webm_opus(wave: np.ndarray, sample_rate: int = 48_000) -> bytes:
    """WebM with Opus, the way a browser's MediaRecorder sends it."""
    import av

    buf = io.BytesIO()
    with av.open(buf, mode="w", format="webm") as container:
        stream = container.add_stream("libopus", rate=sample_rate, layout="mono")
        pcm = (np.clip(wave, -1, 1) * 32767).astype(np.int16)[None, :]
        frame = av.AudioFrame.from_ndarray(pcm, format="s16", layout="mono")
        frame.sample_rate = sample_rate
        for packet in stream.encode(frame):
            container.mux(packet)
        for packet in stream.encode(None):
            container.mux(packet)
    return buf.getvalue()
