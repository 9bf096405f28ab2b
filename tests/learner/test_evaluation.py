"""Evaluation figures: what the report's numbers mean, on outcomes small enough to check by hand."""
from pathlib import Path

import pytest
import torch

from learner.audio import decode_audio
from learner.checkpoint import ModelFileError, model_from_bytes, with_encoder
from learner.corpora import CorpusClip
from learner.evaluation import Outcome, build_report, evaluate_folder, predict_clips, write_report
from learner.inference import Prediction
from learner.speech_encoder.weights import import_encoder
from storage.files import sha256_bytes
from tests.learner.tiny_speech import (BLOCKS, bundled_tiny_encoder,  # noqa: F401 (fixtures)
                                       tiny_ct2, tiny_encoder_bytes, tiny_encoder_file,
                                       toy_speech_model)
from tests.learner.toy_learning import toy_model  # noqa: F401 (fixture)


def _clip(corpus: str, emotion: str) -> CorpusClip:
    return CorpusClip(Path("x.flac"), corpus, f"{corpus}-a01", "", "en", emotion, emotion, 1.0)


def test_answers_are_restricted_to_each_corpus_labels_and_unknown_labels_are_skipped():
    clips = [_clip("a", "sad"), _clip("a", "happy"), _clip("b", "sad"), _clip("b", "angry"),
             _clip("b", "boredom")]
    seen = {}

    def predict(clip, allowed):
        seen[(clip.corpus, clip.emotion)] = allowed
        return Prediction(clip.emotion, 1.0, {"happy": 0.5, "sad": 0.2, "angry": 0.3, "calm": 0.0})

    outcomes, skipped = predict_clips(clips, ("happy", "sad", "angry", "calm"), predict)
    assert skipped == 1 and len(outcomes) == 4
    assert seen[("a", "sad")] == ("happy", "sad")
    assert seen[("b", "angry")] == ("sad", "angry")  # boredom is unknown to the model
    # Only the labels it could answer are kept: a forced 0 is no score.
    assert outcomes[2].probabilities == {"sad": 0.2, "angry": 0.3}


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


def _scored(corpus: str, truth: str, **probabilities: float) -> Outcome:
    return Outcome(corpus, truth, max(probabilities, key=probabilities.get), probabilities)


def test_roc_auc_is_each_emotion_against_the_rest_where_it_could_be_answered():
    outcomes = [
        _scored("a", "happy", happy=0.9, sad=0.1), _scored("a", "happy", happy=0.4, sad=0.6),
        _scored("a", "sad", happy=0.6, sad=0.4), _scored("a", "sad", happy=0.2, sad=0.8),
        # Corpus b has no happy: its clips are no negatives for happy (P(happy) is a forced 0).
        _scored("b", "sad", sad=0.3, angry=0.7), _scored("b", "angry", sad=0.1, angry=0.9),
    ]
    auc = build_report(outcomes, skipped=0, labels=("happy", "sad", "angry", "calm"))["roc_auc"]
    # happy: positives 0.9, 0.4 against negatives 0.6, 0.2 -> 3 of 4 pairs ranked right.
    assert auc["per_class"]["happy"] == 0.75
    # sad: positives 0.4, 0.8, 0.3 against negatives 0.1, 0.6, 0.1 -> 7 of 9 pairs.
    assert abs(auc["per_class"]["sad"] - 7 / 9) < 1e-9
    assert auc["per_class"]["angry"] == 1.0
    assert auc["per_class"]["calm"] is None  # no clip of it: no curve, and no crash
    assert abs(auc["macro"] - (0.75 + 7 / 9 + 1.0) / 3) < 1e-9


