"""First-run set-up done once by the launching process: the bundled model as version 1, and the
first pair of API keys."""
import json

from sqlalchemy.orm import Session, sessionmaker

from learner.checkpoint import DEFAULT_MODEL_FILE, DEFAULT_MODEL_INFO
from storage.api_keys import ApiKeyRepository
from storage.artifacts import ArtifactStore
from storage.registry import ModelRegistry


class BundledModelMissing(RuntimeError):
    pass


def register_bundled_model(session_factory: sessionmaker[Session],
                           artifacts: ArtifactStore) -> int | None:
    """On an empty registry, register the bundled default model as the active version 1 and
    return 1; None when versions exist already (then the bundled file is not even read)."""
    with session_factory() as session:
        registry = ModelRegistry(session, artifacts)
        if registry.list_versions():
            return None
        if not DEFAULT_MODEL_FILE.is_file() or not DEFAULT_MODEL_INFO.is_file():
            raise BundledModelMissing(
                f"the model registry is empty and the bundled model {DEFAULT_MODEL_FILE} is "
                f"missing; train it with `make train`")
        info = json.loads(DEFAULT_MODEL_INFO.read_text())
        metrics = {k: info[k] for k in ("validation", "test", "parameters") if k in info}
        version = registry.bootstrap_default(DEFAULT_MODEL_FILE.read_bytes(), info["sha256"],
                                             labels=info["labels"], metrics=metrics)
        session.commit()
        return version.version if version else None


def create_first_keys(session_factory: sessionmaker[Session]) -> dict[str, str] | None:
    """When no key was ever created: one app key and one admin key, as {role: plaintext}, for
    printing once. None otherwise."""
    with session_factory() as session:
        keys = ApiKeyRepository(session).bootstrap()
        session.commit()
        return keys
