"""Whisper's own log-mel front end, for the clip's own length (no 30 s padding).

80 Slaney mel bins over a 400-point STFT (25 ms periodic Hann window, 10 ms hop, centred with
reflection padding, the last frame dropped), log10 of the power floored at 1e-10, everything
below the clip's maximum minus 8 raised to it, then (x + 4) / 4: the input the encoder's weights
were trained on. tests/learner/test_speech_encoder.py holds it to librosa's STFT and filters.
"""
from functools import lru_cache

import numpy as np
import torch

from learner.audio import trim_silence
from learner.features import slaney_mel_filters

N_MELS = 80
N_FFT = 400
HOP_LENGTH = 160  # 100 frames a second


@lru_cache(maxsize=1)
def _filters() -> torch.Tensor:
    return torch.from_numpy(slaney_mel_filters(N_MELS, N_FFT, 0.0, 8000.0))


@lru_cache(maxsize=1)
def _window() -> torch.Tensor:
    return torch.hann_window(N_FFT, periodic=True)


def whisper_log_mel(wave: np.ndarray) -> np.ndarray:
    """(samples,) float32 at 16 kHz -> (frames, 80) float32, frames = samples // 160."""
    with torch.inference_mode():
        audio = torch.from_numpy(np.asarray(wave, dtype=np.float32))
        if audio.numel() <= N_FFT // 2:  # reflection padding needs more samples than it pads
            audio = torch.nn.functional.pad(audio, (0, N_FFT // 2 + 1 - audio.numel()))
        spectrum = torch.stft(audio, N_FFT, HOP_LENGTH, window=_window(), center=True,
                              pad_mode="reflect", return_complex=True)[:, :-1]
        power = spectrum.real**2 + spectrum.imag**2  # (201, frames)
        log_spec = torch.clamp(_filters() @ power, min=1e-10).log10()
        log_spec = torch.maximum(log_spec, log_spec.max() - 8.0)
        return ((log_spec + 4.0) / 4.0).T.contiguous().numpy()


def extract_speech_features(wave: np.ndarray) -> np.ndarray:
    """A validated 16 kHz mono clip -> (frames, 80) Whisper log-mel of its trimmed speech: what
    the encoder-based model reads, in training, evaluation and serving alike."""
    return whisper_log_mel(trim_silence(wave))
