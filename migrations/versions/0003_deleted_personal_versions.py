"""A model version may be `deleted`: an admin removed a personal version's file, and its row stays
as the record the user's earlier predictions point to (it can never be activated again).

Revision ID: 0003
Revises: 0002
Created: 2026-11-22

SQLite cannot alter a CHECK constraint, so batch mode copies the table; the two partial unique
indexes (one active global version, one active version per user) are dropped first and made
again after, as batch mode would not carry their WHERE clauses over.
"""
import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None

OLD = "status IN ('candidate', 'active', 'rejected', 'retired')"
NEW = "status IN ('candidate', 'active', 'rejected', 'retired', 'deleted')"


def upgrade() -> None:
    _replace_status_check(NEW)


def downgrade() -> None:
    # Deleted versions have no file; the old schema has no word for them.
    op.execute("UPDATE model_versions SET status = 'retired' WHERE status = 'deleted'")
    _replace_status_check(OLD)


def _replace_status_check(condition: str) -> None:
    op.drop_index("uq_model_versions_active_user", table_name="model_versions")
    op.drop_index("uq_model_versions_active_global", table_name="model_versions")
    with op.batch_alter_table("model_versions") as batch:
        batch.drop_constraint(op.f("ck_model_versions_status"), type_="check")
        batch.create_check_constraint(op.f("ck_model_versions_status"), condition)
    op.create_index("uq_model_versions_active_global", "model_versions", ["scope"], unique=True,
                    sqlite_where=sa.text("status = 'active' AND scope = 'global'"),
                    postgresql_where=sa.text("status = 'active' AND scope = 'global'"))
    op.create_index("uq_model_versions_active_user", "model_versions", ["user_id"], unique=True,
                    sqlite_where=sa.text("status = 'active' AND scope = 'user'"),
                    postgresql_where=sa.text("status = 'active' AND scope = 'user'"))
