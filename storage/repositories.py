"""Repositories for the data path: clips, predictions, feedback, and the audit log.

Each takes the caller's Session. They add and flush (so ids exist and constraint errors surface
here) but never commit: the caller decides what one transaction covers and commits it.
"""
import uuid
from dataclasses import dataclass
from typing import Any

from sqlalchemy import bindparam, func, insert, select, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session

from storage.models import AuditEntry, Clip, Feedback, Prediction, utcnow

# The hot path (every prediction, every feedback) runs prebuilt Core statements on the session's
# connection: through Session.execute the same INSERT costs about three times the CPU (ORM
# compile state, autoflush, events), and through the unit of work more still.
_STORE_CLIP = {dialect.__name__.rsplit(".", 1)[-1]: dialect.insert(Clip)
               .on_conflict_do_nothing(index_elements=[Clip.sha256]).returning(Clip.id)
               for dialect in (sqlite, postgresql)}  # both know INSERT ... ON CONFLICT
_CLIP_ID = select(Clip.id, Clip.removed_at).where(Clip.sha256 == bindparam("sha256"))
_INSERT_PREDICTION = insert(Prediction)
# FOR UPDATE (PostgreSQL; SQLite's transactions hold the write lock already): two corrections
# of one prediction take turns, so each sees the other's row and one counting row remains.
_PREDICTION_OF_APP = select(Prediction.label, Prediction.user_id).where(
    Prediction.id == bindparam("prediction_id"),
    Prediction.api_key_id == bindparam("api_key_id")).with_for_update()
_COUNTING_FEEDBACK = select(Feedback.id, Feedback.label, Feedback.user_id).where(
    Feedback.prediction_id == bindparam("prediction_id"), Feedback.superseded_at.is_(None))
_SUPERSEDE = update(Feedback).where(Feedback.id == bindparam("old_id")).values(
    superseded_at=bindparam("now"))
_INSERT_FEEDBACK = insert(Feedback).returning(Feedback.id)


class ClipRepository:
    def __init__(self, session: Session):
        self.session = session

    def get_or_create(self, *, sha256: str, duration_s: float, sample_rate: int,
                      artifact_path: str, size_bytes: int) -> Clip:
        """The clip row for these bytes: the existing one when the same sha256 was stored
        before, else a new one."""
        return self.session.get(Clip, self.store(
            sha256=sha256, duration_s=duration_s, sample_rate=sample_rate,
            artifact_path=artifact_path, size_bytes=size_bytes))

    def store(self, *, sha256: str, duration_s: float, sample_rate: int, artifact_path: str,
              size_bytes: int) -> int:
        """The id of the clip row for these bytes, inserted unless the same sha256 was stored
        before: one INSERT ... ON CONFLICT DO NOTHING, no lookup first, no savepoint."""
        connection = self.session.connection()
        clip_id = connection.execute(_STORE_CLIP[connection.dialect.name], {
            "sha256": sha256, "duration_s": duration_s, "sample_rate": sample_rate,
            "artifact_path": artifact_path, "size_bytes": size_bytes}).scalar_one_or_none()
        if clip_id is None:  # stored before, perhaps by a request that raced this one
            clip_id, removed_at = connection.execute(_CLIP_ID, {"sha256": sha256}).one()
            if removed_at is not None:  # retention removed the bytes; the caller stored them anew
                connection.execute(update(Clip).where(Clip.id == clip_id).values(
                    removed_at=None, artifact_path=artifact_path))
        return clip_id

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
        """Record a prediction with everything a later learning round needs. The object
        returned holds the row as inserted; it is not attached to the session (load the row
        again to change it)."""
        row = {"id": uuid.uuid4(), "api_key_id": api_key_id, "clip_id": clip_id,
               "model_version": model_version, "label": label, "confidence": confidence,
               "probabilities": probabilities, "latency_ms": latency_ms, "user_id": user_id,
               "personal": personal, "created_at": utcnow()}
        self.session.connection().execute(_INSERT_PREDICTION, row)
        return Prediction(**row)

    def get_for_app(self, prediction_id: uuid.UUID | str, api_key_id: int) -> Prediction | None:
        """The prediction if this app made it. Another app's prediction, an unknown id and a
        malformed id all give None, so a caller cannot tell them apart."""
        try:
            prediction_id = uuid.UUID(str(prediction_id))
        except ValueError:
            return None
        return self.session.scalars(select(Prediction).where(
            Prediction.id == prediction_id, Prediction.api_key_id == api_key_id)).one_or_none()


@dataclass(frozen=True)
class RecordedFeedback:
    feedback_id: int  # the correction that counts now
    predicted: str  # the label the prediction gave
    created: bool  # False: a repeat of the counting correction, which stays as it was
    replaced_id: int | None = None  # the earlier correction this one superseded


class FeedbackRepository:
    """Corrections. One per prediction counts, the latest: a new label (or user) supersedes the
    counting correction, which stays as history; the same correction sent again changes nothing,
    so a client that retries cannot weight a clip."""

    def __init__(self, session: Session):
        self.session = session

    def add(self, prediction: Prediction, label: str, user_id: str | None = None) -> Feedback:
        """Record the right label for a prediction (a confirmation too). The app is the one that
        made the prediction; the user defaults to the prediction's."""
        self.session.flush()  # a prediction added to this session must be visible below
        recorded = self.add_for_app(prediction.id, prediction.api_key_id, label, user_id)
        return self.session.get(Feedback, recorded.feedback_id)

    def add_for_app(self, prediction_id: uuid.UUID, api_key_id: int, label: str,
                    user_id: str | None = None) -> RecordedFeedback | None:
        """Record feedback on one of this app's predictions, or None when this app made no such
        prediction. Core statements and no ORM objects on this hot path: a third of the CPU of
        loading the prediction (probabilities and all) and flushing a Feedback."""
        connection = self.session.connection()
        row = connection.execute(_PREDICTION_OF_APP, {"prediction_id": prediction_id,
                                                      "api_key_id": api_key_id}).one_or_none()
        if row is None:
            return None
        user_id = user_id if user_id is not None else row.user_id
        counting = connection.execute(_COUNTING_FEEDBACK,
                                      {"prediction_id": prediction_id}).one_or_none()
        if counting is not None and (counting.label, counting.user_id) == (label, user_id):
            return RecordedFeedback(counting.id, row.label, created=False)
        if counting is not None:
            connection.execute(_SUPERSEDE, {"old_id": counting.id, "now": utcnow()})
        feedback_id = connection.execute(_INSERT_FEEDBACK, {
            "prediction_id": prediction_id, "api_key_id": api_key_id, "label": label,
            "user_id": user_id}).scalar_one()
        return RecordedFeedback(feedback_id, row.label, created=True,
                                replaced_id=counting.id if counting is not None else None)

    def count_unconsumed(self, user_id: str | None = None, *, untried: bool = False) -> int:
        """Counting feedback no learning round has used yet; only this user's when user_id is given;
        with `untried`, only feedback no refused round gave back either."""
        query = select(func.count()).select_from(Feedback).where(
            Feedback.consumed_by_run_id.is_(None), Feedback.superseded_at.is_(None))
        if user_id is not None:
            query = query.where(Feedback.user_id == user_id)
        if untried:
            query = query.where(Feedback.rejections == 0)
        return self.session.scalar(query)


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