def test_a_set_of_one_emotion_has_no_roc_and_still_writes_its_report(tmp_path):
    outcomes = [_scored("a", "sad", happy=0.3, sad=0.7), _scored("a", "sad", happy=0.6, sad=0.4)]
    report = build_report(outcomes, skipped=0, labels=("happy", "sad"))
    assert report["roc_auc"] == {"per_class": {"happy": None, "sad": None}, "macro": None}
    write_report(report, outcomes, tmp_path, "one emotion")
    assert (tmp_path / "roc.png").read_bytes()[:4] == b"\x89PNG"
    assert "| sad | 1.000 | 0.500 | 0.667 | 2 | none |" in (tmp_path / "report.md").read_text()


def test_a_report_run_draws_roc_curves_and_reports_each_emotions_auc(toy_corpus, toy_model,
                                                                      tmp_path):
    model = tmp_path / "toy.safetensors"
    model.write_bytes(toy_model)
    report = evaluate_folder(toy_corpus, model, report_dir=tmp_path / "report", workers=1,
                             progress=False)
    auc = report["roc_auc"]
    assert set(auc["per_class"]) == {"happy", "sad"}
    assert all(0.0 <= v <= 1.0 for v in auc["per_class"].values())
    assert 0.0 <= auc["macro"] <= 1.0
    assert (tmp_path / "report" / "roc.png").read_bytes()[:4] == b"\x89PNG"
    assert "![ROC curves](roc.png)" in (tmp_path / "report" / "report.md").read_text()


def test_a_speech_model_is_evaluated_on_another_encoder_file_when_named(
        toy_corpus, toy_speech_model, tiny_encoder_file, bundled_tiny_encoder, tmp_path):
    """`emoloop evaluate --encoder`: the same downstream on another import of the encoder (how
    the precision's cost is measured); the report names the encoder it ran on."""
    model = tmp_path / "speech.safetensors"
    model.write_bytes(toy_speech_model)
    other = tmp_path / "other_encoder.safetensors"
    other.write_bytes(tiny_encoder_bytes(seed=1))

    def run(**kwargs):
        return evaluate_folder(toy_corpus, model, workers=1, progress=False, **kwargs)

    named, again = run(), run(encoder_path=tiny_encoder_file[0])
    assert named["encoder_sha256"] == again["encoder_sha256"] == bundled_tiny_encoder
    assert named == again  # its own encoder named again: the very same figures
    swapped = run(encoder_path=other)
    assert swapped["encoder_sha256"] == sha256_bytes(other.read_bytes())
    assert swapped["model_sha256"] == named["model_sha256"]  # the downstream is unchanged

    # The answers are the downstream's on the other encoder's states, not the named one's
    # (logits compared: the toy model's probabilities are saturated).
    loaded = model_from_bytes(toy_speech_model)
    mel = torch.from_numpy(loaded.features(decode_audio(next(toy_corpus.rglob("*.wav")))))[None]
    lengths = torch.tensor([mel.shape[1]])
    with torch.no_grad():
        own, moved = loaded.net(mel, lengths), with_encoder(loaded, other).net(mel, lengths)
    assert (own - moved).abs().max() > 1e-2


def test_an_encoder_the_downstream_cannot_read_is_refused_by_name(toy_speech_model, toy_model,
                                                                  bundled_tiny_encoder, tmp_path):
    ct2 = tiny_ct2()
    fewer = tmp_path / "one_block_encoder.safetensors"
    fewer.write_bytes(import_encoder(ct2, BLOCKS - 1, pinned={sha256_bytes(ct2): "test, {n}"}))
    with pytest.raises(ModelFileError, match=f"has {BLOCKS - 1} blocks .* reads {BLOCKS} blocks"):
        with_encoder(model_from_bytes(toy_speech_model), fewer)
    with pytest.raises(ModelFileError, match="reads no speech encoder"):
        with_encoder(model_from_bytes(toy_model), fewer)
    garbage = tmp_path / "garbage_encoder.safetensors"
    garbage.write_bytes(b"not an encoder")
    with pytest.raises(ModelFileError, match="not a valid encoder file"):
        with_encoder(model_from_bytes(toy_speech_model), garbage)
