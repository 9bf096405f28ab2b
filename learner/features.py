"""The one feature function: training, evaluation and serving all call `extract_features`,
so what the model sees can never drift between them.

The log-mel spectrogram is librosa's (`librosa.stft` with a periodic Hann window and centred,
zero-padded frames; `librosa.filters.mel` with Slaney's mel scale and area normalisation), written
in NumPy and torch.stft (numpy.fft is six times slower on these frames): importing librosa loads
scipy.signal and numba, about 4 s of the service's cold start.
tests/learner/test_features.py holds both equal to librosa's own functions.
"""
from functools import lru_cache

import numpy as np
import torch

from learner.audio import SAMPLE_RATE, trim_silence

N_MELS = 64
N_FFT = 400  # 25 ms window
HOP_LENGTH = 160  # 10 ms hop: 100 frames a second
F_MIN, F_MAX = 50.0, 8000.0
FEATURE_DIM = N_MELS
FRAMES_PER_SECOND = SAMPLE_RATE // HOP_LENGTH


def _hz_to_mel(hz: np.ndarray) -> np.ndarray:
    """Slaney's mel scale: linear below 1 kHz, logarithmic above."""
    hz = np.asarray(hz, dtype=np.float64)
    linear = hz / (200.0 / 3)
    log_part = 15.0 + np.log(np.maximum(hz, 1e-10) / 1000.0) / (np.log(6.4) / 27.0)
    return np.where(hz >= 1000.0, log_part, linear)


def _mel_to_hz(mel: np.ndarray) -> np.ndarray:
    linear = mel * (200.0 / 3)
    log_part = 1000.0 * np.exp((np.log(6.4) / 27.0) * (mel - 15.0))
    return np.where(mel >= 15.0, log_part, linear)


def slaney_mel_filters(n_mels: int, n_fft: int, f_min: float, f_max: float) -> np.ndarray:
    """(n_mels, n_fft // 2 + 1) triangular filters on Slaney's mel scale with equal area, as
    `librosa.filters.mel(norm="slaney")`."""
    fft_hz = np.fft.rfftfreq(n_fft, 1.0 / SAMPLE_RATE)
    edges = _mel_to_hz(np.linspace(_hz_to_mel(f_min), _hz_to_mel(f_max), n_mels + 2))
    widths = np.diff(edges)
    ramps = edges[:, None] - fft_hz[None, :]
    rising = -ramps[:-2] / widths[:-1, None]
    falling = ramps[2:] / widths[1:, None]
    weights = np.maximum(0.0, np.minimum(rising, falling))
    weights *= (2.0 / (edges[2:] - edges[:-2]))[:, None]  # equal area per filter
    return weights.astype(np.float32)


@lru_cache(maxsize=1)
def mel_basis() -> np.ndarray:
    """(N_MELS, N_FFT // 2 + 1) filters of the log-mel model, built once."""
    return slaney_mel_filters(N_MELS, N_FFT, F_MIN, F_MAX)


@lru_cache(maxsize=1)
def _window() -> torch.Tensor:
    return torch.hann_window(N_FFT, periodic=True)


def power_spectrogram(wave: np.ndarray) -> np.ndarray:
    """(samples,) -> (frames, N_FFT // 2 + 1) float32 power, one frame every HOP_LENGTH samples,
    centred (the first frame is centred on sample 0)."""
    with torch.inference_mode():
        spectrum = torch.stft(torch.from_numpy(np.asarray(wave, dtype=np.float32)), N_FFT,
                              HOP_LENGTH, window=_window(), center=True, pad_mode="constant",
                              return_complex=True)
        return (spectrum.real**2 + spectrum.imag**2).T.numpy()


def log_mel(wave: np.ndarray) -> np.ndarray:
    """(samples,) float32 at 16 kHz -> (frames, N_MELS) natural-log mel power."""
    return np.log(power_spectrogram(wave) @ mel_basis().T + 1e-6)


def normalise(features: np.ndarray) -> np.ndarray:
    """Per-utterance normalisation over the whole clip: one mean and one scale, not one per band,
    so loudness and the recording gain go away but the spectral tilt (voice quality) stays."""
    centred = features - features.mean()
    return (centred / (centred.std() + 1e-5)).astype(np.float32)


def extract_features(wave: np.ndarray) -> np.ndarray:
    """A validated 16 kHz mono clip -> (frames, FEATURE_DIM) float32, silence trimmed, normalised."""
    return normalise(log_mel(trim_silence(wave)))
