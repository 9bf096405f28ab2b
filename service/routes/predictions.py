"""POST /v1/predictions: a clip in, an emotion out, and everything a later learning round
needs (the clip, the model version, the probabilities) stored. GET one back."""
import logging
import uuid
from typing import Annotated

from fastapi import APIRouter, File, Form, UploadFile
from sqlalchemy.orm import Session

from learner.audio import SAMPLE_RATE, AudioError
from service.auth import CurrentKey
from service.deps import ArtifactsDep, EngineDep, ReadSessionDep, SettingsDep, WriterDep
from service.engine import Inference, ModelLoadError
from service.group_commit import GroupCommitWriter
from service.errors import ERROR_RESPONSES, ApiError, audio_error, not_found, too_large
from service.metrics import PREDICTIONS
from service.schemas import PredictionDetail, PredictionOut
from storage.artifacts import ArtifactStore
from storage.models import ApiKey, Prediction
from storage.repositories import ClipRepository, PredictionRepository

log = logging.getLogger("emoloop.service")
router = APIRouter(prefix="/v1/predictions", tags=["predictions"], responses=ERROR_RESPONSES)


@router.post("", status_code=201, response_model=PredictionOut)
def create_prediction(
    key: CurrentKey, session: ReadSessionDep, writer: WriterDep, engine: EngineDep,
    artifacts: ArtifactsDep, settings: SettingsDep,
    file: Annotated[UploadFile, File(description="The clip: WAV, FLAC, OGG/Opus, MP3, WebM...")],
    user_id: Annotated[str | None, Form(min_length=1, max_length=128,
                                        description="The app's id for the speaker")] = None,
) -> PredictionOut:
    limit = settings.api.max_upload_bytes
    audio = file.file.read(limit + 1)
    if len(audio) > limit:
        raise too_large(limit)
    # Decode and validate before anything is stored: a refused clip leaves no file and no row.
    try:
        inference = engine.predict(audio)
    except AudioError as err:
        raise audio_error(err) from None
    except ModelLoadError:
        raise ApiError(503, "not_ready", "the model is still loading; retry shortly") from None
    prediction = _record(writer, session, artifacts, key, user_id, audio, inference)
    PREDICTIONS.labels(prediction.label, str(prediction.model_version)).inc()
    return _prediction_out(prediction, PredictionOut)


@router.get("/{prediction_id}", response_model=PredictionDetail)
def get_prediction(prediction_id: uuid.UUID, key: CurrentKey,
                   session: ReadSessionDep) -> PredictionDetail:
    # Another app's prediction answers exactly like an unknown one.
    prediction = PredictionRepository(session).get_for_app(prediction_id, key.id)
    if prediction is None:
        raise not_found("prediction")
    return _prediction_out(prediction, PredictionDetail)


def _record(writer: GroupCommitWriter, session: Session, artifacts: ArtifactStore, key: ApiKey,
            user_id: str | None, audio: bytes, inference: Inference) -> Prediction:
    """Store the clip file (atomic, content-addressed), then its row and the prediction's in one
    transaction. If that fails, a file no row refers to is removed again."""
    sha256, path = artifacts.put_clip(audio, _extension(audio))

    def insert(write_session: Session) -> Prediction:
        clip = ClipRepository(write_session).get_or_create(
            sha256=sha256, duration_s=len(inference.wave) / SAMPLE_RATE,
            # The rate the model hears: the learner decodes the stored original the same way.
            sample_rate=SAMPLE_RATE, artifact_path=path, size_bytes=len(audio))
        return PredictionRepository(write_session).create(
            api_key_id=key.id, clip_id=clip.id, model_version=inference.model.version,
            label=inference.prediction.emotion, confidence=inference.prediction.confidence,
            probabilities=inference.prediction.probabilities, latency_ms=inference.latency_ms,
            user_id=user_id)

    try:
        return writer.write(insert)
    except Exception:
        _delete_if_unreferenced(session, artifacts, sha256, path)
        raise


def _delete_if_unreferenced(session: Session, artifacts: ArtifactStore, sha256: str,
                            path: str) -> None:
    try:
        if ClipRepository(session).get_by_sha256(sha256) is None:
            artifacts.delete(path)
        session.commit()
    except Exception:  # the original error matters more; a leftover file is only disk space
        log.exception("could not clean up clip %s", path)


def _prediction_out(prediction: Prediction, schema: type[PredictionOut]) -> PredictionOut:
    return schema(prediction_id=prediction.id, emotion=prediction.label,
                  confidence=prediction.confidence, probabilities=prediction.probabilities,
                  model_version=prediction.model_version, latency_ms=prediction.latency_ms,
                  user_id=prediction.user_id, created_at=prediction.created_at)


# Leading bytes of the formats apps send, so a stored clip's name says what it holds. Derived
# from the content, not the upload's file name: the same bytes always get the same path.
_MAGIC = ((b"RIFF", ".wav"), (b"fLaC", ".flac"), (b"OggS", ".ogg"), (b"ID3", ".mp3"),
          (b"\xff\xfb", ".mp3"), (b"\xff\xf3", ".mp3"), (b"\x1a\x45\xdf\xa3", ".webm"))


def _extension(audio: bytes) -> str:
    if audio[4:8] == b"ftyp":
        return ".m4a"
    return next((ext for magic, ext in _MAGIC if audio.startswith(magic)), ".bin")
