"""A correction of part of a recording or stream: the part becomes a clip with a prediction and
the feedback, exactly as POST /v1/predictions and its feedback would have stored them, so the
learner treats it like any other correction. Used by live streams (a window) and recordings
(a segment)."""
import io
import uuid
from dataclasses import dataclass

import numpy as np
import soundfile as sf
from sqlalchemy.orm import Session, sessionmaker

from learner.audio import SAMPLE_RATE
from learner.inference import prediction_from_logits
from storage.artifacts import ArtifactStore
from storage.repositories import ClipRepository, FeedbackRepository, PredictionRepository


@dataclass(frozen=True)
class CorrectedPart:
    api_key_id: int
    user_id: str | None
    model_version: int
    personal: bool
    probabilities: dict[str, float]  # the model's answer for the part


def store_correction(session_factory: sessionmaker[Session], artifacts: ArtifactStore,
                     part: CorrectedPart, wave: np.ndarray, label: str) -> tuple[uuid.UUID, int]:
    """The clip file first (a row never points at a missing file), then the clip, prediction
    and feedback rows in one transaction. Returns (prediction id, feedback id)."""
    buffer = io.BytesIO()
    sf.write(buffer, wave, SAMPLE_RATE, format="WAV", subtype="PCM_16")
    data = buffer.getvalue()
    sha256, path = artifacts.put_clip(data, ".wav")
    labels = tuple(part.probabilities)
    answer = prediction_from_logits(np.log(np.maximum(
        [part.probabilities[k] for k in labels], 1e-12)), labels)
    with session_factory() as session:
        clip_id = ClipRepository(session).store(
            sha256=sha256, duration_s=len(wave) / SAMPLE_RATE, sample_rate=SAMPLE_RATE,
            artifact_path=path, size_bytes=len(data))
        prediction = PredictionRepository(session).create(
            api_key_id=part.api_key_id, clip_id=clip_id, model_version=part.model_version,
            label=answer.emotion, confidence=answer.confidence,
            probabilities=answer.probabilities,
            # Answered as part of a recording or stream, not by a request of its own.
            latency_ms=0.0, user_id=part.user_id, personal=part.personal)
        recorded = FeedbackRepository(session).add_for_app(
            prediction.id, part.api_key_id, label, part.user_id)
        session.commit()
    return prediction.id, recorded.feedback_id
