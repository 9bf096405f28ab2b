"""The shared feature function: deterministic, documented shape, gain-invariant, trims silence."""
import numpy as np
import pytest

from learner.audio import trim_silence
from learner.features import FEATURE_DIM, FRAMES_PER_SECOND, extract_features, log_mel, mel_basis
from service.bench.clips import voiced_clip


def test_shape_and_dtype_follow_the_documented_layout():
    features = extract_features(voiced_clip(2.0))
    assert features.dtype == np.float32
    assert features.shape[1] == FEATURE_DIM == 64
    # 10 ms hop: one frame per 10 ms, plus one for the centred first window.
    assert abs(features.shape[0] - 2.0 * FRAMES_PER_SECOND) <= 2


def test_same_clip_gives_identical_features():
    wave = voiced_clip(1.5, seed=3)
    np.testing.assert_array_equal(extract_features(wave), extract_features(wave.copy()))


def test_features_are_normalised_per_utterance_and_ignore_recording_gain():
    wave = voiced_clip(1.5, seed=4)
    quiet, loud = extract_features(0.5 * wave), extract_features(wave)
    assert abs(float(loud.mean())) < 1e-4 and abs(float(loud.std()) - 1.0) < 1e-3
    # 6 dB quieter changes features only where bands sink towards the log floor: on average
    # by under 5% of their spread.
    assert float(np.abs(quiet - loud).mean()) < 0.05


def test_leading_and_trailing_silence_is_trimmed():
    wave = voiced_clip(1.0)
    silence = np.zeros(16_000, np.float32)
    padded = extract_features(np.concatenate([silence, wave, silence]))
    assert abs(padded.shape[0] - extract_features(wave).shape[0]) <= 10


def test_different_clips_give_different_features():
    a, b = extract_features(voiced_clip(1.0, seed=1)), extract_features(voiced_clip(1.0, 24_000)[:16_000])
    assert not np.allclose(a[: min(len(a), len(b))], b[: min(len(a), len(b))])


def test_log_mel_and_trimming_equal_librosa_which_they_reimplement():
    # The service computes features without librosa (its import costs seconds of cold start);
    # the model was trained on librosa's numbers, so the two must stay the same.
    librosa = pytest.importorskip("librosa")
    rng = np.random.default_rng(7)
    basis = librosa.filters.mel(sr=16_000, n_fft=400, n_mels=64, fmin=50.0, fmax=8000.0)
    np.testing.assert_allclose(mel_basis(), basis, rtol=1e-5, atol=1e-8)
    for seed in range(6):
        lead, tail = rng.integers(0, 16_000, size=2)
        wave = np.concatenate([1e-4 * rng.standard_normal(lead).astype(np.float32),
                               voiced_clip(float(rng.uniform(0.5, 3.0)), seed=seed),
                               np.zeros(tail, np.float32)])
        expected, _ = librosa.effects.trim(wave, top_db=30, frame_length=512, hop_length=128)
        np.testing.assert_array_equal(trim_silence(wave), expected)
        power = np.abs(librosa.stft(wave, n_fft=400, hop_length=160, window="hann")) ** 2
        np.testing.assert_allclose(log_mel(wave), np.log(basis @ power + 1e-6).T, atol=2e-4)
