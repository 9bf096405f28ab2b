"""Labels map right for every corpus; splits never put a speaker on two sides."""
import pytest

from learner.corpora import CorpusError, read_corpora, split_by_speaker
from learner.labels import DEFAULT_LABELS, canonical_label, label_from_source
from learner.training import load_training_config


@pytest.mark.parametrize("corpus, source, label", [
    ("ravdess", "01", "neutral"), ("ravdess", "02-strong", "calm"), ("ravdess", "08", "surprised"),
    ("ravdess", "06-strong", "fearful"), ("tess", "ps", "surprised"), ("tess", "fear", "fearful"),
    ("banglaser", "01", "happy"), ("banglaser", "04", "surprised"), ("banglaser", "05", "neutral"),
    ("banglaser-ext", "06", "disgust"), ("banglaser-ext", "07", "fearful"), ("ased", "f", "fearful"),
    ("ased", "n", "neutral"), ("nemo", "sadness", "sad"), ("nemo", "surprised", "surprised"),
])
def test_corpus_codes_map_to_canonical_labels(corpus, source, label):
    assert label_from_source(corpus, source) == label


def test_unknown_label_is_refused_with_the_known_ones_listed():
    assert canonical_label(" Angry ") == "angry"
    with pytest.raises(ValueError, match="known labels: neutral"):
        canonical_label("grumpy")


def test_split_by_speaker_keeps_every_speaker_on_one_side(toy_corpus):
    clips = read_corpora(toy_corpus)
    split = split_by_speaker(clips, validation_speakers=["toy-a02"], test_speakers=["toy-a03"])
    sides = [{c.speaker for c in part} for part in (split.train, split.validation, split.test)]
    assert sides == [{"toy-a01", "toy-a04"}, {"toy-a02"}, {"toy-a03"}]
    assert len(split.train) + len(split.validation) + len(split.test) == len(clips)
    with pytest.raises(CorpusError):
        split_by_speaker(clips, validation_speakers=["toy-a02"], test_speakers=["toy-a02"])


def test_a_folder_without_manifests_is_a_clear_error(tmp_path):
    with pytest.raises(CorpusError, match="no manifest.csv"):
        read_corpora(tmp_path)


@pytest.mark.corpus
def test_every_manifest_row_of_the_real_corpora_maps_to_its_label(shared_data):
    clips = read_corpora(shared_data)
    assert {c.corpus for c in clips} == {"ravdess", "tess", "banglaser", "ased", "nemo",
                                         "banglaser-ext"}
    for clip in clips:
        assert label_from_source(clip.corpus, clip.source_label) == clip.emotion, clip.path
    assert {c.emotion for c in clips if c.corpus == "ravdess"} == set(DEFAULT_LABELS)


@pytest.mark.corpus
def test_base_recipe_split_is_speaker_disjoint_and_holds_out_the_card_speakers(shared_data):
    config = load_training_config("configs/base-training.yaml")
    clips = read_corpora(shared_data)
    split = split_by_speaker(clips, **{k: config["split"][k]
                                       for k in ("validation_speakers", "test_speakers")})
    train, val, test = ({c.speaker for c in part} for part in (split.train, split.validation, split.test))
    assert not (train & val or train & test or val & test)
    assert {f"ravdess-a{n}" for n in (17, 18, 19, 20)} | {f"banglaser-a{n}" for n in (25, 26, 27, 28)} == test
    assert all(s in {c.speaker for c in clips} for s in val | test)


@pytest.mark.corpus
def test_speech_recipe_split_holds_out_the_fixed_speakers_of_all_six_corpora(shared_data):
    config = load_training_config("configs/speech-training.yaml")
    clips = read_corpora(shared_data, config["corpora"])
    split = split_by_speaker(clips, **{k: config["split"][k]
                                       for k in ("validation_speakers", "test_speakers")})
    train, val, test = ({c.speaker for c in part} for part in (split.train, split.validation, split.test))
    assert not (train & val or train & test or val & test)
    assert {c.corpus for c in split.test} == {"ravdess", "banglaser", "ased", "nemo", "banglaser-ext"}
    assert {"ravdess-a17", "banglaser-a25", "ased-s56", "ased-s65", "nemo-kd0", "nemo-wr0",
            "banglaser-a51"} <= test
    assert {"ravdess-a15", "banglaser-a24", "ased-s51", "nemo-sm0", "banglaser-a47"} <= val
    assert all(s in {c.speaker for c in clips} for s in val | test)
    assert len(clips) == 12_421 and all(c.emotion in config["labels"] for c in clips)
