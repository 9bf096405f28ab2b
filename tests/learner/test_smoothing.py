"""The HMM over window posteriors, on constructed posteriors: what a listener of a smoothed
timeline relies on (odd windows outvoted, real changes followed, pauses called silence, the
live answer never peeking ahead)."""
import numpy as np
import pytest

from learner.smoothing import SILENCE, EmotionHmm, ForwardFilter, viterbi

LABELS = ("neutral", "happy", "sad", "angry")


def posterior(label: str, confidence: float = 0.6) -> np.ndarray:
    p = np.full(len(LABELS), (1 - confidence) / (len(LABELS) - 1))
    p[LABELS.index(label)] = confidence
    return p


def run(*spec: tuple[str | None, int]) -> list[np.ndarray | None]:
    """[("happy", 5), (None, 2)] -> five happy windows, then two without speech."""
    return [None if label is None else posterior(label) for label, n in spec for _ in range(n)]


def filtered(hmm: EmotionHmm, observations) -> list[str]:
    live = ForwardFilter(hmm)
    return [live.label(obs) for obs in observations]


@pytest.fixture
def hmm() -> EmotionHmm:
    return EmotionHmm.sticky(LABELS, 0.9)


def test_sticky_transitions_are_a_distribution_with_the_configured_self_transition(hmm):
    assert hmm.states == LABELS + (SILENCE,)
    np.testing.assert_allclose(hmm.transitions.sum(axis=1), 1.0)
    np.testing.assert_allclose(np.diag(hmm.transitions), 0.9)
    with pytest.raises(ValueError):
        EmotionHmm.sticky(LABELS, 1.0)


def test_a_single_odd_window_is_outvoted_by_both_filter_and_viterbi(hmm):
    obs = run(("sad", 6)) + [posterior("angry", 0.7)] + run(("sad", 6))
    raw = [LABELS[int(np.argmax(o))] for o in obs]
    assert raw.count("angry") == 1
    assert filtered(hmm, obs) == ["sad"] * 13
    assert viterbi(hmm, obs) == ["sad"] * 13


def test_a_lasting_change_is_followed_quickly_and_viterbi_puts_it_in_the_right_place(hmm):
    obs = run(("happy", 8), ("angry", 8))
    live = filtered(hmm, obs)
    assert live[:8] == ["happy"] * 8
    assert live[-6:] == ["angry"] * 6  # caught within two windows of the change
    assert viterbi(hmm, obs) == ["happy"] * 8 + ["angry"] * 8


def test_the_filter_is_causal_its_answers_never_depend_on_later_windows(hmm):
    rng = np.random.default_rng(0)
    obs = [rng.dirichlet(np.ones(len(LABELS))) for _ in range(30)]
    changed_future = obs[:15] + [posterior("angry", 0.99)] * 15
    assert filtered(hmm, obs)[:15] == filtered(hmm, changed_future)[:15]
    assert filtered(hmm, obs)[15:] != filtered(hmm, changed_future)[15:]


def test_windows_without_speech_are_silence_not_a_forced_emotion(hmm):
    obs = run(("happy", 5), (None, 4), ("happy", 5))
    assert viterbi(hmm, obs) == ["happy"] * 5 + [SILENCE] * 4 + ["happy"] * 5
    assert filtered(hmm, obs)[5:9] == [SILENCE] * 4


def test_posteriors_are_divided_by_the_label_priors():
    # The network says neutral 0.45 vs sad 0.35, but it says neutral for most windows anyway:
    # with neutral four times as likely a priori, the evidence favours sad.
    p = np.array([0.45, 0.1, 0.35, 0.1])
    uniform = EmotionHmm.sticky(LABELS, 0.9)
    skewed = EmotionHmm.sticky(LABELS, 0.9, priors=[0.4, 0.2, 0.1, 0.3])
    assert viterbi(uniform, [p] * 3) == ["neutral"] * 3
    assert viterbi(skewed, [p] * 3) == ["sad"] * 3


def test_more_stickiness_means_fewer_label_changes_on_noisy_posteriors():
    rng = np.random.default_rng(1)
    truth = ["happy"] * 20 + ["sad"] * 20 + ["angry"] * 20
    obs = [posterior(t, 0.45) * rng.uniform(0.5, 1.5, len(LABELS)) for t in truth]
    obs = [o / o.sum() for o in obs]

    def changes(labels):
        return sum(a != b for a, b in zip(labels, labels[1:]))

    raw = [LABELS[int(np.argmax(o))] for o in obs]
    loose, sticky = EmotionHmm.sticky(LABELS, 0.5), EmotionHmm.sticky(LABELS, 0.95)
    assert changes(viterbi(sticky, obs)) <= changes(viterbi(loose, obs)) <= changes(raw)
    assert changes(viterbi(sticky, obs)) == 2
    accuracy = np.mean([a == b for a, b in zip(viterbi(sticky, obs), truth)])
    assert accuracy >= np.mean([a == b for a, b in zip(raw, truth)])
