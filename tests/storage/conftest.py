import pytest

from storage.api_keys import ApiKeyRepository
from storage.artifacts import ArtifactStore, LocalArtifactStore
from storage.files import sha256_bytes
from storage.models import ApiKey, Clip, ModelVersion
from storage.registry import ModelRegistry
from storage.repositories import ClipRepository

LABELS = ["neutral", "happy", "sad", "angry"]


def fake_model(tag: str) -> bytes:
    """Stand-in model bytes: storage only moves and checks them, it never parses them."""
    return f"model {tag}".encode()


@pytest.fixture
def artifacts(tmp_path) -> ArtifactStore:
    return LocalArtifactStore(tmp_path / "artifacts")


@pytest.fixture
def app_key(session) -> ApiKey:
    key, _ = ApiKeyRepository(session).create("app one", "app")
    session.commit()
    return key


@pytest.fixture
def other_app_key(session) -> ApiKey:
    key, _ = ApiKeyRepository(session).create("app two", "app")
    session.commit()
    return key


@pytest.fixture
def model_v1(session, artifacts) -> ModelVersion:
    data = fake_model("default")
    version = ModelRegistry(session, artifacts).bootstrap_default(
        data, sha256_bytes(data), labels=LABELS, metrics={"macro_f1": 0.5})
    session.commit()
    return version


@pytest.fixture
def clip(session, artifacts) -> Clip:
    sha256, path = artifacts.put_clip(b"RIFF fake wav", ".wav")
    row = ClipRepository(session).get_or_create(sha256=sha256, duration_s=3.0, sample_rate=16000,
                                                artifact_path=path, size_bytes=13)
    session.commit()
    return row
