"""What personal models need from the store beyond the registry: a user's corrections as a
personal round reads them, which users are due for a round, and whether an app knows a user.

A personal version is a function of (global version it is built on, all of the user's
corrections): personal rounds never mark feedback consumed (that is the global learner's
bookkeeping), they record in their run's `counts` the newest feedback id and the global version
they saw, and a user is due again when either has moved on.

Like the other repositories it works in the caller's Session and never commits.
"""
from dataclasses import dataclass

from sqlalchemy import exists, func, select
from sqlalchemy.orm import Session

from storage.models import Feedback, Prediction, Recording, TrainingRun
from storage.runs import FeedbackItem, RoundFeedbackRepository

# A personal round in these states has looked at the user's data; "failed" ones (a crash, an
# interrupted process) are tried again.
FINISHED_RUN_STATUSES = ("accepted", "rejected", "skipped")


@dataclass(frozen=True)
class UserFeedbackSummary:
    user_id: str
    count: int  # corrected predictions (only the counting correction of each)
    last_feedback_id: int


class PersonalRepository:
    def __init__(self, session: Session):
        self.session = session

    def feedback_for_user(self, user_id: str) -> list[FeedbackItem]:
        """The user's corrections, oldest first: for each prediction, the one that counts (the
        latest). Only feedback whose `user_id` is this user: nobody else's ever trains it."""
        return RoundFeedbackRepository(self.session).items_where(Feedback.user_id == user_id)

    def summary(self, user_id: str) -> UserFeedbackSummary:
        row = self.session.execute(
            select(func.count(), func.max(Feedback.id))
            .where(Feedback.user_id == user_id, Feedback.superseded_at.is_(None))).one()
        return UserFeedbackSummary(user_id, int(row[0] or 0), int(row[1] or 0))

    def summaries(self, min_feedback: int) -> list[UserFeedbackSummary]:
        """Every user with at least `min_feedback` corrections, by user id."""
        count = func.count()
        query = (select(Feedback.user_id, count, func.max(Feedback.id))
                 .where(Feedback.user_id.is_not(None), Feedback.superseded_at.is_(None))
                 .group_by(Feedback.user_id)
                 .having(count >= min_feedback).order_by(Feedback.user_id))
        return [UserFeedbackSummary(u, int(n), int(last)) for u, n, last in
                self.session.execute(query)]

    def last_finished_runs(self, user_ids: list[str] | None = None) -> dict[str, TrainingRun]:
        """Each user's newest finished personal run."""
        newest = (select(func.max(TrainingRun.id))
                  .where(TrainingRun.scope == "user",
                         TrainingRun.status.in_(FINISHED_RUN_STATUSES))
                  .group_by(TrainingRun.user_id))
        query = select(TrainingRun).where(TrainingRun.id.in_(newest))
        if user_ids is not None:
            query = query.where(TrainingRun.user_id.in_(user_ids))
        return {run.user_id: run for run in self.session.scalars(query)}

    def due_users(self, min_feedback: int, global_version: int) -> list[UserFeedbackSummary]:
        """Users with enough corrections whose last finished personal round saw older feedback
        or another global version (or who never had one), oldest request first."""
        last = self.last_finished_runs()
        due = []
        for summary in self.summaries(min_feedback):
            run = last.get(summary.user_id)
            if run is None or not is_up_to_date(run, summary, global_version):
                due.append(summary)
        return sorted(due, key=lambda s: s.last_feedback_id)

    def app_knows_user(self, api_key_id: int, user_id: str) -> bool:
        """Whether this app has made a prediction, or sent a recording, for this user: what
        lets an app see or delete a user."""
        return bool(self.session.scalar(select(exists().where(
            Prediction.api_key_id == api_key_id, Prediction.user_id == user_id)))) or \
            bool(self.session.scalar(select(exists().where(
                Recording.api_key_id == api_key_id, Recording.user_id == user_id))))


def is_up_to_date(run: TrainingRun, summary: UserFeedbackSummary, global_version: int) -> bool:
    counts = run.counts or {}
    return (counts.get("last_feedback_id") == summary.last_feedback_id
            and counts.get("global_version") == global_version)
