"""POST /v1/predictions/{id}/feedback: the right label for a prediction (a confirmation too),
durable before the 201."""
import uuid

from fastapi import APIRouter
from sqlalchemy.orm import Session

from learner.labels import canonical_label
from service.auth import CurrentKey
from service.deps import WriterDep
from service.errors import ERROR_RESPONSES, ApiError, not_found
from service.metrics import FEEDBACK
from service.schemas import FeedbackIn, FeedbackOut
from storage.models import Feedback
from storage.repositories import FeedbackRepository, PredictionRepository

router = APIRouter(prefix="/v1/predictions", tags=["feedback"], responses=ERROR_RESPONSES)


@router.post("/{prediction_id}/feedback", status_code=201, response_model=FeedbackOut)
async def create_feedback(prediction_id: uuid.UUID, body: FeedbackIn, caller: CurrentKey,
                          writer: WriterDep) -> FeedbackOut:
    try:
        label = canonical_label(body.label)
    except ValueError as err:
        raise ApiError(422, "unknown_label", str(err)) from None

    def insert(session: Session) -> tuple[Feedback, str] | None:
        # Only the app that made the prediction may correct it; to others it does not exist.
        prediction = PredictionRepository(session).get_for_app(prediction_id, caller.key_id)
        if prediction is None:
            return None
        return FeedbackRepository(session).add(prediction, label, body.user_id), prediction.label

    # Returns once committed: durable (SQLite synchronous=FULL) before we answer.
    written = await writer.write(insert)
    if written is None:
        raise not_found("prediction")
    feedback, predicted = written
    FEEDBACK.labels(label, str(label == predicted).lower()).inc()
    return FeedbackOut(feedback_id=feedback.id)
