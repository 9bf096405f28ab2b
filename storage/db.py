"""Engines and sessions for SQLite (the embedded default) and PostgreSQL (the scale-out store)."""
from pathlib import Path

from sqlalchemy import ARRAY, Engine, any_, create_engine, event, literal
from sqlalchemy.engine import make_url
from sqlalchemy.orm import Session, sessionmaker


def normalize_url(url: str) -> str:
    """`postgresql://` means psycopg2 to SQLAlchemy; emoloop ships psycopg 3, so say so."""
    parsed = make_url(url)
    if parsed.drivername in ("postgresql", "postgres"):
        parsed = parsed.set(drivername="postgresql+psycopg")
    return parsed.render_as_string(hide_password=False)


def create_db_engine(url: str, *, busy_timeout_s: float = 10.0) -> Engine:
    """`busy_timeout_s`: how long a write waits for a lock another transaction holds (SQLite's
    busy timeout, PostgreSQL's lock_timeout) before it fails."""
    url = normalize_url(url)
    if make_url(url).get_backend_name() == "sqlite":
        return _sqlite_engine(url, busy_timeout_s)
    # pre-ping: a PostgreSQL restart should cost one reconnect, not one failed request.
    engine = create_engine(url, pool_pre_ping=True)

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection, _record) -> None:
        # SQLite's busy timeout, here: a write waiting on a lock gives up after it (and the API
        # answers 503) instead of hanging for as long as another session holds the lock.
        with dbapi_connection.cursor() as cursor:
            cursor.execute(f"SET lock_timeout = {int(busy_timeout_s * 1000)}")
        dbapi_connection.commit()

    return engine


def make_session_factory(engine: Engine) -> sessionmaker[Session]:
    # Rows stay readable after commit: routes commit, then build their response from them.
    return sessionmaker(engine, expire_on_commit=False)


def make_read_session_factory(engine: Engine) -> sessionmaker[Session]:
    """Sessions for reads only. On SQLite their transactions begin deferred, so they read a
    snapshot without queueing behind the writer (a write in one could fail with "database is
    locked" when it races a writer: do not write in them). On PostgreSQL they are ordinary."""
    return sessionmaker(engine.execution_options(emoloop_read_only=True),
                        expire_on_commit=False)


def _sqlite_engine(url: str, busy_timeout_s: float) -> Engine:
    database = make_url(url).database
    if database and database != ":memory:":
        Path(database).parent.mkdir(parents=True, exist_ok=True)
    engine = create_engine(url, connect_args={"check_same_thread": False})

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection, _record) -> None:
        # Let SQLAlchemy say when transactions begin (below) instead of the sqlite3 module, which
        # delays BEGIN until the first write and so breaks SAVEPOINT and read consistency.
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")  # readers never wait for the writer
        cursor.execute("PRAGMA foreign_keys=ON")  # off by default in SQLite
        cursor.execute(f"PRAGMA busy_timeout={int(busy_timeout_s * 1000)}")
        cursor.execute("PRAGMA synchronous=FULL")  # feedback is durable before the 2xx
        cursor.close()

    @event.listens_for(engine, "begin")
    def _on_begin(connection) -> None:
        if connection.get_execution_options().get("emoloop_read_only"):
            connection.exec_driver_sql("BEGIN")  # WAL: a reader never waits for the writer
            return
        # SQLite has one writer at a time. A deferred transaction that reads and then writes while
        # another writer commits fails at once with "database is locked" (its snapshot is stale,
        # so the busy timeout cannot help). Taking the write lock up front makes every
        # transaction wait its turn instead; they are short, so the queue is too.
        connection.exec_driver_sql("BEGIN IMMEDIATE")

    return engine


def one_of(session: Session, column, values: list):
    """`column IN (values)` for long lists: on PostgreSQL `= ANY(array)`, one parameter however
    many values (an IN list of thousands costs more to render and parse than to run)."""
    if session.get_bind().dialect.name == "postgresql":
        return column == any_(literal(list(values), ARRAY(column.type)))
    return column.in_(list(values))
