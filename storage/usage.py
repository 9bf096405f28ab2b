"""What is stored and how big it is (`emoloop storage stats`)."""
from sqlalchemy import func, select, text
from sqlalchemy.orm import Session, sessionmaker

from storage.artifacts import ArtifactStore
from storage.models import (Clip, Feedback, ModelVersion, Prediction, ReplayExemplar,
                            TrainingRun)


def storage_usage(session_factory: sessionmaker[Session], artifacts: ArtifactStore) -> dict:
    with session_factory() as session:
        answered = select(Feedback.prediction_id).distinct().subquery()
        usage = {
            "predictions": _count(session, Prediction),
            "predictions_with_feedback": session.scalar(
                select(func.count()).select_from(answered)),
            "feedback": _count(session, Feedback),
            "feedback_pending": session.scalar(select(func.count()).where(
                Feedback.consumed_by_run_id.is_(None))),
            "clips": _count(session, Clip),
            "clips_bytes_removed": session.scalar(select(func.count()).where(
                Clip.removed_at.is_not(None))),
            "clip_bytes": int(session.scalar(select(func.coalesce(func.sum(
                Clip.size_bytes), 0)).where(Clip.removed_at.is_(None)))),
            "model_versions": dict(session.execute(select(
                ModelVersion.status, func.count()).group_by(ModelVersion.status)).all()),
            "replay_exemplars": _count(session, ReplayExemplar),
            "training_runs": _count(session, TrainingRun),
            "database_bytes": _database_bytes(session),
        }
        session.rollback()
    stats = artifacts.stats()
    usage["artifact_store"] = {"kind": artifacts.name, "artifacts": stats.artifacts,
                               "bytes": stats.bytes}
    return usage


def _count(session: Session, model) -> int:
    return session.scalar(select(func.count()).select_from(model))


def _database_bytes(session: Session) -> int:
    if session.connection().dialect.name == "postgresql":
        return int(session.scalar(text("SELECT pg_database_size(current_database())")))
    pages = session.scalar(text("PRAGMA page_count"))
    return int(pages * session.scalar(text("PRAGMA page_size")))
