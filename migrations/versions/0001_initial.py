"""The initial schema: clips, predictions, feedback, model registry, runs, replay, keys, audit.

Revision ID: 0001
Revises:
Created: 2026-11-21

Written by hand to match storage/models.py (tests check that autogenerate finds no difference).
The same operations run on SQLite and PostgreSQL: portable types only (JSON, Uuid, timezone-aware
DateTime), and partial unique indexes, which both support, for "one active version per scope".
"""
import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def timestamp(name: str, nullable: bool = False) -> sa.Column:
    return sa.Column(name, sa.DateTime(timezone=True), nullable=nullable)


def upgrade() -> None:
    op.create_table(
        "api_keys",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("name", sa.String(100), nullable=False),
        sa.Column("role", sa.String(10), nullable=False),
        sa.Column("key_hash", sa.String(64), nullable=False),
        sa.Column("prefix", sa.String(16), nullable=False),
        timestamp("created_at"),
        timestamp("revoked_at", nullable=True),
        sa.CheckConstraint("role IN ('app', 'admin')", name=op.f("ck_api_keys_role")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_api_keys")),
        sa.UniqueConstraint("key_hash", name=op.f("uq_api_keys_key_hash")),
    )

    op.create_table(
        "clips",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("sha256", sa.String(64), nullable=False),
        sa.Column("duration_s", sa.Float(), nullable=False),
        sa.Column("sample_rate", sa.Integer(), nullable=False),
        sa.Column("artifact_path", sa.String(255), nullable=False),
        sa.Column("size_bytes", sa.Integer(), nullable=False),
        timestamp("created_at"),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_clips")),
        sa.UniqueConstraint("sha256", name=op.f("uq_clips_sha256")),
    )

    op.create_table(
        "model_versions",
        sa.Column("version", sa.Integer(), autoincrement=False, nullable=False),
        sa.Column("parent_version", sa.Integer(), nullable=True),
        sa.Column("scope", sa.String(10), nullable=False),
        sa.Column("user_id", sa.String(128), nullable=True),
        sa.Column("labels", sa.JSON(), nullable=False),
        sa.Column("artifact_path", sa.String(255), nullable=False),
        sa.Column("sha256", sa.String(64), nullable=False),
        sa.Column("metrics", sa.JSON(), nullable=False),
        sa.Column("gate_report", sa.JSON(), nullable=True),
        sa.Column("status", sa.String(10), nullable=False),
        timestamp("created_at"),
        timestamp("activated_at", nullable=True),
        sa.CheckConstraint("status IN ('candidate', 'active', 'rejected', 'retired')",
                           name=op.f("ck_model_versions_status")),
        sa.CheckConstraint("(scope = 'global' AND user_id IS NULL) OR "
                           "(scope = 'user' AND user_id IS NOT NULL)",
                           name=op.f("ck_model_versions_scope")),
        sa.ForeignKeyConstraint(["parent_version"], ["model_versions.version"],
                                name=op.f("fk_model_versions_parent_version_model_versions")),
        sa.PrimaryKeyConstraint("version", name=op.f("pk_model_versions")),
    )
    # At most one active global version, and at most one active version per user.
    op.create_index("uq_model_versions_active_global", "model_versions", ["scope"], unique=True,
                    sqlite_where=sa.text("status = 'active' AND scope = 'global'"),
                    postgresql_where=sa.text("status = 'active' AND scope = 'global'"))
    op.create_index("uq_model_versions_active_user", "model_versions", ["user_id"], unique=True,
                    sqlite_where=sa.text("status = 'active' AND scope = 'user'"),
                    postgresql_where=sa.text("status = 'active' AND scope = 'user'"))

    counter = op.create_table(
        "model_version_counter",
        sa.Column("id", sa.Integer(), autoincrement=False, nullable=False),
        sa.Column("last_version", sa.Integer(), nullable=False),
        sa.CheckConstraint("id = 1", name=op.f("ck_model_version_counter_single_row")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_model_version_counter")),
    )
    op.bulk_insert(counter, [{"id": 1, "last_version": 0}])

    op.create_table(
        "training_runs",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("trigger", sa.String(20), nullable=False),
        timestamp("started_at"),
        timestamp("finished_at", nullable=True),
        sa.Column("status", sa.String(20), nullable=False),
        sa.Column("counts", sa.JSON(), nullable=False),
        sa.Column("gate_report", sa.JSON(), nullable=True),
        sa.Column("error", sa.Text(), nullable=True),
        sa.Column("candidate_version", sa.Integer(), nullable=True),
        sa.ForeignKeyConstraint(["candidate_version"], ["model_versions.version"],
                                name=op.f("fk_training_runs_candidate_version_model_versions")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_training_runs")),
    )

    op.create_table(
        "predictions",
        sa.Column("id", sa.Uuid(), nullable=False),
        sa.Column("api_key_id", sa.Integer(), nullable=False),
        sa.Column("user_id", sa.String(128), nullable=True),
        sa.Column("clip_id", sa.Integer(), nullable=False),
        sa.Column("model_version", sa.Integer(), nullable=False),
        sa.Column("label", sa.String(64), nullable=False),
        sa.Column("confidence", sa.Float(), nullable=False),
        sa.Column("probabilities", sa.JSON(), nullable=False),
        sa.Column("latency_ms", sa.Float(), nullable=False),
        sa.Column("personal", sa.Boolean(), server_default=sa.text("false"), nullable=False),
        timestamp("created_at"),
        sa.ForeignKeyConstraint(["api_key_id"], ["api_keys.id"],
                                name=op.f("fk_predictions_api_key_id_api_keys")),
        sa.ForeignKeyConstraint(["clip_id"], ["clips.id"],
                                name=op.f("fk_predictions_clip_id_clips")),
        sa.ForeignKeyConstraint(["model_version"], ["model_versions.version"],
                                name=op.f("fk_predictions_model_version_model_versions")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_predictions")),
    )
    op.create_index(op.f("ix_predictions_api_key_id"), "predictions", ["api_key_id"])
    op.create_index(op.f("ix_predictions_user_id"), "predictions", ["user_id"])
    op.create_index(op.f("ix_predictions_clip_id"), "predictions", ["clip_id"])

    op.create_table(
        "feedback",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("prediction_id", sa.Uuid(), nullable=False),
        sa.Column("api_key_id", sa.Integer(), nullable=False),
        sa.Column("user_id", sa.String(128), nullable=True),
        sa.Column("label", sa.String(64), nullable=False),
        timestamp("created_at"),
        sa.Column("consumed_by_run_id", sa.Integer(), nullable=True),
        sa.ForeignKeyConstraint(["prediction_id"], ["predictions.id"],
                                name=op.f("fk_feedback_prediction_id_predictions")),
        sa.ForeignKeyConstraint(["api_key_id"], ["api_keys.id"],
                                name=op.f("fk_feedback_api_key_id_api_keys")),
        sa.ForeignKeyConstraint(["consumed_by_run_id"], ["training_runs.id"],
                                name=op.f("fk_feedback_consumed_by_run_id_training_runs")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_feedback")),
    )
    op.create_index(op.f("ix_feedback_prediction_id"), "feedback", ["prediction_id"])
    op.create_index(op.f("ix_feedback_user_id"), "feedback", ["user_id"])
    op.create_index(op.f("ix_feedback_consumed_by_run_id"), "feedback", ["consumed_by_run_id"])

    op.create_table(
        "replay_exemplars",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("clip_id", sa.Integer(), nullable=False),
        sa.Column("label", sa.String(64), nullable=False),
        sa.Column("source", sa.String(20), nullable=False),
        timestamp("created_at"),
        sa.ForeignKeyConstraint(["clip_id"], ["clips.id"],
                                name=op.f("fk_replay_exemplars_clip_id_clips")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_replay_exemplars")),
    )
    op.create_index(op.f("ix_replay_exemplars_clip_id"), "replay_exemplars", ["clip_id"])

    op.create_table(
        "audit_log",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("actor_key_id", sa.Integer(), nullable=True),
        sa.Column("action", sa.String(50), nullable=False),
        sa.Column("target", sa.String(100), nullable=False),
        sa.Column("details", sa.JSON(), nullable=False),
        timestamp("created_at"),
        sa.ForeignKeyConstraint(["actor_key_id"], ["api_keys.id"],
                                name=op.f("fk_audit_log_actor_key_id_api_keys")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_audit_log")),
    )
    op.create_index(op.f("ix_audit_log_created_at"), "audit_log", ["created_at"])

    lock = op.create_table(
        "learner_lock",
        sa.Column("id", sa.Integer(), autoincrement=False, nullable=False),
        sa.Column("holder", sa.String(100), nullable=True),
        timestamp("acquired_at", nullable=True),
        timestamp("expires_at", nullable=True),
        sa.CheckConstraint("id = 1", name=op.f("ck_learner_lock_single_row")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_learner_lock")),
    )
    op.bulk_insert(lock, [{"id": 1, "holder": None, "acquired_at": None, "expires_at": None}])


def downgrade() -> None:
    for table in ("learner_lock", "audit_log", "replay_exemplars", "feedback", "predictions",
                  "training_runs", "model_version_counter", "model_versions", "clips",
                  "api_keys"):
        op.drop_table(table)  # its indexes go with it
