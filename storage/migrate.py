"""Apply the Alembic migrations in `migrations/`: the only way the schema is made, in tests too.

`migrations/` sits beside this package in the repository (and in site-packages when installed),
so this works from any working directory and needs no alembic.ini.
"""
from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory

from storage.db import create_db_engine

MIGRATIONS_DIR = Path(__file__).resolve().parent.parent / "migrations"


def alembic_config() -> Config:
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    return config


def upgrade_to_head(database_url: str) -> str:
    """Bring the database to the newest schema; returns the revision it is at."""
    _run(database_url, lambda config: command.upgrade(config, "head"))
    return head_revision()


def upgrade_to(database_url: str, revision: str) -> None:
    """Bring the database to one revision (tests of a migration start from the one before)."""
    _run(database_url, lambda config: command.upgrade(config, revision))


def downgrade_to_base(database_url: str) -> None:
    """Undo every migration (drops all of emoloop's tables)."""
    _run(database_url, lambda config: command.downgrade(config, "base"))


def current_revision(database_url: str) -> str | None:
    """The revision the database is at; None for a database never migrated."""
    engine = create_db_engine(database_url)
    try:
        with engine.connect() as connection:
            return MigrationContext.configure(connection).get_current_revision()
    finally:
        engine.dispose()


def head_revision() -> str:
    return ScriptDirectory.from_config(alembic_config()).get_current_head()


def _run(database_url: str, alembic_command) -> None:
    engine = create_db_engine(database_url)
    try:
        # One transaction for the whole command: both databases have transactional DDL, so a
        # failed migration leaves the schema as it was.
        with engine.begin() as connection:
            config = alembic_config()
            config.attributes["connection"] = connection
            alembic_command(config)
    finally:
        engine.dispose()
