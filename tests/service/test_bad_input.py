"""Every bad input gets a 4xx `{error, detail}` and leaves no row and no file behind."""
import uuid

import numpy as np
import pytest

from service.bench.clips import to_wav, voiced_clip
from tests.service.conftest import bearer, files_under, predict, row_counts

SR = 16_000


def wav(seconds: float, amplitude: float = 1.0) -> bytes:
    return to_wav(amplitude * voiced_clip(seconds, SR), SR)


def upload(audio: bytes, name: str = "clip.wav") -> dict:
    return {"files": {"file": (name, audio, "audio/wav")}}


# (what, request arguments, expected status, expected error slug). Limits in conftest: 1 MiB,
# 5 s.
BAD_PREDICTIONS = [
    ("not audio", upload(b"just some text, not a recording" * 10), 422, "unreadable_audio"),
    ("an image", upload(b"\x89PNG\r\n\x1a\n" + bytes(2000), "a.png"), 422, "unreadable_audio"),
    ("truncated wav", upload(wav(1.0)[:30]), 422, "unreadable_audio"),
    ("empty file", upload(b""), 422, "empty_audio"),
    ("too short", upload(wav(0.1)), 422, "audio_too_short"),
    ("silence", upload(to_wav(np.zeros(SR, np.float32), SR)), 422, "silent_audio"),
    ("too long", upload(wav(6.0)), 413, "audio_too_long"),
    ("too large", upload(bytes(1024 * 1024 + 1)), 413, "file_too_large"),
    ("far too large", upload(bytes(3 * 1024 * 1024)), 413, "file_too_large"),
    ("missing file field", {"data": {"user_id": "u"}}, 422, "validation_error"),
    ("wrong field name", {"files": {"audio": ("a.wav", wav(1.0), "audio/wav")}}, 422,
     "validation_error"),
    ("file sent as text", {"data": {"file": "not a file"}}, 422, "validation_error"),
    ("json instead of multipart", {"json": {"file": "x"}}, 422, "validation_error"),
    ("user_id too long", {**upload(wav(1.0)), "data": {"user_id": "u" * 200}}, 422,
     "validation_error"),
    ("user_id with control characters", {**upload(wav(1.0)), "data": {"user_id": "a\x00b"}},
     422, "validation_error"),
    # /v1/users/{user_id} could never name it
    ("user_id with a slash", {**upload(wav(1.0)), "data": {"user_id": "team/ana"}}, 422,
     "validation_error"),
]


def test_bad_uploads_are_refused_and_store_nothing(client, keys, db, artifacts):
    # One app for all cases (they are many and an app per case is slow); each case names itself.
    for what, kwargs, status, error in BAD_PREDICTIONS:
        before = row_counts(db)
        response = client.post("/v1/predictions", headers=bearer(keys.app), **kwargs)
        assert response.status_code == status, (what, response.text)
        assert response.json().keys() == {"error", "detail"}, what
        assert response.json()["error"] == error and response.json()["detail"], what
        assert row_counts(db) == before, what
        assert files_under(artifacts.root / "clips") == [], what


def test_a_chunked_upload_stops_being_read_past_the_limit(client, keys, db, artifacts):
    def body():  # no Content-Length: the limit must hold while reading
        for _ in range(64):
            yield bytes(64 * 1024)

    response = client.post("/v1/predictions", headers={**bearer(keys.app),
                           "Content-Type": "multipart/form-data; boundary=x"}, content=body())
    assert response.status_code == 413 and response.json()["error"] == "file_too_large"
    assert row_counts(db)["clips"] == 0 and files_under(artifacts.root / "clips") == []


@pytest.fixture
def prediction_id(client, keys, wav_clip) -> str:
    return predict(client, keys.app, wav_clip)["prediction_id"]


BAD_FEEDBACK = [
    ("unknown label", {"json": {"label": "ecstatic"}}, 422, "unknown_label"),
    ("empty label", {"json": {"label": ""}}, 422, "validation_error"),
    ("label not a string", {"json": {"label": 3}}, 422, "validation_error"),
    ("missing label", {"json": {"user_id": "u"}}, 422, "validation_error"),
    ("unexpected field", {"json": {"label": "sad", "extra": 1}}, 422, "validation_error"),
    ("user_id with control characters", {"json": {"label": "sad", "user_id": "u\x00"}}, 422,
     "validation_error"),
    ("user_id with a slash", {"json": {"label": "sad", "user_id": "a/b"}}, 422,
     "validation_error"),
    ("label with control characters", {"json": {"label": "sad\x00"}}, 422, "unknown_label"),
    ("malformed json", {"content": b'{"label": "sad"',
                        "headers": {"Content-Type": "application/json"}}, 400, "malformed_json"),
    ("json not an object", {"json": ["sad"]}, 422, "validation_error"),
    ("no body", {}, 422, "validation_error"),
]


