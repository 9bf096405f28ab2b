"""The loop a user walks, over HTTP against the real app, on SQLite and PostgreSQL."""
import uuid

from learner.labels import CANONICAL_LABELS, DEFAULT_LABELS
from service.bench.clips import to_webm_opus, voiced_clip
from storage.models import Clip, Feedback, Prediction
from storage.registry import ModelRegistry
from tests.service.conftest import bearer, files_under, predict


def test_predict_correct_and_read_back(client, keys, wav_clip, db, artifacts):
    answer = predict(client, keys.app, wav_clip, user_id="speaker-1")
    assert set(answer) == {"prediction_id", "emotion", "confidence", "probabilities",
                           "model_version", "personal", "latency_ms"}
    assert answer["personal"] is False  # no personal model yet
    assert set(answer["probabilities"]) == set(DEFAULT_LABELS)
    assert abs(sum(answer["probabilities"].values()) - 1) < 1e-4
    assert answer["confidence"] == answer["probabilities"][answer["emotion"]]
    assert answer["model_version"] == 1 and answer["latency_ms"] > 0

    wrong = next(label for label in DEFAULT_LABELS if label != answer["emotion"])
    correction = client.post(f"/v1/predictions/{answer['prediction_id']}/feedback",
                             json={"label": wrong.upper()}, headers=bearer(keys.app))
    assert correction.status_code == 201, correction.text
    confirmation = client.post(f"/v1/predictions/{answer['prediction_id']}/feedback",
                               json={"label": answer["emotion"], "user_id": "speaker-2"},
                               headers=bearer(keys.app))
    assert confirmation.status_code == 201
    assert confirmation.json()["feedback_id"] != correction.json()["feedback_id"]

    detail = client.get(f"/v1/predictions/{answer['prediction_id']}", headers=bearer(keys.app))
    assert detail.status_code == 200
    assert {k: detail.json()[k] for k in answer} == answer
    assert detail.json()["user_id"] == "speaker-1"

    # Everything a learning round needs is stored: the clip, the version, the probabilities.
    with db() as session:
        prediction = session.get(Prediction, uuid.UUID(answer["prediction_id"]))
        clip = session.get(Clip, prediction.clip_id)
        feedback = session.query(Feedback).order_by(Feedback.id).all()
    assert prediction.model_version == 1 and prediction.probabilities == answer["probabilities"]
    assert artifacts.path(clip.artifact_path).read_bytes() == wav_clip
    assert clip.artifact_path.endswith(".wav") and 0.9 < clip.duration_s < 1.1
    assert [(f.label, f.user_id) for f in feedback] == [(wrong, "speaker-1"),
                                                        (answer["emotion"], "speaker-2")]


def test_the_same_clip_is_stored_once(client, keys, wav_clip, db, artifacts):
    first = predict(client, keys.app, wav_clip)
    second = predict(client, keys.other_app, wav_clip)
    assert first["prediction_id"] != second["prediction_id"]
    assert len(files_under(artifacts.root / "clips")) == 1
    with db() as session:
        assert session.query(Clip).count() == 1


def test_browser_webm_is_accepted(client, keys):
    answer = predict(client, keys.app, to_webm_opus(voiced_clip(1.5, 48_000)))
    assert answer["model_version"] == 1


def test_another_apps_prediction_does_not_exist_for_it(client, keys, wav_clip):
    answer = predict(client, keys.app, wav_clip)
    path = f"/v1/predictions/{answer['prediction_id']}"
    for response in (client.get(path, headers=bearer(keys.other_app)),
                     client.post(f"{path}/feedback", json={"label": "sad"},
                                 headers=bearer(keys.other_app))):
        assert response.status_code == 404
        assert response.json() == {"error": "not_found", "detail": "prediction not found"}


