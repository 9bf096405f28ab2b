"""How `emoloop bench continual` splits newcomers' clips and sums up seeds, small: a measured
clip's sentence was never corrected with its label, and the intervals are the median's."""
from collections import Counter
from pathlib import Path

import numpy as np

from learner.corpora import CorpusClip
from service.bench.continual import (VALIDATION, _summary, newcomers_and_old, split_newcomers,
                                     split_without)


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


SPLIT = {"test_speakers": ["ravdess-a17", "ased-s56", "nemo-kd0"],
         "validation_speakers": ["ravdess-a15", "ased-s51", "nemo-sm0", "banglaser-a47"]}


def _speakers() -> list[CorpusClip]:
    corpus_of = {"ravdess-a01": "ravdess", "ravdess-a15": "ravdess", "ravdess-a17": "ravdess",
                 "ased-s51": "ased", "ased-s56": "ased", "nemo-sm0": "nemo", "nemo-kd0": "nemo",
                 "banglaser-a47": "banglaser-ext"}
    return [CorpusClip(Path(f"/x/{speaker}.opus"), corpus, speaker, "", "xx", "sad", "s", 3.0)
            for speaker, corpus in corpus_of.items()]


def _names(clips: list[CorpusClip]) -> list[str]:
    return sorted(c.speaker for c in clips)


def test_newcomers_are_a_corpus_test_speakers_or_validation_speakers_of_several_emotions():
    new, old = newcomers_and_old(_speakers(), SPLIT, "ased")
    assert _names(new) == ["ased-s56"] and _names(old) == ["nemo-kd0", "ravdess-a17"]
    # Validation newcomers: only corpora whose sentences are spoken in several emotions (a
    # sentence split holds their words apart); the old speakers are the ASED run's, the same
    # clips, and never a training or validation speaker.
    new, old = newcomers_and_old(_speakers(), SPLIT, VALIDATION)
    assert _names(new) == ["nemo-sm0", "ravdess-a15"]
    assert _names(old) == ["nemo-kd0", "ravdess-a17"]


def test_the_gate_set_for_validation_newcomers_is_built_as_if_they_were_test_speakers():
    split = split_without(SPLIT, {"nemo-sm0", "ravdess-a15"})
    # Not validation (the gate set's speakers), and not training (the replay set's, and the
    # gate set's fill): the recipe builds its sets from neither.
    assert split["validation_speakers"] == ["ased-s51", "banglaser-a47"]
    assert split["test_speakers"] == ["ravdess-a17", "ased-s56", "nemo-kd0", "nemo-sm0",
                                      "ravdess-a15"]
    assert SPLIT["validation_speakers"][0] == "ravdess-a15"  # the recipe's own is unchanged
