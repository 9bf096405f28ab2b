"""The exact permutation test of agreement beyond chance, against a count of every permutation."""
import itertools

import numpy as np
import pytest

from learner.continual.agreement import (Agreement, agreement_p_value, agreement_tail, best_p_value,
                               required_agreements)


def _enumerated_tail(labels, answers):
    counts = [0] * (len(labels) + 1)
    for perm in itertools.permutations(labels):
        counts[sum(p == a for p, a in zip(perm, answers))] += 1
    return [sum(counts[m:]) / sum(counts) for m in range(len(counts))]


def test_the_tail_is_the_share_of_label_permutations_with_that_many_agreements():
    rng = np.random.default_rng(3)
    for _ in range(12):
        n = int(rng.integers(1, 8))
        labels = [str(x) for x in rng.choice(["a", "b", "c"], n)]
        answers = [str(x) for x in rng.choice(["a", "b", "c", "d"], n)]  # 'd': a label unseen
        assert agreement_tail(labels, answers) == pytest.approx(
            _enumerated_tail(labels, answers), abs=1e-12), (labels, answers)


def test_chance_agreement_kappa_and_the_agreements_needed():
    labels = ["a"] * 4 + ["b"] * 4 + ["c"] * 4 + ["d"] * 4 + ["e"] * 4
    shifted = {"a": "b", "b": "c", "c": "d", "d": "e", "e": "a"}
    answers = [label if i % 4 < 2 else shifted[label] for i, label in enumerate(labels)]
    agreement = Agreement.of(labels, answers)
    assert (agreement.n, agreement.agreements, agreement.expected) == (20, 10, 4.0)
    assert agreement.kappa == pytest.approx((10 - 4) / (20 - 4))
    # Twice the agreement chance gives, on 20 clips of 5 labels: 8 are needed at 5%.
    assert required_agreements(labels, answers, 0.05) == 8
    assert agreement_p_value(labels, answers) == pytest.approx(0.0034186, rel=1e-4)


def test_one_label_or_too_few_clips_can_never_show_agreement():
    assert best_p_value(["sad"] * 30) == 1.0
    assert best_p_value(["happy", "sad"] * 2) == pytest.approx(1 / 6)
    assert best_p_value(["happy", "sad"] * 3) == pytest.approx(1 / 20)
    assert required_agreements(["sad"] * 30, ["sad"] * 30, 0.05) is None
    assert agreement_p_value([], []) == 1.0