def test_labels_and_models(client, keys):
    labels = client.get("/v1/labels", headers=bearer(keys.app)).json()
    assert labels == {"model_version": 1, "labels": list(DEFAULT_LABELS),
                      "feedback_labels": list(CANONICAL_LABELS)}
    models = client.get("/v1/models", headers=bearer(keys.app)).json()
    assert [(m["version"], m["status"]) for m in models] == [(1, "active")]
    one = client.get("/v1/models/1", headers=bearer(keys.app)).json()
    assert one == models[0] and one["activated_at"] and one["labels"] == list(DEFAULT_LABELS)
    assert client.get("/v1/models/99", headers=bearer(keys.app)).status_code == 404


def test_admin_rollback_is_served_at_once_and_audited(client, keys, db, artifacts, random_model,
                                                      wav_clip):
    with db() as session:  # a learning round's result, activated: version 2 serves
        registry = ModelRegistry(session, artifacts)
        registry.register(random_model, labels=list(DEFAULT_LABELS), parent_version=1)
        registry.activate(2, reason="round 1 passed the gate")
        session.commit()
    client.app.state.engine.refresh()
    assert predict(client, keys.app, wav_clip)["model_version"] == 2

    rollback = client.post("/v1/admin/models/1/activate", json={"reason": "v2 sounds worse"},
                           headers=bearer(keys.admin))
    assert rollback.status_code == 200, rollback.text
    assert rollback.json()["version"] == 1 and rollback.json()["status"] == "active"
    assert predict(client, keys.app, wav_clip)["model_version"] == 1  # this worker: at once
    statuses = {m["version"]: m["status"]
                for m in client.get("/v1/models", headers=bearer(keys.app)).json()}
    assert statuses == {1: "active", 2: "retired"}

    audit = client.get("/v1/admin/audit", headers=bearer(keys.admin)).json()
    newest = audit[0]
    assert newest["action"] == "model.activate" and newest["target"] == "model_version:1"
    assert newest["details"]["previous_version"] == 2
    assert newest["details"]["reason"] == "v2 sounds worse"
    assert newest["actor_key_id"] is not None


def test_admin_endpoints_need_an_admin_key(client, keys):
    for response in (client.post("/v1/admin/models/1/activate", headers=bearer(keys.app)),
                     client.get("/v1/admin/audit", headers=bearer(keys.app))):
        assert response.status_code == 403
        assert response.json()["error"] == "forbidden"
    assert client.post("/v1/admin/models/7/activate",
                       headers=bearer(keys.admin)).status_code == 404


def test_a_corrupt_model_file_is_never_activated(client, keys, db, artifacts, random_model,
                                                 wav_clip):
    with db() as session:
        version = ModelRegistry(session, artifacts).register(
            random_model, labels=list(DEFAULT_LABELS), parent_version=1)
        session.commit()
    path = artifacts.path(version.artifact_path)
    path.write_bytes(path.read_bytes()[:-10] + b"0123456789")  # damaged on disk

    response = client.post(f"/v1/admin/models/{version.version}/activate",
                           headers=bearer(keys.admin))
    assert response.status_code == 409 and response.json()["error"] == "model_not_loadable"
    assert predict(client, keys.app, wav_clip)["model_version"] == 1
    statuses = {m["version"]: m["status"]
                for m in client.get("/v1/models", headers=bearer(keys.app)).json()}
    assert statuses == {1: "active", 2: "candidate"}

    # Activated behind the API's back (a buggy script): the poll refuses it, 1 keeps serving.
    with db() as session:
        ModelRegistry(session, artifacts).activate(version.version)
        session.commit()
    assert client.app.state.engine.refresh() == 1
    assert predict(client, keys.app, wav_clip)["model_version"] == 1


def test_docs_and_openapi_are_served(client):
    assert client.get("/docs").status_code == 200
    paths = client.get("/openapi.json").json()["paths"]
    for path in ("/v1/predictions", "/v1/predictions/{prediction_id}",
                 "/v1/predictions/{prediction_id}/feedback", "/v1/labels", "/v1/models",
                 "/v1/models/{version}", "/v1/admin/models/{version}/activate",
                 "/v1/admin/audit", "/health", "/ready"):
        assert path in paths
