"""POST /v1/recordings: a long recording in, its emotion over time out (windows and segments);
GET /v1/recordings/{id}: the same, or a job's progress. The work is in service.recording_jobs."""
import uuid
from typing import Annotated

import anyio
from fastapi import APIRouter, Depends, File, Form, Request, UploadFile
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool

from learner.audio_chunks import read_span
from learner.smoothing import SILENCE
from service.auth import CurrentKey
from service.deps import ArtifactsDep, EngineDep, ReadSessionDep, SettingsDep
from service.errors import ERROR_RESPONSES, ApiError, not_found
from service.recording_jobs import STALE_AFTER_S, RecordingJobs, receive_upload
from service.routes.feedback import checked_label
from service.routes.predictions import clip_extension
from service.schemas import USER_ID_PATTERN, FeedbackIn, RecordingOut, SegmentFeedbackOut
from service.window_feedback import CorrectedPart, store_correction
from storage.artifacts import ArtifactRef, ArtifactStore
from storage.models import Recording, utcnow
from storage.recordings import RecordingRepository
from storage.repositories import ClipRepository, FeedbackRepository
from storage.settings import Settings

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
    # The upload size limit (service.upload_spool) refused a too-large body already.
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


@router.post("/{recording_id}/segments/{index}/feedback", status_code=201,
             response_model=SegmentFeedbackOut)
async def correct_segment(recording_id: uuid.UUID, index: int, body: FeedbackIn,
                          caller: CurrentKey, jobs: JobsDep, artifacts: ArtifactsDep,
                          settings: SettingsDep, engine: EngineDep) -> SegmentFeedbackOut:
    """The right emotion for one segment (a confirmation counts too). The segment's audio (its
    middle `api.max_audio_seconds` when longer) becomes a clip with a prediction (the mean of
    its windows' probabilities) and this feedback, as POST /v1/predictions and its feedback
    would store them; a second correction of the segment adds feedback to that prediction."""
    label = checked_label(body.label, settings, engine)
    return await run_in_threadpool(_correct_segment, jobs, artifacts, settings, caller.key_id,
                                   recording_id, index, label, body.user_id)


def _correct_segment(jobs: RecordingJobs, artifacts: ArtifactStore, settings: Settings,
                     api_key_id: int, recording_id: uuid.UUID, index: int, label: str,
                     user_id: str | None) -> SegmentFeedbackOut:
    with jobs.session_factory() as session:
        row = RecordingRepository(session).get_for_app(recording_id, api_key_id, STALE_AFTER_S)
        if row is None:
            raise not_found("recording")
        if row.status != "done" or not 0 <= index < len(row.segments):
            raise not_found("segment")
        segment = row.segments[index]
        if segment["emotion"] == SILENCE:
            raise ApiError(422, "silence", "this segment has no speech to correct")
        user_id = user_id if user_id is not None else row.user_id
        if segment.get("prediction_id"):  # corrected before: more feedback on that prediction
            written = FeedbackRepository(session).add_for_app(
                uuid.UUID(segment["prediction_id"]), api_key_id, label, user_id)
            session.commit()
            return SegmentFeedbackOut(prediction_id=segment["prediction_id"],
                                      feedback_id=written.feedback_id)
        clip = ClipRepository(session).get(row.clip_id)
        probabilities = _mean_probabilities(row.windows, segment)
        part = CorrectedPart(api_key_id, user_id, row.model_version, row.personal,
                             probabilities)
        session.commit()
    start, end = segment["start"], segment["end"]
    longest = settings.api.max_audio_seconds
    if end - start > longest:  # the middle of a long segment
        start, end = (start + end - longest) / 2, (start + end + longest) / 2
    with artifacts.local_file(ArtifactRef(clip.artifact_path, clip.sha256)) as path:
        wave = read_span(path, start, end, max_seconds=settings.api.max_recording_seconds)
    prediction_id, feedback_id = store_correction(jobs.session_factory, artifacts, part, wave,
                                                  label)

    def remember(session):
        RecordingRepository(session).set_segment_prediction(recording_id, index, prediction_id)
    jobs.write(remember)
    return SegmentFeedbackOut(prediction_id=prediction_id, feedback_id=feedback_id)


def _mean_probabilities(windows: list[dict], segment: dict) -> dict[str, float]:
    inside = [w["probabilities"] for w in windows if w["probabilities"] and
              segment["start"] <= (w["start"] + w["end"]) / 2 < segment["end"]]
    inside = inside or [w["probabilities"] for w in windows if w["probabilities"]]
    return {k: sum(p[k] for p in inside) / len(inside) for k in inside[0]}


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
