"""An app per test on a fresh migrated database (SQLite and PostgreSQL, from the shared
`database_url` fixture), serving a small random model registered as version 1, and three keys:
two apps and an admin."""
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from learner.checkpoint import model_bytes
from learner.labels import DEFAULT_LABELS
from learner.model import EmotionNet, ModelConfig
from service.app import create_app
from service.bench.clips import to_wav, voiced_clip
from storage.api_keys import ApiKeyRepository
from storage.artifacts import ArtifactStore, LocalArtifactStore
from storage.db import create_db_engine, make_session_factory
from storage.files import sha256_bytes
from storage.registry import ModelRegistry
from storage.settings import PersonalSettings, Settings
from tests.learner.toy_learning import (register_active, toy_base_sets,  # noqa: F401 (fixtures)
                                        toy_learner_settings, toy_model)


@dataclass(frozen=True)
class Keys:
    app: str
    other_app: str
    admin: str


@pytest.fixture(scope="session")
def random_model() -> bytes:
    """A model file with random weights: the service's behaviour does not depend on accuracy."""
    import torch

    torch.manual_seed(0)
    return model_bytes(EmotionNet(ModelConfig()), DEFAULT_LABELS)


@pytest.fixture(scope="session")
def wav_clip() -> bytes:
    return to_wav(voiced_clip(1.0, 16_000), 16_000)


@pytest.fixture
def settings(database_url, tmp_path) -> Settings:
    return Settings(database={"url": database_url}, storage={"data_dir": tmp_path / "data"},
                    api={"model_poll_interval_s": 0.2, "max_upload_bytes": 1024 * 1024,
                         "max_audio_seconds": 5.0})


@pytest.fixture
def db(settings):
    """A session factory on the test's database, for looking behind the API."""
    engine = create_db_engine(settings.database.url)
    yield make_session_factory(engine)
    engine.dispose()


@pytest.fixture
def artifacts(settings) -> ArtifactStore:
    return LocalArtifactStore(settings.storage.artifacts_dir)


@pytest.fixture
def keys(db) -> Keys:
    with db() as session:
        repo = ApiKeyRepository(session)
        made = Keys(app=repo.create("app", "app")[1], other_app=repo.create("other", "app")[1],
                    admin=repo.create("admin", "admin")[1])
        session.commit()
    return made


@pytest.fixture
def seeded(db, artifacts, random_model) -> int:
    """Version 1, the random model, active: the app never needs the bundled model."""
    with db() as session:
        version = ModelRegistry(session, artifacts).bootstrap_default(
            random_model, sha256_bytes(random_model), labels=list(DEFAULT_LABELS))
        session.commit()
    return version.version


@pytest.fixture
def app(settings, seeded, keys):
    return create_app(settings)


@pytest.fixture
def learning_app(settings, db, artifacts, keys, toy_model, toy_base_sets):
    """A factory of apps whose active version 1 is the toy model (tests/learner/toy_learning.py),
    with the toy learner settings; `learner` and `personal` override keys of either section."""
    register_active(db, artifacts, toy_model)

    def make(learner: dict | None = None, personal: dict | None = None):
        update = {"learner": toy_learner_settings(toy_base_sets, **(learner or {}))}
        if personal is not None:
            update["personal"] = PersonalSettings(**personal)
        return create_app(settings.model_copy(update=update))
    return make


@pytest.fixture
def client(app) -> TestClient:
    with TestClient(app) as client:
        wait_ready(client)
        yield client


@pytest.fixture
def make_client(settings, seeded, keys):
    """A factory of ready clients of apps whose `api` settings the test overrides."""
    clients = []

    def make(**api) -> TestClient:
        app = create_app(settings.model_copy(update={
            "api": settings.api.model_copy(update=api)}))
        client = TestClient(app).__enter__()
        clients.append(client)
        wait_ready(client)
        return client
    yield make
    for client in clients:
        client.__exit__(None, None, None)


def wait_ready(client: TestClient, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while client.get("/ready").status_code != 200:
        assert time.monotonic() < deadline, "the app did not become ready"
        time.sleep(0.02)


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def files_under(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file()) if root.exists() else []


def row_counts(db) -> dict[str, int]:
    from sqlalchemy import func, select

    from storage.models import AuditEntry, Clip, Feedback, Prediction, Recording

    with db() as session:
        return {model.__tablename__: session.scalar(select(func.count()).select_from(model))
                for model in (Clip, Prediction, Feedback, AuditEntry, Recording)}


def predict(client: TestClient, key: str, audio: bytes, **data) -> dict:
    response = client.post("/v1/predictions", files={"file": ("clip.wav", audio, "audio/wav")},
                           data=data, headers=bearer(key))
    assert response.status_code == 201, response.text
    return response.json()
