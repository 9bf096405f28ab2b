"""Can writes succeed right now? What /ready asks of the store besides the model.

Three checks, each cheap: the data dir's disk has at least `storage.min_free_bytes` free; a small
file can be written there and fsynced (a full or read-only disk fails here, whatever the floor);
and the database takes a write transaction within its busy timeout (SQLite: the write lock;
PostgreSQL: the locks an INSERT into the request tables takes, so a server that is away, read
only, or a table locked by another session all show).

The app runs `check` in the background every second (`watch`), so /ready only reads the last
answer and stays fast while a check waits out a lock; a request that meets a store failure says
so at once (`failed`), and the next check that passes clears it.
"""
import asyncio
import logging
import os
from pathlib import Path

from sqlalchemy import text
from sqlalchemy.exc import DBAPIError
from starlette.concurrency import run_in_threadpool

from storage.db import create_db_engine
from storage.failures import classify, free_space_problem

log = logging.getLogger("emoloop.service")

CHECK_EVERY_S = 1.0
_POSTGRES_WRITE_LOCKS = "LOCK TABLE clips, predictions, feedback IN ROW EXCLUSIVE MODE"


class StoreProbe:
    def __init__(self, database_url: str, data_dir: Path, min_free_bytes: int, *,
                 busy_timeout_s: float):
        self.data_dir, self.min_free_bytes = Path(data_dir), min_free_bytes
        # Its own engine: no pool connection the requests wait for.
        self.db_engine = create_db_engine(database_url, busy_timeout_s=busy_timeout_s)
        self._problem: str | None = None

    def problem(self) -> str | None:
        """Why writes cannot succeed now (as last seen), or None when they can."""
        return self._problem

    def failed(self, reason: str) -> None:
        """A request just met a store failure: not ready until a check passes."""
        self._problem = reason

    def check(self) -> str | None:
        problem = (free_space_problem(self.data_dir, self.min_free_bytes)
                   or self._file_problem() or self._database_problem())
        if problem != self._problem:
            log.warning("store: %s", problem or "writable again")
        self._problem = problem
        return problem

    async def watch(self) -> None:
        """Check every CHECK_EVERY_S seconds, for as long as the app runs."""
        while True:
            try:
                await run_in_threadpool(self.check)
            except Exception:  # a check that breaks must not end the watch
                log.exception("the store check failed")
            await asyncio.sleep(CHECK_EVERY_S)

    def close(self) -> None:
        self.db_engine.dispose()

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
                # the locks an INSERT into the request tables takes, under lock_timeout.
                connection.execute(text(_POSTGRES_WRITE_LOCKS
                                        if connection.dialect.name == "postgresql"
                                        else "SELECT 1"))
                connection.rollback()
        except DBAPIError as err:
            failure = classify(err)
            return failure.reason if failure else f"the database cannot be reached: {err.orig}"
        return None
