"""POST /v1/recordings and GET /v1/recordings/{id}: a long recording's emotion over time, at once
or as a job, the app seeing only its own, and bad input refused with nothing stored. Real
decoding, a real (random-weight) model, SQLite and PostgreSQL."""
import threading
import time

import numpy as np
import pytest
from fastapi.testclient import TestClient

from service import recording_jobs
from service.bench.clips import to_wav, voiced_clip
from tests.service.conftest import bearer, files_under, row_counts

RATE = 16_000


def recording(*parts: tuple[str, float]) -> bytes:
    """[("voice", 20), ("pause", 5)] -> a WAV of those parts, each voice part another voice."""
    waves = [voiced_clip(seconds, RATE, seed=i) if kind == "voice"
             else np.zeros(int(seconds * RATE), np.float32)
             for i, (kind, seconds) in enumerate(parts)]
    return to_wav(np.concatenate(waves), RATE)


@pytest.fixture
def make_client(make_client):
    def make(**api) -> TestClient:
        # Answered at once unless a test asks for a job: on a busy machine analysing a
        # recording can take longer than the default wait.
        return make_client(**{"recording_wait_s": 60.0, **api})
    return make


def uploaded_files(artifacts) -> list:
    """Clip files, and uploads still being received (the model file is not one)."""
    return files_under(artifacts.root / "clips") + files_under(artifacts.root / "incoming")


def post(client: TestClient, key: str, audio: bytes, **data):
    return client.post("/v1/recordings", files={"file": ("talk.wav", audio, "audio/wav")},
                       data=data, headers=bearer(key))


def poll(client: TestClient, key: str, recording_id: str, timeout_s: float = 60.0) -> dict:
    deadline = time.monotonic() + timeout_s
    while True:
        body = client.get(f"/v1/recordings/{recording_id}", headers=bearer(key)).json()
        if body["status"] != "running":
            return body
        assert 0.0 <= body["progress"] < 1.0
        assert time.monotonic() < deadline
        time.sleep(0.05)


def test_a_recording_longer_than_a_clip_gets_windows_and_segments(make_client, keys, db,
                                                                  artifacts):
    client = make_client()
    audio = recording(("voice", 12), ("pause", 6), ("voice", 20))  # 38 s, past the clip limit
    response = post(client, keys.app, audio, user_id="alice")
    assert response.status_code == 201, response.text
    body = response.json()
    assert body["status"] == "done" and body["progress"] == 1.0 and body["user_id"] == "alice"
    assert body["duration_s"] == 38.0 and body["model_version"] == 1
    windows = body["windows"]
    assert len(windows) == 36 and windows[0]["start"] == 0 and windows[-1]["end"] == 38.0
    silent = [w for w in windows if w["raw"] == "silence"]
    assert [w["start"] for w in silent] == [12, 13, 14, 15]  # the windows inside the pause
    assert all(w["probabilities"] is None and w["smoothed"] == "silence" for w in silent)
    speech = [w for w in windows if w["raw"] != "silence"]
    assert all(abs(sum(w["probabilities"].values()) - 1) < 1e-4 for w in speech)
    segments = body["segments"]
    assert segments[0]["start"] == 0 and segments[-1]["end"] == 38.0
    assert any(s["emotion"] == "silence" for s in segments)
    # Stored like a prediction: the clip once, the row readable by this app only.
    assert row_counts(db)["clips"] == 1 and row_counts(db)["recordings"] == 1
    assert [p.name.split(".")[-1] for p in files_under(artifacts.root / "clips")] == ["wav"]
    again = client.get(f"/v1/recordings/{body['recording_id']}", headers=bearer(keys.app))
    assert again.status_code == 200 and again.json() == body
    other = client.get(f"/v1/recordings/{body['recording_id']}", headers=bearer(keys.other_app))
    assert other.status_code == 404 and other.json()["error"] == "not_found"
    assert client.get(f"/v1/recordings/{body['recording_id']}").status_code == 401


def test_a_slow_recording_is_a_job_polled_until_done(make_client, keys, db):
    client = make_client(recording_wait_s=0.0)
    response = post(client, keys.app, recording(("voice", 30)))
    assert response.status_code == 202, response.text
    job = response.json()
    assert job["status"] == "running" and job["windows"] is None
    assert response.headers["location"] == f"/v1/recordings/{job['recording_id']}"
    done = poll(client, keys.app, job["recording_id"])
    assert done["status"] == "done" and len(done["windows"]) == 28 and done["segments"]
    assert row_counts(db)["recordings"] == 1 and row_counts(db)["clips"] == 1


@pytest.mark.parametrize("audio, status, error", [
    (b"this is a text file, not a recording\n" * 200, 422, "unreadable_audio"),
    (b"", 422, "empty_audio"),
    (recording(("pause", 40)), 422, "silent_audio"),
    (recording(("voice", 61)), 413, "audio_too_long"),
], ids=["not-audio", "empty", "silent", "too-long"])
def test_bad_recordings_are_refused_and_nothing_is_stored(make_client, keys, db, artifacts,
                                                          audio, status, error):
    client = make_client(max_recording_seconds=60)
    response = post(client, keys.app, audio)
    assert response.status_code == status, response.text
    assert response.json()["error"] == error
    assert row_counts(db)["recordings"] == 0 and row_counts(db)["clips"] == 0
    assert uploaded_files(artifacts) == []


