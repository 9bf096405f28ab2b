"""Emotion over time: an HMM that ties a recording's windows together.

The hidden states are the model's labels plus `silence`. Each window is one observation: a
window with speech brings the model's posteriors, a window without speech (the voice activity
check in `learner.timeline`) is the `silence` observation, so a pause is never forced into an
emotion.

- Emissions: for a speech window, the posteriors divided by the label priors. The network
  gives p(label | window); the HMM needs p(window | label), which by Bayes' rule is
  proportional to p(label | window) / p(label) (the hybrid HMM/ANN "scaled likelihood"). The
  silence state explains a speech window only with `VAD_MISS` (the voice check heard speech in
  a pause); a silence window is explained by the silence state, and by an emotion state only
  with `VAD_MISS` too.
- Transitions: sticky. Every state stays with probability `self_transition` and moves to each
  other state with an equal share of the rest. With a hop of h seconds a state is expected to
  last h / (1 - self_transition) seconds: 0.9 and a 1 s hop say "an emotion lasts about 10 s",
  so one odd window must be about 0.9 / (0.1 / 8) = 72 times likelier under another state to
  flip the state on its own, while two or three clear windows of a new emotion move it. The
  value is a setting (`timeline.self_transition`), chosen on the validation speakers with
  `emoloop bench stream --speakers validation` (README, "Emotion over time"): among 0.5-0.98,
  with the bundled Whisper-encoder model, 0.9 gave the most accurate segments and found as
  many changes as 0.8 with a quarter fewer boundaries where nothing changed. A value estimated
  from data instead would learn how long acted corpus runs last, not how long people stay in
  an emotion, so it is set, not fitted. Sharpening the emissions (posteriors to a power k) is
  not a separate knob: for Viterbi it scales every window's log-likelihood by k, which picks
  the same path as dividing the log cost of a switch by k (all but the silence terms), i.e.
  another self-transition.
- `ForwardFilter`: causal filtering for live use, one window at a time; its answer for window t
  uses windows 0..t only.
- `viterbi`: the most likely state path of a finished recording, from which segments are cut.

Plain NumPy: no framework, nothing that could not run inside the learner or a benchmark.
"""
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

SILENCE = "silence"
# How often the voice activity check is wrong either way; keeps every path possible.
VAD_MISS = 1e-3


@dataclass(frozen=True)
class EmotionHmm:
    labels: tuple[str, ...]  # the model's labels; the states are these plus SILENCE
    priors: np.ndarray  # (n_labels,) the label priors the posteriors are divided by
    transitions: np.ndarray  # (n_states, n_states), rows sum to 1

    @property
    def states(self) -> tuple[str, ...]:
        return self.labels + (SILENCE,)

    @classmethod
    def sticky(cls, labels: Sequence[str], self_transition: float,
               priors: Sequence[float] | None = None) -> "EmotionHmm":
        """Every state keeps itself with `self_transition` and shares the rest evenly among the
        others. `priors`: None for equal priors (the bundled model is trained on class-balanced
        picks, so its posteriors already assume equal priors)."""
        if not 0.0 < self_transition < 1.0:
            raise ValueError(f"self_transition must be in (0, 1), not {self_transition}")
        labels = tuple(labels)
        n = len(labels) + 1
        transitions = np.full((n, n), (1.0 - self_transition) / (n - 1))
        np.fill_diagonal(transitions, self_transition)
        prior = np.full(len(labels), 1.0 / len(labels)) if priors is None \
            else np.asarray(priors, dtype=np.float64)
        if prior.shape != (len(labels),) or (prior <= 0).any():
            raise ValueError("priors need one positive value per label")
        return cls(labels, prior / prior.sum(), transitions)

    def emissions(self, posteriors: np.ndarray | None) -> np.ndarray:
        """(n_states,) likelihoods of one window: `posteriors` (n_labels,) for a speech window,
        None for a window without speech."""
        if posteriors is None:
            return np.append(np.full(len(self.labels), VAD_MISS), 1.0)
        scaled = np.asarray(posteriors, dtype=np.float64) / self.priors
        scaled = scaled / scaled.sum()  # one scale per window: only ratios between states count
        return np.append(scaled, VAD_MISS * scaled.max())


class ForwardFilter:
    """Causal smoothing: `step` takes one window and returns the filtered state probabilities
    p(state_t | windows 0..t)."""

    def __init__(self, hmm: EmotionHmm):
        self.hmm = hmm
        self._belief: np.ndarray | None = None

    def step(self, posteriors: np.ndarray | None) -> np.ndarray:
        likelihood = self.hmm.emissions(posteriors)
        predicted = (np.full(len(likelihood), 1.0 / len(likelihood)) if self._belief is None
                     else self._belief @ self.hmm.transitions)
        belief = predicted * likelihood
        self._belief = belief / belief.sum()
        return self._belief

    def label(self, posteriors: np.ndarray | None) -> str:
        """`step`, answering with the most probable state's name."""
        return self.hmm.states[int(np.argmax(self.step(posteriors)))]


def viterbi(hmm: EmotionHmm, observations: Sequence[np.ndarray | None]) -> list[str]:
    """The most likely state sequence for a whole recording (None = a window without speech)."""
    if not observations:
        return []
    log_transitions = np.log(hmm.transitions)
    n = len(hmm.states)
    score = np.log(np.full(n, 1.0 / n)) + np.log(hmm.emissions(observations[0]))
    back = np.zeros((len(observations), n), dtype=np.int64)
    for t in range(1, len(observations)):
        candidates = score[:, None] + log_transitions  # (from, to)
        back[t] = np.argmax(candidates, axis=0)
        score = candidates[back[t], np.arange(n)] + np.log(hmm.emissions(observations[t]))
    path = [int(np.argmax(score))]
    for t in range(len(observations) - 1, 0, -1):
        path.append(int(back[t, path[-1]]))
    return [hmm.states[i] for i in reversed(path)]
