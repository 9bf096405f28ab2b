import uuid

from sqlalchemy import func, select

from storage.db import create_db_engine, make_session_factory
from storage.models import Clip, Feedback, Prediction, TrainingRun
from storage.repositories import (AuditLog, ClipRepository, FeedbackRepository,
                                  PredictionRepository)
from storage.runs import RoundFeedbackRepository

PROBABILITIES = {"neutral": 0.1, "happy": 0.2, "sad": 0.6, "angry": 0.1}


def predict(session, app_key, clip, model_v1, user_id="u1") -> Prediction:
    prediction = PredictionRepository(session).create(
        api_key_id=app_key.id, clip_id=clip.id, model_version=model_v1.version, label="sad",
        confidence=0.6, probabilities=PROBABILITIES, latency_ms=12.5, user_id=user_id)
    session.commit()
    return prediction


def clip_args(artifacts, data=b"RIFF fake wav"):
    sha256, path = artifacts.put_clip(data, ".wav")
    return dict(sha256=sha256, duration_s=3.0, sample_rate=16000, artifact_path=path,
                size_bytes=len(data))


def test_the_same_clip_uploaded_twice_is_one_row(session, artifacts):
    clips = ClipRepository(session)
    first = clips.get_or_create(**clip_args(artifacts))
    again = clips.get_or_create(**clip_args(artifacts))
    other = clips.get_or_create(**clip_args(artifacts, b"other audio"))
    session.commit()
    assert first.id == again.id != other.id
    assert session.scalar(select(func.count()).select_from(Clip)) == 2


def test_losing_an_upload_race_reuses_the_winners_clip_and_keeps_the_transaction(
        session_factory, artifacts, app_key, model_v1, monkeypatch):
    with session_factory() as winner:
        winner_clip = ClipRepository(winner).get_or_create(**clip_args(artifacts))
        winner.commit()
    with session_factory() as loser:
        clips = ClipRepository(loser)
        # The loser looked before the winner committed: its lookup saw nothing.
        monkeypatch.setattr(clips, "get_by_sha256", lambda sha256: None)
        clip = clips.get_or_create(**clip_args(artifacts))
        assert clip.id == winner_clip.id
        prediction = predict(loser, app_key, clip, model_v1)  # the transaction still works
    with session_factory() as check:
        assert check.get(Prediction, prediction.id).clip_id == winner_clip.id


def test_a_prediction_keeps_what_a_learning_round_needs(session, app_key, clip, model_v1):
    prediction_id = predict(session, app_key, clip, model_v1).id
    session.expire_all()
    stored = PredictionRepository(session).get_for_app(prediction_id, app_key.id)
    assert (stored.clip_id, stored.model_version, stored.label) == (clip.id, 1, "sad")
    assert stored.probabilities == PROBABILITIES
    assert stored.user_id == "u1" and stored.personal is False
    assert stored.created_at.tzinfo is not None


def test_another_apps_prediction_looks_like_an_unknown_one(session, app_key, other_app_key,
                                                           clip, model_v1):
    prediction = predict(session, app_key, clip, model_v1)
    predictions = PredictionRepository(session)
    assert predictions.get_for_app(prediction.id, app_key.id) is not None
    assert predictions.get_for_app(str(prediction.id), app_key.id) is not None
    assert predictions.get_for_app(prediction.id, other_app_key.id) is None
    assert predictions.get_for_app(uuid.uuid4(), app_key.id) is None
    assert predictions.get_for_app("not-a-uuid", app_key.id) is None


def test_committed_feedback_is_there_for_a_new_connection(database_url, session, app_key, clip,
                                                          model_v1):
    prediction = predict(session, app_key, clip, model_v1)
    feedback = FeedbackRepository(session).add(prediction, "angry")
    session.commit()
    # A fresh engine: what the next process (or the learner) sees after this one is gone.
    engine = create_db_engine(database_url)
    with make_session_factory(engine)() as other:
        row = other.get(Feedback, feedback.id)
        assert (row.label, row.prediction_id, row.api_key_id) == ("angry", prediction.id,
                                                                 app_key.id)
        assert row.user_id == "u1"  # taken from the prediction
        assert row.consumed_by_run_id is None
    engine.dispose()


