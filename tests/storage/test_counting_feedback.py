"""One correction per prediction counts, on SQLite and PostgreSQL: repeats store nothing, a new
label supersedes the counting one (kept as history), rounds read only the counting one, two
processes correcting at once still leave one, and migration 0005 marks existing duplicates."""
import threading
import uuid

from sqlalchemy import select, text

from storage.db import create_db_engine, make_session_factory
from storage.migrate import upgrade_to, upgrade_to_head
from storage.models import Feedback
from storage.personal import PersonalRepository
from storage.repositories import FeedbackRepository
from storage.runs import RoundFeedbackRepository
from tests.storage.test_repositories import predict


def test_repeats_store_nothing_and_the_latest_label_counts(session, app_key, clip, model_v1):
    prediction = predict(session, app_key, clip, model_v1)
    feedback = FeedbackRepository(session)
    first = feedback.add_for_app(prediction.id, app_key.id, "angry")
    repeats = [feedback.add_for_app(prediction.id, app_key.id, "angry") for _ in range(2)]
    assert first.created and first.replaced_id is None
    assert [(r.feedback_id, r.created) for r in repeats] == [(first.feedback_id, False)] * 2
    sad = feedback.add_for_app(prediction.id, app_key.id, "sad")
    happy = feedback.add_for_app(prediction.id, app_key.id, "happy")
    assert (sad.replaced_id, happy.replaced_id) == (first.feedback_id, sad.feedback_id)
    session.commit()

    rows = session.scalars(select(Feedback).order_by(Feedback.id)).all()
    # Earlier labels are history; only the last counts, and only it is what a round reads.
    assert [(r.label, r.superseded_at is None) for r in rows] == [
        ("angry", False), ("sad", False), ("happy", True)]
    assert feedback.count_unconsumed() == 1
    assert [(i.feedback_id, i.label) for i in RoundFeedbackRepository(session).unconsumed()] \
        == [(happy.feedback_id, "happy")]
    assert [i.label for i in PersonalRepository(session).feedback_for_user("u1")] == ["happy"]
    assert PersonalRepository(session).summary("u1").count == 1
    # The same label again after a change is a change back: it counts, the others are history.
    again = feedback.add_for_app(prediction.id, app_key.id, "angry")
    assert again.created and again.replaced_id == happy.feedback_id


def test_another_user_on_the_same_prediction_replaces_the_correction(session, app_key, clip,
                                                                     model_v1):
    prediction = predict(session, app_key, clip, model_v1)
    feedback = FeedbackRepository(session)
    first = feedback.add_for_app(prediction.id, app_key.id, "sad")
    second = feedback.add_for_app(prediction.id, app_key.id, "sad", user_id="u2")
    assert second.created and second.replaced_id == first.feedback_id
    assert [i.user_id for i in RoundFeedbackRepository(session).unconsumed()] == ["u2"]


def test_concurrent_corrections_of_one_prediction_leave_one_counting(
        session_factory, session, app_key, clip, model_v1):
    """Two processes' writers, each in its own transaction: the second waits for the first
    (PostgreSQL: the prediction row is locked; SQLite: the write lock), then supersedes it."""
    prediction = predict(session, app_key, clip, model_v1)
    session.commit()
    first_written, results, errors = threading.Event(), {}, []

    def correct(label: str, hold_s: float) -> None:
        try:
            with session_factory() as own:
                results[label] = FeedbackRepository(own).add_for_app(prediction.id, app_key.id,
                                                                     label)
                first_written.set()
                threading.Event().wait(hold_s)  # commit late, while the other one waits
                own.commit()
        except Exception as err:  # noqa: BLE001 (reported below)
            errors.append(err)

    one = threading.Thread(target=correct, args=("sad", 0.5))
    one.start()
    assert first_written.wait(10)
    two = threading.Thread(target=correct, args=("happy", 0.0))
    two.start()
    one.join(20)
    two.join(20)
    assert not errors, errors
    assert results["happy"].replaced_id == results["sad"].feedback_id
    with session_factory() as fresh:
        counting = fresh.scalars(select(Feedback.label).where(
            Feedback.prediction_id == prediction.id, Feedback.superseded_at.is_(None))).all()
    assert counting == ["happy"]


def test_migration_0005_keeps_the_latest_correction_of_each_prediction(empty_database_url):
    upgrade_to(empty_database_url, "0004")
    engine = create_db_engine(empty_database_url)
    predictions = [uuid.uuid4(), uuid.uuid4()]
    with engine.begin() as connection:
        connection.execute(text(
            "INSERT INTO api_keys (id, name, role, key_hash, prefix, created_at) "
            "VALUES (1, 'app', 'app', :h, 'p', CURRENT_TIMESTAMP)"), {"h": "0" * 64})
        connection.execute(text(
            "INSERT INTO clips (id, sha256, duration_s, sample_rate, artifact_path, size_bytes, "
            "created_at) VALUES (1, :s, 1.0, 16000, 'clips/x.wav', 10, CURRENT_TIMESTAMP)"),
            {"s": "1" * 64})
        connection.execute(text(
            "INSERT INTO model_versions (version, scope, labels, artifact_path, sha256, metrics, "
            "status, created_at) VALUES (1, 'global', '[]', 'models/1.safetensors', :s, '{}', "
            "'active', CURRENT_TIMESTAMP)"), {"s": "2" * 64})
        for prediction in predictions:
            connection.execute(text(
                "INSERT INTO predictions (id, api_key_id, clip_id, model_version, label, "
                "confidence, probabilities, latency_ms, personal, created_at) VALUES "
                "(:id, 1, 1, 1, 'sad', 0.5, '{}', 1.0, false, CURRENT_TIMESTAMP)"),
                {"id": prediction.hex if engine.dialect.name == "sqlite" else prediction})
        # Three corrections of the first prediction, one of the second.
        for n, (prediction, label) in enumerate([(0, "angry"), (0, "sad"), (1, "happy"),
                                                 (0, "happy")], start=1):
            connection.execute(text(
                "INSERT INTO feedback (id, prediction_id, api_key_id, label, created_at, "
                "held_out, rejections) VALUES (:n, :p, 1, :label, :t, false, 0)"),
                {"n": n, "label": label, "t": f"2026-12-0{n} 10:00:00",
                 "p": predictions[prediction].hex if engine.dialect.name == "sqlite"
                 else predictions[prediction]})
    engine.dispose()

    upgrade_to_head(empty_database_url)
    engine = create_db_engine(empty_database_url)
    with make_session_factory(engine)() as session:
        rows = session.scalars(select(Feedback).order_by(Feedback.id)).all()
        assert [(r.label, r.superseded_at is None) for r in rows] == [
            ("angry", False), ("sad", False), ("happy", True), ("happy", True)]
        # Each superseded one at the time its successor arrived.
        assert [r.superseded_at.day if r.superseded_at else None for r in rows] == [
            2, 4, None, None]
        assert [i.feedback_id for i in RoundFeedbackRepository(session).unconsumed()] == [3, 4]
    engine.dispose()
