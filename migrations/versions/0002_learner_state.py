"""What the learner carries between rounds, and which feedback judged which round.

Revision ID: 0002
Revises: 0001
Created: 2026-11-22

- replay_exemplars: rows now belong to a model version (each version has its own buffer, so a
  rollback restores its buffer too), may name an entry of the base set shipped beside the default
  model instead of a clip (clip_id nullable, base_index), keep the feedback that labelled them
  and their reservoir-sampling weight.
- feedback.held_out: kept out of training by the round that consumed it, to judge its candidate.
- model_versions.state_path/state_sha256: the EWC state file beside the model file.
- training_runs.scope/user_id: global rounds and personal rounds share one table.
"""
import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # No code wrote replay_exemplars before this revision, and rows without a model version
    # would have no meaning now; emptying it lets the new NOT NULL columns go in on both databases.
    op.execute("DELETE FROM replay_exemplars")
    with op.batch_alter_table("replay_exemplars") as batch:
        batch.alter_column("clip_id", existing_type=sa.Integer(), nullable=True)
        batch.add_column(sa.Column("model_version", sa.Integer(), nullable=False))
        batch.add_column(sa.Column("feedback_id", sa.Integer(), nullable=True))
        batch.add_column(sa.Column("base_index", sa.Integer(), nullable=True))
        batch.add_column(sa.Column("weight", sa.Float(), nullable=False))
        batch.create_foreign_key(op.f("fk_replay_exemplars_model_version_model_versions"),
                                 "model_versions", ["model_version"], ["version"])
        batch.create_foreign_key(op.f("fk_replay_exemplars_feedback_id_feedback"),
                                 "feedback", ["feedback_id"], ["id"])
        batch.create_index(op.f("ix_replay_exemplars_model_version"), ["model_version"])
        batch.create_index(op.f("ix_replay_exemplars_feedback_id"), ["feedback_id"])
        batch.create_check_constraint(
            op.f("ck_replay_exemplars_source"),
            "(source = 'base' AND base_index IS NOT NULL AND clip_id IS NULL) OR "
            "(source = 'feedback' AND clip_id IS NOT NULL AND feedback_id IS NOT NULL)")

    with op.batch_alter_table("feedback") as batch:
        batch.add_column(sa.Column("held_out", sa.Boolean(), server_default=sa.text("false"),
                                   nullable=False))

    with op.batch_alter_table("model_versions") as batch:
        batch.add_column(sa.Column("state_path", sa.String(255), nullable=True))
        batch.add_column(sa.Column("state_sha256", sa.String(64), nullable=True))

    with op.batch_alter_table("training_runs") as batch:
        batch.add_column(sa.Column("scope", sa.String(10), server_default=sa.text("'global'"),
                                   nullable=False))
        batch.add_column(sa.Column("user_id", sa.String(128), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("training_runs") as batch:
        batch.drop_column("user_id")
        batch.drop_column("scope")

    with op.batch_alter_table("model_versions") as batch:
        batch.drop_column("state_sha256")
        batch.drop_column("state_path")

    with op.batch_alter_table("feedback") as batch:
        batch.drop_column("held_out")

    # Base-set rows have no clip, which the old schema cannot hold.
    op.execute("DELETE FROM replay_exemplars")
    with op.batch_alter_table("replay_exemplars") as batch:
        batch.drop_constraint(op.f("ck_replay_exemplars_source"), type_="check")
        batch.drop_index(op.f("ix_replay_exemplars_feedback_id"))
        batch.drop_index(op.f("ix_replay_exemplars_model_version"))
        batch.drop_constraint(op.f("fk_replay_exemplars_feedback_id_feedback"),
                              type_="foreignkey")
        batch.drop_constraint(op.f("fk_replay_exemplars_model_version_model_versions"),
                              type_="foreignkey")
        batch.drop_column("weight")
        batch.drop_column("base_index")
        batch.drop_column("feedback_id")
        batch.drop_column("model_version")
        batch.alter_column("clip_id", existing_type=sa.Integer(), nullable=False)
