"""Version changes pushed to every process at once on PostgreSQL (LISTEN/NOTIFY).

The registry announces each activation (rollbacks included) and each deleted personal version
with `announce` in the transaction that makes the change, so the notice goes out when, and only
if, it commits. Each API process runs a `VersionListener` on its own connection and reacts
within milliseconds instead of at its next poll. Polling stays: it is the only way on SQLite,
and the fallback while a listener's connection is down (a reconnected listener catches up by
reacting once, since notices sent meanwhile are lost).
"""
import json
import logging
import threading
from collections.abc import Callable

import psycopg
from sqlalchemy import text
from sqlalchemy.engine import make_url
from sqlalchemy.orm import Session

log = logging.getLogger("emoloop.storage")

CHANNEL = "emoloop_model_versions"


def announce(session: Session, *, version: int, scope: str, user_id: str | None) -> None:
    """Queue a notice of this version change; PostgreSQL sends it at commit. No-op on SQLite."""
    if session.connection().dialect.name != "postgresql":
        return
    payload = json.dumps({"version": version, "scope": scope, "user_id": user_id})
    session.execute(text("SELECT pg_notify(:channel, :payload)"),
                    {"channel": CHANNEL, "payload": payload})


def listens(database_url: str) -> bool:
    return make_url(database_url).get_backend_name() == "postgresql"


class VersionListener:
    """A thread that LISTENs on its own connection and calls `on_change(notice)` for each version
    change (`notice` is the announced dict, or None after (re)connecting: something may have
    changed unseen). Reconnects after `retry_s` when the connection drops."""

    def __init__(self, database_url: str, on_change: Callable[[dict | None], None], *,
                 retry_s: float = 1.0):
        url = make_url(database_url).set(drivername="postgresql")
        self.conninfo = url.render_as_string(hide_password=False)
        self.on_change, self.retry_s = on_change, retry_s
        self.listening = threading.Event()  # set while LISTEN is in effect
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="version-listener", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                with psycopg.connect(self.conninfo, autocommit=True, connect_timeout=5) as conn:
                    conn.execute(f"LISTEN {CHANNEL}")
                    self.listening.set()
                    self._react(None)
                    while not self._stop.is_set():
                        for notice in conn.notifies(timeout=0.25):
                            self._react(_parse(notice.payload))
            except psycopg.Error as err:
                if not self._stop.is_set():
                    log.warning("version listener lost its connection (%s); polling until it "
                                "is back", err)
            finally:
                self.listening.clear()
            self._stop.wait(self.retry_s)

    def _react(self, notice: dict | None) -> None:
        try:
            self.on_change(notice)
        except Exception:  # a failed load is the engine's to log; keep listening
            log.exception("could not act on a version change %s", notice)


def _parse(payload: str) -> dict | None:
    try:
        notice = json.loads(payload)
        return notice if isinstance(notice, dict) else None
    except ValueError:
        return None
