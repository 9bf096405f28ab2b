"""Training-time augmentation. Waveform changes (speed, gain, noise) are applied before the
shared feature function; masking (SpecAugment) is applied to feature batches."""
import numpy as np
import torch
from scipy.signal import resample_poly


def change_speed(wave: np.ndarray, factor: float) -> np.ndarray:
    """Speed perturbation (tempo and pitch together, as in Kaldi's recipe): play the clip
    `factor` times faster by resampling it and keeping the sample rate."""
    up = 100
    down = int(round(up * factor))
    return resample_poly(wave, up, down).astype(np.float32)


def add_noise(wave: np.ndarray, snr_db: float, rng: np.random.Generator) -> np.ndarray:
    """White or pink-ish noise at the given signal-to-noise ratio."""
    noise = rng.standard_normal(wave.size).astype(np.float32)
    if rng.random() < 0.5:  # pink-ish: low-pass the white noise with a leaky integrator
        noise = np.cumsum(noise) * 0.02
        noise -= np.convolve(noise, np.ones(64) / 64, mode="same")
    signal_power = float(np.mean(wave**2)) + 1e-12
    noise_power = float(np.mean(noise**2)) + 1e-12
    scale = np.sqrt(signal_power / (noise_power * 10 ** (snr_db / 10)))
    return (wave + scale * noise).astype(np.float32)


def perturb_wave(
    wave: np.ndarray, rng: np.random.Generator, *, speeds: list[float],
    snr_db: tuple[float, float], gain_db: tuple[float, float],
) -> np.ndarray:
    """One random waveform variant: speed, then gain, then noise."""
    wave = change_speed(wave, float(rng.choice(speeds)))
    wave = wave * 10 ** (rng.uniform(*gain_db) / 20)
    wave = add_noise(wave, rng.uniform(*snr_db), rng)
    return np.clip(wave, -1.0, 1.0).astype(np.float32)


def spec_augment(
    features: torch.Tensor, lengths: torch.Tensor, generator: torch.Generator, *,
    time_masks: int, time_width: int, freq_masks: int, freq_width: int,
) -> torch.Tensor:
    """Zero random bands of frames and of mel bins ((B, T, F), in place on a copy).
    Zero is the utterance mean after normalisation, so a mask reads as 'no information'."""
    out = features.clone()
    batch, _, n_freq = out.shape
    for i in range(batch):
        n_frames = int(lengths[i])
        for _ in range(time_masks):
            width = int(torch.randint(0, time_width + 1, (1,), generator=generator))
            start = int(torch.randint(0, max(1, n_frames - width), (1,), generator=generator))
            out[i, start : start + width, :] = 0.0
        for _ in range(freq_masks):
            width = int(torch.randint(0, freq_width + 1, (1,), generator=generator))
            start = int(torch.randint(0, n_freq - width + 1, (1,), generator=generator))
            out[i, :, start : start + width] = 0.0
    return out
