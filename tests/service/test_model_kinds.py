"""A store holding versions of both kinds, the log-mel CNN-BiLSTM and the one on the speech
encoder: the engine serves whichever is active, each on its own features, and a user's personal
head on its own global version's features whatever kind serves the others."""
import pytest
import torch

from learner.audio import decode_audio
from learner.checkpoint import LOGMEL_KIND, WHISPER_KIND, model_bytes, model_from_bytes
from learner.inference import EmotionPredictor
from learner.labels import DEFAULT_LABELS
from learner.personal.model import PersonalPredictor, personal_head_bytes, personal_head_from_bytes
from storage.registry import ModelRegistry
from tests.learner.tiny_speech import (bundled_tiny_encoder, tiny_encoder_file,  # noqa: F401
                                       tiny_speech_model)
from tests.service.conftest import bearer, predict

pytestmark = pytest.mark.parametrize("database_backend", ["sqlite"], indirect=True)


@pytest.fixture
def speech_model(tiny_encoder_file, bundled_tiny_encoder) -> bytes:
    net = tiny_speech_model(tiny_encoder_file, n_classes=len(DEFAULT_LABELS))
    return model_bytes(net.eval(), DEFAULT_LABELS)


def _answers_as(answer: dict, predictor: EmotionPredictor, audio: bytes) -> None:
    """The served answer is `predictor`'s on the clip, from the features its model reads."""
    expected = predictor.predict_wave(decode_audio(audio))
    assert answer["emotion"] == expected.emotion
    assert answer["probabilities"] == pytest.approx(expected.probabilities, abs=1e-5)


def test_versions_of_both_kinds_are_served_in_turn(client, keys, db, artifacts, speech_model,
                                                   wav_clip):
    with db() as session:  # version 1 is the log-mel model; 2 reads the speech encoder
        ModelRegistry(session, artifacts).register(speech_model, labels=list(DEFAULT_LABELS),
                                                   parent_version=None)
        session.commit()
    engine = client.app.state.engine
    for version, kind in ((1, LOGMEL_KIND), (2, WHISPER_KIND), (1, LOGMEL_KIND),
                          (2, WHISPER_KIND)):
        if version != engine.serving.version:
            response = client.post(f"/v1/admin/models/{version}/activate",
                                   headers=bearer(keys.admin))
            assert response.status_code == 200, response.text
        served = engine.serving.predictor
        assert served.model.kind == kind
        answer = predict(client, keys.app, wav_clip)
        assert answer["model_version"] == version
        _answers_as(answer, served, wav_clip)


def test_a_personal_head_answers_on_its_own_versions_kind(client, keys, db, artifacts,
                                                          speech_model, wav_clip):
    speech = model_from_bytes(speech_model)
    torch.manual_seed(0)
    head = torch.nn.Linear(speech.net.head.in_features, len(DEFAULT_LABELS))
    data = personal_head_bytes(head, DEFAULT_LABELS, parent_version=2,
                               parent_sha256=speech.sha256, parent_kind=speech.kind)
    with db() as session:  # alice's head sits on version 2 while version 1 serves the others
        registry = ModelRegistry(session, artifacts)
        registry.register(speech_model, labels=list(DEFAULT_LABELS), parent_version=None)
        mine = registry.register(data, labels=list(DEFAULT_LABELS), parent_version=2,
                                 scope="user", user_id="alice")
        registry.activate(mine.version)
        session.commit()
        personal_version = mine.version

    answer = predict(client, keys.app, wav_clip, user_id="alice")
    assert (answer["personal"], answer["model_version"]) == (True, personal_version)
    _answers_as(answer,
                PersonalPredictor(EmotionPredictor(speech), personal_head_from_bytes(data)),
                wav_clip)
    others = predict(client, keys.app, wav_clip, user_id="bob")
    assert (others["personal"], others["model_version"]) == (False, 1)
    _answers_as(others, client.app.state.engine.serving.predictor, wav_clip)
