"""One correction per prediction counts, and POSTs may carry an `Idempotency-Key`.

- feedback.superseded_at: set on a correction when a later one for the same prediction arrives.
  The latest correction counts (superseded_at NULL), the earlier ones stay as history; a partial
  unique index lets the database itself hold one counting correction per prediction. Existing
  rows: every correction but the newest of its prediction is marked superseded, at the time its
  successor arrived.
- idempotent_requests: the first answer to a POST sent with an `Idempotency-Key`, per caller, so
  that a repeat within the window gets the same answer instead of doing the work again.

Revision ID: 0005
Revises: 0004
Created: 2026-12-02
"""
import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("feedback") as batch:
        batch.add_column(sa.Column("superseded_at", sa.DateTime(timezone=True), nullable=True))
    op.execute("UPDATE feedback SET superseded_at = ("
               "SELECT MIN(later.created_at) FROM feedback later "
               "WHERE later.prediction_id = feedback.prediction_id AND later.id > feedback.id) "
               "WHERE EXISTS (SELECT 1 FROM feedback later "
               "WHERE later.prediction_id = feedback.prediction_id AND later.id > feedback.id)")
    op.create_index("uq_feedback_counting", "feedback", ["prediction_id"], unique=True,
                    sqlite_where=sa.text("superseded_at IS NULL"),
                    postgresql_where=sa.text("superseded_at IS NULL"))
    op.create_table(
        "idempotent_requests",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("caller_hash", sa.String(length=64), nullable=False),
        sa.Column("key", sa.String(length=255), nullable=False),
        sa.Column("method", sa.String(length=10), nullable=False),
        sa.Column("path", sa.String(length=255), nullable=False),
        sa.Column("body_sha256", sa.String(length=64), nullable=True),
        sa.Column("status_code", sa.Integer(), nullable=True),
        sa.Column("content_type", sa.String(length=100), nullable=True),
        sa.Column("response_body", sa.Text(), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_idempotent_requests")),
        sa.UniqueConstraint("caller_hash", "key", name=op.f("uq_idempotent_requests_caller_hash")),
    )
    op.create_index(op.f("ix_idempotent_requests_created_at"), "idempotent_requests",
                    ["created_at"])


def downgrade() -> None:
    op.drop_index(op.f("ix_idempotent_requests_created_at"), table_name="idempotent_requests")
    op.drop_table("idempotent_requests")
    op.drop_index("uq_feedback_counting", table_name="feedback")
    # The superseded corrections stay as rows; the old schema counts every row again.
    with op.batch_alter_table("feedback") as batch:
        batch.drop_column("superseded_at")