def test_too_large_uploads_are_refused_declared_or_streamed(make_client, keys, db, artifacts):
    client = make_client(max_recording_bytes=200_000)
    audio = recording(("voice", 10))  # 320 KB
    response = post(client, keys.app, audio)
    assert response.status_code == 413 and response.json()["error"] == "file_too_large"

    def chunked():  # no Content-Length: the limit must stop it while it arrives
        for i in range(0, len(audio), 16_384):
            yield audio[i:i + 16_384]
    body = (b"--b\r\nContent-Disposition: form-data; name=\"file\"; filename=\"a.wav\"\r\n"
            b"Content-Type: audio/wav\r\n\r\n" + audio + b"\r\n--b--\r\n")
    response = client.post("/v1/recordings", content=iter([body[:1000], body[1000:]]),
                           headers={**bearer(keys.app),
                                    "Content-Type": "multipart/form-data; boundary=b"})
    assert response.status_code == 413 and response.json()["error"] == "file_too_large"
    assert row_counts(db)["recordings"] == 0 and uploaded_files(artifacts) == []
    # The clip limit does not apply to recordings, nor the recording limit to clips.
    assert post(make_client(max_recording_bytes=10_000_000), keys.app, audio).status_code == 201


def test_a_job_whose_recording_turns_out_bad_fails_and_keeps_only_its_error(make_client, keys,
                                                                           db, artifacts,
                                                                           monkeypatch):
    # The job reads its audio only once the route has answered: finding silence takes
    # milliseconds, and a job already done when the route looks is answered at once (422).
    answered = threading.Event()
    chunks = recording_jobs.AudioChunks
    monkeypatch.setattr(recording_jobs, "AudioChunks",
                        lambda *args, **kwargs: answered.wait(30) and chunks(*args, **kwargs))
    client = make_client(recording_wait_s=0.0)
    response = post(client, keys.app, recording(("pause", 30)))
    answered.set()
    assert response.status_code == 202
    failed = poll(client, keys.app, response.json()["recording_id"])
    assert failed["status"] == "failed" and failed["error"]["error"] == "silent_audio"
    assert failed["windows"] is None and failed["segments"] is None
    assert row_counts(db)["clips"] == 0 and uploaded_files(artifacts) == []


def test_forgetting_a_user_removes_their_recordings(make_client, keys, db, artifacts):
    client = make_client()
    mine = post(client, keys.app, recording(("voice", 8)), user_id="bob").json()
    theirs = post(client, keys.app, recording(("voice", 9)), user_id="carol").json()
    response = client.delete("/v1/users/bob", headers=bearer(keys.admin))
    assert response.status_code == 200, response.text
    assert response.json()["deleted"]["recordings"] == 1
    assert client.get(f"/v1/recordings/{mine['recording_id']}",
                      headers=bearer(keys.app)).status_code == 404
    assert client.get(f"/v1/recordings/{theirs['recording_id']}",
                      headers=bearer(keys.app)).status_code == 200
    assert row_counts(db)["clips"] == 1 and len(files_under(artifacts.root / "clips")) == 1


def test_a_segment_is_corrected_in_one_call_and_stored_like_a_prediction(make_client, keys, db,
                                                                        artifacts):
    client = make_client()
    body = post(client, keys.app, recording(("voice", 10), ("pause", 6), ("voice", 8)),
                user_id="erin").json()
    segments = body["segments"]
    speech = next(i for i, s in enumerate(segments) if s["emotion"] != "silence")
    silence = next(i for i, s in enumerate(segments) if s["emotion"] == "silence")
    path = f"/v1/recordings/{body['recording_id']}/segments"
    assert row_counts(db)["predictions"] == 0
    first = client.post(f"{path}/{speech}/feedback", json={"label": "angry"},
                        headers=bearer(keys.app))
    assert first.status_code == 201, first.text
    prediction = client.get(f"/v1/predictions/{first.json()['prediction_id']}",
                            headers=bearer(keys.app)).json()
    assert prediction["emotion"] == segments[speech]["emotion"]
    assert prediction["user_id"] == "erin" and prediction["model_version"] == 1
    # Again: more feedback on the same prediction, no second clip.
    again = client.post(f"{path}/{speech}/feedback", json={"label": "sad"},
                        headers=bearer(keys.app))
    assert again.status_code == 201
    assert again.json()["prediction_id"] == first.json()["prediction_id"]
    counts = row_counts(db)
    assert (counts["clips"], counts["predictions"], counts["feedback"]) == (2, 1, 2)
    read = client.get(f"/v1/recordings/{body['recording_id']}", headers=bearer(keys.app)).json()
    assert read["segments"][speech]["prediction_id"] == first.json()["prediction_id"]
    # Silence, an unknown segment, an unknown label, another app: refused, nothing stored.
    for index, label, key, status in ((silence, "sad", keys.app, 422),
                                      (99, "sad", keys.app, 404),
                                      (speech, "bored-ish", keys.app, 422),
                                      (speech, "sad", keys.other_app, 404)):
        response = client.post(f"{path}/{index}/feedback", json={"label": label},
                               headers=bearer(key))
        assert response.status_code == status, response.text
    assert row_counts(db)["feedback"] == 2
