"""Request and response bodies of the HTTP API."""
import uuid
from datetime import datetime
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

# Ids an app gives its own users: opaque, but bounded and free of control characters (which
# PostgreSQL refuses to store, NUL above all) and of "/", so that every id a prediction accepts
# can be named in /v1/users/{user_id} (to see or forget that user).
USER_ID_PATTERN = r"^[^\x00-\x1f\x7f/]+$"
UserId = Field(default=None, min_length=1, max_length=128, pattern=USER_ID_PATTERN,
               description="The app's own id for the person who spoke, if it has one")


class PredictionOut(BaseModel):
    prediction_id: uuid.UUID
    emotion: str
    confidence: float = Field(description="The probability of `emotion`")
    probabilities: dict[str, float] = Field(description="Every label the model knows, summing to 1")
    model_version: int = Field(description="The version that answered: the user's personal "
                                           "version when `personal`, else the global one")
    personal: bool = Field(description="Whether the user's personal model answered")
    latency_ms: float = Field(description="Server time to decode the clip, compute features "
                                          "and run the model")


class PredictionDetail(PredictionOut):
    user_id: str | None
    created_at: datetime


class FeedbackIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    label: str = Field(min_length=1, max_length=64,
                       description="The right emotion; the predicted one again confirms it")
    user_id: str | None = UserId


class FeedbackOut(BaseModel):
    feedback_id: int = Field(description="The correction that counts for this prediction now")
    replaced_feedback_id: int | None = Field(
        None, description="The earlier correction of this prediction that this one replaced "
                          "(kept as history; only the latest counts)")


class LabelsOut(BaseModel):
    model_version: int = Field(description="The active global model version")
    labels: list[str] = Field(description="What the active model predicts")
    feedback_labels: list[str] = Field(description="What feedback may name")


class ModelVersionOut(BaseModel):
    version: int
    parent_version: int | None
    status: str = Field(description="candidate, active, rejected, retired or deleted (its file "
                                    "removed: a deleted personal version, or a rejected one "
                                    "past storage.retention)")
    labels: list[str]
    sha256: str
    metrics: dict[str, Any]
    gate_report: dict[str, Any] | None
    created_at: datetime
    activated_at: datetime | None


class ActivationIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    reason: str | None = Field(default=None, max_length=500, pattern=r"^[^\x00]*$",
                               description="Why, for the audit log")


class AuditEntryOut(BaseModel):
    id: int
    actor_key_id: int | None = Field(description="The admin key; null for the CLI and learner")
    action: str
    target: str
    details: dict[str, Any]
    created_at: datetime


class HealthOut(BaseModel):
    status: str


class ReadyOut(BaseModel):
    status: str
    model_version: int = Field(description="The global version serving")
    active_version: int | None = Field(description="The registry's active global version")
    detail: str | None = Field(None, description="Why another version than the active one "
                                                 "serves; absent when it does not")


class RunOut(BaseModel):
    """A learning round: what started it, what it used, and the gate's decision."""
    id: int
    trigger: str = Field(description="schedule or manual")
    scope: str = Field(description="global, or user for a personal round")
    user_id: str | None
    status: str = Field(description="running, accepted, rejected, skipped or failed")
    started_at: datetime
    finished_at: datetime | None
    counts: dict[str, Any] = Field(description="Feedback used, held out, ignored; strategy, "
                                               "epochs, steps; seconds per phase")
    gate_report: dict[str, Any] | None
    error: str | None
    candidate_version: int | None


class RunListOut(BaseModel):
    runs: list[RunOut] = Field(description="Newest first")


class RunStartedOut(BaseModel):
    run_id: int


class UserModelOut(BaseModel):
    """Which model answers a user, and how far they are from a personal one."""
    user_id: str
    personal: bool = Field(description="Whether a personal version answers this user")
    version: int | None = Field(description="The active personal version, if any")
    built_on_version: int | None = Field(description="The global version it was built on (it "
                                                     "keeps serving on that one)")
    feedback_count: int = Field(description="The user's corrections (one per prediction)")
    min_feedback: int = Field(description="Corrections needed before a personal round")
    status: str = Field(description="active (a personal version answers), collecting (fewer "
                                    "corrections than min_feedback), due (the next personal "
                                    "round builds one), rejected (the last round's gate "
                                    "refused it) or disabled (personal models are off)")


class PersonalVersionOut(ModelVersionOut):
    user_id: str


class UserForgottenOut(BaseModel):
    user_id: str
    deleted: dict[str, int] = Field(description="Rows removed per table; clips_kept_shared "
                                                "counts clips another user also sent")



class RecordingWindowOut(BaseModel):
    start: float = Field(description="Seconds from the recording's start")
    end: float
    probabilities: dict[str, float] | None = Field(
        description="The model's answer for this window; null when the window has no speech")
    raw: str = Field(description="The most probable label, or `silence`")
    smoothed: str = Field(description="The HMM's answer from this window and the ones before "
                                      "it only (what a live view would have shown)")


class RecordingSegmentOut(BaseModel):
    start: float
    end: float
    emotion: str = Field(description="A label, or `silence`")
    confidence: float | None = Field(description="Mean probability of `emotion` over the "
                                                 "segment's windows; null for silence")
    prediction_id: uuid.UUID | None = Field(
        default=None, description="Once the segment was corrected: the prediction its clip "
                                  "was stored with")


class RecordingError(BaseModel):
    error: str
    detail: str


class RecordingOut(BaseModel):
    recording_id: uuid.UUID
    status: str = Field(description="running, done or failed")
    progress: float = Field(description="Share of the file analysed, 0 to 1")
    user_id: str | None
    model_version: int | None
    personal: bool
    duration_s: float | None
    window_s: float
    hop_s: float
    windows: list[RecordingWindowOut] | None = Field(description="Once done")
    segments: list[RecordingSegmentOut] | None = Field(
        description="Once done: the most likely sequence over the whole recording (Viterbi)")
    error: RecordingError | None = Field(description="Why a failed job failed")
    processing_ms: float | None
    created_at: datetime


class StreamIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    sample_rate: int = Field(ge=8000, le=48000, description="Of the 16-bit mono PCM the socket "
                                                            "will send")
    user_id: str | None = UserId


class StreamOut(BaseModel):
    token: str = Field(description="Send `{\"token\": ...}` as the socket's first message; "
                                   "good once, until `expires_at`")
    expires_at: datetime
    socket_path: str = Field(description="The WebSocket to open: /v1/stream")
    sample_rate: int
    max_chunk_bytes: int
    window_s: float
    hop_s: float


class SegmentFeedbackOut(BaseModel):
    prediction_id: uuid.UUID = Field(description="The prediction the segment's clip was "
                                                 "stored with (the same for every correction "
                                                 "of this segment)")
    feedback_id: int
