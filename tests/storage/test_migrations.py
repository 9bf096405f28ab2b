"""The migrations are the only way the schema is made: they must run on both databases, both ways,
and produce exactly the schema storage/models.py describes."""
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import inspect

from storage.db import create_db_engine
from storage.migrate import current_revision, downgrade_to_base, head_revision, upgrade_to_head
from storage.models import Base

TABLES = {"clips", "predictions", "feedback", "model_versions", "model_version_counter",
          "training_runs", "replay_exemplars", "api_keys", "audit_log", "learner_lock",
          "recordings", "stream_tokens"}


def test_upgrade_from_empty_makes_the_schema_the_models_describe(empty_database_url):
    assert current_revision(empty_database_url) is None
    assert upgrade_to_head(empty_database_url) == head_revision()
    assert current_revision(empty_database_url) == head_revision()
    engine = create_db_engine(empty_database_url)
    try:
        assert TABLES <= set(inspect(engine).get_table_names())
        with engine.connect() as connection:
            context = MigrationContext.configure(connection, opts={"compare_type": True})
            assert compare_metadata(context, Base.metadata) == []
    finally:
        engine.dispose()


def test_upgrading_an_up_to_date_database_changes_nothing(database_url):
    assert upgrade_to_head(database_url) == head_revision()


def test_downgrade_to_base_removes_every_table_and_upgrade_works_again(database_url):
    downgrade_to_base(database_url)
    assert current_revision(database_url) is None
    engine = create_db_engine(database_url)
    try:
        assert not TABLES & set(inspect(engine).get_table_names())
    finally:
        engine.dispose()
    assert upgrade_to_head(database_url) == head_revision()
