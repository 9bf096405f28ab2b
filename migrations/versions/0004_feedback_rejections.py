"""feedback.rejections: how many rounds the gate refused while training on (or judging with) this
feedback. A refused round gives its feedback back for the next round until learner.max_attempts;
the scheduler only counts feedback no round has tried.

Revision ID: 0004
Revises: 0003
Created: 2026-11-23
"""
import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("feedback") as batch:
        batch.add_column(sa.Column("rejections", sa.Integer(), nullable=False,
                                   server_default=sa.text("0")))


def downgrade() -> None:
    with op.batch_alter_table("feedback") as batch:
        batch.drop_column("rejections")
