"""The labels and the model versions, for any key."""
from typing import Annotated

from fastapi import APIRouter, Path

from learner.labels import feedback_labels
from service.auth import CurrentKey
from service.deps import ArtifactsDep, EngineDep, ReadSessionDep, SettingsDep
from service.errors import ERROR_RESPONSES, ApiError, not_found
from service.schemas import LabelsOut, ModelVersionOut
from storage.models import ModelVersion
from storage.registry import ModelRegistry

router = APIRouter(prefix="/v1", tags=["models"], responses=ERROR_RESPONSES)
# Bounded like the database's integer column, so a huge number is a 422, not a database error.
VersionPath = Annotated[int, Path(ge=1, le=2**31 - 1)]


@router.get("/labels", response_model=LabelsOut)
def list_labels(_: CurrentKey, engine: EngineDep, settings: SettingsDep) -> LabelsOut:
    serving = engine.serving
    if serving is None:
        raise ApiError(503, "not_ready", "the model is still loading; retry shortly")
    labels = list(serving.predictor.labels)
    return LabelsOut(model_version=serving.version, labels=labels,
                     feedback_labels=list(feedback_labels(settings.learner.labels,
                                                          settings.learner.allow_new_labels,
                                                          labels)))


@router.get("/models", response_model=list[ModelVersionOut])
def list_models(_: CurrentKey, session: ReadSessionDep,
                artifacts: ArtifactsDep) -> list[ModelVersionOut]:
    versions = ModelRegistry(session, artifacts).list_versions(scope="global")
    return [model_version_out(v) for v in versions]


@router.get("/models/{version}", response_model=ModelVersionOut)
def get_model(version: VersionPath, _: CurrentKey, session: ReadSessionDep,
              artifacts: ArtifactsDep) -> ModelVersionOut:
    row = ModelRegistry(session, artifacts).get(version)
    # Personal versions belong to one user; they are not listed to apps.
    if row is None or row.scope != "global":
        raise not_found(f"model version {version}")
    return model_version_out(row)


def model_version_out(row: ModelVersion) -> ModelVersionOut:
    return ModelVersionOut(version=row.version, parent_version=row.parent_version,
                           status=row.status, labels=row.labels, sha256=row.sha256,
                           metrics=row.metrics, gate_report=row.gate_report,
                           created_at=row.created_at, activated_at=row.activated_at)
