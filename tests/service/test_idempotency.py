"""Retries are safe, on SQLite and PostgreSQL: corrections sent again (or changed) leave one that
counts, a round trains on one label per prediction, and a POST with an `Idempotency-Key` is
done once, its first answer given to every repeat."""
import hashlib
from datetime import timedelta

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import func, select, update

from storage.idempotency import IdempotentRequestRepository
from storage.models import Feedback, IdempotentRequest, Prediction, utcnow
from tests.learner.toy_learning import toy_wav
from tests.service.conftest import bearer, predict, row_counts, wait_ready
from tests.service.test_learning_loop import _start_round, _wait_for_run


def _correct(client, key: str, prediction_id: str, label: str, **headers):
    return client.post(f"/v1/predictions/{prediction_id}/feedback", json={"label": label},
                       headers={**bearer(key), **headers})


def test_a_correction_sent_again_is_stored_once_and_a_new_label_replaces_it(
        client, keys, wav_clip, db):
    answer = predict(client, keys.app, wav_clip)
    sent = [_correct(client, keys.app, answer["prediction_id"], "angry") for _ in range(3)]
    assert [r.status_code for r in sent] == [201, 200, 200]
    assert len({r.json()["feedback_id"] for r in sent}) == 1
    changed = _correct(client, keys.app, answer["prediction_id"], "sad")
    assert changed.status_code == 201
    assert changed.json()["replaced_feedback_id"] == sent[0].json()["feedback_id"]
    with db() as session:
        rows = session.scalars(select(Feedback).order_by(Feedback.id)).all()
    assert [(r.label, r.superseded_at is None) for r in rows] == [("angry", False),
                                                                 ("sad", True)]


@pytest.fixture
def learning_client(learning_app):
    with TestClient(learning_app()) as client:
        wait_ready(client)
        yield client


def test_a_round_trains_on_exactly_one_label_per_prediction(learning_client, keys, db):
    """The issue's case: the same correction three times and two conflicting labels per
    prediction. The round reads one label per prediction, the last one sent."""
    client, truth = learning_client, ["happy", "sad"] * 6
    for i, label in enumerate(truth):
        answer = predict(client, keys.app, toy_wav(label, i))
        wrong = "sad" if label == "happy" else "happy"
        for sent in [label, label, label, wrong, label]:
            assert _correct(client, keys.app, answer["prediction_id"], sent).status_code \
                in (200, 201)
    run = _wait_for_run(client, keys.admin, _start_round(client, keys.admin))
    assert run["status"] in ("accepted", "rejected"), run
    assert run["counts"]["feedback"] == len(truth)
    assert run["counts"]["trained"] + run["counts"]["held_out"] == len(truth)
    with db() as session:
        consumed = session.execute(
            select(Prediction.id, Feedback.label, Feedback.superseded_at)
            .join(Feedback, Feedback.prediction_id == Prediction.id)
            .where(Feedback.consumed_by_run_id == run["id"])).all()
        left = session.scalar(select(func.count()).select_from(Feedback).where(
            Feedback.consumed_by_run_id.is_(None), Feedback.superseded_at.is_(None)))
        stored = session.scalar(select(func.count()).select_from(Feedback))
    assert stored == 3 * len(truth)  # label, wrong, label: the two repeats stored nothing
    assert len(consumed) == len({row.id for row in consumed}) == len(truth)
    assert all(row.superseded_at is None for row in consumed)
    assert sorted(row.label for row in consumed) == sorted(truth)
    assert left == 0  # nothing counting is left over for another round


def test_an_idempotency_key_makes_a_prediction_once(client, keys, wav_clip, db):
    def send():
        return client.post("/v1/predictions", files={"file": ("clip.wav", wav_clip, "audio/wav")},
                           headers={**bearer(keys.app), "Idempotency-Key": "upload-1"})

    first, repeat = send(), send()
    assert first.status_code == repeat.status_code == 201
    assert repeat.json() == first.json()
    assert repeat.headers["Idempotent-Replayed"] == "true"
    assert "Idempotent-Replayed" not in first.headers
    assert row_counts(db)["predictions"] == 1
    # Keys belong to their caller: another app's same key is another request.
    other = client.post("/v1/predictions", files={"file": ("clip.wav", wav_clip, "audio/wav")},
                        headers={**bearer(keys.other_app), "Idempotency-Key": "upload-1"})
    assert other.status_code == 201 and other.json()["prediction_id"] != first.json()[
        "prediction_id"]


