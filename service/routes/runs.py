"""Admin-only: start a learning round now, and read the rounds with their gate reports."""
from typing import Annotated

from fastapi import APIRouter, Depends, Path, Query, Request

from service.auth import AdminKey
from service.deps import ReadSessionDep, SessionDep
from service.errors import ERROR_RESPONSES, ApiError, ErrorBody, not_found
from service.scheduler import LearnerService
from service.schemas import RunListOut, RunOut, RunStartedOut
from storage.models import TrainingRun
from storage.repositories import AuditLog
from storage.runs import TrainingRunRepository

router = APIRouter(prefix="/v1/admin", tags=["learner"],
                   responses={**ERROR_RESPONSES, 409: {"model": ErrorBody}})


async def get_learner(request: Request) -> LearnerService:
    return request.app.state.learner


LearnerDep = Annotated[LearnerService, Depends(get_learner)]
RunIdPath = Annotated[int, Path(ge=1, le=2**31 - 1)]


@router.post("/learner/run", status_code=202, response_model=RunStartedOut)
def start_round(caller: AdminKey, learner: LearnerDep, session: SessionDep) -> RunStartedOut:
    """Start a round now, whatever `learner.min_new_feedback` says; it runs in the background.
    Follow it with GET /v1/admin/runs/{run_id}."""
    from learner.continual.rounds import RoundRunning

    try:
        run_id = learner.start_now(trigger="manual")
    except RoundRunning:
        raise ApiError(409, "round_running", "a learning round is running; one runs at a time "
                                             "(see GET /v1/admin/runs)") from None
    AuditLog(session).record("learner.run", f"training_run:{run_id}", actor_key_id=caller.key_id)
    session.commit()
    return RunStartedOut(run_id=run_id)


@router.get("/runs", response_model=RunListOut)
def list_runs(_: AdminKey, session: ReadSessionDep,
              limit: Annotated[int, Query(ge=1, le=1000)] = 50,
              offset: Annotated[int, Query(ge=0, le=2**31 - 1)] = 0) -> RunListOut:
    runs = TrainingRunRepository(session).list_recent(limit=limit, offset=offset)
    return RunListOut(runs=[run_out(run) for run in runs])


@router.get("/runs/{run_id}", response_model=RunOut)
def get_run(run_id: RunIdPath, _: AdminKey, session: ReadSessionDep) -> RunOut:
    run = TrainingRunRepository(session).get(run_id)
    if run is None:
        raise not_found(f"training run {run_id}")
    return run_out(run)


def run_out(run: TrainingRun) -> RunOut:
    return RunOut.model_validate(run, from_attributes=True)
