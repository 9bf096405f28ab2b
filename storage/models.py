"""The SQL schema as typed SQLAlchemy models.

The tables are made only by the Alembic migrations in `migrations/`; these classes describe them
for queries and for `alembic revision --autogenerate`, which must come out empty after a migration.
"""
import uuid
from datetime import datetime, timezone
from typing import Any

from sqlalchemy import (JSON, BigInteger, Boolean, CheckConstraint, DateTime, Float, ForeignKey,
                        Index, LargeBinary, MetaData, String, Text, TypeDecorator, UniqueConstraint,
                        Uuid, text)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

# Deterministic constraint names, so migrations can refer to them on both SQLite and PostgreSQL.
NAMING_CONVENTION = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

MODEL_STATUSES = ("candidate", "active", "rejected", "retired", "deleted")
MODEL_SCOPES = ("global", "user")
KEY_ROLES = ("app", "admin")


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


class UTCDateTime(TypeDecorator[datetime]):
    """Timezone-aware UTC in and out. PostgreSQL stores `timestamptz`; SQLite keeps no zone, so
    values are normalised to UTC on the way in and marked UTC on the way out. Naive datetimes are
    refused: a local time written by mistake would silently shift every timestamp."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError(f"naive datetime {value!r}: pass a timezone-aware UTC time")
        return value.astimezone(timezone.utc)

    def process_result_value(self, value: datetime | None, dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            return value.replace(tzinfo=timezone.utc)
        return value.astimezone(timezone.utc)


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)
    type_annotation_map = {datetime: UTCDateTime, dict[str, Any]: JSON, list[str]: JSON}


class Clip(Base):
    """One uploaded audio clip, stored once however often it is sent (content-addressed)."""

    __tablename__ = "clips"

    id: Mapped[int] = mapped_column(primary_key=True)
    sha256: Mapped[str] = mapped_column(String(64), unique=True)
    duration_s: Mapped[float] = mapped_column(Float)
    sample_rate: Mapped[int]
    artifact_path: Mapped[str] = mapped_column(String(255))  # relative to the artifact root
    size_bytes: Mapped[int]
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    # Set when retention removed the bytes (storage.retention): the predictions that used the
    # clip stay, but nothing can learn from it any more. Storing the same bytes again clears it.
    removed_at: Mapped[datetime | None]


class ApiKey(Base):
    __tablename__ = "api_keys"
    __table_args__ = (CheckConstraint("role IN ('app', 'admin')", name="role"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(100))
    role: Mapped[str] = mapped_column(String(10))
    # sha256 of the whole key. Keys are 256-bit random tokens, so a leaked hash cannot be brute
    # forced whatever the hash's speed; a slow password hash (bcrypt, argon2) would only add tens
    # of milliseconds to every request.
    key_hash: Mapped[str] = mapped_column(String(64), unique=True)
    prefix: Mapped[str] = mapped_column(String(16))  # shown in listings so a key can be recognised
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    revoked_at: Mapped[datetime | None]


class ModelVersion(Base):
    """One trained model. Numbers come from `model_version_counter`, so they only go up."""

    __tablename__ = "model_versions"
    __table_args__ = (
        # deleted: a personal version whose file an admin removed; the row stays for the
        # predictions it made.
        CheckConstraint("status IN ('candidate', 'active', 'rejected', 'retired', 'deleted')",
                        name="status"),
        CheckConstraint("(scope = 'global' AND user_id IS NULL) OR "
                        "(scope = 'user' AND user_id IS NOT NULL)", name="scope"),
        # The database itself guarantees one active global model and one active model per user.
        Index("uq_model_versions_active_global", "scope", unique=True,
              sqlite_where=text("status = 'active' AND scope = 'global'"),
              postgresql_where=text("status = 'active' AND scope = 'global'")),
        Index("uq_model_versions_active_user", "user_id", unique=True,
              sqlite_where=text("status = 'active' AND scope = 'user'"),
              postgresql_where=text("status = 'active' AND scope = 'user'")),
    )

    version: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
    parent_version: Mapped[int | None] = mapped_column(ForeignKey("model_versions.version"))
    scope: Mapped[str] = mapped_column(String(10), default="global")
    user_id: Mapped[str | None] = mapped_column(String(128))
    labels: Mapped[list[str]]
    artifact_path: Mapped[str] = mapped_column(String(255))  # relative to the artifact root
    sha256: Mapped[str] = mapped_column(String(64))
    metrics: Mapped[dict[str, Any]] = mapped_column(default=dict)
    gate_report: Mapped[dict[str, Any] | None]
    status: Mapped[str] = mapped_column(String(10), default="candidate")
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    activated_at: Mapped[datetime | None]
    # What the learner carries from this version to the next round (EWC importances and anchor
    # weights, safetensors) beside the model file; None until a round computes it.
    state_path: Mapped[str | None] = mapped_column(String(255))
    state_sha256: Mapped[str | None] = mapped_column(String(64))


class ModelVersionCounter(Base):
    """A single row holding the last version number handed out. Registering locks it, so two
    registrations in flight get distinct numbers, and a deleted version never frees its number."""

    __tablename__ = "model_version_counter"
    __table_args__ = (CheckConstraint("id = 1", name="single_row"),)

    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
    last_version: Mapped[int]


class TrainingRun(Base):
    __tablename__ = "training_runs"

    id: Mapped[int] = mapped_column(primary_key=True)
    trigger: Mapped[str] = mapped_column(String(20))  # schedule, manual, ...
    scope: Mapped[str] = mapped_column(String(10), default="global",
                                       server_default=text("'global'"))
    user_id: Mapped[str | None] = mapped_column(String(128))  # a personal round's user
    started_at: Mapped[datetime] = mapped_column(default=utcnow)
    finished_at: Mapped[datetime | None]
    status: Mapped[str] = mapped_column(String(20), default="running")
    counts: Mapped[dict[str, Any]] = mapped_column(default=dict)
    gate_report: Mapped[dict[str, Any] | None]
    error: Mapped[str | None] = mapped_column(Text)
    candidate_version: Mapped[int | None] = mapped_column(ForeignKey("model_versions.version"))


class Prediction(Base):
    """Everything a later learning round needs: the clip, the model version, the probabilities."""

    __tablename__ = "predictions"

    id: Mapped[uuid.UUID] = mapped_column(Uuid, primary_key=True, default=uuid.uuid4)
    api_key_id: Mapped[int] = mapped_column(ForeignKey("api_keys.id"), index=True)  # the app
    user_id: Mapped[str | None] = mapped_column(String(128), index=True)
    clip_id: Mapped[int] = mapped_column(ForeignKey("clips.id"), index=True)
    model_version: Mapped[int] = mapped_column(ForeignKey("model_versions.version"))
    label: Mapped[str] = mapped_column(String(64))
    confidence: Mapped[float] = mapped_column(Float)
    probabilities: Mapped[dict[str, Any]]
    latency_ms: Mapped[float] = mapped_column(Float)
    personal: Mapped[bool] = mapped_column(Boolean, default=False, server_default=text("false"))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class Feedback(Base):
    """A label an app sent back for one of its predictions; a confirmation counts too. One
    correction per prediction counts, the latest: a new one supersedes the one before, which stays
    as history and is never read by the learner."""

    __tablename__ = "feedback"
    __table_args__ = (
        # The database itself guarantees one counting correction per prediction.
        Index("uq_feedback_counting", "prediction_id", unique=True,
              sqlite_where=text("superseded_at IS NULL"),
              postgresql_where=text("superseded_at IS NULL")),
    )

    id: Mapped[int] = mapped_column(primary_key=True)
    prediction_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("predictions.id"), index=True)
    api_key_id: Mapped[int] = mapped_column(ForeignKey("api_keys.id"))
    user_id: Mapped[str | None] = mapped_column(String(128), index=True)
    label: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    # NULL until a learning round uses it; counting NULLs here is how a round decides to start.
    consumed_by_run_id: Mapped[int | None] = mapped_column(ForeignKey("training_runs.id"),
                                                           index=True)
    # Set by the round that consumed it when it kept this one out of training to judge the
    # candidate; held-out feedback of accepted rounds joins every later round's gate set.
    held_out: Mapped[bool] = mapped_column(Boolean, default=False, server_default=text("false"))
    # Rounds the gate refused that tried this feedback and gave it back (learner.max_attempts).
    rejections: Mapped[int] = mapped_column(default=0, server_default=text("0"))
    # When a later correction of the same prediction replaced this one; NULL: this one counts.
    superseded_at: Mapped[datetime | None]


class IdempotentRequest(Base):
    """The first answer to a POST sent with an `Idempotency-Key` header, per caller (the hash of
    its Authorization header), so that a repeat within `api.idempotency_window_s` is answered
    the same without doing the work again. `status_code` is NULL while the first one runs."""

    __tablename__ = "idempotent_requests"
    __table_args__ = (UniqueConstraint("caller_hash", "key"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    caller_hash: Mapped[str] = mapped_column(String(64))
    key: Mapped[str] = mapped_column(String(255))
    method: Mapped[str] = mapped_column(String(10))
    path: Mapped[str] = mapped_column(String(255))
    body_sha256: Mapped[str | None] = mapped_column(String(64))  # JSON bodies only
    status_code: Mapped[int | None]
    content_type: Mapped[str | None] = mapped_column(String(100))
    response_body: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(default=utcnow, index=True)


class ReplayExemplar(Base):
    """One exemplar of a model version's class-balanced replay buffer: a feedback clip, or an
    entry of the base set shipped beside the default model (learner/default_model). A round
    restores the buffer of the version it starts from and stores its candidate's, so rolling
    back to a version brings its buffer back too."""

    __tablename__ = "replay_exemplars"
    __table_args__ = (
        CheckConstraint("(source = 'base' AND base_index IS NOT NULL AND clip_id IS NULL) OR "
                        "(source = 'feedback' AND clip_id IS NOT NULL "
                        "AND feedback_id IS NOT NULL)", name="source"),
    )

    id: Mapped[int] = mapped_column(primary_key=True)
    model_version: Mapped[int] = mapped_column(ForeignKey("model_versions.version"), index=True)
    clip_id: Mapped[int | None] = mapped_column(ForeignKey("clips.id"), index=True)
    feedback_id: Mapped[int | None] = mapped_column(ForeignKey("feedback.id"), index=True)
    base_index: Mapped[int | None]  # position in the shipped base replay set
    label: Mapped[str] = mapped_column(String(64))
    source: Mapped[str] = mapped_column(String(20))  # base, feedback
    # Reservoir-sampling priority: each class keeps its highest-weighted exemplars, so the
    # buffer stays a uniform sample of everything that class has seen, across rounds.
    weight: Mapped[float] = mapped_column(Float)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class AuditEntry(Base):
    __tablename__ = "audit_log"

    id: Mapped[int] = mapped_column(primary_key=True)
    # None when the CLI or the learner acted.
    actor_key_id: Mapped[int | None] = mapped_column(ForeignKey("api_keys.id"))
    action: Mapped[str] = mapped_column(String(50))
    target: Mapped[str] = mapped_column(String(100))
    details: Mapped[dict[str, Any]] = mapped_column(default=dict)
    created_at: Mapped[datetime] = mapped_column(default=utcnow, index=True)


class LearnerLock(Base):
    """A single row: which process is running a learning round, until when. Taking it is one
    conditional UPDATE, so any number of processes may run the scheduler."""

    __tablename__ = "learner_lock"
    __table_args__ = (CheckConstraint("id = 1", name="single_row"),)

    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
    holder: Mapped[str | None] = mapped_column(String(100))
    acquired_at: Mapped[datetime | None]
    expires_at: Mapped[datetime | None]


RECORDING_STATUSES = ("running", "done", "failed")


class Recording(Base):
    """A long recording's emotion over time (POST /v1/recordings): its windows and segments.

    A recording answered at once is inserted `done`; one that became a job is inserted
    `running` and updated with its progress (`updated_at` is its heartbeat) until `done` or
    `failed`. A failed job keeps only its error: no clip, no windows."""

    __tablename__ = "recordings"
    __table_args__ = (CheckConstraint("status IN ('running', 'done', 'failed')", name="status"),)

    id: Mapped[uuid.UUID] = mapped_column(Uuid, primary_key=True, default=uuid.uuid4)
    api_key_id: Mapped[int] = mapped_column(ForeignKey("api_keys.id"), index=True)  # the app
    user_id: Mapped[str | None] = mapped_column(String(128), index=True)
    clip_id: Mapped[int | None] = mapped_column(ForeignKey("clips.id"), index=True)
    model_version: Mapped[int | None] = mapped_column(ForeignKey("model_versions.version"))
    personal: Mapped[bool] = mapped_column(Boolean, default=False, server_default=text("false"))
    status: Mapped[str] = mapped_column(String(10))
    progress: Mapped[float] = mapped_column(Float, default=0.0)
    duration_s: Mapped[float | None] = mapped_column(Float)
    window_s: Mapped[float] = mapped_column(Float)
    hop_s: Mapped[float] = mapped_column(Float)
    windows: Mapped[list[Any] | None] = mapped_column(JSON)
    segments: Mapped[list[Any] | None] = mapped_column(JSON)
    error: Mapped[dict[str, Any] | None]  # {error, detail} of a failed job
    processing_ms: Mapped[float | None] = mapped_column(Float)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow)


class StreamToken(Base):
    """A live stream's ticket (POST /v1/streams): the socket presents it once, before it expires.
    Only its sha256 is stored, like an API key's."""

    __tablename__ = "stream_tokens"

    id: Mapped[int] = mapped_column(primary_key=True)
    token_hash: Mapped[str] = mapped_column(String(64), unique=True)
    api_key_id: Mapped[int] = mapped_column(ForeignKey("api_keys.id"), index=True)
    user_id: Mapped[str | None] = mapped_column(String(128))
    sample_rate: Mapped[int]
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    expires_at: Mapped[datetime]
    used_at: Mapped[datetime | None]


class ArtifactBlob(Base):
    """The database artifact store (storage.db_artifacts): one row per distinct content, named by
    its sha256, whose bytes are the `artifact_chunks` rows. Rows elsewhere refer to it by the
    same sha256 (`clips.sha256`, `model_versions.sha256`, `model_versions.state_sha256`)."""

    __tablename__ = "artifact_blobs"

    sha256: Mapped[str] = mapped_column(String(64), primary_key=True)
    size_bytes: Mapped[int] = mapped_column(BigInteger)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    # Refreshed whenever the same bytes are stored again: the sweep leaves young blobs alone.
    touched_at: Mapped[datetime] = mapped_column(default=utcnow, index=True)


class ArtifactChunk(Base):
    """A piece of a blob's bytes, so no single value is large and reads stream."""

    __tablename__ = "artifact_chunks"

    sha256: Mapped[str] = mapped_column(ForeignKey("artifact_blobs.sha256", ondelete="CASCADE"),
                                        primary_key=True)
    seq: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
    data: Mapped[bytes] = mapped_column(LargeBinary)
