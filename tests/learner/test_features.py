"""The shared feature function: deterministic, documented shape, gain-invariant, trims silence."""
import numpy as np

from learner.features import FEATURE_DIM, FRAMES_PER_SECOND, extract_features
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
