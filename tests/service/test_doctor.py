"""`emoloop doctor` and the start-up check, on SQLite and PostgreSQL: a sound store passes with
exit 0; a corrupt database page, a database behind the migrations, a damaged active model or
replay clip and a disk below its floor each fail with a line saying what, and exit 1; a round
whose process was killed is marked failed at once, not when its lease runs out."""
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
from sqlalchemy import select
from sqlalchemy.engine import make_url

from storage.api_keys import ApiKeyRepository
from storage.db import create_db_engine, make_session_factory
from storage.migrate import head_revision, upgrade_to
from storage.models import LearnerLock, ReplayExemplar, TrainingRun
from storage.registry import ModelRegistry
from storage.repositories import ClipRepository, FeedbackRepository, PredictionRepository
from storage.runs import LearnerLockRepository, TrainingRunRepository

EMOLOOP = str(Path(sys.executable).with_name("emoloop"))


@pytest.fixture
def env(settings) -> dict[str, str]:
    return {**os.environ, "EMOLOOP_DATABASE_URL": settings.database.url,
            "EMOLOOP_DATA_DIR": str(settings.storage.data_dir),
            "EMOLOOP_STORAGE__MIN_FREE_BYTES": "1048576", "EMOLOOP_LEARNER__ENABLED": "false"}


def doctor(env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run([EMOLOOP, "doctor"], env=env, capture_output=True, text=True,
                          timeout=120)


def _replay_clip(db, artifacts) -> str:
    """A clip a replay buffer of version 1 refers to; returns its relative path."""
    sha256, path = artifacts.put_clip(b"RIFF a replayed clip", ".wav")
    with db() as session:
        key, _ = ApiKeyRepository(session).create("app", "app")
        clip_id = ClipRepository(session).store(sha256=sha256, duration_s=1.0, sample_rate=16_000,
                                                artifact_path=path, size_bytes=20)
        prediction = PredictionRepository(session).create(
            api_key_id=key.id, clip_id=clip_id, model_version=1, label="sad", confidence=0.5,
            probabilities={}, latency_ms=1.0)
        feedback = FeedbackRepository(session).add_for_app(prediction.id, key.id, "happy")
        session.add(ReplayExemplar(model_version=1, clip_id=clip_id,
                                   feedback_id=feedback.feedback_id, label="happy",
                                   source="feedback", weight=1.0))
        session.commit()
    return path


def test_a_sound_store_passes(env, seeded, db, artifacts):
    _replay_clip(db, artifacts)
    result = doctor(env)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "2 file(s) match their sha256" in result.stdout  # the active model, the replay clip
    assert result.stdout.strip().endswith("no problems found")


def test_damaged_artifacts_and_a_low_disk_are_each_named(env, seeded, db, artifacts):
    clip = _replay_clip(db, artifacts)
    with db() as session:
        model = ModelRegistry(session, artifacts).get(1).artifact_path
    artifacts.path(model).write_bytes(b"damaged")
    artifacts.path(clip).unlink()
    result = doctor({**env, "EMOLOOP_STORAGE__MIN_FREE_BYTES": str(2**62)})
    assert result.returncode == 1
    lines = [line for line in result.stdout.splitlines() if "FAIL" in line]
    assert len(lines) == 3, result.stdout
    assert "active version 1" in lines[0] and "is corrupt" in lines[0]
    assert "replay clip" in lines[1] and "cannot read" in lines[1]
    assert "disk" in lines[2] and "below the floor" in lines[2]
    assert result.stdout.strip().endswith("3 problem(s) found")


def test_a_database_behind_the_migrations_fails(empty_database_url, tmp_path):
    upgrade_to(empty_database_url, "0004")
    result = doctor({**os.environ, "EMOLOOP_DATABASE_URL": empty_database_url,
                     "EMOLOOP_DATA_DIR": str(tmp_path / "data")})
    assert result.returncode == 1
    assert f"at revision 0004, not {head_revision()}" in result.stdout


@pytest.mark.parametrize("database_backend", ["sqlite"], indirect=True)
def test_a_corrupt_database_page_is_found_and_serve_refuses_to_start(env, settings, seeded,
                                                                     db):
    path = Path(make_url(settings.database.url).database)
    with sqlite3.connect(path) as connection:  # fold the write-ahead log into the file
        connection.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    data = bytearray(path.read_bytes())
    page = 4096
    assert len(data) > 8 * page
    for offset in range(2 * page, len(data), 2 * page):  # every other page's b-tree header
        data[offset:offset + 12] = b"\xff" * 12
    path.write_bytes(bytes(data))
    result = doctor(env)
    assert result.returncode == 1
    assert "FAIL  database" in result.stdout
    served = subprocess.run([EMOLOOP, "serve", "--port", "1"], env=env, capture_output=True,
                            text=True, timeout=120)
    assert served.returncode == 2 and "the database is damaged" in served.stderr


HOLD_LOCK = """
import sys, time
from learner.continual.rounds import new_holder
from storage.db import create_db_engine, make_session_factory
from storage.runs import LearnerLockRepository, TrainingRunRepository
with make_session_factory(create_db_engine(sys.argv[1]))() as session:
    assert LearnerLockRepository(session).acquire(new_holder(), ttl_s=600)
    TrainingRunRepository(session).start("manual")
    session.commit()
print("holding", flush=True)
time.sleep(600)
"""


def test_a_killed_rounds_lock_is_freed_at_once(database_url):
    holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, database_url],
                              stdout=subprocess.PIPE, text=True,
                              env={**os.environ, "PYTHONPATH": os.getcwd()})
    try:
        assert holder.stdout.readline().strip() == "holding"
    finally:
        os.kill(holder.pid, signal.SIGKILL)
        holder.wait(30)
    engine = create_db_engine(database_url)
    sessions = make_session_factory(engine)
    try:
        with sessions() as session:  # its lease has ten minutes to run; its process is gone
            lock = session.get(LearnerLock, 1)
            assert f":{holder.pid}:" in lock.holder
            assert session.scalars(select(TrainingRun.status)).all() == ["running"]
        started = time.monotonic()
        with sessions() as session:
            assert LearnerLockRepository(session).acquire("me:1:a", ttl_s=60)
            assert TrainingRunRepository(session).fail_interrupted() == 1
            session.commit()
        assert time.monotonic() - started < 5
    finally:
        engine.dispose()


def test_doctor_marks_a_killed_round_failed(database_url, env):
    holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, database_url],
                              stdout=subprocess.PIPE, text=True,
                              env={**os.environ, "PYTHONPATH": os.getcwd()})
    try:
        assert holder.stdout.readline().strip() == "holding"
    finally:
        os.kill(holder.pid, signal.SIGKILL)
        holder.wait(30)
    result = doctor(env)
    assert f":{holder.pid}:" in result.stdout and "marked failed" in result.stdout
    engine = create_db_engine(database_url)
    with make_session_factory(engine)() as session:
        assert session.scalars(select(TrainingRun.status)).all() == ["failed"]
        assert session.get(LearnerLock, 1).holder is None
    engine.dispose()
