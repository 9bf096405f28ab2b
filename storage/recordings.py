"""The recordings table: long recordings' windows and segments, and the state of their jobs.

Like the other repositories it adds and updates but never commits: the caller decides what one
transaction covers.
"""
import uuid
from datetime import timedelta
from typing import Any

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from storage.models import Recording, utcnow


class RecordingRepository:
    def __init__(self, session: Session):
        self.session = session

    def start(self, *, recording_id: uuid.UUID, api_key_id: int, user_id: str | None,
              window_s: float, hop_s: float, progress: float) -> None:
        """A job's row, `running`, before its answer exists."""
        now = utcnow()
        self.session.add(Recording(
            id=recording_id, api_key_id=api_key_id, user_id=user_id, status="running",
            progress=progress, window_s=window_s, hop_s=hop_s, created_at=now, updated_at=now))
        self.session.flush()

    def save_done(self, *, recording_id: uuid.UUID, api_key_id: int, user_id: str | None,
                  clip_id: int, model_version: int, personal: bool, duration_s: float,
                  window_s: float, hop_s: float, windows: list[dict[str, Any]],
                  segments: list[dict[str, Any]], processing_ms: float) -> Recording:
        """The finished answer: inserted, or written over the job's running row."""
        row = self.session.get(Recording, recording_id)
        if row is None:
            row = Recording(id=recording_id, api_key_id=api_key_id, user_id=user_id,
                            created_at=utcnow())
            self.session.add(row)
        row.status, row.progress, row.error = "done", 1.0, None
        row.clip_id, row.model_version, row.personal = clip_id, model_version, personal
        row.duration_s, row.window_s, row.hop_s = duration_s, window_s, hop_s
        row.windows, row.segments, row.processing_ms = windows, segments, processing_ms
        row.updated_at = utcnow()
        self.session.flush()
        return row

    def fail(self, recording_id: uuid.UUID, error: dict[str, str]) -> None:
        """A job that ended without an answer keeps only why."""
        self.session.execute(update(Recording).where(Recording.id == recording_id).values(
            status="failed", error=error, updated_at=utcnow()))

    def set_segment_prediction(self, recording_id: uuid.UUID, index: int,
                               prediction_id: uuid.UUID) -> None:
        """Remember the prediction a segment's correction made, so the next correction of the
        segment is feedback on it rather than a second copy of the clip."""
        row = self.session.get(Recording, recording_id)
        segments = [dict(s) for s in row.segments]
        segments[index]["prediction_id"] = str(prediction_id)
        row.segments = segments  # a new list: JSON columns notice assignment, not mutation
        self.session.flush()

    def report_progress(self, recording_id: uuid.UUID, progress: float) -> None:
        self.session.execute(update(Recording).where(
            Recording.id == recording_id, Recording.status == "running").values(
            progress=progress, updated_at=utcnow()))

    def get_for_app(self, recording_id: uuid.UUID, api_key_id: int,
                    stale_after_s: float) -> Recording | None:
        """The recording if this app sent it (another app's answers like an unknown id). A job
        whose process stopped reporting for `stale_after_s` died with it (a crash or a restart)
        and is answered as failed."""
        row = self.session.scalars(select(Recording).where(
            Recording.id == recording_id, Recording.api_key_id == api_key_id)).one_or_none()
        if row is not None and row.status == "running" and \
                utcnow() - row.updated_at > timedelta(seconds=stale_after_s):
            row.status = "failed"
            row.error = {"error": "interrupted",
                         "detail": "the server stopped while analysing this recording; "
                                   "send it again"}
        return row
