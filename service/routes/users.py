"""Users: which model answers a user, their personal versions, and forgetting a user.

An app sees and may delete only users it has made predictions for; to it, any other user id
answers 404, exactly like one nobody ever sent. Admin keys see every user. User ids are one
namespace for the whole deployment: the same id from two apps is one person, with one personal
model (learner/personal/rounds.py, storage/forget.py).
"""
from typing import Annotated

from fastapi import APIRouter, Path, Request

from learner.checkpoint import ModelFileError
from service.auth import AdminKey, Caller, CurrentKey
from service.deps import ArtifactsDep, EngineDep, ReadSessionDep, SessionDep, SettingsDep
from service.errors import ERROR_RESPONSES, ApiError, ErrorBody, not_found
from service.routes.models import VersionPath
from service.schemas import (
    ActivationIn,
    PersonalVersionOut,
    RunStartedOut,
    UserForgottenOut,
    UserModelOut,
)
from storage.artifacts import ArtifactError, ArtifactRef
from storage.forget import delete_files, forget_user
from storage.models import ModelVersion
from storage.personal import PersonalRepository, is_up_to_date
from storage.registry import CannotActivate, ModelRegistry
from storage.repositories import AuditLog
from storage.settings import Settings

router = APIRouter(prefix="/v1", tags=["users"],
                   responses={**ERROR_RESPONSES, 409: {"model": ErrorBody}})
UserIdPath = Annotated[str, Path(min_length=1, max_length=128, pattern=r"^[^\x00-\x1f\x7f]+$",
                                 description="The app's id for the user")]


@router.get("/users/{user_id}/model", response_model=UserModelOut)
def get_user_model(user_id: UserIdPath, caller: CurrentKey, session: ReadSessionDep,
                   artifacts: ArtifactsDep, settings: SettingsDep) -> UserModelOut:
    repository = PersonalRepository(session)
    _check_visible(repository, caller, user_id)
    registry = ModelRegistry(session, artifacts)
    active = registry.active_for_user(user_id)
    summary = repository.summary(user_id)
    status = _status(settings, repository, registry, active, summary)
    return UserModelOut(user_id=user_id, personal=active is not None and settings.personal.enabled,
                        version=active.version if active else None,
                        built_on_version=active.parent_version if active else None,
                        feedback_count=summary.count, min_feedback=settings.personal.min_feedback,
                        status=status)


@router.delete("/users/{user_id}", response_model=UserForgottenOut)
def forget(user_id: UserIdPath, caller: CurrentKey, session: SessionDep, artifacts: ArtifactsDep,
           engine: EngineDep) -> UserForgottenOut:
    """Forget a user: their clips (unless another user sent the same bytes), predictions,
    feedback, replay exemplars, personal versions and personal rounds. Audited."""
    _check_visible(PersonalRepository(session), caller, user_id)
    report = forget_user(session, user_id, actor_key_id=caller.key_id,
                         reason=f"DELETE /v1/users by {caller.role} key {caller.name!r}")
    session.commit()
    delete_files(artifacts, report.files)
    engine.personal.forget(user_id)  # this process at once; the others within their poll
    return UserForgottenOut(user_id=user_id, deleted=report.counts)


@router.get("/admin/users/{user_id}/models", response_model=list[PersonalVersionOut],
            tags=["admin"])
def list_personal_versions(user_id: UserIdPath, _: AdminKey, session: ReadSessionDep,
                           artifacts: ArtifactsDep) -> list[PersonalVersionOut]:
    """The user's personal versions, oldest first, with their gate reports."""
    versions = ModelRegistry(session, artifacts).list_versions(scope="user", user_id=user_id)
    return [_version_out(v) for v in versions]


@router.post("/admin/users/{user_id}/models/{version}/activate",
             response_model=PersonalVersionOut, tags=["admin"])
