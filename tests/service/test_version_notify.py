"""Two API instances that share only one real PostgreSQL (artifacts in the database, separate data
folders, polls too slow to matter): an activation on one and a rollback on the other are served
by both within a second, through LISTEN/NOTIFY."""
import time

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import text

from learner.labels import DEFAULT_LABELS
from service.app import create_app
from storage.artifacts import open_artifact_store
from storage.db import create_db_engine
from storage.files import sha256_bytes
from storage.registry import ModelRegistry
from storage.version_events import CHANNEL
from tests.service.conftest import bearer, predict, wait_ready

pytestmark = pytest.mark.postgres


@pytest.fixture
def database_backend() -> str:
    return "postgresql"  # LISTEN/NOTIFY is PostgreSQL's; SQLite processes poll


def node_settings(settings, folder):
    return settings.model_copy(update={
        "storage": settings.storage.model_copy(update={"data_dir": folder,
                                                       "artifacts": "database"}),
        "api": settings.api.model_copy(update={"model_poll_interval_s": 60.0})})


def served_within(client: TestClient, version: int, limit_s: float) -> float:
    """Seconds until the node serves `version`; fails past `limit_s`."""
    start = time.perf_counter()
    while (client.app.state.engine.serving.version != version
           and time.perf_counter() - start < limit_s):
        time.sleep(0.005)
    elapsed = time.perf_counter() - start
    assert client.app.state.engine.serving.version == version, f"not served after {elapsed:.2f} s"
    return elapsed


def test_activation_and_rollback_reach_the_other_node_within_a_second(
        settings, db, keys, random_model, wav_clip, tmp_path):
    a_settings, b_settings = (node_settings(settings, tmp_path / name) for name in ("a", "b"))
    engine = create_db_engine(settings.database.url)
    try:
        with db() as session:
            registry = ModelRegistry(session, open_artifact_store(a_settings, engine))
            registry.bootstrap_default(random_model, sha256_bytes(random_model),
                                       labels=list(DEFAULT_LABELS))
            other = random_model[:-4] + b"\x00\x00\x00\x00"
            registry.register(other, labels=list(DEFAULT_LABELS), parent_version=1)
            session.commit()
    finally:
        engine.dispose()

    with TestClient(create_app(a_settings)) as a, TestClient(create_app(b_settings)) as b:
        for node in (a, b):
            wait_ready(node)
            assert node.app.state.version_listener.listening.wait(5)
        assert a.post("/v1/admin/models/2/activate", headers=bearer(keys.admin),
                      json={"reason": "round passed"}).status_code == 200
        assert served_within(b, 2, limit_s=1.0) < 1.0
        assert predict(b, keys.app, wav_clip)["model_version"] == 2

        assert b.post("/v1/admin/models/1/activate", headers=bearer(keys.admin),
                      json={"reason": "rollback"}).status_code == 200
        assert served_within(a, 1, limit_s=1.0) < 1.0
        assert predict(a, keys.app, wav_clip)["model_version"] == 1


def test_a_listener_whose_connection_drops_reconnects_and_catches_up(
        settings, db, keys, random_model, tmp_path):
    node = node_settings(settings, tmp_path / "a")
    engine = create_db_engine(settings.database.url)
    try:
        store = open_artifact_store(node, engine)
        with db() as session:
            registry = ModelRegistry(session, store)
            registry.bootstrap_default(random_model, sha256_bytes(random_model),
                                       labels=list(DEFAULT_LABELS))
            registry.register(random_model[:-4] + b"\x00\x00\x00\x00",
                              labels=list(DEFAULT_LABELS), parent_version=1)
            session.commit()
        with TestClient(create_app(node)) as client:
            wait_ready(client)
            listener = client.app.state.version_listener
            assert listener.listening.wait(5)
            with db() as session:  # the server ends the listener's connection (a failover)
                session.execute(text("SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                                     "WHERE query = :listen"), {"listen": f"LISTEN {CHANNEL}"})
                session.commit()
            deadline = time.monotonic() + 5
            while listener.listening.is_set() and time.monotonic() < deadline:
                time.sleep(0.01)
            with db() as session:  # activated while the listener is away: the notice is lost
                ModelRegistry(session, store).activate(2, reason="during the failover")
                session.commit()
            assert listener.listening.wait(5)  # back: it re-reads the active version at once
            assert served_within(client, 2, limit_s=5.0) < 5.0  # not at the poll, 60 s away
    finally:
        engine.dispose()
