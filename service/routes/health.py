"""Liveness, readiness and Prometheus metrics: no key needed."""
from fastapi import APIRouter, Response

from service.deps import EngineDep
from service.errors import ErrorBody, error_response
from service.metrics import render_metrics
from service.schemas import HealthOut, ReadyOut

router = APIRouter(tags=["operations"])


@router.get("/health", response_model=HealthOut)
def health() -> HealthOut:
    """The process answers; the model may still be loading."""
    return HealthOut(status="ok")


@router.get("/ready", response_model=ReadyOut, responses={503: {"model": ErrorBody}})
def ready(engine: EngineDep):
    """A model is loaded and warmed up: predictions are answered at full speed."""
    serving = engine.serving
    if serving is None:
        return error_response(503, "not_ready", "the model is still loading")
    return ReadyOut(status="ready", model_version=serving.version)


@router.get("/metrics", include_in_schema=False)
def metrics() -> Response:
    body, content_type = render_metrics()
    return Response(body, media_type=content_type)
