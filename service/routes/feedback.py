"""POST /v1/predictions/{id}/feedback: the right label for a prediction (a confirmation too),
durable before the 201. One correction per prediction counts, the latest: a different label
replaces the one before (201, which says which it replaced); the same correction again changes
nothing (200, the same feedback id), so retries are safe."""
import uuid

from fastapi import APIRouter, Response
from sqlalchemy.orm import Session

from learner.labels import canonical_label, feedback_labels
from service.auth import CurrentKey
from service.deps import EngineDep, SettingsDep, WriterDep
from service.engine import InferenceEngine
from service.errors import ERROR_RESPONSES, ApiError, not_found
from service.metrics import FEEDBACK
from service.schemas import FeedbackIn, FeedbackOut
from storage.repositories import FeedbackRepository, RecordedFeedback
from storage.settings import Settings

router = APIRouter(prefix="/v1/predictions", tags=["feedback"], responses=ERROR_RESPONSES)


def checked_label(text: str, settings: Settings, engine: InferenceEngine) -> str:
    """The canonical label feedback names, if feedback may name it here; else a 422."""
    try:
        label = canonical_label(text)
    except ValueError as err:
        raise ApiError(422, "unknown_label", str(err)) from None
    serving = engine.serving
    allowed = feedback_labels(settings.learner.labels, settings.learner.allow_new_labels,
                              serving.predictor.labels if serving else None)
    if label not in allowed:
        raise ApiError(422, "unknown_label", f"feedback may not name {label!r} here; allowed: "
                                             f"{', '.join(allowed)}")
    return label


@router.post("/{prediction_id}/feedback", status_code=201, response_model=FeedbackOut,
             responses={200: {"model": FeedbackOut,
                              "description": "The counting correction already says this"}})
async def create_feedback(prediction_id: uuid.UUID, body: FeedbackIn, caller: CurrentKey,
                          writer: WriterDep, settings: SettingsDep, engine: EngineDep,
                          response: Response) -> FeedbackOut:
    label = checked_label(body.label, settings, engine)

    def insert(session: Session) -> RecordedFeedback | None:
        # Only the app that made the prediction may correct it; to others it does not exist.
        return FeedbackRepository(session).add_for_app(prediction_id, caller.key_id, label,
                                                       body.user_id)

    # Returns once committed: durable (SQLite synchronous=FULL) before we answer.
    written = await writer.write(insert)
    if written is None:
        raise not_found("prediction")
    if not written.created:
        response.status_code = 200  # a repeat: nothing new was stored
    else:
        FEEDBACK.labels(label, str(label == written.predicted).lower()).inc()
    return FeedbackOut(feedback_id=written.feedback_id, replaced_feedback_id=written.replaced_id)
