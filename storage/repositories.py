"""Repositories for the data path: clips, predictions, feedback, and the audit log.

Each takes the caller's Session. They add and flush (so ids exist and constraint errors surface
here) but never commit: the caller decides what one transaction covers and commits it.
"""
import uuid
from collections.abc import Sequence
from typing import Any

from sqlalchemy import func, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from storage.models import AuditEntry, Clip, Feedback, Prediction


class ClipRepository:
    def __init__(self, session: Session):
        self.session = session

    def get_or_create(self, *, sha256: str, duration_s: float, sample_rate: int,
                      artifact_path: str, size_bytes: int) -> Clip:
        """The clip row for these bytes: the existing one when the same sha256 was stored
        before, else a new one."""
        existing = self.get_by_sha256(sha256)
        if existing is not None:
            return existing
        clip = Clip(sha256=sha256, duration_s=duration_s, sample_rate=sample_rate,
                    artifact_path=artifact_path, size_bytes=size_bytes)
        self.session.flush()  # so an error below can only be about this clip
        try:
            with self.session.begin_nested():  # a savepoint: losing the race keeps our transaction
                self.session.add(clip)
        except IntegrityError:
            # Another request stored the same bytes between our lookup and our insert.
            return self.session.scalars(select(Clip).where(Clip.sha256 == sha256)).one()
        return clip

    def get(self, clip_id: int) -> Clip | None:
        """The clip with this id, or None."""
        return self.session.get(Clip, clip_id)

    def get_by_sha256(self, sha256: str) -> Clip | None:
        """The clip stored for these bytes, or None."""
        return self.session.scalars(select(Clip).where(Clip.sha256 == sha256)).one_or_none()


class PredictionRepository:
    def __init__(self, session: Session):
        self.session = session

    def create(self, *, api_key_id: int, clip_id: int, model_version: int, label: str,
               confidence: float, probabilities: dict[str, float], latency_ms: float,
               user_id: str | None = None, personal: bool = False) -> Prediction:
        """Record a prediction with everything a later learning round needs."""
        prediction = Prediction(api_key_id=api_key_id, clip_id=clip_id,
                                model_version=model_version, label=label, confidence=confidence,
                                probabilities=probabilities, latency_ms=latency_ms,
                                user_id=user_id, personal=personal)
        self.session.add(prediction)
        self.session.flush()
        return prediction

    def get_for_app(self, prediction_id: uuid.UUID | str, api_key_id: int) -> Prediction | None:
        """The prediction if this app made it. Another app's prediction, an unknown id and a
        malformed id all give None, so a caller cannot tell them apart."""
        try:
            prediction_id = uuid.UUID(str(prediction_id))
        except ValueError:
            return None
        return self.session.scalars(select(Prediction).where(
            Prediction.id == prediction_id, Prediction.api_key_id == api_key_id)).one_or_none()


class FeedbackRepository:
    def __init__(self, session: Session):
        self.session = session

    def add(self, prediction: Prediction, label: str, user_id: str | None = None) -> Feedback:
        """Record the right label for a prediction (a confirmation too). The app is the one that
        made the prediction; the user defaults to the prediction's."""
        feedback = Feedback(prediction_id=prediction.id, api_key_id=prediction.api_key_id,
                            user_id=user_id if user_id is not None else prediction.user_id,
                            label=label)
        self.session.add(feedback)
        self.session.flush()
        return feedback

    def count_unconsumed(self, user_id: str | None = None) -> int:
        """Feedback no learning round has used yet; only this user's when user_id is given."""
        query = select(func.count()).select_from(Feedback).where(
            Feedback.consumed_by_run_id.is_(None))
        if user_id is not None:
            query = query.where(Feedback.user_id == user_id)
        return self.session.scalar(query)

    def list_unconsumed(self, user_id: str | None = None,
                        limit: int | None = None) -> list[Feedback]:
        """Unused feedback, oldest first; only this user's when user_id is given."""
        query = select(Feedback).where(Feedback.consumed_by_run_id.is_(None)).order_by(Feedback.id)
        if user_id is not None:
            query = query.where(Feedback.user_id == user_id)
        return list(self.session.scalars(query.limit(limit)))

    def mark_consumed(self, feedback_ids: Sequence[int], run_id: int) -> int:
        """Mark feedback as used by a training run; returns how many rows were still unused.
        Rows another round already took are left as they are."""
        if not feedback_ids:
            return 0
        result = self.session.execute(
            update(Feedback)
            .where(Feedback.id.in_(feedback_ids), Feedback.consumed_by_run_id.is_(None))
            .values(consumed_by_run_id=run_id)
            .execution_options(synchronize_session="fetch"))
        return result.rowcount


class AuditLog:
    def __init__(self, session: Session):
        self.session = session

    def record(self, action: str, target: str, *, actor_key_id: int | None = None,
               details: dict[str, Any] | None = None) -> AuditEntry:
        """Append an entry; actor_key_id is None for the CLI and the learner."""
        entry = AuditEntry(action=action, target=target, actor_key_id=actor_key_id,
                           details=details or {})
        self.session.add(entry)
        self.session.flush()
        return entry

    def list_recent(self, limit: int = 100, offset: int = 0) -> list[AuditEntry]:
        """Entries, newest first."""
        query = select(AuditEntry).order_by(AuditEntry.id.desc()).limit(limit).offset(offset)
        return list(self.session.scalars(query))