def test_uncommitted_feedback_is_not_kept(session_factory, app_key, clip, model_v1):
    with session_factory() as session:
        prediction = predict(session, app_key, clip, model_v1)
        FeedbackRepository(session).add(prediction, "angry")
        session.rollback()
    with session_factory() as session:
        assert FeedbackRepository(session).count_unconsumed() == 0


def test_unconsumed_feedback_is_counted_listed_and_consumed_once(session, app_key, clip,
                                                                 model_v1):
    feedback, rounds = FeedbackRepository(session), RoundFeedbackRepository(session)
    for user, label in [("u1", "angry"), ("u2", "sad"), ("u1", "happy")]:
        feedback.add(predict(session, app_key, clip, model_v1, user_id=user), label)
    session.commit()
    assert feedback.count_unconsumed() == 3
    assert feedback.count_unconsumed(user_id="u1") == 2
    unused = rounds.unconsumed()
    assert [f.label for f in unused] == ["angry", "sad", "happy"]  # oldest first
    assert [f.label for f in rounds.unconsumed(limit=1)] == ["angry"]

    first_run, second_run = TrainingRun(trigger="manual"), TrainingRun(trigger="manual")
    session.add_all([first_run, second_run])
    session.flush()
    ids = [f.feedback_id for f in unused]
    assert rounds.mark_consumed(first_run.id, ids[:1], held_out=ids[1:2]) == 2
    # A second round cannot take what the first one used.
    assert rounds.mark_consumed(second_run.id, ids, held_out=[]) == 1
    session.commit()
    assert feedback.count_unconsumed() == 0
    rows = {f.id: (f.consumed_by_run_id, f.held_out) for f in session.scalars(select(Feedback))}
    assert [rows[i] for i in ids] == [(first_run.id, False), (first_run.id, True),
                                      (second_run.id, False)]
    assert rounds.mark_consumed(second_run.id, [], held_out=[]) == 0


def test_a_refused_round_gives_feedback_back_until_its_attempts_are_spent(session, app_key,
                                                                          clip, model_v1):
    feedback, rounds = FeedbackRepository(session), RoundFeedbackRepository(session)
    for label in ["angry", "sad"]:
        feedback.add(predict(session, app_key, clip, model_v1), label)
    session.commit()
    ids = [f.feedback_id for f in rounds.unconsumed()]

    assert sorted(rounds.give_back(ids, max_attempts=2)) == ids
    session.commit()
    # Still waiting for a round, but it no longer starts one by itself.
    assert (feedback.count_unconsumed(), feedback.count_unconsumed(untried=True)) == (2, 0)
    assert rounds.give_back(ids, max_attempts=2) == []  # its second refusal is its last
    assert rounds.give_back(ids, max_attempts=3) == ids
    session.commit()
    assert [f.rejections for f in session.scalars(select(Feedback).order_by(Feedback.id))] == [
        2, 2]


def test_a_confirmation_may_name_another_user(session, app_key, clip, model_v1):
    prediction = predict(session, app_key, clip, model_v1, user_id=None)
    row = FeedbackRepository(session).add(prediction, "sad", user_id="u9")
    assert row.user_id == "u9" and row.label == prediction.label


def test_audit_log_lists_newest_first(session, app_key):
    audit = AuditLog(session)
    audit.record("key.create", "api_key:1", actor_key_id=app_key.id, details={"role": "app"})
    audit.record("model.activate", "model_version:2")
    session.commit()
    entries = audit.list_recent()
    assert [e.action for e in entries] == ["model.activate", "key.create"]
    assert entries[1].details == {"role": "app"} and entries[1].actor_key_id == app_key.id
    assert [e.action for e in audit.list_recent(limit=1, offset=1)] == ["key.create"]