def test_a_correction_with_a_key_answers_as_the_first_time(client, keys, wav_clip, db):
    answer = predict(client, keys.app, wav_clip)
    first = _correct(client, keys.app, answer["prediction_id"], "angry", **{
        "Idempotency-Key": "fix-1"})
    repeat = _correct(client, keys.app, answer["prediction_id"], "angry", **{
        "Idempotency-Key": "fix-1"})
    assert (first.status_code, repeat.status_code) == (201, 201)  # not the 200 of a plain repeat
    assert repeat.json() == first.json() and repeat.headers["Idempotent-Replayed"] == "true"
    # A 4xx is an answer too: the same bad request again gets it back.
    bad = [_correct(client, keys.app, answer["prediction_id"], "bogus",
                    **{"Idempotency-Key": "fix-2"}) for _ in range(2)]
    assert [r.status_code for r in bad] == [422, 422]
    assert bad[1].headers["Idempotent-Replayed"] == "true"
    assert row_counts(db)["feedback"] == 1


def test_a_key_reused_for_another_request_is_refused(client, keys, wav_clip):
    answer = predict(client, keys.app, wav_clip)
    key = {"Idempotency-Key": "fix-1"}
    assert _correct(client, keys.app, answer["prediction_id"], "angry", **key).status_code == 201
    other_body = _correct(client, keys.app, answer["prediction_id"], "sad", **key)
    assert other_body.status_code == 422
    assert other_body.json()["error"] == "idempotency_key_reused"
    other_path = client.post("/v1/predictions", headers={**bearer(keys.app), **key},
                             files={"file": ("clip.wav", wav_clip, "audio/wav")})
    assert other_path.json()["error"] == "idempotency_key_reused"
    too_long = _correct(client, keys.app, answer["prediction_id"], "angry",
                        **{"Idempotency-Key": "k" * 256})
    assert too_long.status_code == 400
    assert too_long.json()["error"] == "invalid_idempotency_key"


def test_a_repeat_while_the_first_runs_waits_and_a_dead_claim_is_taken_over(client, keys,
                                                                           wav_clip, db):
    answer = predict(client, keys.app, wav_clip)
    caller = hashlib.sha256(f"Bearer {keys.app}".encode()).hexdigest()
    path = f"/v1/predictions/{answer['prediction_id']}/feedback"
    with db() as session:  # as if another worker were answering the first request right now
        claim = IdempotentRequestRepository(session).claim(
            caller, "fix-1", "POST", path, window_s=3600, stale_after_s=120)
        session.commit()
    assert claim.outcome == "run"
    busy = _correct(client, keys.app, answer["prediction_id"], "angry",
                    **{"Idempotency-Key": "fix-1"})
    assert busy.status_code == 409 and busy.headers["Retry-After"] == "1"
    assert busy.json()["error"] == "idempotency_key_in_use"
    assert row_counts(db)["feedback"] == 0
    with db() as session:  # that worker died: its claim ages past STALE_AFTER_S
        session.execute(update(IdempotentRequest).values(
            created_at=utcnow() - timedelta(seconds=600)))
        session.commit()
    taken = _correct(client, keys.app, answer["prediction_id"], "angry",
                     **{"Idempotency-Key": "fix-1"})
    assert taken.status_code == 201 and row_counts(db)["feedback"] == 1


def test_answers_are_forgotten_after_the_window(db, keys):
    with db() as session:
        repo = IdempotentRequestRepository(session)
        first = repo.claim("c" * 64, "k", "POST", "/v1/x", window_s=60, stale_after_s=10)
        repo.complete(first.claim_id, status_code=201, content_type="application/json",
                      body="{}", body_sha256=None)
        session.commit()
        assert repo.claim("c" * 64, "k", "POST", "/v1/x", window_s=60,
                          stale_after_s=10).outcome == "replay"
        session.execute(update(IdempotentRequest).values(
            created_at=utcnow() - timedelta(seconds=61)))
        assert repo.claim("c" * 64, "k", "POST", "/v1/x", window_s=60,
                          stale_after_s=10).outcome == "run"
