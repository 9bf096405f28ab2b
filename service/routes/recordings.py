"""POST /v1/recordings: a long recording in, its emotion over time out (windows and segments);
GET /v1/recordings/{id}: the same, or a job's progress. The work is in service.recording_jobs."""
import uuid
from typing import Annotated

import anyio
from fastapi import APIRouter, Depends, File, Form, Request, UploadFile
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool

from service.auth import CurrentKey
from service.deps import ArtifactsDep, ReadSessionDep, SettingsDep
from service.errors import ERROR_RESPONSES, not_found
from service.recording_jobs import STALE_AFTER_S, RecordingJobs, receive_upload
from service.routes.predictions import clip_extension
from service.schemas import USER_ID_PATTERN, RecordingOut
from storage.models import Recording, utcnow
from storage.recordings import RecordingRepository

router = APIRouter(prefix="/v1/recordings", tags=["recordings"], responses=ERROR_RESPONSES)


async def get_jobs(request: Request) -> RecordingJobs:
    return request.app.state.recording_jobs


JobsDep = Annotated[RecordingJobs, Depends(get_jobs)]


@router.post("", status_code=201, response_model=RecordingOut,
             responses={202: {"model": RecordingOut,
                              "description": "Still analysing: poll the Location"}})
async def create_recording(
    caller: CurrentKey, jobs: JobsDep, artifacts: ArtifactsDep, settings: SettingsDep,
    file: Annotated[UploadFile, File(description="The recording: WAV, FLAC, OGG/Opus, MP3, "
                                                 "WebM..., up to api.max_recording_seconds")],
    user_id: Annotated[str | None, Form(min_length=1, max_length=128, pattern=USER_ID_PATTERN,
                                        description="The app's id for the speaker")] = None,
) -> RecordingOut | JSONResponse:
    # The upload size limit (service.upload_limit) refused a too-large body already.
    upload = await run_in_threadpool(receive_upload, file.file, artifacts, clip_extension)
    job = jobs.submit(upload, caller.key_id, user_id)
    finished = await anyio.to_thread.run_sync(job.finished.wait, settings.api.recording_wait_s)
    if not finished and await run_in_threadpool(job.detach):
        running = RecordingOut(
            recording_id=job.id, status="running", progress=job.progress, user_id=user_id,
            model_version=None, personal=False, duration_s=None,
            window_s=settings.timeline.window_s, hop_s=settings.timeline.hop_s, windows=None,
            segments=None, error=None, processing_ms=None, created_at=utcnow())
        return JSONResponse(running.model_dump(mode="json"), status_code=202,
                            headers={"Location": f"/v1/recordings/{job.id}"})
    await anyio.to_thread.run_sync(job.finished.wait)  # it ended while being detached
    if job.error is not None:
        raise job.error  # bad input: nothing was stored
    return await run_in_threadpool(_read, jobs, job.id, caller.key_id)


@router.get("/{recording_id}", response_model=RecordingOut)
def get_recording(recording_id: uuid.UUID, caller: CurrentKey, jobs: JobsDep,
                  session: ReadSessionDep) -> RecordingOut:
    # Another app's recording answers exactly like an unknown one.
    row = RecordingRepository(session).get_for_app(recording_id, caller.key_id, STALE_AFTER_S)
    if row is None:
        raise not_found("recording")
    job = jobs.get(recording_id)
    if row.status == "running" and job is not None:
        row.progress = job.progress  # fresher than the row, when this process runs the job
    return _out(row)


def _read(jobs: RecordingJobs, recording_id: uuid.UUID, api_key_id: int) -> RecordingOut:
    with jobs.session_factory() as session:
        return _out(RecordingRepository(session).get_for_app(recording_id, api_key_id,
                                                             STALE_AFTER_S))


def _out(row: Recording) -> RecordingOut:
    return RecordingOut(
        recording_id=row.id, status=row.status, progress=row.progress, user_id=row.user_id,
        model_version=row.model_version, personal=row.personal, duration_s=row.duration_s,
        window_s=row.window_s, hop_s=row.hop_s, windows=row.windows, segments=row.segments,
        error=row.error, processing_ms=row.processing_ms, created_at=row.created_at)