def activate_personal_version(user_id: UserIdPath, version: VersionPath, caller: AdminKey,
                              session: SessionDep, artifacts: ArtifactsDep, engine: EngineDep,
                              body: ActivationIn | None = None) -> PersonalVersionOut:
    """Serve an earlier personal version to this user again (rollback)."""
    registry = ModelRegistry(session, artifacts)
    row = _personal_version(registry, user_id, version)
    try:
        row = registry.activate(version, actor_key_id=caller.key_id,
                                reason=body.reason if body else None)
        _check_loads(registry, row)  # before the commit: a broken file is never recorded active
    except CannotActivate as err:
        raise ApiError(409, "cannot_activate", str(err)) from None
    except (ArtifactError, ModelFileError) as err:
        raise ApiError(409, "model_not_loadable", str(err)) from None
    session.commit()
    engine.personal.forget(user_id)
    return _version_out(row)


@router.delete("/admin/users/{user_id}/models/{version}", response_model=PersonalVersionOut,
               tags=["admin"])
def delete_personal_version(user_id: UserIdPath, version: VersionPath, caller: AdminKey,
                            session: SessionDep, artifacts: ArtifactsDep,
                            engine: EngineDep) -> PersonalVersionOut:
    """Delete one personal version: its file goes, its row stays as `deleted` (the user's
    earlier predictions name it). If it was active, the user gets the global model until an
    admin activates another version or a later round builds a new one."""
    registry = ModelRegistry(session, artifacts)
    row = _personal_version(registry, user_id, version)
    row = registry.delete_personal(row.version, actor_key_id=caller.key_id)
    session.commit()
    delete_files(artifacts, [ArtifactRef(row.artifact_path, row.sha256)])
    engine.personal.forget(user_id)
    return _version_out(row)


@router.post("/admin/users/{user_id}/rounds", status_code=202, response_model=RunStartedOut,
             tags=["admin"])
def start_personal_round(user_id: UserIdPath, caller: AdminKey, request: Request,
                         session: SessionDep, settings: SettingsDep) -> RunStartedOut:
    """Run this user's personal round now, in the background; follow it with
    GET /v1/admin/runs/{run_id}."""
    from learner.continual.rounds import RoundRunning

    if not settings.personal.enabled:
        raise ApiError(409, "personal_disabled", "personal models are off (personal.enabled)")
    try:
        run_id = request.app.state.learner.start_personal_now(user_id)
    except RoundRunning:
        raise ApiError(409, "round_running", "a learning round is running; one runs at a time "
                                             "(see GET /v1/admin/runs)") from None
    AuditLog(session).record("learner.personal_run", f"training_run:{run_id}",
                             actor_key_id=caller.key_id)
    session.commit()
    return RunStartedOut(run_id=run_id)


def _check_visible(repository: PersonalRepository, caller: Caller, user_id: str) -> None:
    if caller.role != "admin" and not repository.app_knows_user(caller.key_id, user_id):
        raise not_found("user")


def _check_loads(registry: ModelRegistry, row: ModelVersion) -> None:
    """The file checks out and parses, and the global version it was built on is still there."""
    from learner.personal.model import personal_head_from_bytes

    head = personal_head_from_bytes(registry.artifacts.read_model(row.artifact_path, row.sha256),
                                    expected_sha256=row.sha256)
    parent = registry.get(head.parent_version)
    if parent is None or parent.sha256 != head.parent_sha256:
        raise ModelFileError(f"the global version {head.parent_version} it was built on is gone "
                             f"or changed")


def _personal_version(registry: ModelRegistry, user_id: str, version: int) -> ModelVersion:
    row = registry.get(version)
    if row is None or row.scope != "user" or row.user_id != user_id:
        raise not_found(f"personal model version {version} of this user")
    return row


def _status(settings: Settings, repository: PersonalRepository, registry: ModelRegistry,
            active: ModelVersion | None, summary) -> str:
    if not settings.personal.enabled:
        return "disabled"
    if active is not None:
        return "active"
    if summary.count < settings.personal.min_feedback:
        return "collecting"
    last = repository.last_finished_runs([summary.user_id]).get(summary.user_id)
    active_global = registry.active_global()
    if (last is not None and last.status == "rejected" and active_global is not None
            and is_up_to_date(last, summary, active_global.version)):
        return "rejected"
    return "due"


def _version_out(row: ModelVersion) -> PersonalVersionOut:
    return PersonalVersionOut(version=row.version, parent_version=row.parent_version,
                              status=row.status, labels=row.labels, sha256=row.sha256,
                              metrics=row.metrics, gate_report=row.gate_report,
                              created_at=row.created_at, activated_at=row.activated_at,
                              user_id=row.user_id)
