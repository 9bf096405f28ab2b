"""The recordings table: a job's row through its states, and a job whose process died."""
import uuid
from datetime import timedelta

from sqlalchemy import update

from storage.models import Recording, utcnow
from storage.recordings import RecordingRepository


def test_a_job_row_runs_reports_progress_and_is_done_or_reads_as_interrupted(session, app_key,
                                                                            other_app_key):
    repository = RecordingRepository(session)
    job = uuid.uuid4()
    repository.start(recording_id=job, api_key_id=app_key.id, user_id="u", window_s=3.0,
                     hop_s=1.0, progress=0.0)
    repository.report_progress(job, 0.4)
    session.commit()
    row = repository.get_for_app(job, app_key.id, stale_after_s=60)
    assert (row.status, row.progress) == ("running", 0.4)
    assert repository.get_for_app(job, other_app_key.id, stale_after_s=60) is None

    # Nobody updated it for longer than allowed: its process is gone, so it failed.
    session.execute(update(Recording).where(Recording.id == job).values(
        updated_at=utcnow() - timedelta(seconds=120)))
    session.commit()
    session.expire_all()
    row = repository.get_for_app(job, app_key.id, stale_after_s=60)
    assert row.status == "failed" and row.error["error"] == "interrupted"
    session.rollback()  # reading it so changes nothing stored

    repository.fail(job, {"error": "silent_audio", "detail": "silent"})
    session.commit()
    session.expire_all()
    row = repository.get_for_app(job, app_key.id, stale_after_s=60)
    assert row.status == "failed" and row.error["error"] == "silent_audio"
    assert row.windows is None and row.clip_id is None
