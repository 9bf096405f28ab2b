"""Evaluation figures: what the report's numbers mean, on outcomes small enough to check by hand."""
from pathlib import Path

from learner.corpora import CorpusClip
from learner.evaluation import Outcome, build_report, predict_clips


def _clip(corpus: str, emotion: str) -> CorpusClip:
    return CorpusClip(Path("x.flac"), corpus, f"{corpus}-a01", "", "en", emotion, emotion, 1.0)


def test_answers_are_restricted_to_each_corpus_labels_and_unknown_labels_are_skipped():
    clips = [_clip("a", "sad"), _clip("a", "happy"), _clip("b", "sad"), _clip("b", "angry"),
             _clip("b", "boredom")]
    seen = {}

    def predict(clip, allowed):
        seen[(clip.corpus, clip.emotion)] = allowed
        return clip.emotion

    outcomes, skipped = predict_clips(clips, ("happy", "sad", "angry", "calm"), predict)
    assert skipped == 1 and len(outcomes) == 4
    assert seen[("a", "sad")] == ("happy", "sad")
    assert seen[("b", "angry")] == ("sad", "angry")  # boredom is unknown to the model


def test_accuracy_unweighted_accuracy_and_macro_f1_follow_their_definitions():
    # 3 sad (2 right), 1 happy (right): accuracy 3/4, UA = (2/3 + 1) / 2.
    outcomes = [Outcome("a", "sad", "sad"), Outcome("a", "sad", "sad"),
                Outcome("a", "sad", "happy"), Outcome("b", "happy", "happy")]
    report = build_report(outcomes, skipped=2, labels=("happy", "sad", "angry"))
    assert report["accuracy"] == 0.75 and report["n"] == 4 and report["skipped"] == 2
    assert abs(report["unweighted_accuracy"] - (2 / 3 + 1) / 2) < 1e-9
    # F1 sad = 2*1*(2/3)/(1+2/3) = 0.8; F1 happy = 2*0.5*1/1.5 = 2/3.
    assert abs(report["macro_f1"] - (0.8 + 2 / 3) / 2) < 1e-9
    assert report["per_class"]["sad"] == {"precision": 1.0, "recall": 2 / 3, "f1": 0.8, "support": 3}
    assert "angry" not in report["per_class"]  # never true, never predicted
    assert report["per_corpus"]["b"] == {"accuracy": 1.0, "macro_f1": 1.0,
                                         "unweighted_accuracy": 1.0, "n": 1}
    assert report["confusion"] == {"labels": ["happy", "sad"], "matrix": [[1, 0], [1, 2]]}
