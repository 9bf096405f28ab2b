"""Set-up done by the launching process: this release's bundled model in the registry (version 1
of a fresh install, or a candidate beside the versions of an existing store), and the first pair
of API keys."""
import logging

from sqlalchemy.orm import Session, sessionmaker

from learner.checkpoint import DEFAULT_MODEL_FILE, DEFAULT_MODEL_INFO, bundled_model_info
from storage.api_keys import ApiKeyRepository
from storage.artifacts import ArtifactStore
from storage.registry import ModelRegistry

log = logging.getLogger("emoloop.bootstrap")


class BundledModelMissing(RuntimeError):
    pass


def register_bundled_model(session_factory: sessionmaker[Session], artifacts: ArtifactStore, *,
                           beside_existing: bool = True) -> int | None:
    """Register this release's bundled default model, once; returns the number it registered, or
    None when it registered nothing.
    - On an empty registry: as the active version 1 (a fresh install serves it).
    - On a registry with versions, none of them this file (an upgrade brought a new default):
      as a global candidate beside them, with an audit entry. The active version keeps serving;
      an admin activates the new one (`emoloop models activate N`), nothing else does. Skipped
      with `beside_existing=False`, and when the bundled files are missing.
    The bundled model file is read only when it is registered."""
    with session_factory() as session:
        registry = ModelRegistry(session, artifacts)
        versions = registry.list_versions()
        if versions and not beside_existing:
            return None
        info = _bundled_info(required=not versions)
        if info is None or any(v.sha256 == info["sha256"] for v in versions):
            return None
        metrics = {k: info[k] for k in ("validation", "test", "parameters") if k in info}
        register = registry.register_bundled if versions else registry.bootstrap_default
        version = register(DEFAULT_MODEL_FILE.read_bytes(), info["sha256"],
                           labels=info["labels"], metrics=metrics)
        session.commit()
    if version is not None and version.status == "candidate":
        log.warning("the bundled default model of this release is registered as version %d, "
                    "beside the active one, which keeps serving: activate it with `emoloop "
                    "models activate %d` or POST /v1/admin/models/%d/activate",
                    version.version, version.version, version.version)
    return version.version if version else None


def _bundled_info(*, required: bool) -> dict | None:
    """The bundled model's model.json; None when the bundled files are missing and not
    `required`."""
    if DEFAULT_MODEL_FILE.is_file() and (info := bundled_model_info()) is not None:
        return info
    if required:
        raise BundledModelMissing(
            f"the model registry is empty and the bundled model {DEFAULT_MODEL_FILE} (or its "
            f"{DEFAULT_MODEL_INFO.name}) is missing or unreadable; train it with `make train`")
    return None


def create_first_keys(session_factory: sessionmaker[Session]) -> dict[str, str] | None:
    """When no key was ever created: one app key and one admin key, as {role: plaintext}, for
    printing once. None otherwise."""
    with session_factory() as session:
        keys = ApiKeyRepository(session).bootstrap()
        session.commit()
        return keys