def test_bad_feedback_is_refused_and_stores_nothing(client, keys, db, prediction_id):
    for what, kwargs, status, error in BAD_FEEDBACK:
        before = row_counts(db)
        kwargs = dict(kwargs)
        headers = {**bearer(keys.app), **kwargs.pop("headers", {})}
        response = client.post(f"/v1/predictions/{prediction_id}/feedback", headers=headers,
                               **kwargs)
        assert response.status_code == status, (what, response.text)
        assert response.json().keys() == {"error", "detail"}, what
        assert response.json()["error"] == error, what
        assert row_counts(db) == before, what


def test_unknown_prediction_ids(client, keys, db, prediction_id):
    before = row_counts(db)
    for target, status, error in [(uuid.uuid4(), 404, "not_found"),
                                  ("not-a-uuid", 422, "validation_error")]:
        for response in (
                client.get(f"/v1/predictions/{target}", headers=bearer(keys.app)),
                client.post(f"/v1/predictions/{target}/feedback", json={"label": "sad"},
                            headers=bearer(keys.app))):
            assert response.status_code == status, (target, response.text)
            assert response.json().keys() == {"error", "detail"}
            assert response.json()["error"] == error
    assert row_counts(db) == before


KEY_PROBLEMS = {"missing": {}, "wrong": {"Authorization": "Bearer emo_not-a-real-key"},
                "not bearer": {"Authorization": "Basic dXNlcjpwYXNz"},
                "empty": {"Authorization": "Bearer"}}


def test_missing_or_wrong_keys_get_401_and_store_nothing(client, db, artifacts, wav_clip,
                                                         prediction_id):
    before = row_counts(db)
    files = files_under(artifacts.root)
    for problem, headers in KEY_PROBLEMS.items():
        for method, path, kwargs in [
                ("POST", "/v1/predictions", upload(wav_clip)),
                ("GET", f"/v1/predictions/{prediction_id}", {}),
                ("POST", f"/v1/predictions/{prediction_id}/feedback", {"json": {"label": "sad"}}),
                ("GET", "/v1/labels", {}), ("GET", "/v1/models", {}), ("GET", "/v1/models/1", {}),
                ("POST", "/v1/admin/models/1/activate", {}), ("GET", "/v1/admin/audit", {})]:
            response = client.request(method, path, headers=headers, **kwargs)
            assert response.status_code == 401, (problem, path, response.text)
            assert response.json()["error"] == "unauthorized"
            assert response.headers["WWW-Authenticate"] == "Bearer"
    assert row_counts(db) == before and files_under(artifacts.root) == files


def test_a_revoked_key_is_refused(client, keys, db, wav_clip):
    from storage.api_keys import ApiKeyRepository, hash_key
    from storage.models import ApiKey

    with db() as session:
        key_id = session.query(ApiKey).filter_by(key_hash=hash_key(keys.app)).one().id
        ApiKeyRepository(session).revoke(key_id)
        session.commit()
    response = client.post("/v1/predictions", headers=bearer(keys.app), **upload(wav_clip))
    assert response.status_code == 401


def test_unknown_paths_and_methods_answer_json(client):
    assert client.get("/v2/nothing").json()["error"] == "not_found"
    response = client.delete("/v1/predictions")
    assert response.status_code == 405 and response.json()["error"] == "method_not_allowed"


def test_a_failed_write_leaves_no_row_and_no_file(app, keys, db, artifacts, wav_clip,
                                                  monkeypatch):
    from fastapi.testclient import TestClient

    from storage.repositories import PredictionRepository
    from tests.service.conftest import wait_ready

    def fail(*args, **kwargs):
        raise RuntimeError("the disk is full")

    monkeypatch.setattr(PredictionRepository, "create", fail)
    with TestClient(app, raise_server_exceptions=False) as client:
        wait_ready(client)
        response = client.post("/v1/predictions", headers=bearer(keys.app), **upload(wav_clip))
    assert response.status_code == 500
    assert response.json() == {"error": "internal_error",
                               "detail": "the server failed to answer; see its log"}
    assert row_counts(db)["clips"] == 0 and row_counts(db)["predictions"] == 0
    assert files_under(artifacts.root / "clips") == []
