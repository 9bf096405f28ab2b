"""Database fixtures shared by the storage and service tests: every test gets a fresh database,
made by the real migrations, once on SQLite and once on a real PostgreSQL server.

PostgreSQL: `EMOLOOP_TEST_POSTGRES_URL` names a database to use (each test creates and drops its own
schema there, so its user needs CREATE on it); otherwise the tests start a throwaway cluster from
Debian's `postgresql` package on a free loopback port and remove it at the end. Without the
binaries the PostgreSQL variants skip, except under `CI=true`, where they fail: CI must test both
databases.
"""
import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy.engine import make_url

from service.bench.local_server import free_port, fresh_postgres_schema
from storage.db import create_db_engine, make_session_factory, normalize_url
from storage.migrate import upgrade_to_head


def pytest_configure(config) -> None:
    config.addinivalue_line("markers", "postgres: runs against a real PostgreSQL server")


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[str]:
    """The URL of a database on a PostgreSQL server; each test gets its own schema in it."""
    if os.environ.get("EMOLOOP_TEST_POSTGRES_URL"):
        yield normalize_url(os.environ["EMOLOOP_TEST_POSTGRES_URL"])
        return
    bindir = _postgres_bindir()
    if bindir is None:
        message = ("PostgreSQL binaries not found (apt-get install postgresql, or set "
                   "EMOLOOP_TEST_POSTGRES_URL)")
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)
    base = Path(tempfile.mkdtemp(prefix="emoloop-pg-"))
    # The server refuses to run as root; as root, run it as Debian's `postgres` user.
    as_postgres = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
    if as_postgres:
        shutil.chown(base, "postgres", "postgres")
    data = base / "data"
    try:
        _run(as_postgres + [str(bindir / "initdb"), "-D", str(data), "-U", "postgres",
                            "-A", "trust", "-E", "UTF8", "--no-locale", "--no-sync"])
        port = free_port()
        # Durability off: these databases live for one test run.
        options = (f"-c listen_addresses=127.0.0.1 -p {port} -k {base} -c fsync=off "
                   "-c synchronous_commit=off -c full_page_writes=off")
        _run(as_postgres + [str(bindir / "pg_ctl"), "-D", str(data), "-l", str(base / "log"),
                            "-o", options, "-w", "-t", "60", "start"], log=base / "log")
        yield f"postgresql+psycopg://postgres@127.0.0.1:{port}/postgres"
    finally:
        if (data / "postmaster.pid").exists():
            subprocess.run(as_postgres + [str(bindir / "pg_ctl"), "-D", str(data),
                                          "-m", "immediate", "-w", "stop"], capture_output=True)
        shutil.rmtree(base, ignore_errors=True)


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def database_backend(request) -> str:
    return request.param


@pytest.fixture
def empty_database_url(database_backend, request, tmp_path) -> Iterator[str]:
    """A new, empty database: a SQLite file in tmp_path, or a new schema on the PostgreSQL server
    (a schema is made and dropped in milliseconds; CREATE DATABASE takes most of a second)."""
    if database_backend == "sqlite":
        yield f"sqlite:///{tmp_path / 'emoloop.db'}"
        return
    with fresh_postgres_schema(request.getfixturevalue("postgres_server")) as url:
        yield url


@pytest.fixture(scope="session")
def migrated_sqlite_template(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("template") / "emoloop.db"
    upgrade_to_head(f"sqlite:///{path}")  # disposes its engine: the WAL is folded into the file
    return path


@pytest.fixture
def database_url(database_backend, empty_database_url, request) -> str:
    """A new database at the newest schema, made by the real migrations (for SQLite, a copy of
    a file they made at the start of the session)."""
    if database_backend == "sqlite":
        template = request.getfixturevalue("migrated_sqlite_template")
        shutil.copyfile(template, make_url(empty_database_url).database)
    else:
        upgrade_to_head(empty_database_url)
    return empty_database_url


@pytest.fixture
def session_factory(database_url):
    engine = create_db_engine(database_url)
    yield make_session_factory(engine)
    engine.dispose()


@pytest.fixture
def session(session_factory):
    with session_factory() as session:
        yield session


def _postgres_bindir() -> Path | None:
    found = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"),
                   key=lambda p: int(p.parent.parent.name) if p.parent.parent.name.isdigit() else 0)
    return found[-1].parent if found else None


def _run(command: list[str], log: Path | None = None) -> None:
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        server_log = log.read_text() if log is not None and log.exists() else ""
        pytest.fail(f"{' '.join(command)} failed:\n{result.stdout}{result.stderr}{server_log}")
