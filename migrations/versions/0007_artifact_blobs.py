"""Storage past one machine, and bounded.

- artifact_blobs, artifact_chunks: the database artifact store (storage.db_artifacts), one row
  per distinct content named by its sha256, its bytes in pieces. Only used when
  `storage.artifacts: database`; the local folder stays the default.
- clips.removed_at: when retention (storage.retention) removed a clip's bytes.

Revision ID: 0007
Revises: 0004
Created: 2026-12-02
"""
import sqlalchemy as sa
from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "artifact_blobs",
        sa.Column("sha256", sa.String(64), nullable=False),
        sa.Column("size_bytes", sa.BigInteger(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("touched_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("sha256", name=op.f("pk_artifact_blobs")),
    )
    op.create_index(op.f("ix_artifact_blobs_touched_at"), "artifact_blobs", ["touched_at"])
    op.create_table(
        "artifact_chunks",
        sa.Column("sha256", sa.String(64), nullable=False),
        sa.Column("seq", sa.Integer(), nullable=False),
        sa.Column("data", sa.LargeBinary(), nullable=False),
        sa.ForeignKeyConstraint(["sha256"], ["artifact_blobs.sha256"], ondelete="CASCADE",
                                name=op.f("fk_artifact_chunks_sha256_artifact_blobs")),
        sa.PrimaryKeyConstraint("sha256", "seq", name=op.f("pk_artifact_chunks")),
    )
    with op.batch_alter_table("clips") as batch:
        batch.add_column(sa.Column("removed_at", sa.DateTime(timezone=True), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("clips") as batch:
        batch.drop_column("removed_at")
    op.drop_table("artifact_chunks")
    op.drop_index(op.f("ix_artifact_blobs_touched_at"), table_name="artifact_blobs")
    op.drop_table("artifact_blobs")
