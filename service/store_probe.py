"""Can writes succeed right now? What /ready asks of the store besides the model.

Three checks, each cheap: the data dir's disk has at least `storage.min_free_bytes` free; a small
file can be written there and fsynced (a full or read-only disk fails here, whatever the floor);
and the database takes a write transaction within a short timeout (SQLite: the write lock;
PostgreSQL: the locks an INSERT into the request tables takes, so a server that is away, read
only, or a table locked by another session all show). The answer is
kept for a second, so an orchestrator polling /ready often costs one probe a second.
"""
import os
import threading
import time
from pathlib import Path

from sqlalchemy import text
from sqlalchemy.exc import DBAPIError

from storage.db import create_db_engine
from storage.failures import classify, free_space_problem

PROBE_LOCK_TIMEOUT_S = 0.5  # /ready must answer quickly even while the database is locked
CACHE_S = 1.0
_POSTGRES_WRITE_LOCKS = "LOCK TABLE clips, predictions, feedback IN ROW EXCLUSIVE MODE"


class StoreProbe:
    def __init__(self, database_url: str, data_dir: Path, min_free_bytes: int):
        self.data_dir, self.min_free_bytes = Path(data_dir), min_free_bytes
        # Its own engine: a short lock timeout, and no pool connection the requests wait for.
        self.db_engine = create_db_engine(database_url, busy_timeout_s=PROBE_LOCK_TIMEOUT_S)
        self._lock = threading.Lock()
        self._checked_at, self._problem = float("-inf"), None

    def problem(self) -> str | None:
        """Why writes cannot succeed now, or None when they can."""
        with self._lock:
            if time.monotonic() - self._checked_at >= CACHE_S:
                self._problem = self._check()
                self._checked_at = time.monotonic()
            return self._problem

    def close(self) -> None:
        self.db_engine.dispose()

    def _check(self) -> str | None:
        return (free_space_problem(self.data_dir, self.min_free_bytes)
                or self._file_problem() or self._database_problem())

    def _file_problem(self) -> str | None:
        path = self.data_dir / f".ready-probe-{os.getpid()}"
        try:
            self.data_dir.mkdir(parents=True, exist_ok=True)
            with open(path, "wb") as f:
                f.write(b"\0" * 4096)
                f.flush()
                os.fsync(f.fileno())
        except OSError as err:
            failure = classify(err)
            return failure.reason if failure else f"the data dir cannot be written: {err}"
        finally:
            path.unlink(missing_ok=True)
        return None

    def _database_problem(self) -> str | None:
        try:
            with self.db_engine.connect() as connection:
                # SQLite: the transaction begins with BEGIN IMMEDIATE, the write lock. PostgreSQL:
                # the locks an INSERT takes on the tables requests write, under lock_timeout.
                connection.execute(text(_POSTGRES_WRITE_LOCKS
                                        if connection.dialect.name == "postgresql"
                                        else "SELECT 1"))
                connection.rollback()
        except DBAPIError as err:
            failure = classify(err)
            return failure.reason if failure else f"the database cannot be reached: {err.orig}"
        return None
