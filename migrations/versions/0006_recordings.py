"""recordings: long recordings' emotion over time (POST /v1/recordings), and their jobs;
stream_tokens: single-use tickets for live streams (POST /v1/streams, WebSocket /v1/stream).

Revision ID: 0006
Revises: 0004
Created: 2026-12-02
"""
import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def timestamp(name: str) -> sa.Column:
    return sa.Column(name, sa.DateTime(timezone=True), nullable=False)


def upgrade() -> None:
    op.create_table(
        "recordings",
        sa.Column("id", sa.Uuid(), nullable=False),
        sa.Column("api_key_id", sa.Integer(), nullable=False),
        sa.Column("user_id", sa.String(128), nullable=True),
        sa.Column("clip_id", sa.Integer(), nullable=True),
        sa.Column("model_version", sa.Integer(), nullable=True),
        sa.Column("personal", sa.Boolean(), server_default=sa.text("false"), nullable=False),
        sa.Column("status", sa.String(10), nullable=False),
        sa.Column("progress", sa.Float(), nullable=False),
        sa.Column("duration_s", sa.Float(), nullable=True),
        sa.Column("window_s", sa.Float(), nullable=False),
        sa.Column("hop_s", sa.Float(), nullable=False),
        sa.Column("windows", sa.JSON(), nullable=True),
        sa.Column("segments", sa.JSON(), nullable=True),
        sa.Column("error", sa.JSON(), nullable=True),
        sa.Column("processing_ms", sa.Float(), nullable=True),
        timestamp("created_at"),
        timestamp("updated_at"),
        sa.CheckConstraint("status IN ('running', 'done', 'failed')",
                           name=op.f("ck_recordings_status")),
        sa.ForeignKeyConstraint(["api_key_id"], ["api_keys.id"],
                                name=op.f("fk_recordings_api_key_id_api_keys")),
        sa.ForeignKeyConstraint(["clip_id"], ["clips.id"], name=op.f("fk_recordings_clip_id_clips")),
        sa.ForeignKeyConstraint(["model_version"], ["model_versions.version"],
                                name=op.f("fk_recordings_model_version_model_versions")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_recordings")),
    )
    op.create_index(op.f("ix_recordings_api_key_id"), "recordings", ["api_key_id"])
    op.create_index(op.f("ix_recordings_user_id"), "recordings", ["user_id"])
    op.create_index(op.f("ix_recordings_clip_id"), "recordings", ["clip_id"])

    op.create_table(
        "stream_tokens",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("token_hash", sa.String(64), nullable=False),
        sa.Column("api_key_id", sa.Integer(), nullable=False),
        sa.Column("user_id", sa.String(128), nullable=True),
        sa.Column("sample_rate", sa.Integer(), nullable=False),
        timestamp("created_at"),
        timestamp("expires_at"),
        sa.Column("used_at", sa.DateTime(timezone=True), nullable=True),
        sa.ForeignKeyConstraint(["api_key_id"], ["api_keys.id"],
                                name=op.f("fk_stream_tokens_api_key_id_api_keys")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_stream_tokens")),
        sa.UniqueConstraint("token_hash", name=op.f("uq_stream_tokens_token_hash")),
    )
    op.create_index(op.f("ix_stream_tokens_api_key_id"), "stream_tokens", ["api_key_id"])


def downgrade() -> None:
    op.drop_table("stream_tokens")
    op.drop_table("recordings")
