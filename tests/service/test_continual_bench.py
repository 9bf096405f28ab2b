"""How `emoloop bench continual` splits newcomers' clips and sums up seeds, small: a measured
clip's sentence was never corrected with its label, and the intervals are the median's."""
from collections import Counter
from pathlib import Path

import numpy as np

from learner.corpora import CorpusClip
from service.bench.continual import _summary, split_newcomers


def _clips() -> list[CorpusClip]:
    """ASED-like: 5 sentences an emotion, each read twice by each of 4 speakers."""
    return [CorpusClip(Path(f"/x/{speaker}-{emotion}-{sentence}-{take}.opus"), "ased",
                       speaker, "", "am", emotion, emotion[0], 3.0, text_id=f"s0{sentence}")
            for speaker in ("ased-s56", "ased-s57", "ased-s58", "ased-s59")
            for emotion in ("angry", "happy", "neutral", "sad")
            for sentence in range(3, 8) for take in (1, 2)]


def test_newcomers_are_split_by_sentence_about_half_each_way():
    clips = _clips()
    shares, measured = split_newcomers(clips, 3, np.random.default_rng(7))
    corrected = [c for share in shares for c in share]
    assert sorted(map(len, shares)) == [26, 27, 27]
    assert len(corrected) + len(measured) == len(clips)
    # No sentence of an emotion on both sides: the words cannot give a measured clip's label away.
    assert not ({(c.emotion, c.text_id) for c in corrected}
                & {(c.emotion, c.text_id) for c in measured})
    # An emotion's 5 sentences: 3 one way and 2 the other, alternating so the totals balance.
    per_emotion = Counter(c.emotion for c in corrected)
    assert sorted(per_emotion.values()) == [16, 16, 24, 24]
    # Every speaker is on both sides.
    assert {c.speaker for c in corrected} == {c.speaker for c in measured} == {
        c.speaker for c in clips}


def test_summary_is_the_median_over_seeds_with_an_interval_around_it():
    start = {"newcomers": np.zeros(200, bool), "old_test": np.ones(100, bool)}
    runs = {}
    for seed, gained in ((1, 20), (2, 30), (3, 60)):
        end = {"newcomers": np.arange(200) < gained, "old_test": np.arange(100) >= 1}
        runs[seed] = {"rounds": [{"round": 0}, {"round": 1, "status": "accepted"}],
                      "right": [start, end]}
    summary = _summary(runs, np.random.default_rng(0))
    assert summary["newcomers"]["per_seed"] == [10.0, 15.0, 30.0]
    assert summary["newcomers"]["median_change"] == 15.0
    low, high = summary["newcomers"]["interval_95"]
    assert low < 15.0 < high and high - low < 15
    assert summary["old_test"]["median_change"] == -1.0
    assert summary["accepted"] == [1, 1, 1] and summary["newcomers"]["clips"] == 200
