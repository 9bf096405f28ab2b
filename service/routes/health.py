"""Liveness, readiness and Prometheus metrics: no key needed."""
from fastapi import APIRouter, Response

from service.deps import EngineDep, StoreProbeDep
from service.errors import RETRY_AFTER_S, ErrorBody, error_response
from service.metrics import render_metrics
from service.schemas import HealthOut, ReadyOut

router = APIRouter(tags=["operations"])


@router.get("/health", response_model=HealthOut)
def health() -> HealthOut:
    """The process answers; the model may still be loading."""
    return HealthOut(status="ok")


@router.get("/ready", response_model=ReadyOut, response_model_exclude_none=True,
            responses={503: {"model": ErrorBody}})
def ready(engine: EngineDep, store: StoreProbeDep):
    """A model is loaded and warmed up, and writes can succeed: predictions and corrections are
    answered. 503 says why not (the model, the disk, the database) and turns back to 200 by
    itself once the cause is gone. A 200 names the version serving and, when that is not the
    registry's active version (its file would not load), why."""
    status = engine.status
    if status.version is None:
        return error_response(503, "not_ready", status.problem or "the model is still loading",
                              headers={"Retry-After": str(RETRY_AFTER_S)})
    problem = store.problem()
    if problem is not None:
        return error_response(503, "storage_unavailable", problem,
                              headers={"Retry-After": str(RETRY_AFTER_S)})
    return ReadyOut(status="ready", model_version=status.version,
                    active_version=status.active_version, detail=status.problem)


@router.get("/metrics", include_in_schema=False)
def metrics() -> Response:
    body, content_type = render_metrics()
    return Response(body, media_type=content_type)
