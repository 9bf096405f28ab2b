"""What the engine setup promises on both databases: integrity, UTC times, concurrent writers."""
import threading
import time
from datetime import datetime, timedelta, timezone

import pytest
from sqlalchemy import func, select, text
from sqlalchemy.exc import IntegrityError, StatementError

from storage.db import (create_db_engine, make_read_session_factory, make_session_factory,
                        normalize_url)
from storage.models import AuditEntry, Clip, Prediction


def test_foreign_keys_are_enforced(session, app_key, model_v1):
    # SQLite ignores foreign keys unless told otherwise on every connection.
    session.add(Prediction(api_key_id=app_key.id, clip_id=424242, model_version=1, label="sad",
                           confidence=0.9, probabilities={"sad": 0.9}, latency_ms=3.0))
    with pytest.raises(IntegrityError):
        session.flush()


def test_timestamps_come_back_timezone_aware_utc(session):
    written = datetime(2026, 5, 1, 14, 30, tzinfo=timezone(timedelta(hours=2)))
    session.add(AuditEntry(action="test", target="t", created_at=written))
    session.commit()
    session.expire_all()
    read = session.scalars(select(AuditEntry)).one().created_at
    assert read.utcoffset() == timedelta(0)
    assert read == written  # same instant, now expressed in UTC
    assert read.hour == 12


def test_naive_timestamps_are_refused(session):
    session.add(AuditEntry(action="test", target="t", created_at=datetime(2026, 5, 1, 12)))
    with pytest.raises(StatementError, match="naive datetime"):
        session.flush()


def test_concurrent_read_then_write_transactions_all_commit(session_factory):
    """Each thread reads, then writes, like a feedback request checking its prediction first.
    On SQLite this only works because transactions take the write lock at BEGIN."""
    barrier = threading.Barrier(6)
    errors = []

    def worker(n: int) -> None:
        try:
            with session_factory() as session:
                barrier.wait()
                for i in range(5):
                    session.scalar(select(func.count()).select_from(Clip))
                    session.add(Clip(sha256=f"{n:032d}{i:032d}", duration_s=1.0,
                                     sample_rate=16000, artifact_path="clips/x", size_bytes=1))
                    session.commit()
        except Exception as err:  # collected: an exception in a thread would otherwise vanish
            errors.append(err)

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    with session_factory() as session:
        assert session.scalar(select(func.count()).select_from(Clip)) == 30


def test_reads_do_not_wait_for_an_uncommitted_write(database_url):
    # A short busy timeout: if reads queued behind the writer, this would fail in 0.5 s.
    engine = create_db_engine(database_url, busy_timeout_s=0.5)
    try:
        with (make_session_factory(engine)() as writer,
              make_read_session_factory(engine)() as reader):
            # Connected first: what is timed is the read, not opening a connection (a new
            # PostgreSQL connection took 0.7 s on a busy machine).
            reader.connection()
            writer.add(AuditEntry(action="test", target="uncommitted"))
            writer.flush()  # holds the write lock until commit
            started = time.perf_counter()
            assert reader.scalar(select(func.count()).select_from(AuditEntry)) == 0
            assert time.perf_counter() - started < 0.4
            writer.commit()
            reader.rollback()  # a new transaction sees the commit
            assert reader.scalar(select(func.count()).select_from(AuditEntry)) == 1
    finally:
        engine.dispose()


def test_sqlite_runs_in_wal_mode_with_foreign_keys(tmp_path):
    engine = create_db_engine(f"sqlite:///{tmp_path / 'nested' / 'emoloop.db'}")
    with engine.connect() as connection:
        assert connection.execute(text("PRAGMA journal_mode")).scalar() == "wal"
        assert connection.execute(text("PRAGMA foreign_keys")).scalar() == 1
    engine.dispose()
    assert (tmp_path / "nested" / "emoloop.db").exists()  # the data dir is created on demand


def test_plain_postgresql_urls_use_psycopg_3():
    assert normalize_url("postgresql://u:p@localhost/db") == "postgresql+psycopg://u:p@localhost/db"
    assert normalize_url("sqlite:///x.db") == "sqlite:///x.db"
