"""Alembic environment. `storage.migrate` passes an open connection in `config.attributes`; the
`alembic` command line (migrations/alembic.ini) connects to the database the settings name."""
from alembic import context

from storage.db import create_db_engine
from storage.models import Base
from storage.settings import get_settings

config = context.config
target_metadata = Base.metadata


def run_with(connection) -> None:
    # render_as_batch: SQLite cannot ALTER most things, so autogenerate writes batch operations
    # (copy the table, then swap) that run on PostgreSQL too.
    context.configure(connection=connection, target_metadata=target_metadata,
                      render_as_batch=True, compare_type=True)
    with context.begin_transaction():
        context.run_migrations()


def database_url() -> str:
    return config.get_main_option("sqlalchemy.url") or get_settings().database.url


if context.is_offline_mode():
    context.configure(url=database_url(), target_metadata=target_metadata, literal_binds=True)
    with context.begin_transaction():
        context.run_migrations()
elif config.attributes.get("connection") is not None:
    run_with(config.attributes["connection"])
else:
    engine = create_db_engine(database_url())
    with engine.connect() as connection:
        run_with(connection)
        connection.commit()
    engine.dispose()
