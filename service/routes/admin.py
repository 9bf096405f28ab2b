"""Admin-only: activate any version (this is rollback), read the audit log."""
from typing import Annotated

from fastapi import APIRouter, Query

from service.auth import AdminKey
from service.deps import ArtifactsDep, EngineDep, ReadSessionDep, SessionDep
from service.engine import ModelLoadError
from service.errors import ERROR_RESPONSES, ApiError, not_found
from service.routes.models import VersionPath, model_version_out
from service.schemas import ActivationIn, AuditEntryOut, ModelVersionOut
from storage.registry import CannotActivate, ModelRegistry, VersionNotFound
from storage.repositories import AuditLog

router = APIRouter(prefix="/v1/admin", tags=["admin"],
                   responses={**ERROR_RESPONSES, 409: ERROR_RESPONSES[422]})


@router.post("/models/{version}/activate", response_model=ModelVersionOut)
def activate_model(version: VersionPath, caller: AdminKey, session: SessionDep, engine: EngineDep,
                   artifacts: ArtifactsDep, body: ActivationIn | None = None) -> ModelVersionOut:
    registry = ModelRegistry(session, artifacts)
    row = registry.get(version)
    session.commit()
    if row is None or row.scope != "global":
        raise not_found(f"model version {version}")
    # Load and verify first: a version whose file is corrupt is never recorded as active, and
    # the model serving now keeps serving.
    try:
        model = engine.load(version)
    except ModelLoadError as err:
        raise ApiError(409, "model_not_loadable", str(err)) from None
    try:
        row = registry.activate(version, actor_key_id=caller.key_id,
                                reason=body.reason if body else None)
    except VersionNotFound:
        raise not_found(f"model version {version}") from None
    except CannotActivate as err:
        raise ApiError(409, "cannot_activate", str(err)) from None
    session.commit()
    # This worker serves it at once; the others notice within api.model_poll_interval_s.
    engine.serve(model)
    return model_version_out(row)


@router.get("/audit", response_model=list[AuditEntryOut])
def list_audit(_: AdminKey, session: ReadSessionDep,
               limit: Annotated[int, Query(ge=1, le=1000)] = 100,
               offset: Annotated[int, Query(ge=0, le=2**31 - 1)] = 0) -> list[AuditEntryOut]:
    entries = AuditLog(session).list_recent(limit=limit, offset=offset)
    return [AuditEntryOut.model_validate(e, from_attributes=True) for e in entries]
