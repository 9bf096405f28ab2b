"""The one feature function: training, evaluation and serving all call `extract_features`,
so what the model sees can never drift between them."""
from functools import lru_cache

import librosa
import numpy as np

from learner.audio import SAMPLE_RATE, trim_silence

N_MELS = 64
N_FFT = 400  # 25 ms window
HOP_LENGTH = 160  # 10 ms hop: 100 frames a second
F_MIN, F_MAX = 50.0, 8000.0
FEATURE_DIM = N_MELS
FRAMES_PER_SECOND = SAMPLE_RATE // HOP_LENGTH


@lru_cache(maxsize=1)
def _mel_basis() -> np.ndarray:
    # Built once: librosa would rebuild the filterbank on every call.
    return librosa.filters.mel(
        sr=SAMPLE_RATE, n_fft=N_FFT, n_mels=N_MELS, fmin=F_MIN, fmax=F_MAX
    ).astype(np.float32)


def log_mel(wave: np.ndarray) -> np.ndarray:
    """(samples,) float32 at 16 kHz -> (frames, N_MELS) natural-log mel power."""
    spectrum = librosa.stft(
        wave, n_fft=N_FFT, hop_length=HOP_LENGTH, window="hann", center=True
    )
    power = (spectrum.real**2 + spectrum.imag**2).astype(np.float32)
    return np.log(_mel_basis() @ power + 1e-6).T


def normalise(features: np.ndarray) -> np.ndarray:
    """Per-utterance normalisation over the whole clip: one mean and one scale, not one per band,
    so loudness and the recording gain go away but the spectral tilt (voice quality) stays."""
    centred = features - features.mean()
    return (centred / (centred.std() + 1e-5)).astype(np.float32)


def extract_features(wave: np.ndarray) -> np.ndarray:
    """A validated 16 kHz mono clip -> (frames, FEATURE_DIM) float32, silence trimmed, normalised."""
    return normalise(log_mel(trim_silence(wave)))
