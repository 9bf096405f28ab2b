"""Request and response bodies of the HTTP API."""
import uuid
from datetime import datetime
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

# Ids an app gives its own users: opaque, but bounded and free of control characters (which
# PostgreSQL refuses to store, NUL above all).
USER_ID_PATTERN = r"^[^\x00-\x1f\x7f]+$"
UserId = Field(default=None, min_length=1, max_length=128, pattern=USER_ID_PATTERN,
               description="The app's own id for the person who spoke, if it has one")


class PredictionOut(BaseModel):
    prediction_id: uuid.UUID
    emotion: str
    confidence: float = Field(description="The probability of `emotion`")
    probabilities: dict[str, float] = Field(description="Every label the model knows, summing to 1")
    model_version: int
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
    feedback_id: int


class LabelsOut(BaseModel):
    model_version: int = Field(description="The active global model version")
    labels: list[str] = Field(description="What the active model predicts")
    feedback_labels: list[str] = Field(description="What feedback may name")


class ModelVersionOut(BaseModel):
    version: int
    parent_version: int | None
    status: str = Field(description="candidate, active, rejected or retired")
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
    model_version: int
