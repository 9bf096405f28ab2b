"""The API with `storage.artifacts: database`: clips and model files live in the database, nothing
on the local disk; a corrupt artifact is refused, logged and counted in /metrics, and the request
falls back (the version serving before, or 503 while nothing valid is loaded). On SQLite and
PostgreSQL."""
import uuid

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import update

from learner.labels import DEFAULT_LABELS
from service.app import create_app
from storage.artifacts import open_artifact_store
from storage.db import create_db_engine
from storage.files import sha256_bytes
from storage.models import ArtifactBlob, ArtifactChunk, Clip, Prediction
from storage.registry import ModelRegistry
from tests.service.conftest import bearer, files_under, predict, wait_ready


@pytest.fixture
def db_settings(settings):
    return settings.model_copy(update={"storage": settings.storage.model_copy(
        update={"artifacts": "database"})})


@pytest.fixture
def db_artifacts(db_settings):
    engine = create_db_engine(db_settings.database.url)
    yield open_artifact_store(db_settings, engine)
    engine.dispose()


def _register(db, artifacts, model: bytes, *, activate: bool) -> int:
    with db() as session:
        registry = ModelRegistry(session, artifacts)
        if registry.active_global() is None:
            version = registry.bootstrap_default(model, sha256_bytes(model),
                                                 labels=list(DEFAULT_LABELS))
        else:
            version = registry.register(model, labels=list(DEFAULT_LABELS), parent_version=1)
            if activate:
                registry.activate(version.version)
        session.commit()
    return version.version


def _corrupt(db, sha256: str) -> None:
    with db() as session:
        session.execute(update(ArtifactChunk).where(ArtifactChunk.sha256 == sha256,
                                                    ArtifactChunk.seq == 0)
                        .values(data=b"flipped bits"))
        session.commit()


def _corrupt_count(client: TestClient) -> float:
    for line in client.get("/metrics").text.splitlines():
        if line.startswith('emoloop_artifacts_corrupt_total{store="database"}'):
            return float(line.split()[-1])
    return 0.0


def test_clips_and_models_live_in_the_database_only(db_settings, db, db_artifacts, keys,
                                                    random_model, wav_clip):
    _register(db, db_artifacts, random_model, activate=True)
    with TestClient(create_app(db_settings)) as client:
        wait_ready(client)
        answer = predict(client, keys.app, wav_clip, user_id="speaker-1")
        again = predict(client, keys.other_app, wav_clip)
        correction = client.post(f"/v1/predictions/{answer['prediction_id']}/feedback",
                                 json={"label": "sad"}, headers=bearer(keys.app))
        assert correction.status_code == 201
        refused = client.post("/v1/predictions", headers=bearer(keys.app),
                              files={"file": ("notes.txt", b"not audio at all", "text/plain")})
        assert refused.status_code == 422
    assert again["model_version"] == answer["model_version"] == 1
    with db() as session:
        clip = session.get(Clip, session.get(Prediction,
                                             uuid.UUID(answer["prediction_id"])).clip_id)
        assert session.query(Clip).count() == 1  # stored once; nothing of the refused upload
        assert session.query(ArtifactBlob).count() == 2  # the model and the clip
    assert db_artifacts.read_checked(clip.artifact_path, clip.sha256) == wav_clip
    assert files_under(db_settings.storage.data_dir) == []  # no file on this machine


def test_a_corrupt_model_is_never_served_and_is_counted(db_settings, db, db_artifacts, keys,
                                                        random_model, wav_clip, caplog):
    _register(db, db_artifacts, random_model, activate=True)
    with TestClient(create_app(db_settings)) as client:
        wait_ready(client)
        before = _corrupt_count(client)
        other = random_model[:-4] + b"\x00\x00\x00\x00"  # other bytes: its own blob
        version = _register(db, db_artifacts, other, activate=False)
        _corrupt(db, sha256_bytes(other))
        response = client.post(f"/v1/admin/models/{version}/activate",
                               headers=bearer(keys.admin))
        assert response.status_code == 409 and response.json()["error"] == "model_not_loadable"
        assert predict(client, keys.app, wav_clip)["model_version"] == 1
        assert _corrupt_count(client) == before + 1
    assert "corrupt" in caplog.text


def test_with_no_valid_model_predictions_answer_503(db_settings, db, db_artifacts, keys,
                                                   random_model, wav_clip):
    _register(db, db_artifacts, random_model, activate=True)
    _corrupt(db, sha256_bytes(random_model))
    with TestClient(create_app(db_settings)) as client:
        assert client.get("/ready").status_code == 503
        response = client.post("/v1/predictions", headers=bearer(keys.app),
                               files={"file": ("clip.wav", wav_clip, "audio/wav")})
        assert response.status_code == 503 and response.json()["error"] == "not_ready"
    with db() as session:
        assert session.query(Prediction).count() == 0
