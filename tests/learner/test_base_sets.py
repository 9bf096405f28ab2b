"""The base sets shipped beside a model: a gate set of speakers the model never trained on."""
import json

import yaml

from learner.checkpoint import LOGMEL_KIND, WHISPER_KIND
from learner.continual.base_sets import build_base_sets, load_base_set
from tests.learner.toy_corpus import make_corpus


def test_the_gate_set_is_of_unseen_speakers_and_the_replay_set_of_training_speakers(tmp_path):
    data = tmp_path / "data"
    make_corpus(data, "toy", speakers=4, per_label=4)  # the corpus the model trained on
    make_corpus(data, "other", speakers=4, per_label=4)  # one it never heard
    held_out = tmp_path / "other-recipe.yaml"  # another recipe's held-out speakers: left out
    held_out.write_text(yaml.safe_dump({"split": {"validation_speakers": ["other-a01"],
                                                  "test_speakers": ["other-a02"]}}))
    config = {"seed": 3, "labels": ["happy", "sad"], "corpora": ["toy"],
              "split": {"validation_speakers": ["toy-a04"], "test_speakers": ["toy-a03"]},
              "gate_set": {"about": "other", "corpora": ["other"],
                           "exclude_splits_of": [str(held_out)], "per_class": 12,
                           "min_per_class": 10, "max_frames": 50}}
    out = tmp_path / "sets"
    out.mkdir()
    info = build_base_sets(data, config, replay_per_class=2, gate_per_class=4, kind=LOGMEL_KIND,
                           max_frames=300, out_dir=out, workers=1)

    gate = load_base_set("gate", out, kind=LOGMEL_KIND)
    replay = load_base_set("replay", out, kind=LOGMEL_KIND)
    for label in ("happy", "sad"):
        speakers = [s for s, l in zip(gate.speakers, gate.labels) if l == label]
        # The 8 clips a label of the two speakers no one holds out, filled up to 10 with the
        # training speakers' clips; never a validation or test speaker of either recipe.
        assert sorted(set(speakers)) == ["other-a03", "other-a04", "toy-a01", "toy-a02"]
        assert sum(s.startswith("other-") for s in speakers) == 8 and len(speakers) == 10
    assert max(f.shape[0] for f in gate.features) <= 50
    assert set(replay.speakers) <= {"toy-a01", "toy-a02"}
    assert max(f.shape[0] for f in replay.features) > 50  # the replay set keeps longer crops
    written = json.loads((out / "base_sets.json").read_text())
    assert written == info and written["speakers"].startswith("unseen speakers")
    assert written["sets"]["gate"]["per_class"] == {"happy": 10, "sad": 10}


def test_the_shipped_gate_sets_hold_unseen_speakers_where_the_corpora_allow():
    """The bundled model's gate set: its own validation speakers (never trained on), 150 a class
    where they have them, only calm and disgust filled up to 50 from training speakers; the
    log-mel kind's: speakers of corpora it never heard, none a benchmark holds out."""
    from learner.continual.base_sets import REPO_ROOT

    logmel_recipe, speech_recipe = (
        yaml.safe_load((REPO_ROOT / "configs" / name).read_text())
        for name in ("base-training.yaml", "speech-training.yaml"))
    validation = set(speech_recipe["split"]["validation_speakers"])
    test = set(speech_recipe["split"]["test_speakers"])

    gate = load_base_set("gate", kind=WHISPER_KIND)
    per_class = {label: gate.labels.count(label) for label in set(gate.labels)}
    assert not set(gate.speakers) & test
    for label, n in per_class.items():
        unseen = sum(s in validation for s, l in zip(gate.speakers, gate.labels) if l == label)
        if label in ("calm", "disgust"):  # 16 and 34 validation clips: filled up to 50
            assert n == 50 and unseen < 50
        else:
            assert unseen == n >= 124

    gate = load_base_set("gate", kind=LOGMEL_KIND)
    held_out = {s for r in (logmel_recipe, speech_recipe)
                for key in ("validation_speakers", "test_speakers") for s in r["split"][key]}
    assert not set(gate.speakers) & held_out
    info = json.loads((REPO_ROOT / "learner" / "default_model" / "base_sets.json").read_text())
    from_trained = sum(info["sets"]["gate"]["per_corpus"].get(c, 0)
                       for c in logmel_recipe["corpora"])
    # Only calm (RAVDESS's alone, its unseen actors all held out) comes from training speakers.
    assert from_trained == gate.labels.count("calm") == 50
    assert {s for s, label in zip(gate.speakers, gate.labels) if label == "calm"} <= {
        f"ravdess-a{i:02d}" for i in range(1, 15)}
