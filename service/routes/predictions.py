"""POST /v1/predictions: a clip in, an emotion out, and everything a later learning round
needs (the clip, the model version, the probabilities) stored. GET one back."""
import logging
import uuid
from typing import Annotated, NamedTuple

import anyio
from fastapi import APIRouter, File, Form, UploadFile
from sqlalchemy.orm import Session, sessionmaker
from starlette.concurrency import run_in_threadpool

from learner.audio import SAMPLE_RATE, AudioError
from service.auth import CurrentKey
from service.deps import (ArtifactsDep, EngineDep, ReadSessionDep, ReadSessionsDep,
                          SettingsDep, WriterDep)
from service.engine import Inference, InferenceEngine, ModelLoadError
from service.errors import (ERROR_RESPONSES, RETRY_AFTER_S, ApiError, audio_error, not_found,
                            too_large)
from service.metrics import PREDICTIONS
from service.schemas import USER_ID_PATTERN, PredictionDetail, PredictionOut
from storage.artifacts import ArtifactStore
from storage.failures import free_space_problem
from storage.models import Prediction
from storage.repositories import ClipRepository, PredictionRepository

log = logging.getLogger("emoloop.service")
router = APIRouter(prefix="/v1/predictions", tags=["predictions"], responses=ERROR_RESPONSES)


# async, with the model work and file writes sent to a worker thread (the engine runs decoding
# one clip per core at a time, the model in batches) and the rows to the group-commit writer:
# one thread hop per request instead of one per dependency.
@router.post("", status_code=201, response_model=PredictionOut)
async def create_prediction(
    caller: CurrentKey, writer: WriterDep, engine: EngineDep, artifacts: ArtifactsDep,
    settings: SettingsDep, read_sessions: ReadSessionsDep,
    file: Annotated[UploadFile, File(description="The clip: WAV, FLAC, OGG/Opus, MP3, WebM...")],
    user_id: Annotated[str | None, Form(min_length=1, max_length=128, pattern=USER_ID_PATTERN,
                                        description="The app's id for the speaker")] = None,
) -> PredictionOut:
    # Refused before anything is written, so what space is left keeps corrections writable.
    no_room = free_space_problem(settings.storage.data_dir, settings.storage.min_free_bytes)
    if no_room is not None:
        raise ApiError(507, "insufficient_storage", no_room,
                       headers={"Retry-After": str(RETRY_AFTER_S)})
    try:
        # With personal models off, every user gets the global model.
        personal_user = user_id if settings.personal.enabled else None
        # The clip is read from its spooled file in the thread, under the engine's request
        # slots: only requests being worked on hold a clip in memory, not every one waiting.
        inference, stored, audio = await anyio.to_thread.run_sync(
            _predict_and_keep_clip, engine, artifacts, file, settings.api.max_upload_bytes,
            personal_user, limiter=engine.request_slots)
    except AudioError as err:
        raise audio_error(err) from None
    except ModelLoadError:
        raise ApiError(503, "not_ready", "the model is still loading; retry shortly") from None

    def insert(session: Session) -> Prediction:
        # The database store writes the clip's bytes here, in the rows' transaction.
        clip_path = stored or StoredClip(*artifacts.put_clip(audio, clip_extension(audio), session))
        clip_id = ClipRepository(session).store(
            sha256=clip_path.sha256, duration_s=len(inference.wave) / SAMPLE_RATE,
            # The rate the model hears: the learner decodes the stored original the same way.
            sample_rate=SAMPLE_RATE, artifact_path=clip_path.path, size_bytes=len(audio))
        return PredictionRepository(session).create(
            api_key_id=caller.key_id, clip_id=clip_id, model_version=inference.model.version,
            label=inference.prediction.emotion, confidence=inference.prediction.confidence,
            probabilities=inference.prediction.probabilities, latency_ms=inference.latency_ms,
            user_id=user_id, personal=inference.model.personal)

    try:
        prediction = await writer.write(insert)  # clip row + prediction row: one transaction
    except Exception:
        if stored is not None:
            await run_in_threadpool(_delete_if_unreferenced, read_sessions, artifacts, stored)
        raise
    PREDICTIONS.labels(prediction.label, str(prediction.model_version)).inc()
    return _prediction_out(prediction, PredictionOut)


@router.get("/{prediction_id}", response_model=PredictionDetail)
def get_prediction(prediction_id: uuid.UUID, caller: CurrentKey,
                   session: ReadSessionDep) -> PredictionDetail:
    # Another app's prediction answers exactly like an unknown one.
    prediction = PredictionRepository(session).get_for_app(prediction_id, caller.key_id)
    if prediction is None:
        raise not_found("prediction")
    return _prediction_out(prediction, PredictionDetail)


class StoredClip(NamedTuple):
    sha256: str
    path: str  # relative to the artifact root


def _predict_and_keep_clip(engine: InferenceEngine, artifacts: ArtifactStore, file: UploadFile,
                           limit: int, user_id: str | None
                           ) -> tuple[Inference, StoredClip | None, bytes]:
    audio = file.file.read(limit + 1)
    if len(audio) > limit:
        raise too_large(limit)
    # Decode and validate before anything is stored: a refused clip leaves no file and no row.
    inference = engine.predict(audio, user_id)
    if artifacts.transactional:
        return inference, None, audio  # stored with the rows, in their transaction
    # The file goes first (atomic, content-addressed); a row never points at a missing file.
    return inference, StoredClip(*artifacts.put_clip(audio, clip_extension(audio))), audio


def _delete_if_unreferenced(read_sessions: sessionmaker[Session], artifacts: ArtifactStore,
                            clip: StoredClip) -> None:
    """After a failed write: remove the clip file unless a row refers to it (the same bytes
    may have been stored before)."""
    try:
        with read_sessions() as session:
            if ClipRepository(session).get_by_sha256(clip.sha256) is None:
                artifacts.delete(clip.path, clip.sha256)
    except Exception:  # the original error matters more; a leftover file is only disk space
        log.exception("could not clean up clip %s", clip.path)


def _prediction_out(prediction: Prediction, schema: type[PredictionOut]) -> PredictionOut:
    return schema(prediction_id=prediction.id, emotion=prediction.label,
                  confidence=prediction.confidence, probabilities=prediction.probabilities,
                  model_version=prediction.model_version, personal=prediction.personal,
                  latency_ms=prediction.latency_ms, user_id=prediction.user_id,
                  created_at=prediction.created_at)


# Leading bytes of the formats apps send, so a stored clip's name says what it holds. Derived
# from the content, not the upload's file name: the same bytes always get the same path.
_MAGIC = ((b"RIFF", ".wav"), (b"fLaC", ".flac"), (b"OggS", ".ogg"), (b"ID3", ".mp3"),
          (b"\xff\xfb", ".mp3"), (b"\xff\xf3", ".mp3"), (b"\x1a\x45\xdf\xa3", ".webm"))


def clip_extension(audio: bytes) -> str:
    if audio[4:8] == b"ftyp":
        return ".m4a"
    return next((ext for magic, ext in _MAGIC if audio.startswith(magic)), ".bin")
